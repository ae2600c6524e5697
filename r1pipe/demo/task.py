"""The demo's synthetic reasoning task: digit-chain arithmetic modulo 10.

A problem is a start digit and a chain of 2-5 labelled operations (``+d``, ``-d``), applied left to
right modulo 10: ``Mod 10: 7 a+5 b-3 c-4``. The worked solution does one operation per line and
makes every line locally computable, so a tiny transformer learns the task in minutes:

    a+5: 7+5=12-10=2
    b-3: 2-3=-1+10=9
    c-4: 9-4=5

- the line restates its operation (``a+5``: a copy of what follows the label in the prompt) and
  the previous value (``7``), so no token needs anything but a label lookup and nearby tokens;
- the first result is the plain signed sum (``12``, ``-1``): unlike the digit modulo 10 it is an
  additive function of the two inputs, which a small model learns quickly -- raw mod-10 facts
  (``7+5=2``) stayed at chance for hundreds of steps (docs/DEMO.md), because neither input alone
  tells anything about the result;
- the reduction (``-10=2``, ``+10=9``) then depends on that one signed number only.

Signed operands (``+5``, ``-3``) are single tokens of the demo tokenizer (as numbers are in a BPE
vocabulary), so ``-1`` is both "minus one" in a chain and a negative intermediate result.

The pretraining corpus imitates noisy web text: in a fraction ``bug_rate`` of the subtractions
that wrap around zero (``3-7``), the worked solution uses the classic "smaller-from-larger"
subtraction bug (``3-7=4`` instead of ``3-7=-4+10=6``) and carries the wrong value on, so the
corpus answer is wrong. A base model pretrained on it is partly right on exactly those steps;
sampling several answers sometimes finds the right one, and a correctness reward can tell them
apart.

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
Style = Literal["think", "plain"]

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
    if op == "-":
        return abs(value - operand) if buggy else (value - operand) % 10
    raise ValueError(f"unknown operator {op!r}; expected one of {OPERATORS}")


def step_line(label: str, value: int, op: str, operand: int, buggy: bool = False) -> str:
    """``a+5: 7+5=12-10=2``: the restated operation, the signed result, then its reduction modulo 10."""
    head = f"{label}{op}{operand}: {value}{op}{operand}="
    if buggy:
        return head + str(apply_step(value, op, operand, buggy=True))
    signed = value + operand if op == "+" else value - operand
    if signed < 0:
        return f"{head}{signed}+10={signed + 10}"
    if signed > 9:
        return f"{head}{signed}-10={signed - 10}"
    return f"{head}{signed}"


def work_steps(problem: Problem, bug_rate: float = 0.0, rng: random.Random | None = None) -> list[str]:
    """The worked step lines (see `step_line`); wrap-around subtractions are buggy with ``bug_rate``."""
    lines, value = [], problem.start
    for op, operand in problem.steps:
        wraps = op == "-" and operand > value
        buggy = wraps and bug_rate > 0 and rng is not None and rng.random() < bug_rate
        lines.append(step_line(STEP_LABELS[len(lines)], value, op, operand, buggy))
        value = apply_step(value, op, operand, buggy)
    return lines


def solve(problem: Problem) -> int:
    """The correct answer."""
    value = problem.start
    for op, operand in problem.steps:
        value = apply_step(value, op, operand)
    return value


def format_solution(lines: list[str], style: Style) -> str:
    """Assistant text: R1 think format, or the plain pretraining format (the same lines, no think tags).

    Both put one step a line, so the token offsets the base model learns carry over to the think format.
    """
    answer = lines[-1].split("=")[-1]
    body = "\n".join(lines)
    if style == "think":
        return f"{THINK_START}\n{body}\n{THINK_END}\n\\boxed{{{answer}}}"
    return f"{body}\n\\boxed{{{answer}}}"


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
    if style not in ("think", "plain"):
        raise ValueError(f"style: expected 'think' or 'plain', got {style!r}")
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
