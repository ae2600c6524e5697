"""Arithmetic problems (`What is 37 + 48?`) for SmolLM2-135M-Instruct GRPO, with difficulty levels.

    python recipes/smollm2/make_arith.py                       # the committed splits (recipes/smollm2/data/)
    python recipes/smollm2/make_arith.py --levels 1,2,3,4,5,6,7 --test 32 --train 0 --out /tmp/arith-all
                                                               # every level, for measuring the base model

Each row: {"id": "<split>-L<level>-<n>", "level": int, "prompt": "What is 37 + 48?", "answer": "85"}.
The test split is drawn first and the training split only from what is left, so no held-out
question is ever trained on (the script checks it); levels whose pool runs short (1, 5 and 6) repeat
their remaining problems, so each level is 1/6 of the training prompts as of the test. Levels:

    1  a + b         a, b in 1..9
    2  a + b         a in 10..99, b in 1..9
    3  a + b         a, b in 10..99
    4  a - b         a in 10..99, b in 1..a-1
    5  a * b         a, b in 2..9
    6  a * b         a in 2..9, b in 10..99
    7  a + b - c     a, b in 10..99, c in 1..a+b-1

docs/SMOLLM2.md gives the base model's measured pass@1 per level and why the default mix is levels 1-6.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

DEFAULT_LEVELS = (1, 2, 3, 4, 5, 6)


def pool(level: int) -> list[tuple[str, int]]:
    """Every problem of a level (levels 1-6), in a fixed order."""
    if level == 1:
        return [(f"{a} + {b}", a + b) for a in range(1, 10) for b in range(1, 10)]
    if level == 2:
        return [(f"{a} + {b}", a + b) for a in range(10, 100) for b in range(1, 10)]
    if level == 3:
        return [(f"{a} + {b}", a + b) for a in range(10, 100) for b in range(10, 100)]
    if level == 4:
        return [(f"{a} - {b}", a - b) for a in range(10, 100) for b in range(1, a)]
    if level == 5:
        return [(f"{a} * {b}", a * b) for a in range(2, 10) for b in range(2, 10)]
    if level == 6:
        return [(f"{a} * {b}", a * b) for a in range(2, 10) for b in range(10, 100)]
    raise ValueError(f"level {level} has no enumerated pool")


def sample_level7(rng: random.Random) -> tuple[str, int]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    c = rng.randint(1, a + b - 1)
    return f"{a} + {b} - {c}", a + b - c


def draw(levels, count: int, rng: random.Random, taken: set[str], split: str, repeat: bool = False) -> list[dict]:
    """Up to `count` problems per level that are not in `taken` (added to it), in random order.

    Levels 1-6 draw without replacement from their whole pool; a small pool (level 1: 81 problems,
    level 5: 64, level 6: 720) gives fewer rows than asked, or with `repeat` (the training split)
    its remaining problems repeated up to `count`, so every level weighs the same in training."""
    rows = []
    for level in levels:
        if level == 7:
            chosen, tries = [], 0
            while len(chosen) < count and tries < 100 * count + 1000:
                tries += 1
                expression, answer = sample_level7(rng)
                if f"What is {expression}?" not in taken:
                    taken.add(f"What is {expression}?")
                    chosen.append((expression, answer))
        else:
            candidates = [item for item in pool(level) if f"What is {item[0]}?" not in taken]
            rng.shuffle(candidates)
            chosen = candidates[:count]
            taken.update(f"What is {expression}?" for expression, _ in chosen)
            if len(chosen) < count and repeat and chosen:
                print(f"{split}: level {level} has {len(chosen)} problems left; repeated to {count} rows")
                chosen = [chosen[i % len(chosen)] for i in range(count)]
        if len(chosen) < count:
            print(f"{split}: level {level} has only {len(chosen)} problems left (asked {count})")
        rows += [{"id": f"{split}-L{level}-{n:05d}", "level": level, "prompt": f"What is {expression}?",
                  "answer": str(answer)} for n, (expression, answer) in enumerate(chosen)]
    return rows


def main() -> None:
    here = Path(__file__).parent
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", default=",".join(map(str, DEFAULT_LEVELS)), help="comma-separated levels")
    parser.add_argument("--train", type=int, default=700, help="training problems per level (at most)")
    parser.add_argument("--test", type=int, default=40, help="held-out problems per level")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=here / "data", help="folder for arith_train/test.jsonl")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",") if x]

    rng = random.Random(args.seed)
    taken: set[str] = set()
    test = draw(levels, args.test, rng, taken, "test")
    test_prompts = {row["prompt"] for row in test}
    train = draw(levels, args.train, rng, taken, "train", repeat=True)
    rng.shuffle(train)  # levels interleaved (GRPO shuffles too; this keeps max_rows subsets mixed)
    assert not test_prompts & {row["prompt"] for row in train}, "a test problem leaked into the training split"

    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("arith_test.jsonl", test), ("arith_train.jsonl", train)):
        if not rows:
            continue
        with open(args.out / name, "w") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows)
        print(f"{args.out / name}: {len(rows)} rows")


if __name__ == "__main__":
    main()
