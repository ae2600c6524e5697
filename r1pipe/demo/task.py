"""The demo's synthetic reasoning task: digit-chain arithmetic modulo 10.

A problem is a start digit and a chain of 2-5 labelled operations (``+d``, ``-d``), applied left to
right modulo 10: ``Mod 10: 7 a+5 b-3 c-4``. The worked solution does one operation per line
(``a: 7+5=2``, ``b: 2-3=9``, ``c: 9-4=5``) and ends with ``\\boxed{5}``. Every step is one of 180
single-digit facts, and the labels make each line's operation a lookup by content (the next label)
rather than by counting lines, so a tiny transformer learns the task in minutes; the chance of a
whole chain being right still falls with its length, which leaves room for RL.

The pretraining corpus imitates noisy web text: in a fraction ``bug_rate`` of the subtractions
that wrap around zero (``3-7``), the worked solution uses the classic "smaller-from-larger"
subtraction bug (``3-7=4`` instead of ``6``) and carries the wrong value on, so the corpus answer is
wrong. A base model pretrained on it is partly right on exactly those steps; sampling several
answers sometimes finds the right one, and a correctness reward can tell them apart.

Splits are fixed by a hash of the problem text (1 in 10 problems is ``test``), so the held-out
split never shares a problem with ``train`` whatever the seed or count.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Literal

from r1pipe.demo.tokenizer import THINK_END, THINK_START

Split = Literal["train", "test"]
Style = Literal["think", "terse"]

MIN_STEPS, MAX_STEPS = 2, 5
OPERATORS = ("+", "-")
STEP_LABELS = "abcde"
TEST_SHARE = 10  # 1 problem in TEST_SHARE goes to the held-out split
_MAX_TRIES_PER_EXAMPLE = 1000


@dataclass(frozen=True)
class Problem:
    """A start digit and the chain of (operator, operand digit) steps applied to it."""

    start: int
    steps: tuple[tuple[str, int], ...]

    @property
    def text(self) -> str:
        chain = " ".join(f"{STEP_LABELS[i]}{op}{d}" for i, (op, d) in enumerate(self.steps))
        return f"Mod 10: {self.start} {chain}"

    @property
    def split(self) -> Split:
        digest = hashlib.sha256(self.text.encode()).digest()
        return "test" if digest[0] % TEST_SHARE == 0 else "train"


def apply_step(value: int, op: str, operand: int, buggy: bool = False) -> int:
    """One step modulo 10; ``buggy`` subtraction takes the smaller digit from the larger."""
    if op == "+":
        return (value + operand) % 10
    if op == "*":
        return (value * operand) % 10
    if op == "-":
        return abs(value - operand) if buggy else (value - operand) % 10
    raise ValueError(f"unknown operator {op!r}; expected one of {OPERATORS}")


def work_steps(problem: Problem, bug_rate: float = 0.0, rng: random.Random | None = None) -> list[str]:
    """The worked step lines ``<label>: x<op>d=y``; wrap-around subtractions are buggy with ``bug_rate``."""
    lines, value = [], problem.start
    for op, operand in problem.steps:
        wraps = op == "-" and operand > value
        buggy = wraps and bug_rate > 0 and rng is not None and rng.random() < bug_rate
        result = apply_step(value, op, operand, buggy)
        lines.append(f"{STEP_LABELS[len(lines)]}: {value}{op}{operand}={result}")
        value = result
    return lines


def solve(problem: Problem) -> int:
    """The correct answer."""
    value = problem.start
    for op, operand in problem.steps:
        value = apply_step(value, op, operand)
    return value


def format_solution(lines: list[str], style: Style) -> str:
    """Assistant text: R1 think format (one step a line) or the terse pretraining format."""
    answer = lines[-1].split("=")[-1]
    if style == "think":
        body = "\n".join(lines)
        return f"{THINK_START}\n{body}\n{THINK_END}\n\\boxed{{{answer}}}"
    return f"{', '.join(lines)}. \\boxed{{{answer}}}"


def _random_problem(rng: random.Random) -> Problem:
    n_steps = rng.randint(MIN_STEPS, MAX_STEPS)
    steps = tuple((rng.choice(OPERATORS), rng.randint(1, 9)) for _ in range(n_steps))
    return Problem(start=rng.randint(0, 9), steps=steps)


def generate_examples(
    n: int, seed: int, split: Split = "train", style: Style = "think", bug_rate: float = 0.0
) -> list[dict]:
    """``n`` distinct problems of ``split`` with worked solutions, deterministic in ``seed``.

    Each row: ``problem`` (user text), ``answer`` (correct digit as text), ``solution`` (assistant
    text in ``style``; with ``bug_rate`` > 0 it may contain the subtraction bug and a wrong final
    answer, as a noisy corpus does), ``n_steps`` and ``split``.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split: expected 'train' or 'test', got {split!r}")
    if style not in ("think", "terse"):
        raise ValueError(f"style: expected 'think' or 'terse', got {style!r}")
    if not 0.0 <= bug_rate <= 1.0:
        raise ValueError(f"bug_rate: expected a value in [0, 1], got {bug_rate}")
    rng = random.Random(f"{seed}:{split}")
    bug_rng = random.Random(f"{seed}:{split}:bugs")  # separate, so the problems never depend on bug_rate
    rows, seen = [], set()
    for _ in range(n * _MAX_TRIES_PER_EXAMPLE):
        if len(rows) == n:
            return rows
        problem = _random_problem(rng)
        if problem.split != split or problem.text in seen:
            continue
        seen.add(problem.text)
        lines = work_steps(problem, bug_rate, bug_rng)
        rows.append(
            {
                "problem": problem.text,
                "answer": str(solve(problem)),
                "solution": format_solution(lines, style),
                "n_steps": len(problem.steps),
                "split": split,
            }
        )
    if len(rows) < n:
        raise ValueError(f"n: could only generate {len(rows)} distinct {split} problems, asked for {n}")
    return rows
