"""The built-in rewards (docs/REWARDS.md lists them with their options).

Each docstring's first line is what `r1pipe rewards list` shows. Lengths (length, cosine_length, soft_overlong) count tokens when the trainer passes completion_ids
and characters otherwise.
"""

from __future__ import annotations

import ast
import math
import re
from fractions import Fraction

from r1pipe.rewards import code as code_scoring
from r1pipe.rewards.math import extract_answer, gold_answer, verify_many
from r1pipe.rewards.registry import RewardError, reward
from r1pipe.rewards.sandbox import Limits
from r1pipe.rewards.think import language_share, reasoning, think_pattern


def _length(completion: str, completion_ids) -> int:
    return len(completion_ids) if completion_ids is not None else len(completion)


def _rows(n: int, columns: dict) -> list[dict]:
    return [{key: values[i] for key, values in columns.items()} for i in range(n)]


def _correctness(completions, columns, source, pattern, timeout) -> list[bool | None]:
    """Math correctness of each completion against its row's gold answer (None: no gold answer)."""
    if not {"answer", "solution"} & set(columns):
        raise RewardError("math accuracy needs a dataset column 'answer' or 'solution'")
    golds = [gold_answer(row, source=source) for row in _rows(len(completions), columns)]
    predictions = [extract_answer(text, pattern) for text in completions]
    return verify_many(list(zip(golds, predictions, strict=True)), timeout)


@reward("accuracy", batched=True)
def accuracy(prompts, completions, *, completion_ids=None, source: str = "auto", pattern: str | None = None,
             timeout: float = 5.0, **columns):
    """Math: 1.0 when the last \\boxed{} answer equals the gold (math-verify; integers and fractions exactly, decimals to 6 significant digits; thousands spaces, units in \\text{}, ° and a final period ignored; huge or deeply nested answers score 0 unparsed), else 0.0; None when the gold has no final answer.

    Rules and why: r1pipe.rewards.math (gold_answer, normalize, numbers_equal, too_costly)."""
    correct = _correctness(completions, columns, source, pattern, timeout)
    return [None if ok is None else float(ok) for ok in correct]


@reward("format")
def format_reward(prompt, completion, *, completion_ids=None, think_tag: str = "think", answer_tag: str = "",
                  prompt_opens_think: bool = False):
    """1.0 for exactly one <think>...</think> followed by an answer (in <answer_tag> if set), else 0.0."""
    ok = think_pattern(think_tag, answer_tag, prompt_opens_think).match(completion)
    return 1.0 if ok and completion.count(f"</{think_tag}>") == 1 else 0.0


@reward("tag_count")
def tag_count(prompt, completion, *, completion_ids=None, tags: list = ("think", "answer")):
    """Partial credit: 1/(2*len(tags)) for each of <tag> and </tag> appearing exactly once."""
    if not tags:
        raise RewardError("reward 'tag_count': option 'tags' must not be empty")
    share = 1.0 / (2 * len(tags))
    return sum(share for tag in tags for mark in (f"<{tag}>", f"</{tag}>") if completion.count(mark) == 1)


_STEP = re.compile(r"(Step \d+:|^\d+\.|\n-|\n\*|First,|Second,|Next,|Finally,)", re.MULTILINE)


@reward("reasoning_steps")
def reasoning_steps(prompt, completion, *, completion_ids=None, target_steps: int = 3):
    """min(1, number of step markers ("Step 1:", "1.", bullets, "First,", ...) / target_steps)."""
    if target_steps < 1:
        raise RewardError(f"reward 'reasoning_steps': option 'target_steps' must be >= 1, got {target_steps}")
    return min(1.0, len(_STEP.findall(completion)) / target_steps)


@reward("length", batched=True)
def length_reward(prompts, completions, *, completion_ids=None, source: str = "auto", pattern: str | None = None,
                  timeout: float = 5.0, **columns):
    """Kimi 1.5 length reward per prompt group: lam = 0.5 - (len-min)/(max-min); correct: lam, wrong: min(0, lam)."""
    correct = _correctness(completions, columns, source, pattern, timeout)
    lengths = [_length(c, completion_ids[i] if completion_ids is not None else None) for i, c in enumerate(completions)]
    groups: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(prompt, []).append(i)
    rewards: list[float | None] = [None] * len(completions)
    for members in groups.values():
        shortest, longest = min(lengths[i] for i in members), max(lengths[i] for i in members)
        for i in members:
            if correct[i] is None:
                continue
            lam = 0.0 if longest == shortest else 0.5 - (lengths[i] - shortest) / (longest - shortest)
            rewards[i] = lam if correct[i] else min(0.0, lam)
    return rewards


def cosine_scaled(length: int, correct: bool, *, min_value_wrong: float, max_value_wrong: float,
                  min_value_correct: float, max_value_correct: float, max_len: int) -> float:
    """Cosine schedule over length: correct answers go from max_value_correct (short) down to
    min_value_correct (at max_len); wrong ones from min_value_wrong (short) up to max_value_wrong,
    so a wrong answer is punished less when more thinking went into it."""
    progress = min(length, max_len) / max_len
    start, end = (max_value_correct, min_value_correct) if correct else (min_value_wrong, max_value_wrong)
    return end + 0.5 * (start - end) * (1.0 + math.cos(progress * math.pi))


@reward("cosine_length", batched=True)
def cosine_length(prompts, completions, *, completion_ids=None, min_value_wrong: float = -1.0,
                  max_value_wrong: float = -0.5, min_value_correct: float = 0.5, max_value_correct: float = 1.0,
                  max_len: int = 1000, source: str = "auto", pattern: str | None = None, timeout: float = 5.0,
                  **columns):
    """Cosine-scaled length: short correct answers score most, short wrong ones are punished most."""
    if max_len < 1:
        raise RewardError(f"reward 'cosine_length': option 'max_len' must be >= 1, got {max_len}")
    correct = _correctness(completions, columns, source, pattern, timeout)
    out: list[float | None] = []
    for i, text in enumerate(completions):
        if correct[i] is None:
            out.append(None)
            continue
        length = _length(text, completion_ids[i] if completion_ids is not None else None)
        out.append(cosine_scaled(length, correct[i], min_value_wrong=min_value_wrong,
                                 max_value_wrong=max_value_wrong, min_value_correct=min_value_correct,
                                 max_value_correct=max_value_correct, max_len=max_len))
    return out


@reward("repetition_penalty")
def repetition_penalty(prompt, completion, *, completion_ids=None, ngram_size: int = 3, max_penalty: float = -1.0):
    """N-gram repetition penalty: max_penalty * (1 - distinct word n-grams / all word n-grams)."""
    if max_penalty > 0:
        raise RewardError(f"reward 'repetition_penalty': option 'max_penalty' must be <= 0, got {max_penalty}")
    words = completion.lower().split()
    if len(words) < ngram_size:
        return 0.0
    ngrams = [tuple(words[i : i + ngram_size]) for i in range(len(words) - ngram_size + 1)]
    return (1.0 - len(set(ngrams)) / len(ngrams)) * max_penalty + 0.0  # no -0.0


def soft_overlong(length: int, max_length: int, cache_length: int) -> float:
    """DAPO soft overlong punishment: 0 up to max_length - cache_length, linear to -1 at max_length, -1 beyond."""
    if length <= max_length - cache_length:
        return 0.0
    if length <= max_length:
        return (max_length - cache_length - length) / cache_length
    return -1.0


@reward("soft_overlong")
def soft_overlong_reward(prompt, completion, *, completion_ids=None, max_length: int = 4096,
                         cache_length: int = 512):
    """DAPO soft overlong punishment: 0, then linear down to -1 over the last cache_length tokens."""
    if not 0 < cache_length <= max_length:
        raise RewardError(f"reward 'soft_overlong': need 0 < cache_length <= max_length, got {cache_length}, {max_length}")
    return soft_overlong(_length(completion, completion_ids), max_length, cache_length)


@reward("language_consistency")
def language_consistency(prompt, completion, *, completion_ids=None, language: str = "en", think_tag: str = "think"):
    """R1 language consistency: share of the chain of thought's words in the target language's script.

    Script-based: R1 fights language *mixing* (e.g. Chinese inside an English CoT), which word
    scripts show reliably, while per-word language identification of short words does not."""
    return language_share(reasoning(completion, think_tag), language)


_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_ARITHMETIC = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Constant, ast.Add, ast.Sub, ast.Mult, ast.Div,
               ast.USub, ast.UAdd)


def countdown_score(equation: str | None, numbers, target, format_score: float = 0.1) -> float:
    """1.0 if the equation uses each number exactly once and equals target; format_score if it is a
    well-formed arithmetic expression otherwise; 0.0 when there is none."""
    if not equation or not re.fullmatch(r"[\d+\-*/().\s]+", equation.split("=")[0]):
        return 0.0
    try:
        tree = ast.parse(equation.split("=")[0].strip(), mode="eval")
    except SyntaxError:
        return 0.0
    if not all(isinstance(node, _ARITHMETIC) for node in ast.walk(tree)):
        return 0.0
    used = sorted(node.value for node in ast.walk(tree) if isinstance(node, ast.Constant))
    if used != sorted(int(n) for n in numbers) or not all(isinstance(v, int) for v in used):
        return format_score
    try:
        value = _evaluate(tree.body)
    except ZeroDivisionError:
        return format_score
    return 1.0 if value == Fraction(target) else format_score


def _evaluate(node) -> Fraction:
    if isinstance(node, ast.Constant):
        return Fraction(node.value)
    if isinstance(node, ast.UnaryOp):
        value = _evaluate(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    left, right = _evaluate(node.left), _evaluate(node.right)
    if isinstance(node.op, ast.Add):
        return left + right
    if isinstance(node.op, ast.Sub):
        return left - right
    if isinstance(node.op, ast.Mult):
        return left * right
    return left / right


@reward("countdown")
def countdown(prompt, completion, *, completion_ids=None, nums, target, format_score: float = 0.1):
    """Countdown: the <answer> equation uses each of nums once and hits target: 1.0; well-formed: 0.1; else 0."""
    answers = _ANSWER_TAG.findall(completion)
    return countdown_score(answers[-1].strip() if answers else None, nums, target, format_score)


@reward("code", batched=True)
def code_reward(prompts, completions, *, completion_ids=None, timeout: float = 10.0, memory_mb: int = 1024,
                partial: bool = False, **columns):
    """Code: 1.0 when the last ```python block passes every one of the row's tests (HumanEval, MBPP or stdin/stdout) after all ran, else 0.0; partial=true: the pass fraction.

    All or nothing by default, as R1: with partial credit a program that passes the easy asserts and
    fails the rest (subtly wrong, or hostile) is still rewarded."""
    rows = _rows(len(completions), columns)
    programs = [code_scoring.extract_code(text) for text in completions]
    limits = Limits(timeout_s=timeout, case_timeout_s=min(timeout, Limits.case_timeout_s), memory_mb=memory_mb)
    try:
        return code_scoring.score_rows(rows, programs, limits=limits, partial=partial)
    except ValueError as err:
        raise RewardError(f"reward 'code': {err}") from None


@reward("code_format")
def code_format(prompt, completion, *, completion_ids=None, require_think: bool = True, think_tag: str = "think"):
    """1.0 when (after a <think> block, if required) there is a ```python block that parses, else 0.0."""
    if require_think and not think_pattern(think_tag, "", False).match(completion):
        return 0.0
    program = code_scoring.extract_code(completion.split(f"</{think_tag}>")[-1])
    if program is None:
        return 0.0
    try:
        ast.parse(program)
    except (SyntaxError, ValueError):
        return 0.0
    return 1.0
