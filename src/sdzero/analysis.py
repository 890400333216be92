"""Where does the Phase 2 signal sit? Token-level inspection of the teacher-student divergence.

For a response y to a prompt x with reward r, the frozen teacher reads x + y + sep + P_r + sep + y
and the student reads x + y, exactly as in Phase 2 (`sdzero.prompts.distill_layout`). At every
token y_t this module records

* the Phase 2 loss term at that position (`sdzero.losses.per_token_divergence` on the teacher's
  top-k support), and
* the token KL reward  log pi_S(y_t | x, y_<t) - log pi_T(y_t | x, y, P_r, y_<t)  on the full
  vocabulary: negative where the teacher, having read P_r, likes the sampled token more than the
  student does.

`bucket_shares` asks how concentrated the divergence is, `localization` whether on the lab task the
largest value of a wrong answer falls on its first wrong step, and `inspect_run` writes them for a
run directory (localisation only on the lab task) together with one self-contained HTML page of
coloured tokens (sdzero.inspect_page). An answer cut by the token cap is read as it was sampled,
without an end token.

Localisation is measured on both quantities, and they answer different questions. The divergence
compares whole distributions, so it is blind to which token was sampled: a slip the student gave 5%
scores little when both models put 95% on the right digit. The token KL reward is the paper's
per-token measure and scores the sampled token itself, so it is the one whose top token should sit
on the step to revise.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sdzero.distill import micro_batch_tensors, teacher_context_limit
from sdzero.errors import MissingFile, Refusal
from sdzero.inspect_page import report_page
from sdzero.lab.task import PROBLEM_PREFIX, Problem, first_wrong_step
from sdzero.losses import per_token_divergence, teacher_topk
from sdzero.modeling import max_positions
from sdzero.prompts import (ControlPhrases, bridge_ids, distill_layout, end_of_turn_ids, generator_prompt_ids,
                            token_pieces)
from sdzero.training import logits_at, model_device, read_json


@dataclass
class TokenSignal:
    """The per-token Phase 2 signal of one response.

    `tokens[t]` is the text of token t, so that "".join(tokens) == text; `offsets[t]` is its
    (start, end) character range in `text`. Special tokens such as the end-of-turn token decode to ""
    and get an empty range at the end of the text.
    """

    prompt: str
    text: str
    ids: list[int]
    tokens: list[str]
    offsets: list[tuple[int, int]]
    divergence: list[float]
    token_kl_reward: list[float]
    reward: float
    phrase: str
    finished: bool = True
    """False for a response cut by the token cap: it has no end-of-turn token, and none is scored."""

    def tokens_in_span(self, start: int, end: int) -> list[int]:
        """Indices of the tokens that overlap the character span [start, end)."""
        return [t for t, (a, b) in enumerate(self.offsets) if a < end and b > start]


@torch.no_grad()
def token_signal(student, teacher, tokenizer, items, phrases: ControlPhrases, *, divergence: str = "reverse",
                 top_k: int | None = 64, batch_size: int = 32, mixed_weight: float = 0.5,
                 tail_bucket: bool = False, system_prompt: str | None = None, max_length: int | None = None,
                 first_copy_keeps_end: bool = False, progress: bool = False) -> list[TokenSignal]:
    """Per-token divergence and token KL reward for each (prompt_text, response_ids, reward) item.

    `response_ids` are the response tokens as sampled: ending with the end-of-turn token when the
    response finished, without one when it was cut by the token cap (its `finished` is then False).
    The divergence options mean what they mean in `DistillConfig`; the layout is Phase 2's. With
    `max_length` (Phase 2's `teacher_max_length`) responses are cut exactly as Phase 2 cuts them (an
    item whose prompt alone does not fit keeps no token), so the signal is the one training saw.
    """
    eot = end_of_turn_ids(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = model_device(student)
    rows = []
    for prompt, response, reward in items:
        prompt_ids = generator_prompt_ids(tokenizer, prompt, system_prompt)
        layout = distill_layout(prompt_ids, list(response), bridge_ids(tokenizer, phrases, reward), eot, max_length,
                                first_copy_keeps_end=first_copy_keeps_end)
        kept = list(response)[:layout.n_targets] if layout is not None else []
        rows.append((prompt, kept, float(reward), layout))
    values: list[tuple[list[float], list[float]]] = [([], []) for _ in rows]
    todo = [i for i, row in enumerate(rows) if row[3] is not None and row[3].n_targets]
    modes = (student.training, teacher.training)
    student.eval()
    teacher.eval()
    for start in tqdm(range(0, len(todo), batch_size), desc="token signal", disable=not progress, leave=False):
        chunk = todo[start:start + batch_size]
        layouts = [rows[i][3] for i in chunk]
        s_ids, s_att, t_ids, t_att, s_pos, t_pos, mask = micro_batch_tensors(layouts, pad_id, device)
        t_device = next(teacher.parameters()).device
        teacher_logits = logits_at(teacher, t_ids.to(t_device), t_att.to(t_device), t_pos.to(t_device)).to(device)
        student_logits = logits_at(student, s_ids, s_att, s_pos)
        t_logprobs, t_indices = teacher_topk(teacher_logits, top_k)
        per_token = per_token_divergence(student_logits, t_logprobs, t_indices, divergence=divergence,
                                         mixed_weight=mixed_weight, tail_bucket=tail_bucket)
        # the token each position predicts is the next one of the student's input
        targets = s_ids.gather(1, s_pos + 1).unsqueeze(-1)
        log_s = torch.log_softmax(student_logits.float(), dim=-1).gather(-1, targets).squeeze(-1)
        log_t = torch.log_softmax(teacher_logits.float(), dim=-1).gather(-1, targets).squeeze(-1)
        kl_reward = log_s - log_t
        for row, i in enumerate(chunk):
            n = int(mask[row].sum())
            values[i] = (per_token[row, :n].tolist(), kl_reward[row, :n].tolist())
    student.train(modes[0])
    teacher.train(modes[1])
    signals = []
    for (prompt, response, reward, _), (div, kl_reward), item in zip(rows, values, items):
        finished = bool(item[1]) and item[1][-1] in eot  # judged on the whole response, before any cut
        text, pieces, offsets = token_pieces(tokenizer, response)
        signals.append(TokenSignal(prompt=prompt, text=text, ids=response, tokens=pieces, offsets=offsets,
                                   divergence=div, token_kl_reward=kl_reward, reward=reward,
                                   phrase=phrases.for_reward(reward), finished=finished))
    return signals


def bucket_shares(signals: list[TokenSignal], n_buckets: int = 20) -> list[float]:
    """Share of the total divergence held by each of `n_buckets` equal-count token buckets.

    All tokens of `signals` are sorted by divergence, largest first, and cut into buckets whose sizes
    differ by at most one (the larger ones first, so the shares never increase). Shares sum to 1;
    an empty list of tokens gives []. Call it separately for right and wrong answers.
    """
    values = sorted((d for s in signals for d in s.divergence), reverse=True)
    if not values:
        return []
    size, extra = divmod(len(values), n_buckets)
    total = sum(values)
    shares, start = [], 0
    for b in range(n_buckets):
        end = start + size + (1 if b < extra else 0)
        # all-zero divergence: every token holds the same (zero) amount, so share by count
        shares.append(sum(values[start:end]) / total if total > 0 else (end - start) / len(values))
        start = end
    return shares


MEASURES = ("token_kl_reward", "divergence")  # per-token quantities `localization` ranks tokens by


def _mean(signals: list[TokenSignal], measure: str = "divergence") -> float | None:
    values = [v for s in signals for v in getattr(s, measure)]
    return sum(values) / len(values) if values else None


def revises_itself(signal: TokenSignal, phrases: ControlPhrases) -> bool:
    """True when the response already holds a control phrase: several attempts in one answer (as
    SRT models write), judged by its last attempt, with twice as long a teacher context."""
    return phrases.correct in signal.text or phrases.wrong in signal.text


def localization(signals: list[TokenSignal], problems_by_response: list[Problem | None],
                 phrases: ControlPhrases | None = None, measure: str = "token_kl_reward") -> dict:
    """Does the largest `measure` of a wrong lab answer fall on its first wrong step?

    `measure` is a per-token field of `TokenSignal` (one of `MEASURES`). `problems_by_response[i]`
    is the lab `Problem` that `signals[i]` answers (None: not a lab problem, skipped). Wrong answers
    count when their first attempt has a first wrong step. The rate is how often the token with the
    largest value overlaps that step; chance is the step's share of the response's tokens, averaged;
    ratio = rate / chance. `kl_mean` is the mean per-token value over wrong and over right answers.

    With `phrases`, the same figures are added for single-attempt and multi-attempt responses
    (`revises_itself`) apart: a multi-attempt "right" answer usually holds a wrong first attempt,
    and its long teacher context is where a small teacher may stop being reliable.
    """
    if measure not in MEASURES:
        raise Refusal(f"measure must be one of {MEASURES}, not {measure!r}")
    if len(problems_by_response) != len(signals):
        raise Refusal(f"{len(signals)} signals but {len(problems_by_response)} problems")
    hits, chances, wrong, right = [], [], [], []
    for signal, problem in zip(signals, problems_by_response):
        values = getattr(signal, measure)
        if problem is None or not values:
            continue
        if signal.reward >= 1.0:
            right.append(signal)
            continue
        span = first_wrong_step(signal.text, problem)
        step = signal.tokens_in_span(*span) if span else []
        if not step:
            continue
        wrong.append(signal)
        top = max(range(len(values)), key=values.__getitem__)
        hits.append(1.0 if top in step else 0.0)
        chances.append(len(step) / len(values))
    rate = sum(hits) / len(hits) if hits else None
    chance = sum(chances) / len(chances) if chances else None
    result = {
        "wrong": {"n": len(wrong), "top_kl_in_first_wrong_step": rate, "chance": chance,
                  "ratio": rate / chance if chances and chance > 0 else None,
                  "kl_mean": _mean(wrong, measure)},
        "right": {"n": len(right), "kl_mean": _mean(right, measure)},
    }
    if phrases is not None:
        for name, multi in (("single_attempt", False), ("multi_attempt", True)):
            keep = [i for i, signal in enumerate(signals) if revises_itself(signal, phrases) == multi]
            result[name] = localization([signals[i] for i in keep], [problems_by_response[i] for i in keep],
                                        measure=measure)
    return result


def lab_problem(row: dict) -> Problem | None:
    """The lab problem of an evaluation row (from its "problem" text or its "lab-<digits>" id), or None."""
    if str(row.get("problem", "")).startswith(PROBLEM_PREFIX):
        return Problem.from_row(row)
    row_id = str(row.get("id", ""))
    if row_id.startswith("lab-") and row_id[4:].isdigit():
        return Problem(tuple(int(c) for c in row_id[4:]))
    return None


def _mix(rows: list[dict], n: int) -> list[dict]:
    """Up to n rows in file order, alternating wrong and right answers while both last."""
    wrong = [r for r in rows if float(r["reward"]) < 1.0]
    right = [r for r in rows if float(r["reward"]) >= 1.0]
    mixed = []
    for i in range(max(len(wrong), len(right))):
        mixed += [group[i] for group in (wrong, right) if i < len(group)]
    return mixed[:n]


def answer_finished(row: dict, max_new_tokens: int) -> bool:
    """Whether an evaluation sample ended with the end-of-turn token: its "finished" field, or for a file
    written without one, whether it stopped short of the token cap."""
    if "finished" in row:
        return bool(row["finished"])
    return not row.get("tokens") or row["tokens"] < max_new_tokens


def stage_model(run_dir: Path, cfg, stage: str) -> str:
    """The model of a stage of the run: "base" is the run's base model, any other name a folder of the
    run holding a saved model (srt, sdzero, ...)."""
    if stage == "base":
        return cfg.model
    if (run_dir / stage / "config.json").exists():
        return str(run_dir / stage)
    stages = ["base"] + sorted(d.name for d in run_dir.iterdir() if (d / "config.json").exists()) \
        if run_dir.is_dir() else ["base"]
    raise MissingFile(f"{run_dir} has no stage {stage!r}; its stages: {', '.join(stages)}")


def held_out_texts(cfg, run_dir: Path) -> dict[str, str]:
    """id -> problem text of the run's held-out problems (the evaluation files keep only the ids), as
    recorded in its split.json when it has one."""
    from sdzero.data import load_problem_sets

    sizes, n_validation = (0, 0, cfg.eval.n_problems), 0
    if (run_dir / "split.json").exists():
        split = read_json(run_dir / "split.json")
        sizes = (len(split["n_phase1"]), len(split["n_phase2"]), len(split["held_out"]))
        n_validation = len(split.get("validation", []))  # none in a split from an older sdzero
    sets = load_problem_sets(cfg.data, cfg.task, *sizes, cfg.seed, n_validation=n_validation,
                             record_dir=run_dir if (run_dir / "split.json").exists() else None)
    return {p["id"]: p["problem"] for p in sets.held_out}


def _signal_items(rows: list[dict], problems: list[Problem | None], cfg, run_dir: Path, tokenizer,
                  samples: Path) -> list[tuple]:
    """(prompt text, response ids, reward) of each evaluation row, as `token_signal` takes them."""
    texts = None  # id -> problem text, from the run's data, read only when a row is not a lab problem
    items = []
    for row, problem in zip(rows, problems):
        prompt = row.get("problem") or (problem.text if problem else None)
        if prompt is None:
            texts = texts or held_out_texts(cfg, run_dir)
            prompt = texts.get(str(row.get("id")))
        if prompt is None:
            raise Refusal(f"{samples}: row {row.get('id')!r} is neither a lab problem nor a held-out problem of "
                             f"the run's data ({cfg.data.path})")
        ids = tokenizer.encode(row["response"], add_special_tokens=False)
        if answer_finished(row, cfg.sampling.max_new_tokens):
            ids.append(tokenizer.eos_token_id)
        items.append((prompt, ids, float(row["reward"])))
    return items


def _write_report(out_dir: Path, rows: list[dict], signals: list[TokenSignal], spans: list, summary: dict,
                  is_lab: bool) -> None:
    """localization.json (on the lab task), signals.jsonl and index.html in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    localization_path = out_dir / "localization.json"
    if is_lab:
        localization_path.write_text(json.dumps(summary["localization"], indent=2))
    elif localization_path.exists():
        localization_path.unlink()  # an earlier report's, on other answers
    with open(out_dir / "signals.jsonl", "w") as f:
        for row, signal, span in zip(rows, signals, spans):
            lab_fields = {"first_wrong_step": span} if is_lab else {}
            f.write(json.dumps({"id": row.get("id"), **asdict(signal), **lab_fields}) + "\n")
    entries = [(row.get("id"), s, span) for row, s, span in zip(rows, signals, spans)]
    (out_dir / "index.html").write_text(report_page(entries, summary))


def inspect_run(run_dir: str | Path, out_dir: str | Path, *, n: int = 200, student: str = "srt",
                teacher: str = "srt", device: str | None = None, progress: bool = True) -> dict:
    """Token-level report of a run: index.html, signals.jsonl and, on the lab task, localization.json in
    `out_dir`.

    The default pair, the SRT model as both student and teacher on its own answers, is the Phase 2
    signal at its first step: the one whose localisation the method relies on. student="sdzero"
    shows what is left of it after Phase 2 (a frozen teacher's residual, not a fresh signal).

    Loads the student and teacher stages (`stage_model`: "base" or a stage folder of the run),
    takes up to `n` responses of run_dir/eval/<student>.jsonl, alternating wrong and right
    ones, and scores them with the run's control phrases and divergence settings (config.yaml, or
    the defaults without one). The evaluation file keeps the response text, not its token ids, so
    the ids are rebuilt as tokenizer.encode(text), followed by EOS when the response finished (a response
    cut at max_new_tokens gets none, and is marked cut); a sampled non-canonical tokenization becomes
    canonical. The lab-only figures (first wrong step, localisation) are computed only when the responses
    answer lab problems. Returns the summary that `format_summary` prints.
    """
    from sdzero.config import RunConfig, load_config
    from sdzero.pipeline import load_model
    from sdzero.training import read_jsonl

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if not run_dir.is_dir():
        raise MissingFile(f"run folder not found: {run_dir}")
    cfg = load_config(run_dir / "config.yaml") if (run_dir / "config.yaml").exists() else RunConfig()
    student_path, teacher_path = stage_model(run_dir, cfg, student), stage_model(run_dir, cfg, teacher)
    student_model, tokenizer = load_model(student_path, device)
    teacher_model = student_model if teacher_path == student_path else load_model(teacher_path, device)[0]

    samples = run_dir / "eval" / f"{student}.jsonl"
    if not samples.exists():
        raise MissingFile(f"{samples} not found: inspect reads the evaluation samples that `sdzero demo` and "
                                f"`sdzero run` write to {run_dir / 'eval'}")
    rows = _mix(read_jsonl(samples), n)
    problems = [lab_problem(row) for row in rows]
    items = _signal_items(rows, problems, cfg, run_dir, tokenizer, samples)
    d = cfg.distill
    signals = token_signal(student_model, teacher_model, tokenizer, items, cfg.phrases(), divergence=d.divergence,
                           top_k=d.top_k, mixed_weight=d.mixed_weight, tail_bucket=d.tail_bucket,
                           max_length=teacher_context_limit(d.teacher_max_length, max_positions(teacher_model)),
                           system_prompt=cfg.system_prompt, first_copy_keeps_end=d.first_copy_keeps_end,
                           progress=progress)

    wrong = [s for s in signals if s.reward < 1.0]
    right = [s for s in signals if s.reward >= 1.0]
    is_lab = any(problem is not None for problem in problems)
    loc = {measure: localization(signals, problems, cfg.phrases(), measure) for measure in MEASURES} if is_lab else None
    spans = [first_wrong_step(s.text, p) if p is not None and s.reward < 1.0 else None
             for s, p in zip(signals, problems)]
    summary = {
        "student": student_path, "teacher": teacher_path, "divergence": d.divergence, "top_k": d.top_k,
        "n": len(signals), "n_wrong": len(wrong), "n_right": len(right),
        "n_cut": sum(not s.finished for s in signals),
        "kl_mean_wrong": _mean(wrong), "kl_mean_right": _mean(right),
        "buckets": {"wrong": bucket_shares(wrong), "right": bucket_shares(right)},
        "localization": loc, "out_dir": str(out_dir),
    }
    _write_report(out_dir, rows, signals, spans, summary, is_lab)
    return summary


def format_summary(summary: dict) -> str:
    """A few lines for the terminal."""
    def num(x, spec=".4f"):
        return "n/a" if x is None else format(x, spec)

    def top(shares):
        return "n/a" if not shares else f"{shares[0]:.1%}"

    def located(part):
        w = part["wrong"]
        return (f"top token in the first wrong step {num(w['top_kl_in_first_wrong_step'], '.1%')} vs chance "
                f"{num(w['chance'], '.1%')} (ratio {num(w['ratio'], '.2f')}, n={w['n']}); mean wrong "
                f"{num(w['kl_mean'])}, right {num(part['right']['kl_mean'])}")

    def split(name):
        part = summary["localization"]["token_kl_reward"].get(name)
        if part is None:
            return None
        return (f"  {name.replace('_', '-')} answers ({part['wrong']['n']} wrong, {part['right']['n']} right): "
                + located(part))

    n_buckets = len(summary["buckets"]["wrong"] or summary["buckets"]["right"]) or 20
    loc = summary["localization"]
    cut = summary.get("n_cut", 0)
    lab_lines = [] if loc is None else ["token KL reward: " + located(loc["token_kl_reward"]),
                                        split("single_attempt"), split("multi_attempt"),
                                        "divergence: " + located(loc["divergence"])]
    return "\n".join(line for line in [
        f"{summary['n']} responses ({summary['n_wrong']} wrong, {summary['n_right']} right"
        + (f"; {cut} cut by the token cap" if cut else "") + f"): "
        f"student {summary['student']} vs teacher {summary['teacher']}",
        f"mean per-token {summary['divergence']} divergence: wrong {num(summary['kl_mean_wrong'])}, "
        f"right {num(summary['kl_mean_right'])}; the top {1 / n_buckets:.0%} of tokens hold "
        f"{top(summary['buckets']['wrong'])} of it on wrong answers, {top(summary['buckets']['right'])} on right ones",
        *lab_lines,
        f"report: {Path(summary['out_dir']) / 'index.html'}",
    ] if line)
