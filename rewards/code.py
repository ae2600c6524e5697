"""Scoring Python programs against HumanEval rows, MBPP rows and stdin/stdout cases.

A score is either the pass fraction or, with `partial=False` (the `code` reward's default, after
R1: a completion is correct or not), 1.0 only when every test passed after all of them ran and 0.0
otherwise: partial credit rewards a program that passes the easy asserts and fails the rest, which
is what a subtly wrong or a hostile program (writing outside its directory, printing fake markers)
gets. Every program runs in `r1pipe.rewards.sandbox`; the batch functions send all jobs through its
bounded pool at once. Used by the `code` reward and by evaluation.
"""

from __future__ import annotations

import re

from r1pipe.rewards.sandbox import Job, Limits, RunResult, Sandbox, default_sandbox, function_job, stdio_job

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.DOTALL)


def extract_code(completion: str, language: str = "python") -> str | None:
    """The last fenced code block in `language` (or untagged); None when there is none."""
    blocks = [body for tag, body in _FENCE.findall(completion) if tag.lower() in ("", language, "py")]
    return blocks[-1] if blocks else None


def humaneval_job(row: dict, program: str) -> Job:
    """HumanEval: the row's `test` defines `check`; `check(<entry_point>)` is the single test.

    The prompt runs as trusted setup, so the test's helper functions (e.g. `poly` in HumanEval/32)
    are the prompt's, not ones the completion redefined. A program that does not define the entry
    point itself is treated as the continuation of the prompt.
    """
    for key in ("prompt", "test", "entry_point"):
        if key not in row:
            raise ValueError(f"HumanEval row {row.get('task_id', '?')}: missing field {key!r}")
    entry = row["entry_point"]
    if not re.search(rf"^\s*def\s+{re.escape(entry)}\s*\(", program, re.MULTILINE):
        program = row["prompt"] + program
    test = f"{row['test']}\ncheck({entry})\n"
    return function_job(program, [test], setup=row["prompt"], expose=[entry])


def mbpp_job(row: dict, program: str, include_challenge: bool = False) -> Job:
    """MBPP: each assert of `test_list` (and `challenge_test_list` if asked) is one test."""
    if "test_list" not in row:
        raise ValueError(f"MBPP row {row.get('task_id', '?')}: missing field 'test_list'")
    tests = list(row["test_list"]) + (list(row.get("challenge_test_list") or []) if include_challenge else [])
    return function_job(program, tests, setup=row.get("test_setup_code") or "")


def stdio_cases(row: dict) -> list[tuple[str, str]]:
    """stdin/stdout cases from `inputs`/`outputs` lists, or a `tests` list of {input, output}."""
    if "inputs" in row and "outputs" in row:
        return list(zip(row["inputs"], row["outputs"], strict=True))
    if isinstance(row.get("tests"), list):
        return [(case["input"], case["output"]) for case in row["tests"]]
    raise ValueError("stdin/stdout row needs 'inputs' and 'outputs' lists or a 'tests' list of {input, output}")


def job_for(row: dict, program: str) -> Job:
    """Pick the test style from the row's fields: HumanEval, MBPP or stdin/stdout."""
    if "entry_point" in row and "test" in row:
        return humaneval_job(row, program)
    if "test_list" in row:
        return mbpp_job(row, program)
    return stdio_job(program, stdio_cases(row))


def score_rows(rows: list[dict], programs: list[str | None], *, sandbox: Sandbox | None = None,
               limits: Limits | None = None, partial: bool = True) -> list[float]:
    """Score of each program on its row's tests (0.0 for a missing program): the pass fraction, or
    with `partial=False` 1.0 when every test passed (`all_passed`) and 0.0 otherwise."""
    if len(rows) != len(programs):
        raise ValueError(f"score_rows: {len(rows)} rows but {len(programs)} programs")
    todo = [(i, job_for(row, program)) for i, (row, program) in enumerate(zip(rows, programs, strict=True)) if program]
    scores = [0.0] * len(rows)
    results = (sandbox or default_sandbox()).map([job for _, job in todo], limits)
    for (i, _), result in zip(todo, results, strict=True):
        scores[i] = result.pass_fraction if partial else float(all_passed(result))
    return scores


def all_passed(result: RunResult) -> bool:
    """The run ended cleanly with its report, with one passing bit for every test."""
    return result.status == "ok" and bool(result.passed) and all(result.passed)


def score_stdio(program: str, cases, *, sandbox: Sandbox | None = None, limits: Limits | None = None) -> float:
    return (sandbox or default_sandbox()).run(stdio_job(program, cases), limits).pass_fraction
