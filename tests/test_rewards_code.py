"""Code scoring on the real HumanEval and MBPP rows, through the sandbox pool."""
import gzip
import json

import pytest

from r1pipe.rewards.code import extract_code, humaneval_job, score_rows, score_stdio
from r1pipe.rewards.sandbox import Limits, Sandbox


@pytest.fixture(scope="module")
def sandbox():
    # MBPP 123 (amicable numbers up to 9999) alone needs ~7 s of CPU; 30 s keeps a loaded machine green
    box = Sandbox(max_workers=2, limits=Limits(timeout_s=30.0))
    yield box
    box.close()


@pytest.fixture(scope="module")
def humaneval(shared_data):
    with gzip.open(shared_data / "humaneval.jsonl.gz", "rt") as handle:
        return [json.loads(line) for line in handle]


@pytest.fixture(scope="module")
def mbpp(shared_data):
    return [json.loads(line) for line in open(shared_data / "mbpp.jsonl")]


def test_all_humaneval_canonical_solutions_pass(humaneval, sandbox):
    programs = [row["prompt"] + row["canonical_solution"] for row in humaneval]
    scores = score_rows(humaneval, programs, sandbox=sandbox)
    assert [row["task_id"] for row, s in zip(humaneval, scores, strict=True) if s != 1.0] == []


def test_completion_only_bodies_are_continued_from_the_prompt(humaneval, sandbox):
    assert score_rows(humaneval[:4], [row["canonical_solution"] for row in humaneval[:4]], sandbox=sandbox) == [1.0] * 4


def test_wrong_humaneval_solutions_fail(humaneval, sandbox):
    rows = humaneval[:40]
    shifted = [rows[(i + 1) % len(rows)]["canonical_solution"] for i in range(len(rows))]  # another task's body
    wrong = [row["prompt"] + body for row, body in zip(rows, shifted, strict=True)]
    wrong += [row["prompt"] + "    return None\n" for row in rows[:10]]
    wrong += [row["prompt"] + "    raise SystemExit(0)\n" for row in rows[10:20]]
    assert score_rows(rows + rows[:10] + rows[10:20], wrong, sandbox=sandbox) == [0.0] * len(wrong)


def test_humaneval_helpers_come_from_the_prompt_not_the_completion(humaneval, sandbox):
    row = next(r for r in humaneval if r["task_id"] == "HumanEval/32")
    cheat = "def poly(xs, x):\n    return 0.0\n\ndef find_zero(xs):\n    return 0.0\n"
    assert "poly" in humaneval_job(row, cheat).setup
    assert score_rows([row], [cheat], sandbox=sandbox) == [0.0]


def test_all_mbpp_reference_solutions_pass(mbpp, sandbox):
    scores = score_rows(mbpp, [row["code"] for row in mbpp], sandbox=sandbox)
    assert [row["task_id"] for row, s in zip(mbpp, scores, strict=True) if s != 1.0] == []


def test_mbpp_scores_the_fraction_of_asserts(mbpp, sandbox):
    row = next(r for r in mbpp if r["task_id"] == 2)  # similar_elements
    always = "def similar_elements(a, b):\n    return (4, 5)\n"
    assert score_rows([row], [always], sandbox=sandbox)[0] == pytest.approx(1 / 3)


def test_all_or_nothing_scores_one_only_when_every_test_passed(mbpp, sandbox):
    row = next(r for r in mbpp if r["task_id"] == 2)
    programs = ["def similar_elements(a, b):\n    return (4, 5)\n", row["code"],
                row["code"] + "\nimport os\nos._exit(0)\n"]  # exits before the report: no test ran
    assert score_rows([row] * 3, programs, sandbox=sandbox, partial=False) == [0.0, 1.0, 0.0]


def test_stdio_rows_and_extract_code(sandbox):
    completion = "<think>sum it</think>\n```python\nprint(sum(map(int, input().split())))\n```\n"
    program = extract_code(completion)
    assert program.startswith("print(")
    assert score_stdio(program, [("1 2", "3"), ("2 2\n", "4\n"), ("1 1", "3")], sandbox=sandbox) == pytest.approx(2 / 3)
    assert score_rows([{"inputs": ["5 6"], "outputs": ["11"]}], [program], sandbox=sandbox) == [1.0]
    assert extract_code("no code") is None
    with pytest.raises(ValueError, match="stdin/stdout row needs"):
        score_rows([{"question": "x"}], [program], sandbox=sandbox)
