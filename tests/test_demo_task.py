"""The demo task generator and the repository-built tokenizer."""
import json

import pytest
from transformers import AutoTokenizer

from r1pipe.demo.task import Problem, apply_step, generate_examples, solve, work_steps
from r1pipe.demo.tokenizer import build_tokenizer


def test_examples_are_deterministic_and_correct():
    rows = generate_examples(200, seed=3)
    assert rows == generate_examples(200, seed=3)
    assert rows != generate_examples(200, seed=4)
    assert len({r["problem"] for r in rows}) == 200
    for row in rows:
        assert row["solution"].endswith(f"\\boxed{{{row['answer']}}}")
        # Replaying the worked lines reproduces each step: restated operation, signed result, reduction.
        for line in row["solution"].split("\n")[1:-2]:
            restated, work = line.split(": ")
            left, signed = work.split("=")[:2]
            value, operand = int(left[0]), int(left[1:])
            assert restated[1:] == left[1:] and int(signed.removesuffix("+10").removesuffix("-10")) == value + operand
            op = "+" if operand > 0 else "-"
            assert apply_step(value, op, abs(operand)) == int(work.split("=")[-1])


def test_held_out_split_is_disjoint():
    train = {r["problem"] for r in generate_examples(2000, seed=0, split="train")}
    test = {r["problem"] for r in generate_examples(300, seed=0, split="test")}
    assert not train & test
    assert all(r["split"] == "test" for r in generate_examples(5, seed=0, split="test"))


def test_bug_rate_corrupts_only_wrapping_subtractions():
    import random

    problem = Problem(start=3, steps=(("-", 7), ("+", 2)))
    assert work_steps(problem) == ["a-7: 3-7=-4+10=6", "b+2: 6+2=8"]
    assert work_steps(problem, bug_rate=1.0, rng=random.Random(0)) == ["a-7: 3-7=4", "b+2: 4+2=6"]
    assert work_steps(Problem(start=8, steps=(("+", 5),))) == ["a+5: 8+5=13-10=3"]
    assert problem.text == "Mod 10: 3 a-7 b+2"
    assert solve(problem) == 8
    rows = generate_examples(500, seed=0, style="plain", bug_rate=0.5)
    wrong = [r for r in rows if not r["solution"].endswith(f"\\boxed{{{r['answer']}}}")]
    assert 0.05 < len(wrong) / len(rows) < 0.6
    assert all("-" in r["problem"] for r in wrong)


def test_bad_arguments_give_one_line_errors():
    with pytest.raises(ValueError, match="split"):
        generate_examples(1, 0, split="dev")
    with pytest.raises(ValueError, match="bug_rate"):
        generate_examples(1, 0, bug_rate=2)


def test_tokenizer_round_trip_and_chat_template(tmp_path):
    build_tokenizer(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    row = generate_examples(1, seed=0)[0]
    chat = [{"role": "user", "content": row["problem"]}, {"role": "assistant", "content": row["solution"]}]
    text = tokenizer.apply_chat_template(chat, tokenize=False)
    assert text == f"<|user|>{row['problem']}<|assistant|>{row['solution']}<|end|>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    # Think tags and \boxed{ survive skip_special_tokens (the rewards read them).
    completion = tokenizer.decode(ids, skip_special_tokens=True)
    assert completion == row["problem"] + row["solution"]
    for word in ("<think>", "</think>", "\\boxed{", "+5", "-3"):
        assert len(tokenizer(word, add_special_tokens=False)["input_ids"]) == 1
    prompt = tokenizer.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|assistant|>")
    assert tokenizer.eos_token == "<|end|>" and tokenizer.pad_token_id == 0
    assert len(tokenizer) < 128
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["eos_token"] == "<|end|>"


def test_chat_template_drops_earlier_reasoning():
    tokenizer = build_tokenizer()
    chat = [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "<think>\nsteps\n</think>\nA1"},
        {"role": "user", "content": "q2"},
    ]
    text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text == "<|user|>q1<|assistant|>A1<|end|><|user|>q2<|assistant|>"
