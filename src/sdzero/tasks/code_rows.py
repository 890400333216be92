"""Code problem rows: their tests, language and default instruction.

A code problem is `{"id", "problem", "tests"}`, optionally with `language` ("python" or "cpp"). Its tests are of
three kinds: stdin tests `{"input", "output"}`, call tests `{"fn_name", "args", "expected"}` (read from APPS/TACO's
`input_output` and LiveCodeBench's functional tests) and check tests `{"check", "entry_point", "prompt", "setup"}`
(made from HumanEval and MBPP rows by sdzero.tasks.codesuites). `parse_tests` reads every form a data set writes
them in; sdzero.tasks.code runs them.
"""

from __future__ import annotations

import json

from sdzero.errors import Refusal
from sdzero.tasks import codesuites

CODE_INSTRUCTION = (
    "Write a complete Python program that reads the input from standard input and writes the "
    "answer to standard output. Give the whole program in one ```python code block."
)
CALL_INSTRUCTION = (
    "Write the Python function `{fn_name}` (as a method of `class Solution` when the problem gives that "
    "class) so that it returns the answer. Give the whole code in one ```python code block."
)
CPP_INSTRUCTION = (
    "Write a complete C++17 program that reads the input from standard input and writes the "
    "answer to standard output. Give the whole program in one ```cpp code block."
)

LANGUAGES = {"python": "python", "py": "python", "python3": "python", "cpp": "cpp", "c++": "cpp"}
"""The languages the code verifier runs, by every name a dataset's `language` column may use."""


def code_language(name: str) -> str:
    """"python" or "cpp" for any of their names in LANGUAGES; an error for anything else."""
    if not isinstance(name, str) or name.lower() not in LANGUAGES:
        raise Refusal(f"unsupported language {name!r}; use one of {', '.join(LANGUAGES)}")
    return LANGUAGES[name.lower()]


def is_call_test(test: dict) -> bool:
    """A call test {"fn_name", "args", "expected"}, as opposed to a stdin test {"input", "output"}."""
    return "fn_name" in test


def is_check_test(test: dict) -> bool:
    """A check test (HumanEval's check function or MBPP's asserts), as opposed to stdin and call tests."""
    return "check" in test


def check_test(where: str, test: dict, field_name: str) -> dict:
    """A check test as written back by the loader ({"check", "entry_point", "prompt", "setup"}), checked."""
    for key in ("check", "prompt", "setup"):
        if not isinstance(test.get(key, ""), str):
            raise Refusal(f"{where}: field {field_name}.{key} must be a string, got {type(test[key]).__name__}")
    entry_point = test.get("entry_point")
    if entry_point is not None and (not isinstance(entry_point, str) or not entry_point.isidentifier()):
        raise Refusal(f"{where}: field {field_name}.entry_point must be a function name, got {entry_point!r}")
    if not test["check"].strip():
        raise Refusal(f"{where}: field {field_name}.check is empty")
    if test.get("prompt") and entry_point is None:
        raise Refusal(f"{where}: field {field_name}: a check test with a prompt needs its entry_point")
    return {"check": test["check"], "entry_point": entry_point, "prompt": test.get("prompt", ""),
            "setup": test.get("setup", "")}


def parse_tests(where: str, value, name: str, row: dict | None = None) -> list[dict]:
    """Tests from a list, its JSON string, or two columns, as a list of
    stdin tests {"input": str, "output": str} and call tests {"fn_name": str, "args": [...], "expected": value}
    (and check tests {"check", "entry_point", "prompt", "setup"}, as `validate_rows` makes them from HumanEval
    and MBPP rows, see sdzero.tasks.codesuites).

    Call tests come from APPS/TACO's `input_output` ({"fn_name", "inputs": [[args...], ...],
    "outputs": [value, ...]}) and from LiveCodeBench's tests with "testtype": "functional" (one JSON
    argument per line of "input", the return value as JSON in "output", the function named by the
    row's metadata.func_name).
    """
    if value is None:
        raise Refusal(f"{where}: field {name!r} is missing")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise Refusal(f"{where}: field {name!r} is a string but not valid JSON ({err.msg})") from None
    if isinstance(value, dict):  # column style: {"input": [...], "output": [...]} (or inputs/outputs)
        ins, outs = value.get("input", value.get("inputs")), value.get("output", value.get("outputs"))
        if not isinstance(ins, list) or not isinstance(outs, list) or len(ins) != len(outs):
            expected = "{'input': [...], 'output': [...]} lists of equal length"
            raise Refusal(f"{where}: field {name!r}: expected {expected}")
        if value.get("fn_name") is not None:  # APPS/TACO call-based
            fn_name = _function_name(where, value["fn_name"], f"{name}.fn_name")
            for i, args in enumerate(ins):
                if not isinstance(args, list):
                    got = type(args).__name__
                    raise Refusal(f"{where}: field {name}.inputs[{i}] must be a list of arguments, got {got}")
            # "unwrap": APPS/TACO often write a return value v as [v]; the verifier accepts both.
            value = [{"fn_name": fn_name, "args": a, "expected": o, "unwrap": True} for a, o in zip(ins, outs)]
        else:
            value = [{"input": i, "output": o} for i, o in zip(ins, outs)]
    if not isinstance(value, list):
        raise Refusal(f"{where}: field {name!r} must be a list of tests, got {type(value).__name__}")
    if not value:
        raise Refusal(f"{where}: field {name!r} is empty")
    tests = []
    for i, test in enumerate(value):
        if not isinstance(test, dict):
            raise Refusal(f"{where}: field {name}[{i}] must be an object with 'input' and 'output'")
        if is_check_test(test):  # HumanEval / MBPP, as written back by this loader
            tests.append(check_test(where, test, f"{name}[{i}]"))
            continue
        if "fn_name" in test:  # already a call test (e.g. a row written back by this loader)
            fn_name = _function_name(where, test["fn_name"], f"{name}[{i}].fn_name")
            if not isinstance(test.get("args"), list) or "expected" not in test:
                raise Refusal(f"{where}: field {name}[{i}]: a call test needs 'args' (a list) and 'expected'")
            tests.append({"fn_name": fn_name, "args": test["args"], "expected": test["expected"],
                          **({"unwrap": True} if test.get("unwrap") else {})})  # fmt: skip
            continue
        for key in ("input", "output"):
            if not isinstance(test.get(key), str):
                got = "missing" if test.get(key) is None else type(test[key]).__name__
                raise Refusal(f"{where}: field {name}[{i}].{key} must be a string, got {got}")
        if test.get("testtype") == "functional":  # LiveCodeBench
            tests.append(_functional_test(where, test, f"{name}[{i}]", row))
        else:
            tests.append({"input": test["input"], "output": test["output"]})
    return tests


def _function_name(where: str, value, field_name: str) -> str:
    if not isinstance(value, str) or not value.isidentifier():
        raise Refusal(f"{where}: field {field_name} must be a function name, got {value!r}")
    return value


def _functional_test(where: str, test: dict, field_name: str, row: dict | None) -> dict:
    """A LiveCodeBench functional test as a call test; the function is the row's metadata.func_name."""
    metadata = (row or {}).get("metadata")
    if isinstance(metadata, str):
        try:
            metadata = json.loads(metadata)
        except json.JSONDecodeError as err:
            raise Refusal(f"{where}: field 'metadata' is a string but not valid JSON ({err.msg})") from None
    if not isinstance(metadata, dict) or metadata.get("func_name") is None:
        raise Refusal(f"{where}: field {field_name} is a functional test, but the row has no metadata.func_name")
    fn_name = _function_name(where, metadata["func_name"], "metadata.func_name")
    args = []
    for line_no, line in enumerate(test["input"].splitlines(), 1):
        if line.strip():
            try:
                args.append(json.loads(line))
            except json.JSONDecodeError as err:
                where_field = f"{where}: field {field_name}.input line {line_no}"
                raise Refusal(f"{where_field}: not valid JSON ({err.msg})") from None
    try:
        expected = json.loads(test["output"])
    except json.JSONDecodeError as err:
        raise Refusal(f"{where}: field {field_name}.output: not valid JSON ({err.msg})") from None
    return {"fn_name": fn_name, "args": args, "expected": expected}


def code_fields(where: str, row: dict, tests_field: str | None, suite: str | None) -> dict:
    """{"tests": [...]} of a code row, with "language" when the row names one. `suite` ("humaneval", "mbpp")
    reads the tests from that format's own columns, else they are in the column `tests_field`."""
    if suite is not None:
        return {"tests": codesuites.suite_tests(where, row, suite)}
    fields = {"tests": parse_tests(where, row.get(tests_field), tests_field, row)}
    if row.get("language") is not None:
        try:
            fields["language"] = code_language(row["language"])
        except ValueError as err:
            raise Refusal(f"{where}: field 'language': {err}") from None
        if any(is_call_test(t) for t in fields["tests"]) and fields["language"] != "python":
            raise Refusal(f"{where}: field 'language': call tests need Python, got {row['language']!r}")
    return fields


def default_instruction(problem: dict, row: dict, suite: str | None) -> str:
    """The instruction of a code problem (its `code_fields` read): complete the function of a HumanEval or MBPP
    row, write the function its call tests call (from the row's starter code when it has one), else a whole
    program on stdin/stdout, in C++ for rows whose language is cpp."""
    if suite is not None:
        return codesuites.suite_instruction(problem["tests"][0])
    call_names = sorted({t["fn_name"] for t in problem["tests"] if is_call_test(t)})
    if call_names:
        instruction = CALL_INSTRUCTION.format(fn_name=call_names[0])
        starter = row.get("starter_code")  # APPS, TACO and LiveCodeBench all name it so
        if isinstance(starter, str) and starter.strip():
            instruction += f" Start from:\n```python\n{starter.rstrip()}\n```"
        return instruction
    return CPP_INSTRUCTION if problem.get("language") == "cpp" else CODE_INSTRUCTION
