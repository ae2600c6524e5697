"""Benchmarks and their metrics: loading, prompt formatting, verdicts, pass@k and maj@k.

    problems = load_benchmark(spec, data_dir)                # GSM8K, MATH-500, AIME, AMC, HumanEval, MBPP, any
    prompts = [format_prompt(p, spec.template) for p in problems]
    verdicts = judge(problems, completions_per_problem, spec)  # r1pipe.rewards decides correctness
    summary = summarize(per_problem_records, ks=[1, 4])       # pass@1 (mean), pass@k (unbiased), maj@k

Evaluation follows DeepSeek-R1: k samples per problem at temperature 0.6 / top-p 0.95, pass@1 is
the mean correctness over those k samples, pass@k uses the unbiased estimator of Chen et al. (2021),
maj@k is the accuracy of the most frequent extracted answer. Correctness is decided by
`r1pipe.rewards` (math-verify on the boxed answer; the code sandbox for HumanEval/MBPP), never here.
"""

from __future__ import annotations

import os
from collections import Counter
from itertools import islice
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from r1pipe.config import RecipeError, Section

Kind = Literal["math", "code"]

MATH_TEMPLATE = "{prompt}\nPlease reason step by step, and put your final answer within \\boxed{{}}."
HUMANEVAL_TEMPLATE = (
    "Complete the following Python function. Reply with the whole function in a ```python code block.\n"
    "```python\n{prompt}```"
)
MBPP_TEMPLATE = (
    "{prompt}\nYour code should pass these tests:\n{tests}\n"
    "Reply with the Python code in a ```python code block."
)
RECORD_FIELDS = (
    "id", "prompt", "answer", "solution",  # math
    "test", "entry_point", "test_list", "test_setup_code", "challenge_test_list",  # code (HumanEval, MBPP)
)


@dataclass(frozen=True)
class BuiltinFormat:
    """Where a built-in benchmark lives in the shared data folder and how its columns map to records."""

    file: str
    kind: Kind
    columns: dict[str, str]
    gold: str = "auto"
    template: str = MATH_TEMPLATE


BUILTIN_BENCHMARKS: dict[str, BuiltinFormat] = {
    "gsm8k": BuiltinFormat("gsm8k_test.jsonl", "math", {"question": "prompt"}, gold="gsm8k"),
    "math500": BuiltinFormat("math500.jsonl", "math", {"problem": "prompt", "unique_id": "id"}, gold="math"),
    "aime24": BuiltinFormat("aime24.jsonl", "math", {"problem": "prompt"}, gold="aime"),
    "aime25": BuiltinFormat("aime25.jsonl", "math", {"problem": "prompt"}, gold="aime"),
    "amc23": BuiltinFormat("amc23.jsonl", "math", {"problem": "prompt"}, gold="math"),
    "humaneval": BuiltinFormat("humaneval.jsonl.gz", "code", {"task_id": "id"}, template=HUMANEVAL_TEMPLATE),
    "mbpp": BuiltinFormat("mbpp.jsonl", "code", {"text": "prompt", "task_id": "id"}, template=MBPP_TEMPLATE),
}


class BenchmarkSpec(Section):
    """One benchmark: a built-in name (data from `eval.data_dir`) or any `datasets` source with a mapping."""

    name: str = Field(
        description=f"Label in the summary; a built-in name ({', '.join(BUILTIN_BENCHMARKS)}) needs nothing else."
    )
    path: str | None = Field(
        None, description="Custom source: local .jsonl/.json/.parquet/.csv file, save_to_disk directory or hub id."
    )
    split: str = Field("test", description="Split of a hub/save_to_disk source (local files have only 'train').")
    subset: str | None = Field(None, description="Hub dataset configuration name.")
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Rename source columns to record fields: prompt (required), id, answer/solution (math), "
        "test+entry_point (HumanEval style) or test_list (+test_setup_code) (MBPP style).",
    )
    kind: Kind | None = Field(None, description="math (boxed answer, math-verify) or code (sandboxed tests).")
    gold: Literal["auto", "gsm8k", "math", "aime", "text"] | None = Field(
        None, description="How the gold answer is read from a math row (r1pipe.rewards.math.gold_answer)."
    )
    template: str | None = Field(
        None, description="User message with {prompt} (and any record field, {tests} for MBPP); "
        "default: R1's 'Please reason step by step, and put your final answer within \\boxed{}.'",
    )
    answer_pattern: str | None = Field(
        None, description="Math: regex whose first group is the answer, used when a completion has no \\boxed{} "
        "(e.g. '(-?[\\d,.]+)\\D*$' for the last number).",
    )
    limit: int | None = Field(None, gt=0, description="Evaluate only the first N problems.")

    @model_validator(mode="after")
    def _known_or_described(self):
        if self.path is None and self.name not in BUILTIN_BENCHMARKS:
            raise ValueError(
                f"{self.name!r} is not a built-in benchmark ({', '.join(BUILTIN_BENCHMARKS)}); give a path, "
                "columns and kind for a custom one"
            )
        if self.path is not None and self.name not in BUILTIN_BENCHMARKS and self.kind is None:
            raise ValueError(f"custom benchmark {self.name!r} needs kind: math or code")
        return self

    @property
    def builtin(self) -> BuiltinFormat | None:
        return BUILTIN_BENCHMARKS.get(self.name)

    def resolved_kind(self) -> Kind:
        return self.kind or self.builtin.kind

    def resolved_gold(self) -> str:
        return self.gold or (self.builtin.gold if self.builtin else "auto")

    def resolved_template(self) -> str:
        if self.template is not None:
            return self.template
        if self.builtin is not None:
            return self.builtin.template
        return MATH_TEMPLATE if self.kind == "math" else "{prompt}"


@dataclass
class Problem:
    """One benchmark item: the record after column mapping, its gold answer (math) and prompt text."""

    id: str
    record: dict
    kind: Kind
    gold: str | None = None
    prompt: str = ""
    metadata: dict = field(default_factory=dict)


def default_data_dir() -> Path:
    """`R1PIPE_SHARED_DATA`, else ../shared/data relative to the current directory."""
    return Path(os.environ.get("R1PIPE_SHARED_DATA", "../shared/data"))


def load_benchmark(spec: BenchmarkSpec, index: int = 0, data_dir: Path | None = None) -> list[Problem]:
    """Read a benchmark into `Problem`s with prompts formatted; errors name `eval.benchmarks.<index>`."""
    from r1pipe.data import SourceSection, load_source

    key = f"eval.benchmarks.{index}"
    builtin = spec.builtin
    if spec.path is None:
        data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
        path = data_dir / builtin.file
        if not path.is_file():
            raise RecipeError(f"{key}: {spec.name}: {path} not found (set eval.data_dir or R1PIPE_SHARED_DATA)")
        columns = dict(builtin.columns)
    else:
        path, columns = spec.path, dict(builtin.columns if builtin and not spec.columns else spec.columns)
    source = SourceSection(path=str(path), split=spec.split, name=spec.subset, columns=columns, max_rows=spec.limit)
    try:
        dataset = load_source(source, index, RECORD_FIELDS)
    except RecipeError as err:
        raise RecipeError(str(err).replace(f"data.sources.{index}", key, 1)) from None
    kind, template = spec.resolved_kind(), spec.resolved_template()
    problems = []
    for row_index, record in enumerate(dataset):
        where = f"{key}: {spec.name} row {row_index}"
        if not record.get("prompt"):
            raise RecipeError(f"{where}: no 'prompt' (map a column to it with {key}.columns)")
        problem = Problem(id=str(record.get("id", row_index)), record=record, kind=kind)
        if kind == "math":
            from r1pipe.rewards.math import gold_answer

            problem.gold = gold_answer(record, spec.resolved_gold())
            if problem.gold is None:
                raise RecipeError(f"{where}: no gold answer (need 'answer' or 'solution'; check {key}.gold)")
        elif not ("test" in record and "entry_point" in record) and "test_list" not in record:
            raise RecipeError(f"{where}: code rows need test+entry_point or test_list (map them with {key}.columns)")
        problem.prompt = format_prompt(record, template, where)
        problems.append(problem)
    if not problems:
        raise RecipeError(f"{key}: {spec.name} has no rows")
    return problems


def format_prompt(record: dict, template: str, where: str = "prompt") -> str:
    """The user message: `template` filled with the record's fields ({tests} = MBPP asserts, one a line)."""
    values = {k: v for k, v in record.items() if v is not None}
    if record.get("test_list"):
        values["tests"] = "\n".join(record["test_list"])
    try:
        return template.format_map(values)
    except KeyError as err:
        raise RecipeError(f"{where}: template field {{{err.args[0]}}} is not a record field "
                          f"({', '.join(sorted(values))})") from None
    except (ValueError, IndexError) as err:
        raise RecipeError(f"{where}: bad template {template!r}: {err}") from None


# ----------------------------------------------------------------------------------------------
# Verdicts


@dataclass
class Verdict:
    """One sample's outcome: the extracted answer (math) or program (code), its score and correctness."""

    answer: str | None
    score: float
    correct: bool
    decided: bool = True  # False when math-verify could not decide (timeout): counted as incorrect


def judge(problems: list[Problem], completions: list[list[str]], answer_pattern: str | None = None,
          truncated: list[list[bool]] | None = None) -> list[list[Verdict]]:
    """Verdicts for each problem's completions, all math checks / sandbox runs batched at once.

    `truncated` marks completions cut at the token limit: they get no `answer_pattern` fallback (the
    last number of an unfinished text is not an answer), only a \\boxed{} they did write.
    """
    if len(problems) != len(completions):
        raise ValueError(f"judge: {len(problems)} problems but {len(completions)} completion lists")
    kinds = {p.kind for p in problems}
    if kinds == {"code"}:
        return _judge_code(problems, completions)
    if kinds == {"math"}:
        cut = truncated or [[False] * len(texts) for texts in completions]
        return _judge_math(problems, completions, answer_pattern, cut)
    raise ValueError(f"judge: one benchmark mixes kinds {sorted(kinds)}")


def _judge_math(problems, completions, answer_pattern, truncated):
    from r1pipe.rewards.math import verify_many

    answers = [[extract_math_answer(text, None if cut else answer_pattern) for text, cut in zip(texts, cuts, strict=True)]
               for texts, cuts in zip(completions, truncated, strict=True)]
    pairs = [(p.gold, a) for p, row in zip(problems, answers, strict=True) for a in row]
    flat = iter(verify_many(pairs))
    verdicts = []
    for row in answers:
        out = []
        for answer in row:
            ok = next(flat)
            out.append(Verdict(answer, float(bool(ok)), bool(ok), decided=ok is not None or answer is None))
        verdicts.append(out)
    return verdicts


def extract_math_answer(text: str, answer_pattern: str | None = None) -> str | None:
    """The last \\boxed{} answer; else the last match of `answer_pattern` (when given)."""
    from r1pipe.rewards.math import extract_answer

    answer = extract_answer(text) or None  # an empty \boxed{} is no answer
    if answer is None and answer_pattern:
        answer = extract_answer(text, answer_pattern)
        answer = answer.replace(",", "").rstrip(".") if answer else answer
    return answer


def _judge_code(problems, completions):
    from r1pipe.rewards.code import extract_code, score_rows

    rows, programs = [], []
    for problem, texts in zip(problems, completions, strict=True):
        for text in texts:
            rows.append(problem.record)
            programs.append(extract_code(text))
    flat = iter(zip(programs, score_rows(rows, programs), strict=True))
    return [[Verdict(program, score, score >= 1.0) for program, score in islice(flat, len(texts))]
            for texts in completions]


# ----------------------------------------------------------------------------------------------
# Metrics


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k = 1 - C(n-c, k) / C(n, k) (Chen et al. 2021), as a stable product.

    n samples of which c are correct; k <= n. The product form avoids the huge binomials.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def normalize_answer(answer: str) -> str:
    """Key for majority voting: whitespace, `$`, `\\!` and `\\left`/`\\right` do not split votes."""
    text = answer.replace("\\!", "").replace("\\left", "").replace("\\right", "").replace("$", "")
    return "".join(text.split())


def majority_vote(verdicts: list[Verdict]) -> tuple[str | None, bool]:
    """maj@k for one problem: (most frequent answer, its correctness); ties go to the earliest sample.

    Samples without an answer do not vote; no answer at all counts as incorrect.
    """
    keys = [normalize_answer(v.answer) if v.answer is not None else None for v in verdicts]
    votes = Counter(k for k in keys if k is not None)
    if not votes:
        return None, False
    winner = max(votes, key=lambda k: (votes[k], -keys.index(k)))
    first = verdicts[keys.index(winner)]
    return first.answer, first.correct


def problem_metrics(verdicts: list[Verdict], ks: list[int], kind: Kind) -> dict:
    """Per-problem numbers: correct count, pass@k for each k <= n, and the majority answer (math)."""
    n, c = len(verdicts), sum(v.correct for v in verdicts)
    out = {"n": n, "correct": c, "pass@1": c / n}
    for k in ks:
        if 1 < k <= n:
            out[f"pass@{k}"] = pass_at_k(n, c, k)
    if kind == "math":
        answer, ok = majority_vote(verdicts)
        out["maj_answer"], out[f"maj@{n}"] = answer, float(ok)
    return out


def summarize(records: list[dict], ks: list[int]) -> dict:
    """Benchmark-level means of the per-problem metrics (fractions in [0, 1]) plus counts."""
    if not records:
        raise ValueError("summarize: no problems")
    keys = [k for k in records[0]["metrics"] if k.startswith(("pass@", "maj@"))]
    summary = {key: float(np.mean([r["metrics"][key] for r in records])) for key in keys}
    samples = [s for r in records for s in r["samples"]]
    summary.update(
        problems=len(records),
        samples=len(samples),
        mean_completion_tokens=float(np.mean([s["tokens"] for s in samples])),
        truncated_fraction=float(np.mean([s["truncated"] for s in samples])),
        undecided=int(sum(not s.get("decided", True) for s in samples)),
    )
    return summary
