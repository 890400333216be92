"""Every ```python block of the documentation runs: the blocks of one page run in order as one script
(later blocks may use what earlier ones defined), in a fresh subprocess with an empty working directory.
Blocks fenced as ```python no-run are shown but not run (GPU-only examples)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(?P<tag>[^\n]*)\n(?P<body>.*?)^```\s*$", re.S | re.M)


def python_blocks(path: Path) -> list[tuple[int, str]]:
    """(line number, code) of every block fenced exactly as ```python."""
    text = path.read_text()
    return [(text[:m.start()].count("\n") + 2, m["body"]) for m in FENCE.finditer(text)
            if m["tag"].strip() == "python"]


def test_fences_are_found():
    blocks = python_blocks(ROOT / "docs" / "python-api.md")
    assert len(blocks) >= 4 and all(code.strip() for _, code in blocks)


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)], ids=lambda p: str(p.relative_to(ROOT)))
def test_python_examples_run(page, tmp_path):
    parts = []
    for line, code in python_blocks(page):
        parts.append(f"# ---- {page.name}, block at line {line}\n{code}")
    script = tmp_path / "page.py"
    script.write_text("\n".join(parts))
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TQDM_DISABLE="1")
    work = tmp_path / "work"
    work.mkdir()
    result = subprocess.run([sys.executable, str(script)], cwd=work, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, f"{page.name}: an example failed\n{result.stderr[-4000:]}"


def test_the_readme_gives_the_pretraining_time_the_command_gives():
    from sdzero.lab import PRETRAIN_CPU_MINUTES

    readme = " ".join((ROOT / "README.md").read_text().split())
    assert f"about {PRETRAIN_CPU_MINUTES} minutes on 2 CPU cores" in readme
