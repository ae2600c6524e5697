"""Math answers: extraction (`\\boxed{}`), gold answers of GSM8K/MATH/AIME rows, and verification.

`verify` decides with math-verify (sympy-based equivalence: fractions vs decimals, `\\dfrac`, `x = 3`
vs `3`, thousands separators, percent, `\\text{}` wrappers, sets, intervals), wrapped in r1pipe's
own rules where math-verify is wrong or slow (each rule below says why):

- a gold that is no final answer gives None, never a score: a worked solution without a box or
  `####` line (math-verify would take its last number), a placeholder (TBD, N/A, ?), unbalanced
  braces, an AIME answer that is not an integer 0-999 (`gold_answer`);
- plain numbers (integers, decimals, `a/b`, `\\frac{a}{b}`, `1.2\\times10^{-6}`, `1.2e-6`) are
  compared here: integers and fractions exactly, decimals to 6 significant digits (`numbers_equal`),
  where math-verify rounds to 6 decimal places and so calls 1.0e-6 and 1.2e-6 equal;
- forms math-verify misreads are rewritten first (`normalize`): thousands separated by a space or
  thin space, a number with its unit inside one `\\text{}`, the degree sign, a sentence period;
- an answer that could keep the parser busy for seconds (very long, deeply nested, power towers,
  huge factorials, nested functions, big polynomial powers, unevaluated integrals or sums) is
  rejected before any parse (`too_costly`), so it costs microseconds instead of the time limit.

math-verify runs in worker processes (`_verify_worker.py`): its own timeout uses SIGALRM, which only
works in the main thread and cannot interrupt a C-level regex or sympy loop, so a worker that
overruns the time limit is killed and replaced. A verification therefore never crashes and never
hangs; it returns None when it cannot decide (no gold answer, timeout, error). A worker that cannot
start at all (math-verify not importable) is a setup error: RewardError, which stops the stage with
one line, instead of every answer silently scoring as undecided.
"""

from __future__ import annotations

import atexit
import functools
import json
import marshal
import math
import os
import queue
import re
import select
import struct
import subprocess
import sys
import tempfile
import threading
import time
from decimal import Decimal, localcontext
from fractions import Fraction
from pathlib import Path

from r1pipe.rewards.per_process import per_process
from r1pipe.rewards.registry import RewardError

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*")
_GSM8K_FINAL = re.compile(r"####\s*(.+?)\s*$", re.DOTALL)


def extract_answer(text: str, pattern: str | None = None) -> str | None:
    """The content of the last `\\boxed{...}` (balanced braces; `\\boxed 5` too), or of the last match
    of `pattern`'s first group when a pattern is given. None when there is no answer."""
    if not isinstance(text, str):
        return None
    if pattern is not None:
        matches = list(re.finditer(pattern, text, re.DOTALL))
        if not matches:
            return None
        last = matches[-1]
        return (last.group(1) if last.groups() else last.group(0)).strip()
    starts = [m.end() for m in _BOXED.finditer(text)]
    for start in reversed(starts):
        if start < len(text) and text[start] == "{":
            depth = 0
            for i in range(start, len(text)):
                if text[i] == "{":
                    depth += 1
                elif text[i] == "}":
                    depth -= 1
                    if depth == 0:
                        return text[start + 1 : i].strip()
            continue  # unbalanced: try an earlier box
        token = re.match(r"([^\s$]+)", text[start:])
        if token:
            return token.group(1)
    return None


# ----------------------------------------------------------------------------------------------
# Gold answers: a final answer or None

GOLD_SOURCES = ("auto", "gsm8k", "math", "aime", "text")
# Missing-value markers that datasets and conversions leave where an answer should be (pandas' NA
# strings plus TBD/TBA/?): math-verify would parse "TBD" as the product T*B*D and match it.
_PLACEHOLDERS = frozenset({"tbd", "tba", "n/a", "na", "nan", "null", "none", "unknown", "?", "??", "???", "-",
                           "--", "\u2013", "\u2014", "...", "\u2026", "<na>", "#n/a"})
_AIME_NAME = re.compile(r"(?<![a-z])aime(?![a-z])", re.IGNORECASE)
_AIME_ID = re.compile(r"\d{4}-I{1,2}-\d{1,2}")  # aime25's ids: 2025-I-1 ... 2025-II-15
_CALCULATOR = re.compile(r"<<[^<>\n]*>>")  # GSM8K's calculator annotations
_TEXT_GROUP = re.compile(r"\\(?:text\w*|mathrm|mbox|operatorname|begin|end)\s*\{[^{}]*\}")
_SENTENCE = re.compile(r"[A-Za-z]{2,}(?:[ ,;:'-]+[A-Za-z]+){3,}")  # four words in a row


def gold_answer(row_or_text, source: str = "auto") -> str | None:
    """The gold answer of a dataset row (or of a raw answer/solution text), or None.

    gsm8k: text after the last `####` of `answer`; math: `answer`, else the last box of `solution`;
    aime: the integer answer 0-999; text: the string itself (its last box if it has one). `auto`
    picks from the fields: an int answer is taken as is, a row whose url/source/id names AIME (or an
    id like aime25's 2025-I-1) is read as AIME. None when there is no final answer: a text without a
    box or `####` that reads like a worked solution (several lines, GSM8K `<<...>>` annotations, a
    sentence), a placeholder (TBD, N/A, ?, ...), unbalanced braces, a non-integer AIME answer.
    """
    if source not in GOLD_SOURCES:
        raise ValueError(f"gold_answer: unknown source {source!r}; expected one of {', '.join(GOLD_SOURCES)}")
    if isinstance(row_or_text, dict):
        row = row_or_text
        answer, solution = row.get("answer"), row.get("solution")
        if source == "auto" and isinstance(answer, int) and not isinstance(answer, bool):
            return str(answer)
        if source == "aime" or (source == "auto" and _names_aime(row)):
            return _aime_answer(answer)
        if source == "gsm8k" or (source == "auto" and isinstance(answer, str) and "####" in answer):
            return _gsm8k_answer(answer)
        if answer is not None and str(answer).strip():
            return _text_answer(str(answer))
        if solution:
            return _final_answer(extract_answer(str(solution)))
        return None
    if row_or_text is None:
        return None
    text = str(row_or_text)
    if source == "aime":
        return _aime_answer(text)
    if source == "gsm8k" or (source == "auto" and "####" in text):
        return _gsm8k_answer(text)
    return _text_answer(text)


def _names_aime(row: dict) -> bool:
    names = [row.get(key) for key in ("url", "source", "dataset", "competition", "id")]
    if any(isinstance(name, str) and _AIME_NAME.search(name) for name in names):
        return True
    return isinstance(row.get("id"), str) and bool(_AIME_ID.fullmatch(row["id"].strip()))


def _aime_answer(value) -> str | None:
    """AIME answers are integers 0-999 ("033" is 33); anything else is no answer."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value) if isinstance(value, int) else _text_answer(str(value))
    if text is None or not re.fullmatch(r"\d+", text) or int(text) > 999:
        return None
    return str(int(text))


def _gsm8k_answer(text) -> str | None:
    match = _GSM8K_FINAL.search(text or "")
    return _final_answer(match.group(1)) if match else None


def _text_answer(text: str) -> str | None:
    if _BOXED.search(text):
        return _final_answer(extract_answer(text))
    if reads_like_solution(text):
        return None
    return _final_answer(text)


def reads_like_solution(text: str) -> bool:
    """Several lines, GSM8K calculator annotations, or a sentence (four words in a row outside
    `\\text{}`): a worked solution, whose last number is not necessarily its answer."""
    text = text.strip()
    if "\n" in text or _CALCULATOR.search(text):
        return True
    return bool(_SENTENCE.search(re.sub(r"\\[A-Za-z]+", " ", _TEXT_GROUP.sub(" ", text))))


def _final_answer(answer: str | None) -> str | None:
    answer = _clean(answer)
    if answer is None or is_placeholder(answer) or not balanced(answer):
        return None
    return answer


def is_placeholder(answer: str) -> bool:
    """A missing-value marker (TBD, N/A, ?, none, ...; also inside `\\text{}`), not an answer."""
    text = answer.strip().strip("$").strip()
    wrapped = re.fullmatch(r"\\text\w*\s*\{(.*)\}", text)
    return (wrapped.group(1) if wrapped else text).strip().lower() in _PLACEHOLDERS


def balanced(text: str) -> bool:
    """Braces balance (escaped `\\{`, `\\}` aside): an unbalanced gold cannot be read as intended."""
    depth = 0
    for token in re.findall(r"\\.|[{}]", text, re.DOTALL):
        depth += (token == "{") - (token == "}")
        if depth < 0:
            return False
    return depth == 0


def _clean(answer: str | None) -> str | None:
    answer = (answer or "").strip().strip("$").strip()
    return answer or None


# ----------------------------------------------------------------------------------------------
# Normalisation: forms math-verify misreads, rewritten to forms it reads

_DEGREE = re.compile(r"\s*(?:\u00b0|\\degree(?![A-Za-z])|\\textdegree(?![A-Za-z]))")
_SPACE = r"(?:\\[,;: ]|\\thinspace(?![A-Za-z])|~|[ \u00a0\u2009\u202f])"
_SPACED_THOUSANDS = re.compile(rf"(?<![\d.,])(\d{{1,3}})((?:{_SPACE}+\d{{3}})+)(?!\d)")
_NUMBER_WITH_UNIT = re.compile(
    r"\\(?:text|textbf|textit|textrm|textnormal|mathrm|mbox)\s*\{\s*(?:\\?\$\s*)?"
    r"([-+]?\d[\d,]*(?:\.\d+)?(?:/\d+)?)\s*(\\%|%|\^\\circ|[A-Za-z][A-Za-z.'\s]*?)?\s*\}")
_TEXT_PERIOD = re.compile(r"(\\text\w*\s*\{[^{}]*?[^.\s{])\s*\.\s*\}\s*$")


def normalize(answer: str) -> str:
    """`answer` with the forms math-verify scores wrongly rewritten to ones it reads.

    `1\\,000`, `1 000` (space, `\\;`, `~`, unicode thin spaces as thousands separators) -> `1000`
    (math-verify reads `1\\,000` as 1*0); `\\text{18 dollars}` -> `18\\text{ dollars}` (it reads the
    whole group as a symbol); `30°`, `30\\degree` -> `30^\\circ`; a sentence period at the end
    (`18.`, `\\text{Evelyn.}`) is dropped; `\\!` (a negative thin space) is dropped.
    """
    text = re.sub(r",\s*\\!\s*", ",", answer.strip()).replace("\\!", "")  # MATH's 11,\! 111
    text = re.sub(r"(?<=\d)\{,\}(?=\d)", ",", text)
    text = _DEGREE.sub(r"^\\circ", text)
    text = _SPACED_THOUSANDS.sub(lambda m: m.group(1) + re.sub(r"\D", "", m.group(2)), text)
    text = _NUMBER_WITH_UNIT.sub(_number_then_unit, text)
    text = _TEXT_PERIOD.sub(r"\1}", text)
    period = re.search(r"\s*\.\s*$", text)
    if period and period.start() > 0 and text[period.start() - 1] not in ".\\":
        text = text[: period.start()]
    return text.strip()


def _number_then_unit(match: re.Match) -> str:
    number, unit = match.group(1), (match.group(2) or "").strip().rstrip(".").strip()
    if unit in ("%", "\\%"):
        return number + "\\%"
    if unit == "^\\circ":
        return number + "^\\circ"
    return number + (f"\\text{{ {unit}}}" if unit else "")


# ----------------------------------------------------------------------------------------------
# Cheap rejection of answers that would keep the parser busy for seconds
#
# Measured with math-verify 0.9 on a 2-core machine: parsing a 10k-character answer, or one nested
# 20 braces deep, takes the whole time limit (ANTLR's full-context prediction grows with nesting);
# sympy evaluates 9^{9^9}, 10^{10^{10}} or 1000000! in C, where no timeout can interrupt it, and
# spends seconds on tan(tan(tan(tan(tan(1))))), (x+y+z+w)^{60} or an unevaluated sum of 10^5
# terms. No library bounds these costs from the text, so the limits below are hand-set, each far
# above what real answers use (MATH-500's golds: at most 53 characters, nesting 2, no bare groups,
# no nested functions).

MAX_ANSWER_CHARS = 300  # or twice the gold's length, if longer
MAX_NESTING = 6  # {, ( and [ levels
MAX_BARE_GROUPS = 3  # `{...}` that are no command's argument: {{{1}}}, {1},{2},... (sets to ANTLR)
MAX_FUNCTION_NESTING = 3  # \tan(\tan(\tan(1))); one more level can take seconds
MAX_EXPONENT_NESTING = 3  # x^{x^{x^{x}}}
MAX_DIGITS = 10_000  # digits of a number the answer spells as a power, factorial, binomial or Gamma
MAX_SYMBOLIC_DEGREE = 64  # (x+1)^{1000}: sympy expands it when comparing (seconds)
MAX_EXPANDED_TERMS = 100  # (x+y+z)^{20} expands to 231 terms (0.3-0.5 s), ^{30} to 496 (0.8 s)
MAX_ROOT_INDEX = 10_000
_TERMS_CAP = 10**9
_LOOKBEHIND = 64  # characters before a bracket that can make it a function's or command's argument
# An unevaluated integral, sum, product or limit is no final answer, and sympy may spend the whole
# time limit evaluating one: rejected unless the gold has one too.
_CALCULUS = re.compile(r"\\(?:i*int|oint|sum|prod|lim|liminf|limsup)(?![A-Za-z])|\\frac\{d\}\{d|\\partial")
_FUNCTION = re.compile(r"\\(?:a?r?c?(?:sin|cos|tan|cot|sec|csc)h?|log|ln|lg|exp|Gamma|operatorname\s*\{[^{}]*\})"
                       r"(?:\s*[_^](?:\{[^{}]*\}|\w))*\s*(?:\\left)?\s*$")
_ARGUMENT_BEFORE = re.compile(r"(?:\\[A-Za-z]+\*?|[\^_}\]])\s*$")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def too_costly(answer: str, gold: str | None = None) -> str | None:
    """Why verifying `answer` could take seconds (None when it cannot), from the text alone: longer
    than MAX_ANSWER_CHARS, nested deeper than MAX_NESTING (functions or exponents deeper than 3),
    more than MAX_BARE_GROUPS bare `{}` groups, a power/factorial/binomial/Gamma of more than
    MAX_DIGITS digits, a polynomial power above MAX_SYMBOLIC_DEGREE or MAX_EXPANDED_TERMS terms, an
    integral/sum/product/limit. A gold that needs more raises the limit to its own."""
    gold = gold or ""
    limit = max(MAX_ANSWER_CHARS, 2 * len(gold))
    if len(answer) > limit:
        return f"longer than {limit} characters"
    if _CALCULUS.search(answer) and not _CALCULUS.search(gold):
        return "an unevaluated integral, sum, product or limit"
    mine, (theirs, gold_size) = _structure(answer), _gold_measures(gold)
    for what, index, floor in (("nested deeper than {} levels", 0, MAX_NESTING),
                               ("more than {} bare {{}} groups", 1, MAX_BARE_GROUPS),
                               ("functions nested deeper than {}", 2, MAX_FUNCTION_NESTING),
                               ("exponents nested deeper than {}", 3, MAX_EXPONENT_NESTING)):
        limit = max(floor, theirs[index])
        if mine[index] > limit:
            return what.format(limit)
    digits, degree, terms = _size(answer)
    if digits > MAX_DIGITS:
        return f"a number of more than {MAX_DIGITS} digits"
    _, gold_degree, gold_terms = gold_size
    if degree > max(MAX_SYMBOLIC_DEGREE, gold_degree) or terms > max(MAX_EXPANDED_TERMS, gold_terms):
        return f"a polynomial power above degree {MAX_SYMBOLIC_DEGREE} or {MAX_EXPANDED_TERMS} terms"
    return None


@functools.lru_cache(maxsize=4096)  # a GRPO group scores its completions against one gold
def _gold_measures(gold: str):
    return _structure(gold), _size(gold)


def _structure(text: str) -> tuple[int, int, int, int]:
    """(bracket nesting, bare `{}` groups, nesting of function arguments, nesting of exponents)."""
    deepest = bare = functions = exponents = 0
    stack: list[str] = []  # per open bracket: "f" function argument, "e" exponent, "b" bare, "" other
    for match in re.finditer(r"\\[{}]|[{(\[]|[})\]]", text):
        token, before = match.group(), text[max(0, match.start() - _LOOKBEHIND) : match.start()]
        if token in ("}", ")", "]", "\\}"):
            if stack:
                stack.pop()
            continue
        kind = ""
        if _FUNCTION.search(before):
            kind = "f"
        elif token == "{" and before.rstrip().endswith("^"):
            kind = "e"
        elif token == "{" and not _ARGUMENT_BEFORE.search(before) and not text.startswith("}", match.end()):
            kind = "b"
            bare += 1
        stack.append(kind)
        deepest = max(deepest, len(stack))
        functions = max(functions, stack.count("f"))
        exponents = max(exponents, stack.count("e"))
    return deepest, bare, functions, exponents


def _group_before(text: str, end: int) -> tuple[str, int]:
    """The operand that ends just before `end`: a bracketed group, a number, a command or a letter."""
    i = end
    while i > 0 and text[i - 1] == " ":
        i -= 1
    if i > 0 and text[i - 1] in ")]}":
        depth, j = 0, i
        while j > 0:
            j -= 1
            depth += (text[j] in ")]}") - (text[j] in "([{")
            if depth == 0:
                return text[j + 1 : i - 1], j
        return text[: i - 1], 0
    number = re.search(r"\d+(?:\.\d+)?$", text[:i])
    if number:
        return number.group(), number.start()
    token = re.search(r"(?:\\[A-Za-z]+|[A-Za-z])$", text[:i])
    return (token.group(), token.start()) if token else ("", i)


def _group_after(text: str, start: int) -> str:
    """The argument that starts at `start`: a `{...}` or `(...)` group, a command or one character."""
    i = start
    while i < len(text) and text[i] == " ":
        i += 1
    if text.startswith("\\left", i):
        i += len("\\left")
    if i < len(text) and text[i] in "{(":
        opener, closer = text[i], "}" if text[i] == "{" else ")"
        depth = 0
        for j in range(i, len(text)):
            depth += (text[j] == opener) - (text[j] == closer)
            if depth == 0:
                return text[i + 1 : j].removesuffix("\\right")
        return text[i + 1 :]
    token = re.match(r"\\[A-Za-z]+|.", text[i:])
    return token.group() if token else ""


def _log10_value(text: str, depth: int = 0) -> float | None:
    """log10 of the absolute value of a numeral, a power of numerals or a factorial of one (inf when
    astronomically large); None when `text` is not one of those (a variable, a sum, ...)."""
    text = text.strip()
    while text.startswith("{") and text.endswith("}") and balanced(text[1:-1]):
        text = text[1:-1].strip()
    text = text.lstrip("+-").strip()
    if _NUMBER.fullmatch(text):
        value = float(text) if len(text) < 300 else float("inf")
        return _log10(value) if value >= 1 else 0.0
    if depth > 20:
        return float("inf")
    if text.endswith("!"):
        operand, _ = _group_before(text, len(text.rstrip("!")))
        n = _log10_value(operand, depth + 1)
        return None if n is None else _factorial_digits(n)
    caret = _top_level_caret(text)
    if caret is not None:
        base, exponent = _log10_value(text[:caret], depth + 1), _log10_value(_group_after(text, caret + 1), depth + 1)
        if base is None or exponent is None:
            return None
        return base * _power(exponent)
    return None


def _top_level_caret(text: str) -> int | None:
    depth = 0
    for i, char in enumerate(text):
        depth += (char == "{") - (char == "}")
        if char == "^" and depth == 0:
            return i
    return None


def _log10(value: float) -> float:
    return math.log10(value) if value > 0 else 0.0


def _power(log10_value: float) -> float:
    """10 ** log10_value without overflow."""
    return float("inf") if log10_value > 300 else 10.0 ** log10_value


def _factorial_digits(log10_n: float) -> float:
    n = _power(log10_n)
    return n * max(log10_n, 1.0)


def _size(text: str) -> tuple[float, float, float]:
    """Upper estimates from the text alone: (digits of the largest number spelled as a power,
    factorial, binomial, Gamma or root; total degree of powers of sums with a variable; terms of
    their expansion)."""
    digits = degree = 0.0
    terms = 1  # an int: capped below, so it never overflows
    for match in re.finditer(r"\^", text):
        exponent = _log10_value(_group_after(text, match.end()))
        if exponent is None:
            continue  # a symbolic exponent (x^{n}, e^{x^2}) spells no number
        base, _ = _group_before(text, match.start())
        base_value = _log10_value(base)
        if base_value is not None:
            digits = max(digits, _power(exponent) * max(base_value, math.log10(2)))
        elif re.search(r"[A-Za-z]", re.sub(r"\\[A-Za-z]+", "", base)) and re.search(r".[+-]", base):
            n = _power(exponent)  # (x+1)^{n}: expanded when compared
            addends = len(re.findall(r"(?<=.)[+-]", re.sub(r"\{[^{}]*\}", "", base))) + 1
            degree += n
            expanded = math.comb(round(n) + addends - 1, addends - 1) if n <= 10**4 else _TERMS_CAP
            terms = min(terms * expanded, _TERMS_CAP)
        elif exponent > 6:
            digits = float("inf")  # x^{10^{10}}
    for match in re.finditer(r"(?<!\\)!(?!=)", text):
        operand, _ = _group_before(text, match.start())
        n = _log10_value(operand.rstrip("!"))
        if n is not None:
            digits = max(digits, _factorial_digits(n))
        elif "!" in operand or "^" in operand:
            digits = float("inf")  # a factorial of a factorial or a power we cannot bound
    for match in re.finditer(r"\\[dt]?binom\s*|\\Gamma\s*|\\choose(?![A-Za-z])", text):
        if match.group().startswith("\\choose"):
            n, _ = _group_before(text, match.start())
        else:
            n = _group_after(text, match.end())
        value = _log10_value(n)
        if value is not None:
            digits = max(digits, _factorial_digits(value))
        elif "!" in n or "^" in n:
            digits = float("inf")
    for match in re.finditer(r"\\sqrt\s*\[([^\]]*)\]", text):
        index = _log10_value(match.group(1))
        if index is not None and _power(index) > MAX_ROOT_INDEX:
            digits = float("inf")
    return digits, degree, terms


# ----------------------------------------------------------------------------------------------
# Plain numbers, decided here

_MANTISSA = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|\.\d+"
_DECIMAL = re.compile(
    rf"([-+]?)({_MANTISSA})(?:(?:\\times|\\cdot|\*)10\^(?:\{{([-+]?\d{{1,3}})\}}|(\d))|[eE]([-+]?\d{{1,3}}))?")
_FRACTION = re.compile(r"([-+]?)(?:\\[dt]?frac\{([-+]?\d{1,60})\}\{([-+]?\d{1,60})\}|(\d{1,60})/(\d{1,60}))")
_POWER_OF_TEN = re.compile(r"([-+]?)10\^(?:\{([-+]?\d{1,3})\}|(\d))")
_TRAILING_UNIT = re.compile(r"(?:\\(?:text|mbox|mathrm)\{[A-Za-z.']*\}|\^\\circ|\^\{\\circ\})$")
_SCALAR_UNSAFE = re.compile(
    r"[=<>,;&%|:]|\\(?:le|ge|leq|geq|ne|neq|approx|sim|pm|mp|cup|cap|in|notin|subset|subseteq|supset|"
    r"setminus|infty|emptyset|varnothing|text\w*|mbox|mathrm|operatorname|begin|end|to|mid|vert|lvert|"
    r"rvert)(?![A-Za-z])|\\[{}\\%]")


def plain_number(answer: str) -> tuple[Fraction, bool] | None:
    """(value, is_decimal) of an answer that is just a number -- integer, decimal, `a/b`,
    `\\frac{a}{b}`, `d\\times10^{k}`, `de-k`, `10^{k}` (|k| <= 999), optionally followed by a unit in
    `\\text{}` or `^\\circ`, which math-verify drops too -- or None."""
    if re.search(r",\s", answer):
        return None  # 1, 234 is a list, not 1234
    text = _TRAILING_UNIT.sub("", re.sub(r"\s+", "", answer).strip("$"))
    match = _DECIMAL.fullmatch(text)
    if match:
        sign, mantissa, *exponents = match.groups()
        exponent = next((int(e) for e in exponents if e is not None), 0)
        value = Fraction(Decimal(mantissa.replace(",", ""))) * Fraction(10) ** exponent
        return (-value if sign == "-" else value), "." in mantissa
    match = _FRACTION.fullmatch(text)
    if match:
        sign, num, den = match.group(1), match.group(2) or match.group(4), match.group(3) or match.group(5)
        if int(den) == 0:
            return None
        value = Fraction(int(num), int(den))
        return (-value if sign == "-" else value), False
    match = _POWER_OF_TEN.fullmatch(text)
    if match:
        value = Fraction(10) ** int(match.group(2) or match.group(3))
        return (-value if match.group(1) == "-" else value), False
    return None


def numbers_equal(a: tuple[Fraction, bool], b: tuple[Fraction, bool]) -> bool:
    """Integers and fractions exactly; when either side is a decimal, to 6 significant digits: they
    may differ by at most half a unit in the 6th significant digit of the larger (1/3 = 0.333333,
    but 2/3 != 0.666666 and 1.0e-6 != 1.2e-6, which math-verify's 6 decimal places call equal)."""
    (x, x_decimal), (y, y_decimal) = a, b
    if x == y or not (x_decimal or y_decimal):
        return x == y
    return abs(x - y) <= Fraction(5) * Fraction(10) ** (_exponent10(max(abs(x), abs(y))) - 6)


def _exponent10(x: Fraction) -> int:
    """floor(log10(x)) for x > 0, exactly."""
    e = len(str(x.numerator)) - len(str(x.denominator))
    return e - 1 if Fraction(10) ** e > x else e


def _decimal_text(value: Fraction) -> str:
    with localcontext() as context:
        context.prec = 200
        return format(Decimal(value.numerator) / Decimal(value.denominator), "f")


def _for_math_verify(gold: str, prediction: str, plain_gold, plain_prediction) -> tuple[str, str]:
    """The pair to send math-verify. It compares a float with anything to 6 decimal places, so a
    decimal below 0.1 against an expression (`0.00000014` vs `\\frac{\\sqrt2}{10^7}`: no digit
    left) is first scaled with its partner by the power of ten that brings it to [0.1, 1); a decimal
    zero becomes an exact 0. Only scalars are scaled (not sets, tuples, equations, text, percent)."""
    plain, other, plain_is_gold = ((plain_gold, prediction, True) if plain_gold
                                   else (plain_prediction, gold, False))
    if plain is None or not plain[1] or _SCALAR_UNSAFE.search(other):
        return gold, prediction
    value = plain[0]
    if value == 0:
        scaled, other_scaled = "0", other
    else:
        exponent = _exponent10(abs(value))
        if exponent >= -1:
            return gold, prediction  # 0.1 or more: 6 decimal places are 6 significant digits already
        scale = -exponent - 1
        scaled = _decimal_text(value * Fraction(10) ** scale)
        other_scaled = rf"\left({other}\right)\cdot 10^{{{scale}}}"
    return (scaled, other_scaled) if plain_is_gold else (other_scaled, scaled)


def _decide(gold, prediction) -> tuple[bool | None, tuple[str, str] | None]:
    """(verdict, None) when decided here, else (None, the pair for math-verify)."""
    gold = _text_answer(str(gold)) if gold is not None else None
    if gold is None:
        return None, None
    if prediction is None or not str(prediction).strip():
        return False, None
    gold, prediction = normalize(gold), normalize(str(prediction))
    if not prediction or too_costly(prediction, gold):
        return False, None
    plain_gold, plain_prediction = plain_number(gold), plain_number(prediction)
    if plain_gold and plain_prediction:
        return numbers_equal(plain_gold, plain_prediction), None
    return None, _for_math_verify(gold, prediction, plain_gold, plain_prediction)


# ----------------------------------------------------------------------------------------------
# Verification in worker processes

_WORKER = Path(__file__).with_name("_verify_worker.py")
WORKER_START_S = 120.0  # importing math-verify (sympy) takes seconds on a loaded machine
# The worker runs isolated (-I: with this folder on sys.path, this module would shadow stdlib `math`)
# and is handed this process's import path instead, so it finds math-verify wherever we do
# (site-packages, PYTHONPATH, a --target directory).
_BOOT = ("import json, runpy, sys; sys.path[:] = json.loads(sys.argv[1]); "
         "runpy.run_path(sys.argv[2], run_name='__main__')")


class _Worker:
    """One verification process; requests and replies are length-prefixed marshal messages. It
    answers a ready message once math-verify is imported; if it dies first, verification cannot run
    at all, and that is a setup error (RewardError) rather than a stream of undecided samples."""

    def __init__(self):
        path = json.dumps([p for p in sys.path if p and Path(p).resolve() != _WORKER.parent])
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-c", _BOOT, path, str(_WORKER)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self.stderr, start_new_session=True, close_fds=True)
        try:
            self._read_reply(time.monotonic() + WORKER_START_S)
        except (TimeoutError, EOFError, OSError, ValueError) as err:
            self.proc.kill()
            self.proc.wait()
            self.stderr.seek(0)
            lines = self.stderr.read().decode(errors="replace").strip().splitlines()
            self.stderr.close()
            why = lines[-1] if lines else f"{type(err).__name__}, no error output"
            raise RewardError(
                f"math verification: the math-verify worker ({sys.executable}) did not start: {why}") from None

    def ask(self, request, deadline: float):
        data = marshal.dumps(request)
        self.proc.stdin.write(struct.pack("<I", len(data)) + data)
        self.proc.stdin.flush()
        return self._read_reply(deadline)

    def _read_reply(self, deadline: float):
        return marshal.loads(self._read_exact(struct.unpack("<I", self._read_exact(4, deadline))[0], deadline))

    def _read_exact(self, size: int, deadline: float) -> bytes:
        fd = self.proc.stdout.fileno()
        chunks, have = [], 0
        while have < size:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not _readable(fd, remaining):
                raise TimeoutError
            chunk = os.read(fd, size - have)
            if not chunk:
                raise EOFError
            chunks.append(chunk)
            have += len(chunk)
        return b"".join(chunks)

    def kill(self):
        self.proc.kill()
        self.proc.wait()
        self.stderr.close()


def _readable(fd: int, timeout: float) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


class Verifier:
    """A pool of `workers` verification processes (started lazily, replaced when killed)."""

    def __init__(self, workers: int | None = None):
        self.size = workers or max(1, min(4, os.cpu_count() or 1))
        self.owner_pid = os.getpid()
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        self._started = 0
        self._lock = threading.Lock()
        atexit.register(self.close)

    def _take(self) -> _Worker:
        with self._lock:
            start = self._started < self.size
            self._started += start
        if not start:
            return self._idle.get()
        try:
            return _Worker()
        except RewardError:
            with self._lock:
                self._started -= 1
            raise

    def _discard(self, worker: _Worker) -> None:
        worker.kill()
        with self._lock:
            self._started -= 1

    def verify_many(self, pairs, timeout: float = 5.0) -> list[bool | None]:
        """Verify (gold, prediction) pairs on up to `size` workers; each pair gets `timeout` seconds."""
        pairs = list(pairs)
        results: list[bool | None] = [None] * len(pairs)
        todo: queue.SimpleQueue[int] = queue.SimpleQueue()
        for i in range(len(pairs)):
            todo.put(i)

        failures: list[RewardError] = []

        def drain():
            try:
                work()
            except RewardError as err:  # a worker could not start: raised in the caller's thread below
                failures.append(err)

        def work():
            worker = None
            while True:
                try:
                    i = todo.get_nowait()
                except queue.Empty:
                    break
                worker = worker or self._take()
                try:
                    results[i] = worker.ask((*pairs[i], float(timeout)), time.monotonic() + timeout + 1.0)
                except (TimeoutError, EOFError, OSError, ValueError):
                    self._discard(worker)  # hung or died: the pair stays None, a fresh worker follows
                    worker = None
            if worker is not None:
                self._idle.put(worker)

        threads = [threading.Thread(target=drain) for _ in range(min(self.size, len(pairs)) - 1)]
        for thread in threads:
            thread.start()
        drain()
        for thread in threads:
            thread.join()
        if failures:
            raise failures[0]
        return results

    def close(self):
        if os.getpid() != self.owner_pid:
            return  # a forked child's copy: the workers belong to the parent
        while True:
            try:
                self._idle.get_nowait().kill()
            except queue.Empty:
                break


@per_process
def default_verifier() -> Verifier:
    """The process-wide verifier pool; a forked child gets its own (worker pipes can't be shared)."""
    return Verifier()


def verify(gold: str | None, prediction: str | None, timeout: float = 5.0) -> bool | None:
    """Is `prediction` mathematically equal to `gold`? None if gold is no final answer (see
    `gold_answer`) or the check timed out; False for a missing or too costly prediction."""
    return verify_many([(gold, prediction)], timeout)[0]


def verify_many(pairs, timeout: float = 5.0) -> list[bool | None]:
    """Batched `verify`: pairs decided by the rules above never reach the worker pool."""
    results: list[bool | None] = []
    asked, requests = [], []
    for gold, prediction in pairs:
        verdict, request = _decide(gold, prediction)
        if request is not None:
            asked.append(len(results))
            requests.append(request)
        results.append(verdict)
    if requests:
        for i, verdict in zip(asked, default_verifier().verify_many(requests, timeout), strict=True):
            results[i] = verdict
    return results
