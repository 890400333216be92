"""reasoning-gym as a data source: problems made by any reasoning-gym generator, judged by that generator's
own `score_answer`.

`data.source: "reasoning-gym:NAME"` (with `task: reasoning-gym`) makes the run's problems with generator NAME,
its settings in `data.options`. The held-out set comes from a fixed seed, so it is the same for every run seed;
N1 and N2 come from the run seed. A question met twice (in one stream, or in training and held-out) is kept
once, where it came first (held-out first), so the three sets are disjoint.

sdzero.data reads the generated rows (`generated_rows`) as it reads a file's, once `check_source` has refused a
source that cannot run. Before scoring, the final answer is cut from the response by `data.answer_rule`
(ANSWER_RULES); the problem ends with that rule's instruction (RULE_INSTRUCTIONS) unless `data.instruction` is
set. r = 1 iff `score_answer` returns 1.0 or more: generators give partial credit (e.g. 0.01 for a badly
formatted answer), but SD-Zero needs a verdict, since it picks the control phrase P_r by r and keeps only right
revisions.
"""

from __future__ import annotations

import hashlib
import json
import re
from functools import lru_cache

from sdzero.errors import Refusal
from sdzero.splits import SET_SIZE_HINT
from sdzero.tasks.math import last_boxed

SOURCE = "reasoning-gym"
"""`data.source` prefix and task name of reasoning-gym problems."""
HELD_OUT_SEED = 2**31
"""Generator seed of the held-out stream; far from every training stream (entry i of seed s is drawn with
random.Random(s + i), so nearby seeds would share most of their problems)."""
VALIDATION_SEED = HELD_OUT_SEED + 2**30
"""Generator seed of the validation stream: like the held-out stream, the same for every run seed, and far from
it and from every training stream."""
SEED_STRIDE = 2**20
"""Training stream of run seed s: generator seed (s * SEED_STRIDE) mod HELD_OUT_SEED, so runs with different
seeds get different problems for their first million draws."""
MAX_DRAWS_PER_PROBLEM = 20
"""Without `data.size`, a stream gives up after this many draws per wanted problem (plus 1000): a generator
whose settings allow only a few distinct questions is an error, not an endless loop."""
SPLIT_RULE = (
    f"held_out = the first n_eval distinct questions of the generator at seed {HELD_OUT_SEED} (the same for "
    f"every run seed); validation = the first n_validation distinct questions, not held out, of the generator "
    f"at seed {VALIDATION_SEED} (the same for every run seed); n_phase1, then n_phase2 = the next distinct "
    f"questions, neither held out nor validation, of the generator at seed (run seed * {SEED_STRIDE}) mod "
    f"{HELD_OUT_SEED}, among its first data.size - n_eval - n_validation (default: as many as needed)."
)

DEFAULT_RULE = "answer-tags"
"""reasoning-gym's own convention, and the one rule that fits every generator: answers that are words, lists
or grids cannot be a last number, and may hold braces."""
RULE_INSTRUCTIONS = {
    "answer-tags": "Solve the problem step by step, then give only the final answer between <answer> and "
                   "</answer> tags.",
    "boxed": "Solve the problem step by step, then give only the final answer in \\boxed{}.",
    "last-number": "Solve the problem step by step, and end your response with the final answer as a number.",
}
"""The sentence appended to each problem for each answer rule, unless `data.instruction` is set."""

_NUMBER = re.compile(
    r"(?<![\w.)\]])"  # a sign is a sign only at the start of a number, not the minus of "7-3"
    r"([-+\u2212]?)"
    r"(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"  # 1,234.5 | 12.5 | .5
)


def extract_answer_tags(text: str) -> str | None:
    """The contents of the last <answer>...</answer>, stripped; None when there is no closed pair."""
    end = text.rfind("</answer>")
    start = text.rfind("<answer>", 0, end) if end >= 0 else -1
    if start < 0:
        return None
    return text[start + len("<answer>"):end].strip()


def extract_boxed(text: str) -> str | None:
    """The contents of the last complete \\boxed{...} (nested braces kept), stripped."""
    boxed = last_boxed(text)
    return None if boxed is None else boxed.strip()


def extract_last_number(text: str) -> str | None:
    """The last number in the text as plain digits: its sign kept ("-3", a "+" dropped), decimals kept,
    thousands separators removed ("1,234" -> "1234"); None when the text holds no number."""
    matches = list(_NUMBER.finditer(text))
    if not matches:
        return None
    sign, digits = matches[-1].groups()
    digits = digits.replace(",", "")
    if digits.startswith("."):
        digits = "0" + digits
    return ("-" if sign in ("-", "\u2212") else "") + digits


ANSWER_RULES = {"answer-tags": extract_answer_tags, "boxed": extract_boxed, "last-number": extract_last_number}
"""`data.answer_rule` -> the function that cuts the final answer from a response (None: nothing to cut)."""


def answer_rule(rule: str | None) -> str:
    """The rule's name (DEFAULT_RULE for None); an unknown rule is an error naming the field."""
    rule = DEFAULT_RULE if rule is None else rule
    if rule not in ANSWER_RULES:
        raise Refusal(f"data.answer_rule: unknown rule {rule!r}; choose one of {', '.join(ANSWER_RULES)}")
    return rule


def instruction(rule: str | None) -> str:
    """The default instruction of an answer rule (None: the default rule)."""
    return RULE_INSTRUCTIONS[answer_rule(rule)]


def reference_completion(answer: str, rule: str) -> str:
    """A response that states `answer` in the format `rule` extracts (e.g. to score a data set's gold answers)."""
    rule = answer_rule(rule)
    if rule == "answer-tags":
        return f"<answer>{answer}</answer>"
    if rule == "boxed":
        return f"The final answer is \\boxed{{{answer}}}."
    if extract_last_number(answer) != answer.strip().lstrip("+"):
        raise Refusal(f"the answer {answer!r} is not a plain number, which the last-number rule needs")
    return f"The final answer is {answer}"


# ------------------------------------------------------------------------------------------
# Generators


def generator_name(source: str) -> str:
    """"reasoning-gym:NAME" -> NAME, which must be a reasoning-gym generator."""
    from reasoning_gym.factory import DATASETS

    prefix, _, name = source.partition(":")
    if prefix != SOURCE or not name:
        raise Refusal(f"data.source: {source!r} names no generator; write {SOURCE}:NAME, e.g. {SOURCE}:chain_sum")
    if name not in DATASETS:
        close = [known for known in sorted(DATASETS) if name.lower() in known or known in name.lower()][:5]
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(sorted(DATASETS))}"
        raise Refusal(f"data.source: unknown reasoning-gym generator {name!r}{hint}")
    return name


def make_dataset(name: str, options: dict, *, size: int, seed: int):
    """The generator `name` with `options`; its own refusal of the options becomes an error naming data.options."""
    import reasoning_gym

    if not isinstance(options, dict):
        raise Refusal(f"data.options must be a mapping of {name}'s settings, got {options!r}")
    for reserved in ("size", "seed"):
        if reserved in options:
            where = "data.size" if reserved == "size" else "the run seed"
            raise Refusal(f"data.options: {reserved!r} is not a generator option here ({where} sets it)")
    try:
        return reasoning_gym.create_dataset(name, size=size, seed=seed, **options)
    except Exception as err:  # config dataclasses raise TypeError, asserts, ValueError...: all mean "bad options"
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise Refusal(f"data.options: {name} refuses {options!r}: {message}") from None


@lru_cache(maxsize=64)
def _scorer(name: str, options_json: str):
    return make_dataset(name, json.loads(options_json), size=1, seed=0)


def scorer(name: str, options: dict):
    """The dataset object that scores answers to `name` with `options`, built once and cached."""
    return _scorer(name, json.dumps(options, sort_keys=True))


def check_source(data, task, rules: str) -> str:
    """Refuse a reasoning-gym source (`data`, the run's DataConfig) that cannot run, before anything loads; returns
    the generator name. `rules` are those that read the rows of the run's `task` (sdzero.data.data_rules)."""
    name = generator_name(data.source)
    if data.path is not None:
        raise Refusal("data.path and data.source are both set; choose one")
    if data.eval_path is not None or data.eval_split is not None:
        raise Refusal("data.eval_path and data.eval_split do not apply to a reasoning-gym source: its held-out "
                         "set is generated")
    if rules != SOURCE:
        raise Refusal(f"data.source {data.source!r} needs task {SOURCE!r} (its generator scores the answers), "
                         f"got task {task!r}")
    if data.size is not None and data.size < 1:
        raise Refusal(f"data.size must be >= 1, got {data.size}")
    answer_rule(data.answer_rule)
    scorer(name, data.options)  # the generator's own check of the options
    return name


def _stream(name: str, options: dict, seed: int, limit: int):
    """Up to `limit` entries of the generator at `seed`, made in growing batches (entry i is the same whatever
    the batch size, as each is drawn with its own seed + i)."""
    made, batch = 0, 64
    while made < limit:
        batch = min(limit, max(batch, 2 * made))
        dataset = make_dataset(name, options, size=batch, seed=seed)
        for index in range(made, batch):
            yield dataset[index]
        made = batch


def _json_safe(value):
    # Tuples become lists and unknown objects their repr: rows travel as JSON (samples, records, workers).
    return json.loads(json.dumps(value, default=repr))


def _row(name: str, options: dict, rule: str, entry: dict) -> dict:
    question = entry["question"]
    return {
        "id": f"{name}-{hashlib.sha256(question.encode()).hexdigest()[:12]}",
        "question": question,
        "answer": entry["answer"],
        "metadata": _json_safe(entry.get("metadata", {})),
        "generator": name,
        "options": _json_safe(options),
        "answer_rule": rule,
    }


def _distinct_rows(name: str, options: dict, rule: str, seed: int, wanted: int, limit: int | None,
                   taken: set[str]) -> tuple[list[tuple[str, dict]], int]:
    """(where, row) pairs of the first `wanted` questions of the stream not in `taken` (which grows), drawn
    from at most its first `limit` entries (None: MAX_DRAWS_PER_PROBLEM per problem); and the repeats passed over."""
    rows, repeats = [], 0
    most = limit if limit is not None else MAX_DRAWS_PER_PROBLEM * wanted + 1000
    for index, entry in enumerate(_stream(name, options, seed, most)):
        if len(rows) == wanted:
            break
        if entry["question"] in taken:
            repeats += 1
            continue
        taken.add(entry["question"])
        rows.append((f"{SOURCE}:{name} seed {seed} entry {index}", _row(name, options, rule, entry)))
    if len(rows) < wanted:
        raise Refusal(f"data.size: {name} with options {options!r} made only {len(rows)} distinct new questions "
                         f"in {most} draws, {wanted} needed; raise data.size or widen data.options, or "
                         f"{SET_SIZE_HINT}")
    return rows, repeats


def training_seed(seed: int) -> int:
    """The generator seed of run seed `seed`'s training stream."""
    return seed * SEED_STRIDE % HELD_OUT_SEED


def generated_rows(data, n_phase1: int, n_phase2: int, n_eval: int, seed: int,
                   n_validation: int = 0) -> tuple[dict[str, list[tuple[str, dict]]], int]:
    """The rows of a reasoning-gym source (`data`, the run's DataConfig, checked by check_source), drawn by
    SPLIT_RULE: {"held_out", "validation", "train"} -> [(where, row), ...], the training rows N1's then N2's;
    and the count of repeated questions passed over."""
    name = generator_name(data.source)
    needed = n_phase1 + n_phase2 + n_validation + n_eval
    if data.size is not None and data.size < needed:
        raise Refusal(f"data.size {data.size} is too small: the run needs n_phase1={n_phase1} + "
                         f"n_phase2={n_phase2} + n_validation={n_validation} + n_eval={n_eval} = {needed} problems; "
                         f"{SET_SIZE_HINT}")
    rule, taken = answer_rule(data.answer_rule), set()
    # Held-out first, then validation, then training: the two fixed sets never depend on the run seed.
    held_rows, held_repeats = _distinct_rows(name, data.options, rule, HELD_OUT_SEED, n_eval, None, taken)
    validation_rows, validation_repeats = _distinct_rows(name, data.options, rule, VALIDATION_SEED, n_validation,
                                                         None, taken)
    train_limit = None if data.size is None else data.size - n_eval - n_validation
    train_rows, train_repeats = _distinct_rows(name, data.options, rule, training_seed(seed),
                                               n_phase1 + n_phase2, train_limit, taken)
    rows = {"held_out": held_rows, "validation": validation_rows, "train": train_rows}
    return rows, held_repeats + validation_repeats + train_repeats


def source_record(data) -> dict:
    """What split.json records as the source of a reasoning-gym run."""
    return {"source": data.source, "options": _json_safe(data.options), "size": data.size}


# ------------------------------------------------------------------------------------------
# Scoring


def extract(completion: str, row: dict) -> str | None:
    """The final answer the row's answer rule cuts from the completion, or None (nothing to extract)."""
    return ANSWER_RULES[answer_rule(row.get("answer_rule"))](completion)


def reasoning_gym_reward(completion: str, row: dict) -> float:
    """1.0 iff the row's generator gives full marks (1.0 or more) to the answer its answer rule cuts from the
    completion, else 0.0 (see the module docstring)."""
    for key in ("generator", "metadata"):
        if key not in row:
            raise Refusal(f"problem {row.get('id')!r}: field {key!r} is missing (a reasoning-gym row names its "
                             "generator and carries its metadata)")
    answer = extract(completion, row)
    if answer is None:
        return 0.0
    entry = {"question": row.get("question", ""), "answer": row.get("answer"), "metadata": row["metadata"]}
    try:
        value = scorer(row["generator"], row.get("options") or {}).score_answer(answer, entry)
    except Exception:  # a generator whose scorer chokes on a malformed answer: that answer is simply wrong
        return 0.0
    return 1.0 if value is not None and value >= 1.0 else 0.0
