"""Token-level analysis: the per-token signal against a by-hand reference, the bucket and
localization statistics on hand-made examples, and the run report on a tiny run directory."""

import copy
import html
import json
import random
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from sdzero.analysis import (TokenSignal, bucket_shares, format_summary, inspect_run, lab_problem, localization,
                             token_signal)
from sdzero.config import RunConfig, config_to_yaml
from sdzero.lab.task import Problem, first_wrong_step, reward, sample_problems, write_solution
from sdzero.prompts import ControlPhrases

PROBLEM = Problem((3, 5, 2, 8))
RIGHT = "b: 3+5=8, c: 8+2=0, d: 0+8=8. Answer: 8"
WRONG = "b: 3+5=8, c: 8+2=1, d: 1+8=9. Answer: 9"  # carry slip on step c
WRONG_STEP = (10, 18)  # "c: 8+2=1"


@pytest.fixture(scope="module")
def student_teacher(lab_model_and_tokenizer):
    """The lab model as student and a perturbed copy as teacher, so swapping their roles would show."""
    model, tokenizer = lab_model_and_tokenizer
    teacher = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return model, teacher.eval(), tokenizer


def reference(student, teacher, tokenizer, problem_text, response_ids, phrase, top_k):
    """Divergence and token KL reward per response token, built by hand in float64."""
    chat = tokenizer.apply_chat_template([{"role": "user", "content": problem_text}],
                                         add_generation_prompt=True, tokenize=False)
    prompt = tokenizer.encode(chat, add_special_tokens=False)
    bridge = tokenizer.encode("\n\n" + phrase + "\n\n", add_special_tokens=False)
    assert response_ids[-1] == tokenizer.eos_token_id
    student_seq = prompt + response_ids
    teacher_seq = prompt + response_ids[:-1] + bridge + response_ids
    with torch.no_grad():
        s_logits = student(torch.tensor([student_seq])).logits[0].double()
        t_logits = teacher(torch.tensor([teacher_seq])).logits[0].double()
    n = len(response_ids)
    s_first = len(prompt) - 1
    t_first = len(teacher_seq) - n - 1
    divergences, kl_rewards = [], []
    for t in range(n):
        p_s = torch.softmax(s_logits[s_first + t], -1)
        p_t = torch.softmax(t_logits[t_first + t], -1)
        support = torch.topk(p_t, top_k).indices
        q_s = p_s[support] / p_s[support].sum()
        q_t = p_t[support] / p_t[support].sum()
        divergences.append(float((q_s * (q_s.log() - q_t.log())).sum()))
        y = response_ids[t]
        kl_rewards.append(float(p_s[y].log() - p_t[y].log()))
    return divergences, kl_rewards


def test_token_signal_matches_a_by_hand_reference(student_teacher):
    student, teacher, tokenizer = student_teacher
    phrases = ControlPhrases()
    items = [(PROBLEM.text, tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id], r)
             for text, r in ((WRONG, 0.0), (RIGHT[:20], 0.0), (RIGHT, 1.0))]  # different lengths: padding
    signals = token_signal(student, teacher, tokenizer, items, phrases, top_k=64, batch_size=2)
    assert len(signals) == 3
    for (prompt, ids, r), signal in zip(items, signals):
        divergence, kl_reward = reference(student, teacher, tokenizer, prompt, ids, phrases.for_reward(r), 64)
        assert signal.divergence == pytest.approx(divergence, abs=2e-5, rel=1e-4)
        assert signal.token_kl_reward == pytest.approx(kl_reward, abs=2e-5, rel=1e-4)
        assert signal.phrase == phrases.for_reward(r) and signal.reward == r and signal.ids == ids
        # offsets tile the decoded text; the end-of-turn token is an empty piece at its end
        assert "".join(signal.tokens) == signal.text == tokenizer.decode(ids, skip_special_tokens=True)
        assert signal.tokens == [tokenizer.decode([i], skip_special_tokens=True) for i in ids]
        assert all(signal.text[a:b] == piece for (a, b), piece in zip(signal.offsets, signal.tokens))
        assert signal.tokens[-1] == "" and signal.offsets[-1] == (len(signal.text), len(signal.text))
    assert max(signals[0].divergence) > 1e-3  # the perturbed teacher really differs


def signal(text, divergence, r, kl_reward=None):
    """A hand-made signal with one token per character (plus nothing else)."""
    kl_reward = [0.0] * len(text) if kl_reward is None else kl_reward
    assert len(divergence) == len(text) == len(kl_reward)
    return TokenSignal(prompt=PROBLEM.text, text=text, ids=list(range(len(text))), tokens=list(text),
                       offsets=[(i, i + 1) for i in range(len(text))], divergence=list(divergence),
                       token_kl_reward=list(kl_reward), reward=r, phrase="")


def test_bucket_shares_on_known_values():
    a, b = signal("ab", [4.0, 1.0], 0.0), signal("cd", [2.0, 3.0], 0.0)
    assert bucket_shares([a, b], n_buckets=2) == pytest.approx([0.7, 0.3])
    assert bucket_shares([a, b], n_buckets=4) == pytest.approx([0.4, 0.3, 0.2, 0.1])
    # uneven split: the larger buckets come first
    c = signal("abcdef", [1, 1, 5, 1, 1, 1], 0.0)
    assert bucket_shares([c], n_buckets=4) == pytest.approx([0.6, 0.2, 0.1, 0.1])
    assert bucket_shares([c], n_buckets=8) == pytest.approx([0.5, 0.1, 0.1, 0.1, 0.1, 0.1, 0.0, 0.0])
    assert bucket_shares([]) == []
    rng = random.Random(0)
    many = [signal("x" * 37, [rng.expovariate(1.0) for _ in range(37)], 0.0) for _ in range(5)]
    shares = bucket_shares(many, n_buckets=20)
    assert len(shares) == 20 and sum(shares) == pytest.approx(1.0)
    assert all(x >= y for x, y in zip(shares, shares[1:]))


def test_localization_on_hand_made_signals():
    assert first_wrong_step(WRONG, PROBLEM) == WRONG_STEP
    late = "b: 3+5=8, c: 8+2=0, d: 0+8=9. Answer: 9"  # the slip is on step d
    late_step = first_wrong_step(late, PROBLEM)
    assert late_step == (20, 28)
    n = len(WRONG)
    hit = [0.1] * n
    hit[15] = 2.0  # inside "c: 8+2=1"
    miss = [0.1] * n
    miss[n - 1] = 2.0  # on the answer
    late_hit = [0.2] * n
    late_hit[21] = 3.0
    right = [0.5] * len(RIGHT)
    signals = [signal(WRONG, hit, 0.0), signal(WRONG, miss, 0.0), signal(late, late_hit, 0.0),
               signal(RIGHT, right, 1.0), signal(WRONG, miss, 0.0)]
    # the last one is skipped
    result = localization(signals, [PROBLEM, PROBLEM, PROBLEM, PROBLEM, None], measure="divergence")
    assert set(result) == {"wrong", "right"}
    assert set(result["wrong"]) == {"n", "top_kl_in_first_wrong_step", "chance", "ratio", "kl_mean"}
    assert set(result["right"]) == {"n", "kl_mean"}
    assert result["wrong"]["n"] == 3
    assert result["wrong"]["top_kl_in_first_wrong_step"] == pytest.approx(2 / 3)
    assert result["wrong"]["chance"] == pytest.approx(8 / n)  # every step is 8 of n tokens
    assert result["wrong"]["ratio"] == pytest.approx((2 / 3) / (8 / n))
    assert result["wrong"]["kl_mean"] == pytest.approx((sum(hit) + sum(miss) + sum(late_hit)) / (3 * n))
    assert result["right"] == {"n": 1, "kl_mean": pytest.approx(0.5)}

    # apart by attempts: a right answer that started over, and a wrong one that did, are multi-attempt
    phrases = ControlPhrases()
    restart = WRONG + "\n\n" + phrases.wrong + "\n\n" + RIGHT
    twice_wrong = WRONG + "\n\n" + phrases.wrong + "\n\n" + WRONG
    multi_right = [1.0] * len(restart)
    multi_wrong = [0.1] * len(twice_wrong)
    multi_wrong[len(twice_wrong) - 3] = 9.0  # the top token sits in the second attempt
    signals += [signal(restart, multi_right, 1.0), signal(twice_wrong, multi_wrong, 0.0)]
    split = localization(signals, [PROBLEM] * 4 + [None] + [PROBLEM] * 2, phrases, "divergence")
    assert split["single_attempt"]["wrong"]["n"] == 3 and split["single_attempt"]["right"]["n"] == 1
    assert split["single_attempt"]["wrong"]["ratio"] == pytest.approx(result["wrong"]["ratio"])
    assert split["multi_attempt"]["right"] == {"n": 1, "kl_mean": pytest.approx(1.0)}
    multi = split["multi_attempt"]["wrong"]
    assert multi["n"] == 1 and multi["top_kl_in_first_wrong_step"] == 0.0
    assert multi["chance"] == pytest.approx(8 / len(twice_wrong))
    assert split["wrong"]["n"] == 4 and split["right"]["n"] == 2


def test_localization_ranks_by_the_measure_asked_for():
    """A slip the student sampled against its own odds: the distributions barely differ there (small
    divergence), but the teacher gives the sampled digit far less than the student (large token KL
    reward). The default measure is the token KL reward, the paper's."""
    n = len(WRONG)
    divergence = [0.1] * n
    divergence[n - 1] = 2.0  # on the answer
    kl_reward = [-0.2] * n
    kl_reward[15] = 1.5  # inside "c: 8+2=1"
    slip = signal(WRONG, divergence, 0.0, kl_reward)
    right = signal(RIGHT, [0.3] * len(RIGHT), 1.0, [-0.1] * len(RIGHT))
    by_reward = localization([slip, right], [PROBLEM, PROBLEM])
    by_divergence = localization([slip, right], [PROBLEM, PROBLEM], measure="divergence")
    assert by_reward["wrong"]["top_kl_in_first_wrong_step"] == 1.0
    assert by_divergence["wrong"]["top_kl_in_first_wrong_step"] == 0.0
    assert by_reward["wrong"]["kl_mean"] == pytest.approx(sum(kl_reward) / n)
    assert by_reward["right"]["kl_mean"] == pytest.approx(-0.1)
    assert by_divergence["right"]["kl_mean"] == pytest.approx(0.3)
    with pytest.raises(ValueError, match="measure"):
        localization([slip], [PROBLEM], measure="kl")


@pytest.fixture(scope="module")
def inspected(tmp_path_factory, lab_model_and_tokenizer):
    """`sdzero inspect` on a tiny run directory: the eval rows, the output folder and the summary."""
    model, tokenizer = lab_model_and_tokenizer
    tmp_path = tmp_path_factory.mktemp("inspect")
    run = tmp_path / "run"
    for stage in ("srt", "sdzero"):
        model.save_pretrained(run / stage)
        tokenizer.save_pretrained(run / stage)
    (run / "config.yaml").write_text(config_to_yaml(RunConfig()))
    rng = random.Random(0)
    rows = []
    for i, problem in enumerate(sample_problems(8, split="eval", seed=0)):
        text = write_solution(problem, rng, slip_rate=1.0 if i % 2 else 0.0)
        if i == 7:
            text = text.replace(". Answer", " <script>alert('x')</script> & \"q\". Answer")
        rows.append({"id": problem.id, "response": text, "reward": reward(text, problem), "tokens": 0})
    assert 0 < sum(r["reward"] for r in rows) < 8, "the example needs right and wrong answers"
    (run / "eval").mkdir()
    (run / "eval" / "sdzero.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    out = tmp_path / "report"
    summary = inspect_run(run, out, n=8, student="sdzero", progress=False)
    return rows, out, summary


def test_inspect_run_writes_a_self_contained_report(inspected):
    rows, out, summary = inspected
    page = (out / "index.html").read_text()
    signals = [json.loads(line) for line in (out / "signals.jsonl").read_text().splitlines()]
    assert len(signals) == summary["n"] == 8
    assert {s["text"] for s in signals} == {r["response"] for r in rows}
    for s in signals:
        assert len(s["tokens"]) == len(s["divergence"]) == len(s["token_kl_reward"]) == len(s["ids"])
        for piece in s["tokens"]:
            assert html.escape(piece) in page
    # nothing is fetched from elsewhere, and model text cannot open a script: the page's own is the only one
    assert "http" not in page.lower() and "src=" not in page and page.count("<script") == 1
    assert "<script>alert" not in page
    assert "&lt;" in page and "&amp;" in page
    assert 'class="t fw"' in page  # a first wrong step is underlined

    by_measure = json.loads((out / "localization.json").read_text())
    assert set(by_measure) == {"token_kl_reward", "divergence"}
    n_wrong = sum(r["reward"] < 1 for r in rows)
    for measure, loc in by_measure.items():
        assert loc["wrong"]["n"] == n_wrong and loc["right"]["n"] == 8 - n_wrong
        assert 0.0 <= loc["wrong"]["top_kl_in_first_wrong_step"] <= 1.0
        assert 0.0 < loc["wrong"]["chance"] < 1.0 and loc["wrong"]["ratio"] >= 0.0
        # each figure is the one its measure gives on the written signals
        kept = [TokenSignal(**{k: v for k, v in s.items() if k not in ("id", "first_wrong_step")}) for s in signals]
        problems = [lab_problem({"id": s["id"]}) for s in signals]
        assert loc == json.loads(json.dumps(localization(kept, problems, ControlPhrases(), measure)))
    assert by_measure["divergence"]["right"]["kl_mean"] >= 0.0
    assert summary["n_wrong"] == n_wrong and summary["localization"] == by_measure
    assert sum(summary["buckets"]["wrong"]) == pytest.approx(1.0)
    text = format_summary(summary)
    assert f"{n_wrong} wrong" in text and "chance" in text and len(text.splitlines()) <= 7
    assert f"single-attempt answers ({n_wrong} wrong, {8 - n_wrong} right)" in text  # none revises itself


def chromium_binary():
    """Debian's chromium (installed by `make setup`), or a skip saying why the browser check cannot run."""
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("chromium is not installed and could not be (make setup runs: apt-get install -y chromium); "
                "the page is still checked as text by test_inspect_run_writes_a_self_contained_report")


def load_in_chromium(page: Path, fragment: str = "") -> tuple[str, list[str]]:
    """The DOM after the page's script ran, and every console message the page produced."""
    result = subprocess.run(
        [chromium_binary(), "--headless", "--disable-gpu", "--no-sandbox", "--enable-logging=stderr", "--v=0",
         "--virtual-time-budget=2000", "--dump-dom", page.resolve().as_uri() + fragment],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    console = [line for line in result.stderr.splitlines() if ":CONSOLE" in line]
    return result.stdout, console


@pytest.mark.slow
def test_report_page_loads_in_a_real_browser_and_shows_the_tokens(inspected, tmp_path):
    rows, out, summary = inspected
    dom, console = load_in_chromium(out / "index.html")
    assert console == [], f"the page logged to the console: {console}"
    signals = [json.loads(line) for line in (out / "signals.jsonl").read_text().splitlines()]
    n_tokens = sum(len(s["tokens"]) for s in signals)
    # the status line is written by the page's script: it ran to the end and counted every token
    assert f'<span id="status">{n_tokens} tokens in {len(signals)} responses</span>' in dom
    assert len(re.findall(r'class="t[ "]', dom)) == n_tokens
    for s in signals:
        for piece in s["tokens"]:
            assert html.escape(piece, quote=False) in dom
    assert "Wrong answers (r = 0)" in dom and "Right answers (r = 1)" in dom

    # "#reward" recolours by the token KL reward: negative rewards turn blue, the others red
    dom_reward, console = load_in_chromium(out / "index.html", "#reward")
    assert console == []
    painted = re.findall(r'<span class="t[^"]*" style="background: ?(rgba?\(\d+, ?\d+, ?\d+)[^"]*" '
                         r'data-d="[^"]+" data-r="([^"]+)"', dom_reward)
    assert len(painted) == n_tokens
    blue = [colour.replace(" ", "").endswith("(31,79,209") for colour, _ in painted]
    assert blue == [float(r) < 0 for _, r in painted] and any(blue)
    assert "31, 79, 209" not in dom  # opened without "#reward": coloured by divergence only

    # the check itself catches a broken page
    broken = tmp_path / "broken.html"
    broken.write_text((out / "index.html").read_text().replace("const n = document", "const n = documen"))
    _, console = load_in_chromium(broken)
    assert any("Uncaught" in line for line in console)


@pytest.fixture(scope="module")
def inspected_elsewhere(tmp_path_factory):
    """`sdzero inspect` on a run of another task (the tiny model of tests/tiny.py on a JSONL of sums), whose
    evaluation file is written by `evaluate` with a token cap that cuts some answers."""
    import yaml

    from sdzero.analysis import held_out_texts
    from sdzero.config import load_config
    from sdzero.evaluate import evaluate
    from sdzero.generation import Generator
    from sdzero.pipeline import load_model
    from tiny import build_tiny_model, write_problems

    tmp_path = tmp_path_factory.mktemp("inspect_tiny")
    run = tmp_path / "run"
    build_tiny_model(run / "srt")
    settings = {"model": str(run / "srt"), "task": "tiny:even_length",
                "data": {"path": str(write_problems(tmp_path / "problems.jsonl", 30))},
                "n_phase1": 4, "n_phase2": 4, "sampling": {"max_new_tokens": 8}, "eval": {"k": 4, "n_problems": 6}}
    (run / "config.yaml").write_text(yaml.safe_dump(settings))
    cfg = load_config(run / "config.yaml")
    model, tokenizer = load_model(str(run / "srt"), "cpu")
    problems = [{"id": i, "problem": text} for i, text in held_out_texts(cfg, run).items()]
    evaluate(Generator(model, tokenizer, cfg.sampling), problems, cfg.verifier(), k=4, progress=False, seed=0,
             samples_path=run / "eval" / "srt.jsonl")
    rows = [json.loads(line) for line in (run / "eval" / "srt.jsonl").read_text().splitlines()]
    assert any(r["finished"] for r in rows) and not all(r["finished"] for r in rows), "needs cut and finished answers"
    out = tmp_path / "report"
    out.mkdir()
    (out / "localization.json").write_text("{}")  # left by an earlier report
    summary = inspect_run(run, out, n=24, progress=False)
    return rows, out, summary, tokenizer


def test_inspect_on_another_task_says_nothing_lab_only_and_marks_cut_answers(inspected_elsewhere):
    rows, out, summary, tokenizer = inspected_elsewhere
    text = format_summary(summary)
    assert len(text.splitlines()) == 3, text  # responses, divergence, report
    for lab_only in ("first wrong step", "chance", "token KL reward", "attempt", "n/a"):
        assert lab_only not in text
    assert not (out / "localization.json").exists() and summary["localization"] is None
    page = (out / "index.html").read_text()
    assert "first wrong step" not in page and 'class="t fw"' not in page

    signals = [json.loads(line) for line in (out / "signals.jsonl").read_text().splitlines()]
    assert len(signals) == summary["n"] == len(rows)
    cut = [s for s in signals if not s["finished"]]
    assert len(cut) == summary["n_cut"] == sum(not r["finished"] for r in rows) > 0
    assert f"{len(cut)} cut by the token cap" in text
    assert page.count('<span class="cut">cut by the token cap</span>') == len(cut)
    assert page.count('<span class="end">end</span>') == len(signals) - len(cut)  # finished answers only
    for s in signals:
        assert "first_wrong_step" not in s
        ids = tokenizer.encode(s["text"], add_special_tokens=False)
        # a cut answer is scored on the tokens it has, with no end token made up for it
        assert s["ids"] == (ids + [tokenizer.eos_token_id] if s["finished"] else ids)
        assert len(s["divergence"]) == len(s["ids"])


def test_inspect_on_a_missing_run_folder_is_one_line(tmp_path, capsys):
    from sdzero.cli import main

    with pytest.raises(FileNotFoundError, match=f"^run folder not found: {re.escape(str(tmp_path / 'nope'))}$"):
        inspect_run(tmp_path / "nope", tmp_path / "out")
    assert main(["inspect", "--run", str(tmp_path / "nope"), "--quiet"]) == 2
    assert capsys.readouterr().err == f"sdzero inspect: error: run folder not found: {tmp_path / 'nope'}\n"
