"""One tiny recipe, one GPU versus two GPUs under DeepSpeed ZeRO-2: the loss curves must match.

    python bench/train_zero2.py single OUT                               # 1 GPU, no DeepSpeed
    torchrun --nproc_per_node 2 bench/train_zero2.py zero2 OUT           # 2 GPUs, ZeRO-2
    python bench/train_zero2.py compare OUT                              # table + max difference

Both runs use recipes/tiny/pretrain.yaml (nano-v3, demo corpus) with the same global batch, so each
step sees the same rows; extra `key=value` arguments override the recipe for both. Run from the
repository root. A launcher-started script keeps the repository root off sys.path, so the folders
model/, kernels/ and rewards/ are only importable as r1pipe.model, r1pipe.kernels, r1pipe.rewards.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

RECIPE = "recipes/tiny/pretrain.yaml"
KEYS = ("loss", "lm_loss", "mtp_loss", "balance_loss", "grad_norm", "eval_loss")


def train(mode: str, out: Path, overrides: list[str]) -> None:
    import torch

    from r1pipe.runner import load_recipe
    from r1pipe.rundir import RunDir, seed_everything
    from r1pipe.stages.pretrain import run

    extra = [f"run.name={mode}", f"run.output_dir={out}", "run.report_to=[]", "train.device=cuda"]
    if mode == "zero2":
        extra.append("train.deepspeed.zero_stage=2")
    cfg = load_recipe(RECIPE, [*extra, *overrides])
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:  # rank 0 creates the run directory; the others reopen it (same config = same run)
        run_dir = RunDir.open(cfg, overwrite=True)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        torch.distributed.init_process_group("nccl")
        torch.distributed.barrier()
    if rank != 0:
        run_dir = RunDir.open(cfg)
    seed_everything(cfg.run.seed)
    outputs = run(cfg, run_dir)
    if rank == 0:
        run_dir.write_outputs(outputs)
        if torch.cuda.is_available():
            peak = torch.cuda.max_memory_allocated() / 2**20
            (out / f"{mode}_peak_mib.txt").write_text(f"{peak:.1f}\n")
    run_dir.close()


def compare(out: Path) -> int:
    def curve(mode):
        records = [json.loads(line) for line in (out / mode / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r for r in records if r["step"] > 0}

    single, zero2 = curve("single"), curve("zero2")
    print(f"| step | {' | '.join(f'{k} 1 GPU | {k} ZeRO-2 x2' for k in ('loss', 'grad_norm'))} |")
    print("|---|---|---|---|---|")
    worst = {k: 0.0 for k in KEYS}
    for step in sorted(single):
        a, b = single[step], zero2.get(step, {})
        for key in KEYS:
            if key in a and key in b:
                worst[key] = max(worst[key], abs(a[key] - b[key]) / max(abs(a[key]), 1e-8))
        if step % 10 == 0 or step == 1:
            print(f"| {step} | {a['loss']:.5f} | {b.get('loss', float('nan')):.5f} | "
                  f"{a['grad_norm']:.4f} | {b.get('grad_norm', float('nan')):.4f} |")
    print("max relative difference:", json.dumps({k: float(f"{v:.2e}") for k, v in worst.items()}))
    for mode in ("single", "zero2"):
        peak = out / f"{mode}_peak_mib.txt"
        if peak.exists():
            print(f"peak GPU memory ({mode}, rank 0): {peak.read_text().strip()} MiB")
    (out / "comparison.json").write_text(json.dumps({"max_relative_difference": worst}, indent=2))
    return 0 if set(single) == set(zero2) else 1


if __name__ == "__main__":
    mode, out, *rest = sys.argv[1:]
    if mode == "compare":
        sys.exit(compare(Path(out)))
    train(mode, Path(out), rest)
