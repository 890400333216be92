"""docs/from-trl.md as a user runs it, on a tiny local model: the page's GRPO script (TRL's GRPOTrainer, one
step) and its sdzero config (collect, srt, distill and compare through the command line), on a dataset in TRL's
conversational format, with TRL's own accuracy_reward and the page's own reward function.

What the test changes, and why: the model (the page's is a hub download), the sizes, and, on the sdzero side,
reward_threshold (a random model never answers right, so the length function alone decides r here; without
right answers Phase 1 keeps nothing and SRT has nothing to train on).
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tiny import build_tiny_model

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "from-trl.md"
FENCE = re.compile(r"^```[^\n]*\n# (?P<name>[\w.]+)\n(?P<body>.*?)^```\s*$", re.S | re.M)
TINY_SDZERO = ["--set", "model=tiny", "--set", "reward_threshold=0.5", "--set", "n_phase1=6", "--set", "n_phase2=8",
               "--set", "sampling.max_new_tokens=12", "--set", "srt.epochs=1", "--set", "srt.batch_size=4",
               "--set", "distill.prompts_per_step=4", "--set", "distill.micro_batch_size=2",
               "--set", "distill.max_steps=2", "--set", "distill.warmup_steps=1", "--set", "eval.k=2",
               "--set", "eval.n_problems=4", "--set", "eval.curve_problems=2", "--set", "eval.curve_k=1"]


def page_files() -> dict[str, str]:
    """The page's files, by the name on their first line ("# my_rewards.py")."""
    return {m["name"]: m["body"] for m in FENCE.finditer(PAGE.read_text())}


def run(args: list, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(cwd)]), OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    done = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"{args}: exit {done.returncode}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    """A user's folder: the tiny model, the page's files, and 24 problems in the page's format: its own two
    rows, 21 more like them, and one whose solution TRL's accuracy_reward cannot parse."""
    home = tmp_path_factory.mktemp("from_trl")
    build_tiny_model(home / "tiny")
    files = page_files()
    for name in ("my_rewards.py", "grpo.py", "sdzero.yaml"):
        (home / name).write_text(files[name])
    rows = [json.loads(line) for line in files["problems.jsonl"].splitlines()]
    system = rows[0]["prompt"][0]
    rows += [{"prompt": [system, {"role": "user", "content": f"What is {i} + {i + 1}?"}], "solution": str(2 * i + 1)}
             for i in range(10, 31)]
    rows.append({"prompt": [system, {"role": "user", "content": "Name a colour."}], "solution": "any colour"})
    (home / "problems.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return home


def test_the_grpo_script_runs_as_written(home):
    script = (home / "grpo.py").read_text()
    tiny_grpo = dict(max_steps=1, per_device_train_batch_size=4, num_generations=4, max_completion_length=12,
                     report_to="none", bf16=False, logging_steps=1, save_strategy="no")
    for old, new in (('"Qwen/Qwen2.5-0.5B-Instruct"', repr(str(home / "tiny"))),
                     ("GRPOConfig(", f"GRPOConfig(**{tiny_grpo!r}, ")):
        assert script.count(old) == 1, f"the page's GRPO script no longer holds {old}"
        script = script.replace(old, new)
    (home / "grpo_tiny.py").write_text(script)
    done = run(["grpo_tiny.py"], home)
    logged = done.stdout + done.stderr
    # both reward functions reached TRL, weighted as the page says
    assert "rewards/accuracy_reward/mean" in logged and "rewards/short_answer/mean" in logged


def test_the_sdzero_config_runs_collect_srt_distill_and_compare(home):
    settings = yaml.safe_load((home / "sdzero.yaml").read_text())
    assert settings["task"] == ["trl:accuracy_reward", "my_rewards:short_answer"]
    for stage in ("collect", "srt", "distill"):
        run(["-m", "sdzero.cli", stage, "--config", "sdzero.yaml", "--out", "runs/sdzero", *TINY_SDZERO, "--quiet"],
            home)
    out = home / "runs" / "sdzero"
    split = json.loads((out / "split.json").read_text())
    assert split["skipped"]["train"]["count"] == 0  # no row is skipped for its solution: the functions judge it
    revisions = [json.loads(line) for line in (out / "phase1" / "revisions.jsonl").read_text().splitlines()]
    assert revisions and all(r["problem"][0] == {"role": "system", "content": "Put the final answer in \\boxed{}."}
                             for r in revisions)  # the conversation, system turn included, is the problem
    assert (out / "srt" / "config.json").exists() and (out / "sdzero" / "config.json").exists()
    steps = [json.loads(line) for line in (out / "sdzero" / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if "loss" in s] == [1, 2] and all("sdzero/no_reward" in s for s in steps
                                                                       if "loss" in s)

    # GRPO judged by the same functions: one step of 2 questions x 4 completions
    run(["-m", "sdzero.cli", "compare", "--config", "sdzero.yaml", "--out", "runs/compare", "--methods", "grpo",
         "--budget", "8", *TINY_SDZERO, "--set", "compare.seeds=1", "--set", "compare.grpo.prompts_per_step=2",
         "--set", "compare.grpo.micro_batch_size=8", "--quiet"], home)
    report = json.loads((home / "runs" / "compare" / "report.json").read_text())
    assert set(report["methods"]) == {"grpo"}
    graded = [json.loads(line) for line in (home / "runs" / "compare" / "seed0" / "eval" / "grpo.jsonl")
              .read_text().splitlines()]
    assert len(graded) == 4 * 2 and {row["reward"] for row in graded} <= {0.0, 1.0}
