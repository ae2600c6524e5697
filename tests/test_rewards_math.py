"""Math answer extraction, gold answers of the real datasets, and math-verify equivalence."""
import json
import time

import pytest

from r1pipe.rewards import RewardError
from r1pipe.rewards.math import Verifier, extract_answer, gold_answer, verify, verify_many


def rows(path):
    return [json.loads(line) for line in open(path)]


def test_extract_answer_takes_last_balanced_box():
    assert extract_answer(r"first \boxed{1} then \boxed{\frac{1}{2}}") == r"\frac{1}{2}"
    assert extract_answer(r"\boxed{x^{2} + \{1\}}") == r"x^{2} + \{1\}"
    assert extract_answer(r"so \boxed 5.") == "5."
    assert extract_answer(r"\fbox{7}") == "7"
    assert extract_answer("no answer here") is None
    assert extract_answer(r"broken \boxed{1 and earlier") is None
    assert extract_answer("Answer: 42", pattern=r"Answer:\s*(\S+)") == "42"


def test_gold_answer_sources():
    assert gold_answer({"question": "q", "answer": "so 3 + 4 = 7\n#### 1,234"}) == "1,234"
    assert gold_answer("work\n#### 18") == "18"
    assert gold_answer({"answer": r"\frac{1}{2}", "solution": r"\boxed{0.5}"}) == r"\frac{1}{2}"
    assert gold_answer({"solution": r"... so \boxed{\dfrac{3}{4}}."}, source="math") == r"\dfrac{3}{4}"
    assert gold_answer({"answer": 204}) == "204"
    assert gold_answer({"answer": "033"}, source="aime") == "33"
    assert gold_answer({"answer": "n/a"}, source="aime") is None
    assert gold_answer({"answer": "no final line"}, source="gsm8k") is None
    assert gold_answer({"answer": ""}) is None and gold_answer(None) is None
    with pytest.raises(ValueError, match="unknown source 'gsm'"):
        gold_answer("x", source="gsm")


@pytest.mark.parametrize("name,source", [("gsm8k_test.jsonl", "gsm8k"), ("math500.jsonl", "math"),
                                         ("aime24.jsonl", "aime"), ("aime25.jsonl", "aime"), ("amc23.jsonl", "auto")])
def test_every_gold_answer_matches_itself_boxed(shared_data, name, source):
    data = rows(shared_data / name)
    golds = [gold_answer(row, source=source) for row in data]
    assert all(golds), [i for i, g in enumerate(golds) if not g]
    predictions = [extract_answer(rf"The answer is $\boxed{{{g}}}$.") for g in golds]
    results = verify_many(list(zip(golds, predictions, strict=True)))
    assert [i for i, ok in enumerate(results) if ok is not True] == []


def test_math500_answer_agrees_with_solution_box(shared_data):
    data = rows(shared_data / "math500.jsonl")
    from_solution = [gold_answer({"solution": row["solution"]}) for row in data]
    assert all(ok is True for ok in verify_many([(row["answer"], s) for row, s in zip(data, from_solution, strict=True)]))


def test_wrong_answers_score_false(shared_data):
    gsm = [gold_answer(row) for row in rows(shared_data / "gsm8k_test.jsonl")]
    off_by_one = [str(int(float(g.replace(",", ""))) + 1) for g in gsm]
    assert not any(verify_many(list(zip(gsm, off_by_one, strict=True))))
    answers = [row["answer"] for row in rows(shared_data / "math500.jsonl")]
    rotated = list(zip(answers, answers[1:] + answers[:1], strict=True))
    pairs = [(a, b) for a, b in rotated if a != b and (a, b) != ("5", "x=5")]  # x=5 is 5
    assert not any(verify_many(pairs))


EQUIVALENT = [("1/2", "0.5"), (r"\frac{1}{2}", r"\dfrac{1}{2}"), ("0.75", r"\tfrac34"), ("3", "x = 3"),
              ("1000", "1,000"), ("18000", "18{,}000"), ("50", r"50\%"), (r"25\%", "25"), ("5", r"\text{5}"),
              ("5", r"5\text{ cm}"), (r"\text{(B)}", "B"), ("18", r"\$18"), (r"\{1, 2\}", r"\{2, 1\}"),
              (r"\sqrt{2}/2", r"\frac{\sqrt2}{2}"), ("10", "10.0"), (r"(1, 2]", r"(1,2]")]


@pytest.mark.parametrize("gold,prediction", EQUIVALENT)
def test_equivalent_forms_verify(gold, prediction):
    assert verify(gold, prediction) is True


@pytest.mark.parametrize("gold,prediction", [("3", "4"), ("1/2", "0.6"), ("1000", "100"), ("x=3", "x=4"),
                                             (r"\sqrt{2}", "1.41")])
def test_different_answers_do_not_verify(gold, prediction):
    assert verify(gold, prediction) is False


def test_unparseable_or_missing_gold_gives_none_never_a_free_pass():
    assert verify(None, "3") is None
    assert verify("", "") is None
    assert verify("}{", "}{") is None
    assert verify("3", None) is False and verify("3", "") is False


def test_pathological_latex_is_cut_off_by_the_time_limit():
    start = time.monotonic()
    results = verify_many([("2", "9^{9^{9^{9^{9}}}}"), ("2", "\\frac{" * 3000), ("2", "2")], timeout=1.0)
    assert results[:2] != [True, True] and results[2] is True
    assert time.monotonic() - start < 8


def _stub_math_verify(folder, body: str):
    package = folder / "math_verify"
    package.mkdir()
    (package / "__init__.py").write_text(body)
    return folder


def test_worker_imports_math_verify_from_this_process_import_path(tmp_path, monkeypatch):
    """The worker runs isolated but gets our sys.path: a math-verify reachable only through it (a
    PYTHONPATH or --target folder) is the one it uses. This stub calls everything equal."""
    stub = _stub_math_verify(tmp_path, "ExprExtractionConfig = LatexExtractionConfig = lambda **kw: None\n"
                                       "def parse(text, **kw): return [text]\n"
                                       "def verify(gold, prediction, **kw): return True\n")
    monkeypatch.syspath_prepend(str(stub))
    verifier = Verifier(workers=1)
    try:
        assert verifier.verify_many([("1", "2")]) == [True]
    finally:
        verifier.close()


def test_a_worker_that_cannot_start_is_a_one_line_setup_error(tmp_path, monkeypatch):
    """Without math-verify every answer would silently score as undecided (0 reward, 0% pass@1)."""
    monkeypatch.syspath_prepend(str(_stub_math_verify(tmp_path, "raise ImportError('math-verify is broken')\n")))
    with pytest.raises(RewardError, match="math-verify worker .* did not start: ImportError: math-verify is broken"):
        Verifier(workers=1).verify_many([("1", "2")])
