"""Small pieces shared by every training loop: padding, SFT steps, optimiser and schedule, the
accelerate runtime, logging, and checkpoints to resume from."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from sdzero.errors import Diverged, Refusal
from sdzero.losses import sft_loss


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def process_state():
    """accelerate's view of the processes: one in a plain run, those of `accelerate launch` / torchrun else
    (on a CPU machine only with cpu=True, as `make_accelerator` asks for it: otherwise accelerate sees one)."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def is_main_process() -> bool:
    """True in the one process of a plain run, and in process 0 under `accelerate launch` / torchrun."""
    return process_state().is_main_process


def wait_for_everyone() -> None:
    process_state().wait_for_everyone()


def is_fsdp2(model) -> bool:
    """Weights sharded with torch's FSDP2 (`fully_shard`): its parameters are DTensor shards."""
    return any(hasattr(p, "to_local") for p in model.parameters())


def full_weights(model) -> dict:
    """The full state dict of an FSDP2-sharded model, gathered into CPU memory on the main process (the
    others get an empty dict). Every process must call it: each contributes its shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def sharded_by_caller(accelerator, model) -> bool:
    """An FSDP2 model that accelerate did not shard: its caller did, with `fully_shard` (accelerate takes its
    own FSDP path only on GPU-like devices). accelerate must neither wrap it nor save it."""
    from accelerate.utils import DistributedType

    return is_fsdp2(model) and accelerator.distributed_type != DistributedType.FSDP


def prepare(accelerator, model, optimizer):
    """`accelerator.prepare(model, optimizer)`, except for a model its caller sharded: accelerate would wrap
    the shards in DDP, so the model and optimiser are used as they are (FSDP2 averages the gradients)."""
    if sharded_by_caller(accelerator, model):
        return model, optimizer
    return accelerator.prepare(model, optimizer)


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def pad_right(rows: list[list[int]], pad_value: int) -> torch.Tensor:
    width = max(map(len, rows))
    # one tensor built from padded lists: a per-row torch.tensor costs more than the padding itself
    return torch.tensor([list(row) + [pad_value] * (width - len(row)) for row in rows], dtype=torch.long)


def gather_positions(values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """values [B, L, D] at positions [B, T] -> [B, T, D]."""
    return values.gather(1, positions.unsqueeze(-1).expand(-1, -1, values.size(-1)))


def unwrap(model):
    """The model inside DDP / FSDP style wrappers (they keep it in `.module`)."""
    while hasattr(model, "module"):
        model = model.module
    return model


def logits_at(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Next-token logits at `positions` [B, T] only: [B, T, V], as `gather_positions(model(...).logits, positions)`.

    The vocabulary projection is the widest matmul of a forward pass and its output the largest tensor;
    the loss reads only a few of its rows. A pre-hook on the LM head gathers the hidden states at
    `positions` before the projection, so the model's own forward runs otherwise unchanged (peft and DDP
    wrappers, logit post-processing such as soft-capping). Where the head is not called as a module on
    [B, L, H] hidden states, the full logits are computed and gathered instead.
    """
    head = unwrap(model).get_output_embeddings()
    hooked = []

    def gather_hidden(_module, args):
        hidden = args[0]
        if hidden.dim() != 3 or hidden.shape[:2] != input_ids.shape:
            return None
        hooked.append(True)
        return (gather_positions(hidden, positions), *args[1:])

    handle = head.register_forward_pre_hook(gather_hidden) if head is not None else None
    try:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    finally:
        if handle is not None:
            handle.remove()
    return logits if hooked else gather_positions(logits, positions)


def sft_batch(examples: list[tuple[list[int], list[int]]], pad_id: int):
    """(context, target) pairs -> input ids, attention mask, and labels already shifted by one.

    Only target tokens carry a label, so the loss is NLL(target | context).
    """
    input_ids = pad_right([c + t for c, t in examples], pad_id)
    attention_mask = pad_right([[1] * (len(c) + len(t)) for c, t in examples], 0)
    labels = pad_right([[-100] * len(c) + t for c, t in examples], -100)
    return input_ids, attention_mask, labels[:, 1:]


def sft_step_loss(model, groups: list[list[tuple[list[int], list[int]]]], pad_id: int) -> list[torch.Tensor]:
    """For each group of (context, target) pairs, the mean NLL of its targets given their contexts.

    All groups go through one forward pass: distributed training wants one forward per backward.
    """
    device = model_device(model)
    input_ids, attention_mask, labels = sft_batch([e for group in groups for e in group], pad_id)
    logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits[:, :-1]
    labels = labels.to(device)
    losses, start = [], 0
    for group in groups:
        losses.append(sft_loss(logits[start:start + len(group)], labels[start:start + len(group)]))
        start += len(group)
    return losses


def make_optimizer(model, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def make_schedule(optimizer, *, warmup_steps: int, total_steps: int, kind: str = "cosine"):
    """Linear warm-up, then cosine decay to zero or a constant rate."""
    if kind not in ("cosine", "constant"):
        raise Refusal(f"unknown schedule {kind!r}; choose 'cosine' or 'constant'")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if kind == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class LogConfig:
    """Where training metrics go besides metrics.jsonl (always written)."""

    tensorboard: bool = True
    """TensorBoard event files in each stage's folder (`tensorboard --logdir RUN`)."""
    wandb: bool = False
    """Also log to Weights & Biases (needs `pip install 'sdzero[wandb]'` and a login)."""
    wandb_project: str = "sdzero"
    """Weights & Biases project name."""


def make_accelerator(out_dir: str | Path | None = None, log: LogConfig | None = None):
    """One accelerate runtime per training stage: devices and processes come from `accelerate launch`
    (or a single process on the GPU / CPU), trackers from `log`."""
    from accelerate import Accelerator

    trackers = []
    if out_dir is not None and log is not None:
        trackers += ["tensorboard"] if log.tensorboard else []
        if log.wandb:
            try:
                import wandb  # noqa: F401
            except ImportError:
                raise Refusal("log.wandb is on but wandb is not installed: pip install 'sdzero[wandb]'") from None
            trackers.append("wandb")
    # Mixed precision: what `accelerate launch` / `accelerate config` chose, else bf16 autocast on a GPU
    # that has it (fp32 weights, bf16 compute), else none.
    on_gpu = torch.cuda.is_available()
    mixed_precision = os.environ.get("ACCELERATE_MIXED_PRECISION") or (
        "bf16" if on_gpu and torch.cuda.is_bf16_supported() else "no")
    # The learning-rate schedule counts optimiser steps, whatever the number of processes.
    accelerator = Accelerator(cpu=not on_gpu, mixed_precision=mixed_precision, log_with=trackers or None,
                              project_dir=str(out_dir) if out_dir is not None else None,
                              step_scheduler_with_optimizer=False)
    if trackers:
        accelerator.init_trackers(log.wandb_project if log.wandb else "tensorboard")
    return accelerator


def finish_trackers(accelerator) -> None:
    """Flush and close a stage's trackers, keeping the process group for the stages that follow."""
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers = []


def check_finite(model, stage: str) -> None:
    """Stop before a stage hands on (or saves) weights that are NaN or inf."""
    bad = []
    for name, param in unwrap(model).named_parameters():
        local = param.detach().to_local() if hasattr(param, "to_local") else param.detach()  # FSDP2 shard
        if not torch.isfinite(local).all():
            bad.append(name)
    if bad:
        raise Diverged(f"{stage}: {len(bad)} weight tensors hold NaN or inf after training "
                                 f"(first: {bad[0]}); nothing was saved. {NAN_HINT}")


NAN_HINT = ("Likely causes: a learning rate too high for this model (try 10x lower), or half-precision weights "
            "(with dtype bfloat16, try dtype auto: fp32 weights under bf16 autocast)")


class MetricsLog:
    """Appends one JSON object per line to metrics.jsonl (and sends numbers to the accelerate trackers);
    stops the run on a NaN or inf loss. Only the main process writes."""

    def __init__(self, path: str | Path, accelerator=None):
        self.path = Path(path)
        self.accelerator = accelerator
        self.main = accelerator is None or accelerator.is_main_process
        if self.main:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        loss = record.get("loss")
        if loss is not None and not math.isfinite(loss):
            raise Diverged(f"loss is {loss} at {record.get('stage', 'training')} step {record.get('step')}. "
                                     f"{NAN_HINT}")
        if not self.main:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.accelerator is not None and self.accelerator.trackers:
            numbers = {key if "/" in key else f"{record.get('stage', 'train')}/{key}": value
                       for key, value in record.items()
                       if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step"}
            self.accelerator.log(numbers, step=record.get("step"))

    def drop_after(self, step: int) -> None:
        """Forget records written after `step` (a resumed run redoes those steps)."""
        if not self.main or not self.path.exists():
            return
        kept = [row for row in read_jsonl(self.path, repair=True) if row.get("step", 0) <= step]
        self.path.write_text("".join(json.dumps(row) + "\n" for row in kept))


def save_checkpoint(accelerator, folder: str | Path, state: dict, tensors: dict[str, dict] | None = None,
                    model=None, optimizer=None) -> None:
    """Everything a stage needs to resume: model, optimiser, scheduler and RNG states (accelerate), and
    `state` (step, data order, ...), and named state dicts in `tensors` (e.g. a synchronised teacher). Written
    beside the previous checkpoint, then swapped in, so a run killed while saving keeps the previous one.

    A `model` its caller sharded with FSDP2 (see `prepare`), and its `optimizer`, are not accelerate's to save:
    they go to a distributed checkpoint, each process writing its own shards."""
    folder = Path(folder)
    partial = folder.with_name(folder.name + ".partial")
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        (partial / "accelerate").mkdir(parents=True)  # before the other processes write their random states there
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial / "accelerate"))
    if model is not None and sharded_by_caller(accelerator, model):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optimizer_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=partial / "sharded")
    if accelerator.is_main_process:
        (partial / "state.json").write_text(json.dumps(state))
        for name, tensor_dict in (tensors or {}).items():
            torch.save(tensor_dict, partial / f"{name}.pt")
        old = folder.with_name(folder.name + ".old")
        if folder.exists():
            folder.rename(old)
        partial.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def load_checkpoint(accelerator, folder: str | Path, model=None, optimizer=None) -> dict | None:
    """Restore a checkpoint written by `save_checkpoint` into the prepared objects (and into the FSDP2 `model`
    and `optimizer` given to it); returns its state."""
    folder = Path(folder)
    if not (folder / "state.json").exists():
        old = folder.with_name(folder.name + ".old")  # killed between the two renames
        if not (old / "state.json").exists():
            return None
        folder = old
    accelerator.load_state(str(folder / "accelerate"))
    if model is not None and sharded_by_caller(accelerator, model):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        # get_state_dict gives an empty optimiser state to load into unless the optimiser has state, or it can
        # make some with a zero-gradient step, which it skips when any gradient is left from earlier training
        optimizer.zero_grad(set_to_none=True)
        model_state, optimizer_state = get_state_dict(model, optimizer)
        saved = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(saved, checkpoint_id=folder / "sharded")
        set_state_dict(model, optimizer, model_state_dict=saved["model"], optim_state_dict=saved["optimizer"])
    state = read_json(folder / "state.json")
    state["folder"] = str(folder)
    return state


def read_jsonl(path: str | Path, *, repair: bool = False) -> list[dict]:
    """Rows of a JSONL file; a bad line is an error naming the file and line.

    With `repair`, a last line cut short (a run killed while writing it) is dropped from the file.
    """
    path = Path(path)
    text = path.read_text()
    if repair and text and not text.endswith("\n"):
        text = text[:text.rfind("\n") + 1]
        path.write_text(text)
    rows = []
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise Refusal(f"{path}:{line_no}: not valid JSON ({err.msg})") from err
    return rows


def read_json(path: str | Path):
    """The JSON value in a file (a run's run.json or split.json, a stage's settings or summary); a broken file
    is a refusal naming it and the line."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise Refusal(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from err
    except json.JSONDecodeError as err:
        raise Refusal(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from err


SIGNAL_DIR = "SDZERO_TEST_SIGNAL_DIR"
"""Environment variable naming the folder where tests hold a run at a point to kill it there (see `reached`)."""


def reached(point: str) -> None:
    """The run has got to `point`: "collect-chunk-N" (N chunks of this command written), "srt-step-N",
    "phase2-step-N" (step N done and its checkpoint, when one is due, written).

    For the tests that kill a run at a known moment: where $SDZERO_TEST_SIGNAL_DIR/point is a FIFO (the test
    made it), the run waits here reading it until the test, which opens it once the run is there, kills the
    process (or closes it, and the run goes on). Otherwise nothing happens."""
    folder = os.environ.get(SIGNAL_DIR)
    if folder and (Path(folder) / point).is_fifo():
        (Path(folder) / point).read_bytes()
