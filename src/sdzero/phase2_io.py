"""Phase 2's records and weight copies: rollouts.jsonl, the checkpoint's extra state (progress, prompt order,
teacher, keep-best weights), and the CPU copies of the student's weights that keep-best sets aside."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from accelerate.utils import gather_object

from sdzero.errors import Refusal
from sdzero.phase2_rules import Progress
from sdzero.training import full_weights, is_fsdp2, load_checkpoint, save_checkpoint, unwrap

ROLLOUTS_FILE = "rollouts.jsonl"
TOP_POSITIONS = 5  # tokens of largest divergence named per rollout in rollouts.jsonl


class PromptOrder:
    """N2 walked in a fresh random order each epoch; every process draws the same order."""

    def __init__(self, n_problems: int, seed: int):
        self.n_problems = n_problems
        self.rng = random.Random(seed)
        self.queue: list[int] = []

    def next_batch(self, size: int) -> list[int]:
        batch = []
        while len(batch) < size:
            if not self.queue:
                self.queue = self.rng.sample(range(self.n_problems), self.n_problems)
            batch.append(self.queue.pop())
        return batch

    def state(self) -> dict:
        return {"queue": self.queue, "rng": list(self.rng.getstate())}

    def load(self, state: dict) -> None:
        self.queue = state["queue"]
        self.rng.setstate((state["rng"][0], tuple(state["rng"][1]), state["rng"][2]))


def save_phase2(accelerator, folder: Path, progress: Progress, order: PromptOrder, teacher, best_weights: dict | None,
                model, optimizer) -> None:
    """A checkpoint to resume Phase 2 from: state.json holds the progress and the prompt order; teacher.pt
    the refreshed teacher (none while it is the starting model), best.pt the keep-best weights."""
    state = {**progress.state(), **order.state()}
    tensors = {"teacher": teacher.state_dict()} if progress.teacher_version > 0 else {}
    if best_weights is not None:
        tensors["best"] = best_weights
    save_checkpoint(accelerator, folder, state, tensors, model=model, optimizer=optimizer)


def load_phase2(accelerator, folder: Path, order: PromptOrder, teacher, model, optimizer
                ) -> tuple[Progress, dict | None] | None:
    """Restore what `save_phase2` wrote (model and optimiser in place, the prompt order into `order`); returns
    the progress and the keep-best weights, or None without a checkpoint."""
    state = load_checkpoint(accelerator, folder, model, optimizer)
    if state is None:
        return None
    order.load(state)
    folder = Path(state["folder"])
    if state["teacher_version"] > 0:
        # read into CPU memory, copied onto the teacher's device (torch.load cannot map onto "cpu:0")
        teacher.model.load_state_dict(torch.load(folder / "teacher.pt", map_location="cpu"))
    best_weights = torch.load(folder / "best.pt") if (folder / "best.pt").exists() else None
    return Progress.from_state(state), best_weights


def divergence_summary(values: torch.Tensor) -> dict | None:
    """Mean and max of one rollout's per-token divergence, and the positions in y of its largest values
    (largest first); None for a rollout with no target token."""
    if not values.numel():
        return None
    top = torch.topk(values, min(TOP_POSITIONS, values.numel())).indices.tolist()
    return {"mean": values.mean().item(), "max": values.max().item(), "top_positions": top}


def rollout_rows(step: int, problems: list[dict], rollouts, tokenizer) -> list[dict]:
    """rollouts.jsonl's lines for one process's rollouts of a step; the largest-divergence tokens are also
    given as text, so a line reads on its own."""
    rows = []
    for problem, sample, reward, layout, summary in zip(problems, rollouts.samples, rollouts.rewards,
                                                        rollouts.layouts, rollouts.divergence):
        if summary is not None:
            summary = {**summary, "top_tokens": [tokenizer.decode([sample.ids[t]]) for t in summary["top_positions"]]}
        rows.append({"step": step, "id": problem.get("id"), "response": sample.text, "tokens": len(sample.ids),
                     "finished": sample.finished, "reward": reward,
                     "truncated": layout is not None and layout.truncated, "divergence": summary})
    return rows


def write_rollouts(path: Path, step: int, problems: list[dict], rollouts, tokenizer, accelerator) -> None:
    """Append the step's rollouts of every process to `path` (every process must call it)."""
    rows = gather_object(rollout_rows(step, problems, rollouts, tokenizer))
    if accelerator.is_main_process:
        with path.open("a") as out:
            out.writelines(json.dumps(row) + "\n" for row in rows)


def drop_rollouts_after(path: Path, step: int) -> None:
    """Forget the rollouts of steps after `step`, and a line a killed run cut short (a resumed run redoes them)."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines(keepends=True)
             if line.endswith("\n") and json.loads(line)["step"] <= step]
    path.write_text("".join(lines))


def gathered_weights(accelerator, model) -> dict:
    """The full weights of a distributed model, gathered on the main process (every process must call it)."""
    return full_weights(model) if is_fsdp2(model) else accelerator.get_state_dict(model)


def trainable_weights(accelerator, model, sharded: bool) -> dict:
    """A CPU copy of the weights training changes (all of them for a sharded model, gathered on the main process)."""
    if sharded:
        return {name: tensor.cpu() for name, tensor in gathered_weights(accelerator, model).items()}
    return {name: p.detach().to("cpu", copy=True) for name, p in unwrap(model).named_parameters() if p.requires_grad}


def load_trainable_weights(accelerator, model, weights: dict, sharded: bool) -> None:
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        # a copy: the broadcast replaces the dict's values with the model's shards
        set_model_state_dict(model, dict(weights),
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        return
    unknown = unwrap(model).load_state_dict(weights, strict=False).unexpected_keys
    if unknown:
        raise Refusal(f"keep-best: weights not in the model: {unknown[:3]}")
