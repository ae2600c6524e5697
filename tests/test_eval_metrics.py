"""pass@k / maj@k maths, benchmark loading on the real data files, and verdicts through r1pipe.rewards."""
import json
from math import comb

import pytest

from r1pipe.config import RecipeError
from r1pipe.runner import load_recipe
from r1pipe.evaluation import (
    BenchmarkSpec,
    Verdict,
    judge,
    load_benchmark,
    majority_vote,
    pass_at_k,
    problem_metrics,
    summarize,
)


@pytest.mark.parametrize("n", [1, 2, 5, 16, 64])
def test_pass_at_k_matches_closed_form(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            expected = 1.0 - comb(n - c, k) / comb(n, k)
            assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12), (n, c, k)


def test_pass_at_k_edges_and_errors():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the mean correctness
    assert pass_at_k(10, 0, 10) == 0.0
    assert pass_at_k(10, 1, 10) == 1.0
    assert pass_at_k(200, 100, 150) == 1.0  # n - c < k
    for bad in [(4, 5, 1), (4, 2, 0), (4, 2, 5)]:
        with pytest.raises(ValueError, match="pass_at_k"):
            pass_at_k(*bad)


def _v(answer, correct):
    return Verdict(answer, float(correct), correct)


def test_majority_vote_counts_normalised_answers_and_breaks_ties_by_order():
    assert majority_vote([_v("7", False), _v(" 18", True), _v("$18$", True), _v("7", False)]) == ("7", False)
    assert majority_vote([_v("\\frac{1}{2}", True), _v("\\frac{1} {2}", True), _v("3", False)])[1] is True
    assert majority_vote([_v(None, False), _v(None, False)]) == (None, False)
    assert majority_vote([_v(None, False), _v("5", True)]) == ("5", True)


def test_problem_metrics_and_summary():
    verdicts = [_v("1", True), _v("2", False), _v("1", True), _v("3", False)]
    m = problem_metrics(verdicts, [1, 2, 4, 8], "math")
    assert m["correct"] == 2 and m["pass@1"] == 0.5
    assert m["pass@2"] == pytest.approx(1 - comb(2, 2) / comb(4, 2))
    assert m["pass@4"] == 1.0 and "pass@8" not in m and m["maj@4"] == 1.0
    records = [{"metrics": m, "samples": [{"tokens": 10, "truncated": False}] * 4},
               {"metrics": problem_metrics([_v("9", False)] * 4, [1, 2, 4], "math"),
                "samples": [{"tokens": 30, "truncated": True}] * 4}]
    s = summarize(records, [1, 2, 4])
    assert s["pass@1"] == 0.25 and s["maj@4"] == 0.5 and s["problems"] == 2
    assert s["mean_completion_tokens"] == 20 and s["truncated_fraction"] == 0.5


def test_builtin_benchmarks_load_real_rows(shared_data):
    gsm = load_benchmark(BenchmarkSpec(name="gsm8k", limit=3), 0, shared_data)
    assert [p.gold for p in gsm] == ["18", "3", "70000"]
    assert gsm[0].prompt.startswith("Janet") and gsm[0].prompt.endswith("within \\boxed{}.")
    math500 = load_benchmark(BenchmarkSpec(name="math500", limit=2), 0, shared_data)
    assert math500[0].id.startswith("test/") and math500[0].gold
    assert len(load_benchmark(BenchmarkSpec(name="aime24"), 0, shared_data)) == 30
    assert len(load_benchmark(BenchmarkSpec(name="aime25"), 0, shared_data)) == 30
    amc = load_benchmark(BenchmarkSpec(name="amc23"), 0, shared_data)
    assert len(amc) == 40 and amc[0].gold == "27.0"
    humaneval = load_benchmark(BenchmarkSpec(name="humaneval", limit=1), 0, shared_data)
    assert humaneval[0].id == "HumanEval/0" and "def has_close_elements" in humaneval[0].prompt
    mbpp = load_benchmark(BenchmarkSpec(name="mbpp", limit=1), 0, shared_data)
    assert "assert min_cost(" in mbpp[0].prompt and mbpp[0].kind == "code"


def test_custom_source_with_column_mapping(tmp_path):
    rows = [{"q": "What is 2+3?", "final": "5", "key": "a"}, {"q": "What is 2*3?", "final": "6", "key": "b"}]
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = BenchmarkSpec(name="mine", path=str(path), kind="math", template="Q: {prompt}",
                         columns={"q": "prompt", "final": "answer", "key": "id"})
    problems = load_benchmark(spec, 0)
    assert [(p.id, p.prompt, p.gold) for p in problems] == [("a", "Q: What is 2+3?", "5"), ("b", "Q: What is 2*3?", "6")]
    bad = spec.model_copy(update={"columns": {"question": "prompt"}})
    with pytest.raises(RecipeError, match=r"eval\.benchmarks\.0\.columns: 'question' is not a column"):
        load_benchmark(bad, 0)
    bad_template = spec.model_copy(update={"template": "{prompt} {nope}"})
    with pytest.raises(RecipeError, match=r"template field \{nope\}"):
        load_benchmark(bad_template, 0)


def test_judge_math_on_gsm8k_rows(shared_data):
    problems = load_benchmark(BenchmarkSpec(name="gsm8k", limit=2), 0, shared_data)
    completions = [
        ["<think>16-3-4=9, 9*2=18</think> The answer is \\boxed{18}.", "\\boxed{\\$18.00}", "\\boxed{9}",
         "no box, the total is 18 dollars."],
        ["2 + 1 = 3 bolts", "\\boxed{}", "\\boxed{3}", "\\boxed{2}"],
    ]
    verdicts = judge(problems, completions, answer_pattern=r"(-?[\d,]*\.?\d+)\D*$")
    assert [v.correct for v in verdicts[0]] == [True, True, False, True]
    assert [v.correct for v in verdicts[1]] == [True, False, True, False]
    assert verdicts[1][1].answer is None  # an empty box is no answer
    cut = judge(problems[:1], completions[:1], r"(-?[\d,]*\.?\d+)\D*$", [[True, True, False, True]])
    assert [v.correct for v in cut[0]] == [True, True, False, False]  # no last-number fallback when truncated
    strict = judge(problems[:1], completions[:1])  # no pattern: unboxed answers do not count
    assert [v.correct for v in strict[0]] == [True, True, False, False]


def test_judge_code_runs_the_tests(shared_data):
    mbpp = load_benchmark(BenchmarkSpec(name="mbpp", limit=1), 0, shared_data)
    reference = json.loads((shared_data / "mbpp.jsonl").read_text().splitlines()[0])["code"]
    solution = "```python\n" + reference + "\n```"
    wrong = "```python\ndef min_cost(cost, m, n):\n    return 0\n```"
    verdicts = judge(mbpp, [[solution, wrong, "no code at all"]])[0]
    assert [v.correct for v in verdicts] == [True, False, False]
    assert verdicts[0].score == 1.0 and verdicts[1].score == 0.0


def test_recipes_parse_and_check_ks(tmp_path):
    cfg = load_recipe("recipes/smollm2/eval.yaml")
    assert cfg.sampling.temperature == 0.6 and cfg.sampling.top_p == 0.95 and cfg.eval.ks == [1, 4]
    with pytest.raises(RecipeError, match=r"eval\.ks: pass@8 needs sampling\.n >= 8"):
        load_recipe("recipes/smollm2/eval.yaml", ["eval.ks=[1,8]"])
    with pytest.raises(RecipeError, match=r"eval\.benchmarks\.0.*not a built-in benchmark"):
        load_recipe("recipes/smollm2/eval.yaml", ["eval.benchmarks.0.name=gsm9k"])
