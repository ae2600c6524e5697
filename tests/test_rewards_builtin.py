"""The built-in rewards on small cases with known values (formulas in docs/REWARDS.md, "Built-in rewards")."""
import gzip
import json
import math

import pytest

from r1pipe.rewards import RewardError, RewardSet
from r1pipe.rewards.builtin import cosine_scaled, countdown_score, soft_overlong
from r1pipe.rewards.think import language_share


def score(name, completions, prompts=None, options=None, completion_ids=None, **columns):
    prompts = prompts or ["p"] * len(completions)
    result = RewardSet([{"name": name, "options": options or {}}]).score(prompts, completions, completion_ids, **columns)
    assert result.errors == []
    return result.per_reward[name]


def test_accuracy_uses_the_last_box_and_gives_no_free_score(shared_data):
    rows = [json.loads(line) for line in open(shared_data / "gsm8k_test.jsonl")][:3]
    golds = [row["answer"].split("####")[-1].strip() for row in rows]
    completions = [rf"<think>...</think> so \boxed{{{golds[0]}}}", r"\boxed{1} no wait \boxed{-12345}", "no box"]
    assert score("accuracy", completions, answer=[row["answer"] for row in rows]) == [1.0, 0.0, 0.0]
    assert score("accuracy", [r"\boxed{3}"], answer=["no gold here"], options={"source": "gsm8k"}) == [None]
    assert score("accuracy", ["ANSWER: 7"], answer=["7"], options={"pattern": r"ANSWER:\s*(\S+)"}) == [1.0]
    with pytest.raises(RewardError, match="needs a dataset column 'answer' or 'solution'"):
        score("accuracy", ["x"], question=["q"])


def test_format_and_tag_count():
    good = "<think>\nreasoning\n</think>\nThe answer is 4."
    assert score("format", [good, "no tags", "<think>a</think>", "<think>a</think><think>b</think> 4"]) == [
        1.0, 0.0, 0.0, 0.0]
    assert score("format", ["reasoning</think> 4"], options={"prompt_opens_think": True}) == [1.0]
    tagged = "<think>x</think><answer>4</answer>"
    assert score("format", [tagged, good], options={"answer_tag": "answer"}) == [1.0, 0.0]
    assert score("tag_count", [tagged, good, "<think><think></think>"]) == [1.0, 0.5, 0.25]


def test_reasoning_steps():
    text = "Step 1: read\nStep 2: add\nStep 3: check"
    assert score("reasoning_steps", [text, "First, x. Finally, y.", "none"]) == [1.0, pytest.approx(2 / 3), 0.0]


def test_kimi_length_reward_per_prompt_group():
    completions = [r"\boxed{2} short", r"\boxed{2} a much longer one....", r"\boxed{3} mid length..", r"\boxed{5}"]
    prompts = ["a", "a", "a", "b"]
    values = score("length", completions, prompts=prompts, answer=["2", "2", "2", "5"])
    lengths = [len(c) for c in completions[:3]]
    lam = [0.5 - (n - min(lengths)) / (max(lengths) - min(lengths)) for n in lengths]
    assert values[:3] == [pytest.approx(lam[0]), pytest.approx(lam[1]), pytest.approx(min(0.0, lam[2]))]
    assert values[3] == 0.0  # a group of one has no length spread
    ids = [[0] * 10, [0] * 30, [0] * 20, [0]]
    by_tokens = score("length", completions, prompts=prompts, completion_ids=ids, answer=["2", "2", "2", "5"])
    assert by_tokens[:2] == [pytest.approx(0.5), pytest.approx(-0.5)]


def test_cosine_scaled_length():
    assert cosine_scaled(0, True, min_value_wrong=-1, max_value_wrong=-0.5, min_value_correct=0.5,
                         max_value_correct=1.0, max_len=100) == pytest.approx(1.0)
    assert cosine_scaled(100, True, min_value_wrong=-1, max_value_wrong=-0.5, min_value_correct=0.5,
                         max_value_correct=1.0, max_len=100) == pytest.approx(0.5)
    assert cosine_scaled(0, False, min_value_wrong=-1, max_value_wrong=-0.5, min_value_correct=0.5,
                         max_value_correct=1.0, max_len=100) == pytest.approx(-1.0)
    assert cosine_scaled(500, False, min_value_wrong=-1, max_value_wrong=-0.5, min_value_correct=0.5,
                         max_value_correct=1.0, max_len=100) == pytest.approx(-0.5)
    values = score("cosine_length", [r"\boxed{4}", r"\boxed{5}", "x"], answer=["4", "4", "}{"],
                   completion_ids=[[0] * 50, [0] * 50, [0]], options={"max_len": 100})
    assert values == [pytest.approx(0.75), pytest.approx(-0.75), None]


def test_repetition_penalty():
    assert score("repetition_penalty", ["a b c d e f", "a b a b a b", "a b"]) == [
        0.0, pytest.approx(-(1 - 2 / 4)), 0.0]
    assert score("repetition_penalty", ["x y x y x y"], options={"ngram_size": 2, "max_penalty": -0.5}) == [
        pytest.approx(-0.5 * (1 - 2 / 5))]


def test_soft_overlong_punishment():
    assert [soft_overlong(n, 100, 20) for n in (50, 80, 90, 100, 101)] == [0.0, 0.0, -0.5, -1.0, -1.0]
    assert score("soft_overlong", ["x", "y"], completion_ids=[[0] * 90, [0] * 10],
                 options={"max_length": 100, "cache_length": 20}) == [-0.5, 0.0]
    with pytest.raises(RewardError, match="cache_length <= max_length"):
        score("soft_overlong", ["x"], options={"max_length": 10, "cache_length": 20})


def test_language_consistency():
    assert language_share("The answer is four", "en") == 1.0
    assert language_share("The answer 是四", "en") == pytest.approx(2 / 4)
    assert language_share("答案是四", "zh") == 1.0
    values = score("language_consistency", ["<think>think in English 然后</think> final 答案", "<think></think>"])
    assert values == [pytest.approx(3 / 5), None]
    with pytest.raises(RewardError, match="unknown language 'xx'"):
        score("language_consistency", ["a"], options={"language": "xx"})


def test_countdown():
    assert countdown_score("(100 - 4) / 4 + 1", [100, 4, 4, 1], 25) == 1.0
    assert countdown_score("100 - 4 - 4 - 1", [100, 4, 4, 1], 25) == 0.1
    assert countdown_score("100 + 4", [100, 4, 4, 1], 25) == 0.1  # numbers not all used
    assert countdown_score("__import__('os')", [1], 1) == 0.0
    assert countdown_score(None, [1], 1) == 0.0
    completions = ["<think>try</think><answer>(100 - 4) / 4 + 1</answer>", "<answer>4 / 0 + 100 - 4 + 1</answer>",
                   "25"]
    assert score("countdown", completions, nums=[[100, 4, 4, 1]] * 3, target=[25] * 3) == [1.0, 0.1, 0.0]


def test_code_reward_and_code_format(shared_data):
    with gzip.open(shared_data / "humaneval.jsonl.gz", "rt") as handle:
        rows = [json.loads(line) for line in handle][:2]
    completions = [f"<think>easy</think>\n```python\n{rows[0]['prompt'] + rows[0]['canonical_solution']}```",
                   "<think>hmm</think>\n```python\ndef wrong(:\n```", "no code"]
    columns = {key: [rows[0][key], rows[1][key], rows[1][key]] for key in ("task_id", "prompt", "test", "entry_point")}
    assert score("code", completions, **columns) == [1.0, 0.0, 0.0]
    assert score("code_format", completions) == [1.0, 0.0, 0.0]
    assert score("code_format", ["```python\nx = 1\n```"], options={"require_think": False}) == [1.0]
    mbpp = {"test_list": [["assert f(1) == 2", "assert f(2) == 3"]], "test_setup_code": [""]}
    half_right = ["```python\ndef f(x):\n    return 2\n```"]
    assert score("code", half_right, **mbpp) == [0.0]  # R1: correct or not
    assert score("code", half_right, options={"partial": True}, **mbpp) == [0.5]
    assert not math.isnan(sum(score("code", ["```python\nprint(int(input()) * 2)\n```"], inputs=[["2"]],
                                    outputs=[["4"]])))
