"""A run directory's identity: one split, one configuration, one base model, and resume only of the same run.

The first command that writes into a run directory records what the run is:

    config.yaml        the resolved configuration the run was started with
    split.json         the ids of N1, N2 and the held-out problems (written by sdzero.data)
    run.json           seed, task, data, set sizes, control phrases, system prompt, and the
                       fingerprints of the base model and its tokenizer

and each stage folder (phase1/, srt/, sdzero/, an `sdzero eval --out` folder) records in
settings.json the settings that shaped its output. Every later command checks the run and its own
stage before any work: a difference is refused in one line naming it, unless the command runs with
`--restart`, which moves the outputs the difference makes stale to RUN/stale/<time>/ and starts over.

One process writes into a run directory at a time: every command that writes into one first takes its lock
(RUN/.lock, `hold_run`), which the kernel releases when the process ends, however it ends.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

from sdzero import lab, models
from sdzero.errors import Refusal
from sdzero.modeling import load_tokenizer, resolve_model_path, tokenizer_fingerprint
from sdzero.prompts import effective_system_prompt
from sdzero.training import read_json

RUN_FILE = "run.json"
SETTINGS_FILE = "settings.json"
RESTART_HINT = "pass --restart to move the old outputs to {stale} and start again, or use another --out"
RUN_OUTPUTS = ["eval", "report.json", "learning_curve.png"]
"""The run's evaluations, report and plot: every stage feeds them."""
STAGE_DEPENDENTS = {"phase1": ["srt", "sdzero", *RUN_OUTPUTS], "srt": ["sdzero", *RUN_OUTPUTS],
                    "sdzero": RUN_OUTPUTS}
"""What else a stage's outputs feed: restarting a stage makes these stale too."""
NOT_SHAPING = {
    "sampling": {"batch_size", "vllm_gpu_memory_utilization", "vllm_enforce_eager"},
    "srt": {"save_every"},
    "distill": {"save_every", "micro_batch_size", "rollouts_every"},
}
"""Per config section, the fields that change speed or memory, not what a stage produces; they may differ
between runs of a stage. Not srt.batch_size (it is the optimiser's batch: the schedule), nor
collect.chunk_size (each chunk is sampled as one batch from a seed of its own)."""
LOCK_FILE = ".lock"
FULL_HASH_BYTES = 256 << 20
SAMPLED_BLOCKS, BLOCK_BYTES = 64, 1 << 20


# ------------------------------------------------------------------------------------------
# Fingerprints


def _hash_file(digest, path: Path) -> None:
    """The whole file up to FULL_HASH_BYTES; beyond that, SAMPLED_BLOCKS blocks spread over it (training
    changes every weight, so any block of a retrained model differs), and always its size."""
    size = path.stat().st_size
    digest.update(f"{path.name}:{size}".encode())
    with path.open("rb") as f:
        if size <= FULL_HASH_BYTES:
            digest.update(f.read())
            return
        for i in range(SAMPLED_BLOCKS):
            f.seek(i * (size - BLOCK_BYTES) // (SAMPLED_BLOCKS - 1))
            digest.update(f.read(BLOCK_BYTES))


def model_fingerprint(name: str) -> str:
    """A fingerprint of a model's config and weights: a lab model or a local folder (a save_pretrained or a LoRA
    adapter folder). A hub id is taken at its word: its fingerprint is its name. A real model or GGUF file
    is fingerprinted by its GGUF checksum (`sdzero.models.fingerprint`), without converting it."""
    real = models.fingerprint(name)
    if real is not None:
        return real
    folder = Path(resolve_model_path(name)) if name in lab.LAB_MODELS else Path(name).expanduser()
    if not folder.is_dir():
        return f"hub:{name}"
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.name in ("config.json", "adapter_config.json") or path.suffix in (".safetensors", ".bin"):
            _hash_file(digest, path)
    return digest.hexdigest()[:16]


# ------------------------------------------------------------------------------------------
# The run


def run_identity(cfg) -> dict:
    """The settings every stage of a run shares: a command that differs in one of them belongs to another run.
    The system prompt is the one the prompts carry: the chat template's own when the config sets none."""
    system_prompt = effective_system_prompt(load_tokenizer(cfg.model), cfg.system_prompt)
    return {"seed": cfg.seed, "task": cfg.task, "reward_weights": cfg.reward_weights,
            "reward_threshold": cfg.reward_threshold, "data": dataclasses.asdict(cfg.data), "n_phase1": cfg.n_phase1,
            "n_phase2": cfg.n_phase2, "n_eval": cfg.eval.n_problems,
            "control_phrases": dataclasses.asdict(cfg.phrases()), "system_prompt": system_prompt,
            # A run from before validation sets has none, and no such key: its record still matches to be read.
            **({"n_validation": cfg.eval.n_validation()} if cfg.eval.n_validation() else {})}


def read_run(run_dir: str | Path) -> dict | None:
    path = Path(run_dir) / RUN_FILE
    return read_json(path) if path.exists() else None


def recorded_limit(run_dir: str | Path | None) -> int | None:
    """The --limit the run was started with: a later command without --limit uses the same sets."""
    record = read_run(run_dir) if run_dir is not None else None
    return record.get("limit") if record else None


def differences(recorded: dict, current: dict, prefix: str = "") -> list[str]:
    """"field: recorded -> current" for every leaf that differs (fields missing on one side included)."""
    found = []
    for key in sorted(set(recorded) | set(current)):
        old, new = recorded.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            found += differences(old, new, f"{prefix}{key}.")
        elif old != new:
            found.append(f"{prefix}{key}: {old!r} -> {new!r}")
    return found


def refusal(what: str, found: list[str], stale: Path) -> Refusal:
    shown = "; ".join(found[:3]) + (f" (and {len(found) - 3} more)" if len(found) > 3 else "")
    return Refusal(f"{what} was made with other settings ({shown}); {RESTART_HINT.format(stale=stale)}")


def hold_run(folder: str | Path) -> bool:
    """Make this process the one writer of `folder` until it ends (or `release_run`); returns False when it
    already was. Another process holding it is refused in one line naming it (pid and command).

    The lock is an fcntl.flock on folder/.lock: the kernel drops it when the holder exits, even by SIGKILL,
    so a killed run never leaves a stale lock behind."""
    folder = Path(folder).resolve()
    if folder in _HELD:
        return False
    folder.mkdir(parents=True, exist_ok=True)
    lock = (folder / LOCK_FILE).open("a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "a process that has not yet written its pid"
        lock.close()
        raise Refusal(f"{folder} is in use by another sdzero command ({holder}): one command writes into a "
                         "run directory at a time; wait for it to end, or use another --out") from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()}: {shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])}\n")
    lock.flush()
    _HELD[folder] = lock
    return True


def release_run(folder: str | Path) -> None:
    """Let other processes write into `folder` again (after `hold_run`)."""
    lock = _HELD.pop(Path(folder).resolve(), None)
    if lock is not None:
        lock.close()  # closing the last descriptor releases the flock


_HELD: dict[Path, object] = {}
"""The folders this process holds: their open lock files (the lock lives as long as the file stays open)."""


def stale_folder(run_dir: Path) -> Path:
    return run_dir / "stale" / time.strftime("%Y%m%d-%H%M%S")


def move_aside(run_dir: Path, names: list[str], stale: Path) -> list[str]:
    """Move the run's entries `names` (files or folders) into `stale`; returns those that existed."""
    moved = []
    for name in names:
        path = run_dir / name
        if path.exists():
            (stale / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(path), str(stale / name))
            moved.append(name)
    return moved


def open_run(run_dir: str | Path, cfg, *, limit: int | None = None, restart: bool = False,
             main_process: bool = True, log=print) -> dict:
    """The run recorded in `run_dir`, checked against `cfg`; a new record (written by `check_base_model`,
    once the command's input has been validated) when the directory holds no run yet.

    A run-level difference is refused; with `restart`, everything of the old run moves to RUN/stale/<time>/.
    """
    run_dir = Path(run_dir)
    if main_process and run_dir.is_dir():
        hold_run(run_dir)  # a new directory is held from when it is first written (write_run, begin_stage)
    identity = run_identity(cfg)
    record = read_run(run_dir)
    if record is not None:
        found = differences(record["identity"], identity)
        if not found:
            return record
        stale = stale_folder(run_dir)
        if not restart:
            raise refusal(f"the run in {run_dir}", found, stale)
        if main_process:
            old = sorted(p.name for p in run_dir.iterdir() if p.name not in ("stale", LOCK_FILE))
            moved = move_aside(run_dir, old, stale)
            log(f"moved the old run's {', '.join(moved)} to {stale}")
    elif (run_dir / "split.json").exists():
        # A directory from before run.json: its split is still checked (sdzero.data), its stages by their files.
        log(f"{run_dir} has no {RUN_FILE}; recording this command's settings as the run's")
    return {"identity": identity, "limit": limit, "base_model": None}


def is_run(folder: Path) -> bool:
    """True for a run directory (one a run has been recorded in)."""
    return (folder / RUN_FILE).exists() or (folder / "split.json").exists()


def write_run(run_dir: Path, record: dict) -> None:
    run_dir = Path(run_dir)
    hold_run(run_dir)
    (run_dir / RUN_FILE).write_text(json.dumps(record, indent=1) + "\n")


def check_base_model(run_dir: str | Path, record: dict, cfg, tokenizer, *, main_process: bool = True) -> str:
    """The base model `cfg.model` (collection, SRT) must be the run's. The first command that names one
    records it, writing the run's record and config.yaml (the configuration the run was started with);
    returns its fingerprint."""
    from sdzero.config import config_to_yaml

    name = cfg.model
    current = {"name": name, "fingerprint": model_fingerprint(name), "tokenizer": tokenizer_fingerprint(tokenizer)}
    recorded = record.get("base_model")
    if recorded is None:
        record["base_model"] = current
        if main_process:
            write_run(Path(run_dir), record)
            (Path(run_dir) / "config.yaml").write_text(config_to_yaml(cfg))
        return current["fingerprint"]
    if recorded["fingerprint"] != current["fingerprint"]:
        raise Refusal(f"the run in {run_dir} has the base model {recorded['name']} (fingerprint "
                         f"{recorded['fingerprint']}); this command's model {name} differs ({current['fingerprint']}); "
                         + RESTART_HINT.format(stale=stale_folder(Path(run_dir))))
    return current["fingerprint"]


def check_tokenizer(run_dir: str | Path, record: dict, name: str, tokenizer) -> None:
    """A model used in the run (a Phase 2 student or teacher) must read the run's token ids."""
    recorded = (record.get("base_model") or {}).get("tokenizer")
    if recorded is not None and recorded != tokenizer_fingerprint(tokenizer):
        raise Refusal(f"{name} uses another tokenizer than the run in {run_dir} (base model "
                         f"{record['base_model']['name']}): its token ids mean other text")


# ------------------------------------------------------------------------------------------
# Stages


def stage_settings(**sections) -> dict:
    """Settings of a stage from named values and config sections, without the fields that do not shape output."""
    settings = {}
    for name, value in sections.items():
        if dataclasses.is_dataclass(value):
            value = {k: v for k, v in dataclasses.asdict(value).items() if k not in NOT_SHAPING.get(name, ())}
        settings[name] = value
    return settings


def begin_stage(run_dir: str | Path, stage: str, settings: dict, *, restart: bool = False, resume: bool = False,
                resume_may_change: tuple[str, ...] = (), main_process: bool = True, log=print) -> None:
    """Check a stage's settings against those its folder records, then record them.

    A difference is refused; with `restart` the stage and the stages it feeds move to RUN/stale/<time>/.
    Without `resume`, a checkpoint left by an earlier run of the stage is deleted, so that a later
    `--resume` can only find one of this run. `resume_may_change`: fields a resumed run may change
    (e.g. distill.max_steps, to run on past the planned end).
    """
    run_dir = Path(run_dir)
    folder = run_dir / stage
    if main_process:
        # A folder outside any run (an `sdzero eval --out` elsewhere) is its own: its writer holds it alone.
        hold_run(run_dir if is_run(run_dir) else folder)
    path = folder / SETTINGS_FILE
    if path.exists():
        recorded = read_json(path)
        found = differences(recorded, settings)
        if resume:
            found = [f for f in found if f.split(":")[0] not in resume_may_change]
        if found:
            stale = stale_folder(run_dir)
            if not restart:
                raise refusal(f"{folder}", found, stale)
            if main_process:
                moved = move_aside(run_dir, [stage] + STAGE_DEPENDENTS.get(stage, []), stale)
                log(f"moved {', '.join(moved)} to {stale}")
    elif resume and (folder / "checkpoint").exists():
        raise Refusal(f"{folder}/checkpoint has no {SETTINGS_FILE} to say which settings made it, so it cannot "
                         f"be resumed safely; run without --resume to start the stage again")
    if not main_process:
        return
    folder.mkdir(parents=True, exist_ok=True)
    if not resume:
        for old in ("checkpoint", "checkpoint.old", "checkpoint.partial"):
            shutil.rmtree(folder / old, ignore_errors=True)
    path.write_text(json.dumps(settings, indent=1) + "\n")


def file_digest(path: str | Path) -> str:
    digest = hashlib.sha256()
    _hash_file(digest, Path(path))
    return digest.hexdigest()[:16]


def phase1_settings(cfg, model: str) -> dict:
    return stage_settings(model=model, collect=cfg.collect, sampling=cfg.sampling)


def srt_settings(cfg, model: str, tuples_path: Path) -> dict:
    return stage_settings(model=model, tuples=file_digest(tuples_path), srt=cfg.srt, lora=cfg.lora, dtype=cfg.dtype)


def sdzero_settings(cfg, student: str, teacher: str) -> dict:
    """`teacher`: a fingerprint, or "frozen copy of the student"."""
    return stage_settings(student=student, teacher=teacher, distill=cfg.distill, sampling=cfg.sampling,
                          lora=cfg.lora, dtype=cfg.dtype,
                          curve={"problems": cfg.eval.curve_problems, "k": cfg.eval.curve_k})
