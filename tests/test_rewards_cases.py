"""Labelled reward cases (tests/data/reward_cases.jsonl), one class per way a reward went wrong.

Each case carries the right score, not the one math-verify or the sandbox happened to give, and a
note. Rows are real dataset rows (GSM8K, MATH-500, AIME 2024/2025, AMC 2023, MBPP) -- edited where
the class needs a broken gold -- or marked synthetic; the first test re-derives every real row.
Classes: no_final_answer (None), tolerance, equivalent_forms, pathological (0.0, rejected before any
parse), code_hostile / code_subtle / code_correct (all-or-nothing by default, pass fraction with
partial=true).
"""
import json
import os
import stat
from pathlib import Path

import pytest

from r1pipe.rewards import RewardSet
from r1pipe.rewards.math import extract_answer, normalize, too_costly

CASES_FILE = Path(__file__).with_name("data") / "reward_cases.jsonl"


def load_cases() -> list[dict]:
    cases = [json.loads(line) for line in CASES_FILE.read_text().splitlines() if line.strip()]
    for case in cases:
        if "completion_parts" in case:  # the ~10k-character answers are stored as repeated pieces
            case["completion"] = "".join(text * count for text, count in case.pop("completion_parts"))
    return cases


CASES = load_cases()
MATH_CLASSES = sorted({c["class"] for c in CASES if c["kind"] == "math"})


def _real_row(shared_data, origin: dict) -> dict:
    with open(shared_data / origin["data"]) as handle:
        rows = [json.loads(line) for line in handle]
    if "index" in origin:
        return rows[origin["index"]]
    return next(row for row in rows if row["task_id"] == origin["task_id"])


def _edited(real: dict, case: dict) -> dict:
    row = {key: real[key] for key in case["row"]}
    answer = row.get("answer")
    if case["edit"] == "drop_gsm8k_final":
        row["answer"] = answer.split("####")[0].strip()
    elif case["edit"] == "drop_last_brace":
        cut = answer.rindex("}")
        row["answer"] = answer[:cut] + answer[cut + 1 :]
    elif case["edit"] == "extra_brace":
        row["answer"] = answer + "}"
    elif case["edit"] == "set_answer":
        row["answer"] = case["row"]["answer"]  # a placeholder in place of the real answer
    else:
        assert case["edit"] is None, case["edit"]
    return row


def test_case_rows_are_the_real_rows_with_the_stated_edit(shared_data):
    assert len({case["id"] for case in CASES}) == len(CASES)
    real = [case for case in CASES if case["origin"]]
    assert len(real) >= 50
    for case in real:
        assert case["row"] == _edited(_real_row(shared_data, case["origin"]), case), case["id"]
    for case in CASES:
        assert case["origin"] or "synthetic" in case["note"], case["id"]


def _accuracy(cases: list[dict]) -> list[float | None]:
    """The accuracy reward on each case's row, batched per `source` option as a recipe would."""
    scores: dict[str, float | None] = {}
    for source in sorted({case["source"] for case in cases}):
        group = [case for case in cases if case["source"] == source]
        keys = sorted({key for case in group for key in case["row"]})
        columns = {key: [case["row"].get(key) for case in group] for key in keys}
        result = RewardSet([{"name": "accuracy", "options": {"source": source}}]).score(
            ["p"] * len(group), [case["completion"] for case in group], None, **columns)
        assert result.errors == []
        scores.update(zip([case["id"] for case in group], result.per_reward["accuracy"], strict=True))
    return [scores[case["id"]] for case in cases]


@pytest.mark.parametrize("klass", MATH_CLASSES)
def test_math_cases_score_their_labels(klass):
    cases = [case for case in CASES if case["class"] == klass]
    assert len(cases) >= 10
    got = _accuracy(cases)
    wrong = [(case["id"], case["expected"], score) for case, score in zip(cases, got, strict=True)
             if score != case["expected"]]
    assert wrong == []


def test_pathological_answers_are_rejected_before_any_parse():
    cases = [case for case in CASES if case["class"] == "pathological"]
    for case in cases:
        answer = normalize(extract_answer(case["completion"]))
        assert too_costly(answer, case["row"]["answer"]), case["id"]
    assert sum(len(case["completion"]) > 9000 for case in cases) >= 5


@pytest.fixture()
def outside(tmp_path):
    """A world-writable folder outside the sandbox: only the sandbox's isolation keeps programs out."""
    os.chmod(tmp_path, stat.S_IRWXU | stat.S_IRWXG | stat.S_IRWXO)
    return tmp_path


def _code_scores(cases, outside: Path, options: dict) -> list[float]:
    scores = []
    for style in ("test_list", "inputs"):  # one batch per test style: their columns differ
        group = [case for case in cases if style in case["row"]]
        columns = {key: [case["row"][key] for case in group] for key in group[0]["row"]}
        completions = [case["completion"].replace("{OUTSIDE}", str(outside)) for case in group]
        result = RewardSet([{"name": "code", "options": options}]).score(["p"] * len(group), completions, None,
                                                                           **columns)
        assert result.errors == []
        scores += list(zip([case["id"] for case in group], result.per_reward["code"], strict=True))
    by_id = dict(scores)
    return [by_id[case["id"]] for case in cases]


def test_code_cases_are_all_or_nothing_and_partial_keeps_the_fraction(outside):
    cases = [case for case in CASES if case["kind"] == "code"]
    assert {case["class"] for case in cases} == {"code_hostile", "code_subtle", "code_correct"}
    assert [(c["id"], s) for c, s in zip(cases, _code_scores(cases, outside, {}), strict=True)] == [
        (c["id"], c["expected"]) for c in cases]
    partial = _code_scores(cases, outside, {"partial": True})
    assert partial == [pytest.approx(case["partial"]) for case in cases]
    assert list(outside.iterdir()) == []  # nothing escaped the sandbox
