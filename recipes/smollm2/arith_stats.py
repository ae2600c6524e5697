"""Held-out results of the arithmetic GRPO runs: per level, format vs arithmetic, and the gain's CI.

    python recipes/smollm2/arith_stats.py runs/smollm2-arith      # a pipeline's folder (eval_base, eval_rl_s*)
    python recipes/smollm2/arith_stats.py BASE_EVAL TRAINED_EVAL [TRAINED_EVAL ...]   # eval run folders

Per model and level (recipes/smollm2/make_arith.py): strict pass@1 (the eval's verdict: the last
\\boxed{} equals the gold), how often a \\boxed{} is written at all, and how often the last number of
the completion is the gold (the arithmetic, whatever the format) -- so a gain can be split into
format and arithmetic. Then the gain of each trained model over the base in pass@1 points with a
95% paired bootstrap interval over problems (sampling noise of the eval), and over seeds the mean
gain with a 95% t interval (training noise as well; needs 2 or more trained models).
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def load(run: Path) -> dict[str, dict]:
    """{problem id: {"level", "correct": [bool], "boxed": [bool], "last": [bool]}} of an eval run."""
    out = {}
    for line in (run / "samples" / "arith.jsonl").read_text().splitlines():
        row = json.loads(line)
        parts = row["id"].split("-")
        level = parts[1] if len(parts) >= 3 else "?"
        last = []
        for sample in row["samples"]:
            numbers = re.findall(r"-?\d+", sample["text"])
            last.append(bool(numbers) and numbers[-1] == str(row["gold"]))
        out[row["id"]] = {"level": level, "correct": [bool(s["correct"]) for s in row["samples"]],
                          "boxed": ["\\boxed{" in s["text"] for s in row["samples"]], "last": last}
    return out


def table(name: str, problems: dict[str, dict]) -> None:
    groups: dict[str, list[dict]] = defaultdict(list)
    for p in problems.values():
        groups[p["level"]].append(p)
    groups["all"] = list(problems.values())
    print(f"\n{name}\n")
    print("| level | problems | pass@1 (strict) | writes \\boxed{} | last number right |")
    print("|---|---|---|---|---|")
    for level, rows in groups.items():
        mean = {k: 100 * np.mean([np.mean(r[k]) for r in rows]) for k in ("correct", "boxed", "last")}
        print(f"| {level} | {len(rows)} | {mean['correct']:.1f} | {mean['boxed']:.1f} | {mean['last']:.1f} |")


def paired_gain(base: dict, trained: dict, rounds: int = 10_000, seed: int = 0) -> tuple[float, float, float]:
    ids = sorted(set(base) & set(trained))
    diff = np.array([np.mean(trained[i]["correct"]) - np.mean(base[i]["correct"]) for i in ids])
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(rounds, len(diff)))].mean(axis=1)
    return 100 * diff.mean(), 100 * np.percentile(means, 2.5), 100 * np.percentile(means, 97.5)


def main() -> None:
    args = [Path(a) for a in sys.argv[1:]]
    if len(args) == 1 and (args[0] / "eval_base").is_dir():
        base_dir = args[0] / "eval_base"
        trained_dirs = sorted(p for p in args[0].glob("eval_rl*") if (p / "samples" / "arith.jsonl").is_file())
    elif len(args) >= 2:
        base_dir, trained_dirs = args[0], args[1:]
    else:
        raise SystemExit(__doc__)
    base = load(base_dir)
    table(f"base: {base_dir}", base)
    gains = []
    for run in trained_dirs:
        trained = load(run)
        table(f"trained: {run}", trained)
        gain, low, high = paired_gain(base, trained)
        gains.append(gain)
        print(f"\ngain over the base: {gain:+.1f} points (95% paired bootstrap over problems: {low:+.1f} .. {high:+.1f})")
    if len(gains) >= 2:
        mean, sd = float(np.mean(gains)), float(np.std(gains, ddof=1))
        half = T975.get(len(gains) - 1, 1.96) * sd / math.sqrt(len(gains))
        print(f"\nover {len(gains)} seeds: gain {mean:+.1f} points, sd {sd:.1f}, 95% t interval "
              f"{mean - half:+.1f} .. {mean + half:+.1f}")


if __name__ == "__main__":
    main()
