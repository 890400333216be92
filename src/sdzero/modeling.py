"""Models for every stage: loading (any causal LM with a chat template), dtype, gradient
checkpointing, LoRA adapters, and the Phase 2 teacher.

The teacher is a frozen copy of the starting student, or, when the student trains a LoRA adapter,
the student itself with its adapter switched off: the base weights are the starting point, so no
second copy of the weights is needed.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from sdzero import lab, models
from sdzero.checks import check_ranges
from sdzero.errors import MissingFile, Refusal
from sdzero.training import is_fsdp2, unwrap

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoraConfig:
    """LoRA adapters (peft) for SRT and Phase 2; the base weights stay frozen."""

    enabled: bool = False
    """Train LoRA adapters instead of all weights."""
    r: int = 16
    """Adapter rank."""
    alpha: int = 32
    """Adapter scaling numerator (the update is scaled by alpha / r)."""
    dropout: float = 0.05
    """Dropout on the adapter input."""
    target_modules: str | list[str] = "all-linear"
    """Modules that get adapters: "all-linear" or a list of module names (e.g. [q_proj, v_proj])."""

    def validate(self) -> None:
        check_ranges("lora", self, {"r": ">= 1", "alpha": "> 0", "dropout": "in [0, 1)"})


STAGE_COMMANDS = {"srt": "sdzero srt", "sdzero": "sdzero distill"}
"""The command that writes each stage folder of a run directory (named in a missing folder's error)."""


def looks_like_path(name: str) -> bool:
    """A hub id is "name" or "owner/name"; anything that starts like a path, exists here, has more
    parts, or starts with a folder that exists here (runs/mine when ./runs exists) is a local path."""
    path = Path(name).expanduser()
    return (name.startswith((".", "/", "~")) or path.exists() or name.count("/") > 1
            or (len(path.parts) > 1 and Path(path.parts[0]).is_dir()))


def resolve_model_path(name: str) -> str:
    """"lab", "lab-v2", "lab-control" -> a shipped lab model; a registered real model ("smollm2-135m-instruct")
    or a GGUF file (or a folder holding one) -> its Hugging Face folder in the cache (built on first use, see
    `sdzero.models`); a local path (checked: it must hold a saved model); anything else is a hub id."""
    if name in lab.LAB_MODELS:
        folder, preset = lab.LAB_MODELS[name]
        if not (folder / "config.json").exists():
            raise MissingFile(f"the lab base model {name!r} is missing from {folder}; "
                                    f"rebuild it with: sdzero lab pretrain --preset {preset} --out {folder}")
        return str(folder)
    real = models.real_model_folder(name)
    if real is not None:
        return real
    if not looks_like_path(name):
        return name
    path = Path(name).expanduser()
    if (path / "config.json").exists():
        return str(path)
    made_by = STAGE_COMMANDS.get(path.name)
    hint = (f"; run `{made_by} --out {path.parent}` first" if made_by else
            "; give a folder written by save_pretrained, or a hub id such as Qwen/Qwen3-0.6B")
    what = "has no config.json" if path.is_dir() else "not found"
    raise MissingFile(f"model folder {what}: {name}{hint}")


def export(name: str, out: Path, log=models.say) -> Path:
    """Write the model `name` (any name a config accepts that resolves to a local folder) into `out` as a
    plain Hugging Face folder."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise Refusal(f"--out {out} already exists and is not an empty folder; give a new folder")
    folder = Path(resolve_model_path(name))
    if not folder.is_dir():
        raise Refusal(f"{name!r} is a hub id, not a local or registered model; nothing to write")
    out.parent.mkdir(parents=True, exist_ok=True)
    copying = Path(tempfile.mkdtemp(prefix=f".copying-{out.name}-", dir=out.parent))
    try:
        shutil.copytree(folder, copying, dirs_exist_ok=True)
        models.readable_by_all(copying)
        if out.exists():
            out.rmdir()  # empty, checked above
        copying.rename(out)
    except BaseException:
        shutil.rmtree(copying, ignore_errors=True)
        raise
    log(f"sdzero: wrote {name} to {out}")
    return out


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the hub's host accepts a connection (checked before a download that would otherwise
    retry for half a minute when offline)."""
    import os
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout_s).close()
    except OSError:
        return False
    return True


def from_local_or_hub(load, name: str, path: str, **kwargs):
    """`load(path)` (a transformers from_pretrained): a local folder as it is; a hub id from the cache
    first, then from the hub. Failures end in one line naming the model."""
    if Path(path).is_dir():
        try:
            return load(path, **kwargs)
        except (OSError, ValueError) as err:  # a broken or unknown config, tokenizer or weights file
            reason = str(err).strip().splitlines()[0]
            raise Refusal(f"model {name!r} could not be loaded from {path}: {reason}") from err
    try:
        return load(path, local_files_only=True, **kwargs)
    except OSError:
        pass
    if not hub_reachable():
        raise MissingFile(f"model {name!r} is neither a local folder nor in the hub cache, and the hub "
                                f"cannot be reached (offline?); download it once online, or give a local folder")
    from huggingface_hub.utils import logging as hub_logging

    hub_logging.set_verbosity_error()  # its retry notes would bury the one-line error below
    try:
        return load(path, **kwargs)
    except OSError as err:  # unknown id, gated repository, network error
        reason = str(err).strip().splitlines()[0]
        raise MissingFile(f"model {name!r} could not be loaded from the hub: {reason}") from None


def max_positions(model) -> int | None:
    """The position limit (`max_position_embeddings`) of a loaded model, or of the model that a name
    (lab name, folder, hub id) refers to, read from its config alone; None when it declares none."""
    if isinstance(model, str):
        from transformers import AutoConfig

        config = from_local_or_hub(AutoConfig.from_pretrained, model, resolve_model_path(model))
    else:
        config = getattr(unwrap(model), "config", None)
    return getattr(config, "max_position_embeddings", None)


def load_tokenizer(name: str):
    """The tokenizer of "lab", a local folder or a hub id, with a pad token."""
    from transformers import AutoTokenizer

    path = name if (Path(name) / "adapter_config.json").exists() else resolve_model_path(name)
    tokenizer = from_local_or_hub(AutoTokenizer.from_pretrained, name, path)
    if tokenizer.chat_template is None:
        raise Refusal(f"the tokenizer of {name} has no chat template; SD-Zero needs one to lay out turns")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def same_tokenizer(a, b) -> bool:
    """True when two tokenizers map every token to the same id (a teacher must score the student's ids)."""
    return a.get_vocab() == b.get_vocab() and a.all_special_ids == b.all_special_ids


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of what makes token ids mean the same text: the vocabulary, the special tokens and the
    chat template."""
    content = [sorted(tokenizer.get_vocab().items()), tokenizer.all_special_tokens, tokenizer.chat_template]
    return hashlib.sha256(json.dumps(content).encode()).hexdigest()[:16]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(name: str) -> torch.dtype:
    """"auto" = fp32 weights: on a GPU the training stages compute in bf16 autocast (see
    `sdzero.training.make_accelerator`), while the weights and optimiser keep full precision, so
    small updates (lr 5e-6) are not lost to bf16 rounding."""
    if name == "auto":
        return torch.float32
    if name not in DTYPES:
        raise Refusal(f"unknown dtype {name!r}; choose auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def load_model(name: str, device: str | None = None, dtype: str = "auto"):
    """A causal LM and its tokenizer from "lab", a local save_pretrained folder or a hub id.

    A saved LoRA adapter folder (adapter_config.json) loads as its base model with the adapter merged.
    """
    from transformers import AutoModelForCausalLM

    device = device or default_device()
    tokenizer = load_tokenizer(name)
    adapter = (Path(name) / "adapter_config.json").exists()
    path = name if adapter else resolve_model_path(name)
    torch_dtype = resolve_dtype(dtype)
    if adapter:
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(path, dtype=torch_dtype).merge_and_unload()
    else:
        model = from_local_or_hub(AutoModelForCausalLM.from_pretrained, name, path, dtype=torch_dtype)
    return model.to(device).eval(), tokenizer


def prepare_for_training(model, *, gradient_checkpointing: bool = False, lora: LoraConfig | None = None):
    """The model a stage trains: with gradient checkpointing and/or LoRA adapters when asked."""
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False  # generation turns it back on per call
    if lora is not None and lora.enabled and not is_lora(model):
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        settings = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                  target_modules=lora.target_modules, task_type="CAUSAL_LM")
        try:
            model = get_peft_model(model, settings)
        except ValueError as err:  # peft's refusal of the settings, e.g. target modules the model lacks
            raise Refusal(f"lora: {err}") from err
    return model


def is_lora(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def merged_for_saving(model):
    """A plain transformers model to save: LoRA adapters merged into a copy of the base weights."""
    if not is_lora(model):
        return model
    return copy.deepcopy(model).merge_and_unload()


def unsharded_copy(model):
    """A plain copy of an FSDP2-sharded model (FSDP refuses deepcopy): the model's own class, holding the full
    weights, gathered on every process. Every process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FSDPModule

    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    plain_class = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))  # fully_shard subclasses it
    copied = plain_class(model.config).to(next(iter(weights.values())).dtype)
    copied.load_state_dict(weights)
    return copied


def frozen_copy(model):
    """A copy of `model` in eval mode that never receives gradients (an unsharded one of an FSDP2 model)."""
    teacher = unsharded_copy(model) if is_fsdp2(model) else copy.deepcopy(model)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


class Teacher:
    """The Phase 2 teacher: forward passes without gradients, and synchronisation with the student.

    Without a given model it is a frozen copy of the student, or, for a LoRA student, the student
    with its adapter switched off (the starting weights, without a second copy).
    """

    def __init__(self, student, model=None):
        self.student = student
        self.adapter_off = model is None and is_lora(student)
        if self.adapter_off:
            self.model = None
        else:
            self.model = frozen_copy(student) if model is None else model.eval().requires_grad_(False)

    @torch.no_grad()
    def __call__(self, **inputs):
        if self.adapter_off:
            was_training = self.student.training
            self.student.eval()
            with self.student.disable_adapter():
                output = self.student(**inputs)
            self.student.train(was_training)
            return output
        return self.model(**inputs)

    def get_output_embeddings(self):
        """The LM head of the model that runs the teacher's forward (`training.logits_at` hooks it)."""
        return unwrap(self.student if self.adapter_off else self.model).get_output_embeddings()

    def sync(self, student) -> None:
        """teacher <- current student (self-evolution)."""
        self.load(student.state_dict())

    def load(self, state_dict: dict, *, from_main_process: bool = False) -> None:
        """teacher <- these weights; with `from_main_process`, only the main process's state dict counts
        (sharded training gathers the full weights there) and the others receive it."""
        if self.adapter_off:
            raise Refusal("teacher synchronisation is not available with a LoRA student whose teacher is the "
                             "adapter-free base model; train all weights (lora.enabled=false) or pass --teacher")
        if from_main_process:
            from accelerate.utils import broadcast

            own = self.model.state_dict()
            state_dict = {name: broadcast(state_dict[name].to(own[name]) if state_dict else own[name].clone())
                          for name in own}
        self.model.load_state_dict(state_dict)

    def state_dict(self) -> dict | None:
        return None if self.adapter_off else self.model.state_dict()
