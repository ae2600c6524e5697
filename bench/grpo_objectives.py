"""Each GRPO policy objective and advantage estimator on the same toy task with a known optimum.

The task is the GRPO stage's learning test (tests/test_grpo_stage.py): a random 2-layer Qwen2
(hidden 64, the demo tokenizer's vocabulary, weights from torch seed 0) sampling 8 completions of at
most 8 tokens for prompts "say <i>", rewarded by the share of digits in the completion (`toy_digits`;
the optimum 1.0 is to answer only digits), native rollout engine, 16 completions per rollout batch,
lr 1e-2 constant, AdamW, grad-norm clip 1. Unlike the test, every run splits each rollout batch into
2 mini-batches of 8 (`grpo.mini_batches: 2`, mu 1): 2 optimizer steps per rollout batch, the second
one off the sampling policy, so the objectives' clipping and weighting actually differ (with one
on-policy step per rollout batch every ratio is 1 and the clip-based objectives coincide).

For each objective and seed it runs `--steps` optimizer steps and reports the rollout reward of the
first batch, the mean of the last 3 batches, the best batch, the optimizer updates made before the
first rollout batch whose mean reward reached 0.5 and 0.75 ("-": not within the run), and the mean
`clip_fraction` over the steps (tokens whose clip or dual-clip was active, or whose CISPO weight was
clipped).

    python bench/grpo_objectives.py                         # all objectives, seeds 0 and 1 (docs/GRPO.md)
    python bench/grpo_objectives.py --only gspo cispo --seeds 0 --steps 12
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "recipes" / "demo" / "tokenizer"
MINI_BATCHES = 2  # optimizer steps per rollout batch (mu 1)

# name -> grpo section overrides; the base is the stage default (token clip 0.2/0.28, group baseline, dapo loss)
OBJECTIVES: dict[str, dict] = {
    "grpo (default: token clip, dapo loss)": {},
    "grpo, loss_type grpo": {"loss_type": "grpo"},
    "dr_grpo": {"loss_type": "dr_grpo", "scale_rewards": "none"},
    "dual-clip (clip_ratio_c 3)": {"clip_ratio_c": 3.0},
    "gspo (sequence, eps 3e-4/4e-4, loss grpo)": {"importance_sampling_level": "sequence", "eps_low": 3e-4,
                                                  "eps_high": 4e-4, "loss_type": "grpo"},
    "gspo_token (same)": {"importance_sampling_level": "sequence_token", "eps_low": 3e-4, "eps_high": 4e-4,
                          "loss_type": "grpo"},
    "cispo (weight <= 5, no lower bound)": {"policy_loss": "cispo", "eps_low": 1.0, "eps_high": 4.0},
    "rloo": {"advantage": "rloo"},
    "reinforce_pp": {"advantage": "reinforce_pp"},
    "reinforce_pp_baseline": {"advantage": "reinforce_pp_baseline"},
    "passk": {"advantage": "passk"},
}
KEYS = {name.split(" ")[0]: name for name in OBJECTIVES}  # short names for --only


def toy_digits(prompt, completion, *, completion_ids=None):
    """Share of the completion's characters that are digits: the optimum (1.0) is to answer only digits."""
    return sum(c.isdigit() for c in completion) / len(completion) if completion else 0.0


def tiny_model(directory: Path) -> Path:
    """The stage test's tiny Qwen2 (torch seed 0)."""
    from transformers import AutoTokenizer

    from r1pipe.demo.build import tiny_qwen2

    return tiny_qwen2(directory, len(AutoTokenizer.from_pretrained(TOKENIZER)))


def recipe(work: Path, name: str, seed: int, steps: int, grpo: dict) -> dict:
    data = work / "prompts.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps({"prompt": f"say {i}", "answer": "7"}) + "\n" for i in range(32)))
    return {
        "stage": "grpo",
        "run": {"name": name, "output_dir": str(work / "runs"), "seed": seed, "report_to": []},
        "model": {"path": str(tiny_model(work / "tiny-qwen2")), "tokenizer": str(TOKENIZER)},
        "data": {"sources": [{"path": str(data)}], "reward_columns": []},
        "train": {"max_steps": steps, "batch_size": 16, "micro_batch_size": 8, "lr": 1e-2, "scheduler": "constant",
                  "max_grad_norm": 1.0},
        "grpo": {"group_size": 8, "max_completion_length": 8, "max_prompt_length": 32, "log_samples": 0,
                 "mini_batches": MINI_BATCHES, **grpo},
        "rollout": {"engine": "native"},
        "rewards": [{"name": f"{Path(__file__).resolve()}:toy_digits"}],
    }


def run_one(work: Path, name: str, seed: int, steps: int, grpo: dict) -> dict:
    import yaml

    from r1pipe.runner import load_recipe, run_stage

    run_name = f"{name.split(' ')[0]}-seed{seed}"
    path = work / f"{run_name}.yaml"
    path.write_text(yaml.safe_dump(recipe(work, run_name, seed, steps, grpo)))
    start = time.perf_counter()
    run_stage(load_recipe(path), overwrite=True)
    seconds = time.perf_counter() - start
    lines = [json.loads(line) for line in (work / "runs" / run_name / "metrics.jsonl").read_text().splitlines()]
    batches = [(m["step"], m["reward/mean"]) for m in lines if "reward/mean" in m]
    clipped = statistics.mean(m["clip_fraction"] for m in lines if "clip_fraction" in m)
    return {"batches": batches, "seconds": seconds, "clipped": clipped}


def updates_to_reach(batches: list[tuple[int, float]], threshold: float) -> int | None:
    """Optimizer updates made before the first rollout batch whose mean reward reached `threshold`."""
    return next((step - 1 for step, reward in batches if reward >= threshold), None)


def summarise(results: dict[str, list[dict]]) -> str:
    def fmt_steps(values):
        shown = [str(v) if v is not None else "-" for v in values]
        return " / ".join(shown)

    rows = ["| objective | first batch | last 3 batches | best batch | updates to reach 0.5 | updates to reach 0.75 "
            "| clipped |", "|---|---|---|---|---|---|---|"]
    for name, runs in results.items():
        first = statistics.mean(r["batches"][0][1] for r in runs)
        last = statistics.mean(statistics.mean(b for _, b in r["batches"][-3:]) for r in runs)
        best = statistics.mean(max(b for _, b in r["batches"]) for r in runs)
        half = fmt_steps(updates_to_reach(r["batches"], 0.5) for r in runs)
        three = fmt_steps(updates_to_reach(r["batches"], 0.75) for r in runs)
        clipped = statistics.mean(r["clipped"] for r in runs)
        rows.append(f"| {name} | {first:.3f} | {last:.3f} | {best:.3f} | {half} | {three} | {clipped:.3f} |")
    return "\n".join(rows)


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help=f"optimizer steps per run ({MINI_BATCHES} per rollout batch)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="run.seed values (sampling, data order)")
    parser.add_argument("--only", nargs="+", choices=sorted(KEYS), help="objectives to run (first word of the name)")
    parser.add_argument("--work", type=Path, default=None, help="work directory (default: a temporary one)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(min(2, torch.get_num_threads()))
    names = [KEYS[k] for k in args.only] if args.only else list(OBJECTIVES)
    work = args.work or Path(tempfile.mkdtemp(prefix="grpo-objectives-"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict]] = {}
    start = time.perf_counter()
    for name in names:
        results[name] = []
        for seed in args.seeds:
            results[name].append(run_one(work, name, seed, args.steps, OBJECTIVES[name]))
            rewards = " ".join(f"{r:.2f}" for _, r in results[name][-1]["batches"])
            print(f"{name} seed {seed}: rollout rewards {rewards} ({results[name][-1]['seconds']:.0f} s)",
                  file=sys.stderr)
    print(f"\ncommand: python bench/grpo_objectives.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"CPU: {cpu_model()}, torch threads {torch.get_num_threads()}; wall {time.perf_counter() - start:.0f} s; "
          f"seeds {args.seeds}; {args.steps} optimizer steps = {args.steps // MINI_BATCHES} rollout batches of 16 "
          "completions; rewards: means over the seeds; updates: per seed")
    print(summarise(results))


if __name__ == "__main__":
    main()
