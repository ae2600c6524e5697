"""Math answer extraction, gold answers of the real datasets, and math-verify equivalence."""
import json
import time

import pytest

from r1pipe.rewards import RewardError
from r1pipe.rewards.math import (
    Verifier, extract_answer, gold_answer, normalize, numbers_equal, plain_number, too_costly, verify, verify_many,
)


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


def test_gold_answer_is_none_without_a_final_answer(shared_data):
    gsm = rows(shared_data / "gsm8k_test.jsonl")[0]
    assert gold_answer({"answer": gsm["answer"].split("####")[0]}) is None  # its last number is 18
    assert gold_answer(gsm["answer"].split("####")[0], source="text") is None
    aime24, aime25 = rows(shared_data / "aime24.jsonl")[0], rows(shared_data / "aime25.jsonl")[0]
    assert gold_answer(aime24) == "204" and gold_answer(aime25) == "70"  # auto reads both as AIME
    assert gold_answer({**aime24, "answer": "x+1"}) is None  # named AIME by its url
    assert gold_answer({**aime25, "answer": "12.5"}) is None  # by its id 2025-I-1
    assert gold_answer("TBD", source="aime") is None and gold_answer({"answer": 1000}, source="aime") is None
    assert gold_answer({"answer": 1500}) == "1500"  # an int answer outside AIME is taken as is
    for placeholder in ("TBD", "N/A", "?", "None", r"\text{n/a}"):
        assert gold_answer({"answer": placeholder}) is None, placeholder
    assert gold_answer({"answer": r"\frac{14}{3"}) is None and gold_answer({"answer": "1}"}) is None
    assert gold_answer({"answer": r"\{1,2\}"}) == r"\{1,2\}"  # escaped braces are not unbalanced
    assert gold_answer({"answer": r"5.4 \text{ cents}"}) == r"5.4 \text{ cents}"


def test_normalize_rewrites_forms_math_verify_misreads():
    assert normalize(r"1\,450\,000") == normalize("1 450 000") == normalize("1\u2009450\u2009000") == "1450000"
    assert normalize(r"276\;000") == normalize("276~000") == "276000"
    assert normalize("0.123 456") == "0.123 456" and normalize("1, 234") == "1, 234"  # not thousands
    assert normalize(r"\text{18 dollars}") == r"18\text{ dollars}" and normalize(r"\text{\$18}") == "18"
    assert normalize("90°") == normalize(r"90\degree") == r"90^\circ"
    assert normalize("18.") == normalize("18 .") == "18" and normalize(r"\text{Evelyn.}") == r"\text{Evelyn}"
    assert normalize("1, 2, 3, ...") == "1, 2, 3, ..."  # an ellipsis is no sentence period
    assert normalize(r"11,\! 111,\! 100") == "11,111,100"


def test_plain_numbers_compare_exactly_or_to_six_significant_digits():
    def equal(a, b):
        return numbers_equal(plain_number(a), plain_number(b))

    assert plain_number(r"1.2\times10^{-6}") == plain_number("1.2e-6") == plain_number("0.0000012")
    assert plain_number(r"-\frac{3}{4}")[0] == -0.75 and plain_number("1,000")[0] == 1000
    assert plain_number("x") is None and plain_number("1, 2") is None and plain_number(r"\frac{1}{0}") is None
    assert not equal("1000000", "1000001") and not equal(r"\frac{1}{3}", r"\frac{333333}{1000000}")
    assert equal("1/3", "0.333333") and equal("2/3", "0.666667") and not equal("2/3", "0.666666")
    assert not equal("0.000001", "0.0000012") and not equal("0.0000123", "0.0000124")
    assert equal(".0000672", r"6.72\times10^{-5}") and not equal(".0000672", "0.0000673")
    assert equal("12345.7", "12345.67") and not equal("1234567.5", "1234560")
    assert not equal("0", "0.0000001") and equal("0", "0.0")


def test_too_costly_names_the_rule_and_spares_real_answers(shared_data):
    assert "longer than 300" in too_costly("1" * 301)
    assert too_costly("1" * 301, gold="1" * 200) is None  # a long gold allows a long answer
    assert "nested deeper" in too_costly("{" * 7 + "1" + "}" * 7)
    assert "bare" in too_costly("{{{{1}}}}+1")
    assert "functions" in too_costly(r"\tan(\tan(\tan(\tan(1))))")
    assert "exponents" in too_costly("x^{x^{x^{x^{x}}}}")
    assert "digits" in too_costly("9^{9^{9}}") and "digits" in too_costly("1000000!")
    assert "digits" in too_costly(r"\binom{10^{8}}{5}") and "digits" in too_costly(r"\Gamma(10^{6})")
    assert "polynomial" in too_costly("(x+1)^{1000}") and "polynomial" in too_costly("(x+y+z)^{20}")
    assert "integral" in too_costly(r"\sum_{k=1}^{100000} \sin(k)")
    assert too_costly(r"\sum_{k=1}^{n} k", gold=r"\sum_{k=1}^{n} k^2") is None
    for answer in ("2^{2005}", "100!", r"\binom{10}{3}", "(x+1)^{3}", r"e^{x^2}", r"\sin(\frac{\pi}{4})"):
        assert too_costly(answer) is None, answer
    golds = [gold_answer(row, source=source) for name, source in (("gsm8k_test.jsonl", "gsm8k"),
             ("math500.jsonl", "math"), ("aime24.jsonl", "aime"), ("amc23.jsonl", "auto"))
             for row in rows(shared_data / name)]
    boxes = [extract_answer(row["solution"]) for row in rows(shared_data / "math500.jsonl")]
    assert [g for g in golds + boxes if too_costly(normalize(g))] == []


def test_pathological_latex_is_rejected_before_the_parse():
    pathological = ["9^{9^{9^{9^{9}}}}", "\\frac{" * 3000, "{" * 5000 + "1" + "}" * 5000, "9" * 9999 + "!"]
    assert all(too_costly(answer) for answer in pathological)
    assert verify_many([("2", answer) for answer in pathological] + [("2", "2")], timeout=1.0) == [False] * 4 + [True]


def test_a_check_that_overruns_the_time_limit_is_killed_and_gives_none(tmp_path, monkeypatch):
    """A worker stuck in a C-level loop ignores math-verify's alarm: the pool kills it, the pair
    stays undecided, and a fresh worker verifies the next one. This stub hangs on gold "hang"."""
    stub = _stub_math_verify(tmp_path, "import time\n"
                                       "ExprExtractionConfig = LatexExtractionConfig = lambda **kw: None\n"
                                       "def parse(text, **kw): return [text]\n"
                                       "def verify(gold, prediction, **kw):\n"
                                       "    if 'hang' in gold[0]: time.sleep(60)\n"
                                       "    return True\n")
    monkeypatch.syspath_prepend(str(stub))
    verifier = Verifier(workers=1)
    try:
        start = time.monotonic()
        assert verifier.verify_many([("hang", "1"), ("1", "1")], timeout=1.0) == [None, True]
        assert time.monotonic() - start < 30  # killed after ~2 s, not left to sleep for 60
    finally:
        verifier.close()


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
