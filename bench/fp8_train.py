"""Train a tiny DeepSeek-V3 twice on GSM8K text, bf16 and with FP8 linears, and compare the losses.

    python bench/fp8_train.py --data ../shared/data/gsm8k_train.jsonl [--steps 300] [--json out.json]

Same seed, data order and init for both runs; the FP8 run swaps every eligible nn.Linear for
FP8Linear (`convert_to_fp8_linear`: attention projections, dense and shared-expert MLPs; the
embedding, output head, MoE gate and MTP eh_proj stay bf16, the routed experts' grouped GEMMs stay
bf16 in the model). Tokens are UTF-8 bytes (the tiny-v3 vocabulary has 512 ids).
"""
import argparse
import json
import time

import torch

from r1pipe.kernels import convert_to_fp8_linear
from r1pipe.model import DeepseekConfig, DeepseekForCausalLM


def load_batches(path: str, steps: int, batch: int, seq: int, seed: int) -> torch.Tensor:
    with open(path) as f:
        text = "\n\n".join(json.loads(line)["question"] + "\n" + json.loads(line)["answer"] for line in f)
    data = torch.tensor(list(text.encode()), dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, data.numel() - seq, (steps, batch), generator=gen)
    return data[starts[..., None] + torch.arange(seq)]  # [steps, batch, seq]


def train(config: DeepseekConfig, batches: torch.Tensor, fp8: bool, lr: float, seed: int) -> dict:
    torch.manual_seed(seed)
    model = DeepseekForCausalLM(config).to(device="cuda", dtype=torch.bfloat16)
    converted = convert_to_fp8_linear(model) if fp8 else []
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
    losses, step_seconds = [], []
    torch.cuda.synchronize()
    for tokens in batches:
        begin = time.perf_counter()
        tokens = tokens.cuda(non_blocking=True)
        out = model(tokens, labels=tokens)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        model.update_expert_bias()
        losses.append(out.aux["lm_loss"])
        torch.cuda.synchronize()
        step_seconds.append(time.perf_counter() - begin)
    return {"lm_loss": losses, "step_seconds": step_seconds, "fp8_linears": len(converted)}


WARMUP_STEPS = 10  # the first steps compile and autotune kernels and time the GEMM backends of each new shape


def timing(step_seconds: list[float]) -> str:
    steady = sorted(step_seconds[WARMUP_STEPS:]) or [float("nan")]
    return (f"first {WARMUP_STEPS} steps {sum(step_seconds[:WARMUP_STEPS]):.1f} s, "
            f"then {1e3 * steady[len(steady) // 2]:.1f} ms per step (median)")


def window_mean(values: list[float], end: int, width: int = 20) -> float:
    window = values[max(0, end - width):end]
    return sum(window) / len(window)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="gsm8k_train.jsonl")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write both loss curves here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/fp8_train.py needs a CUDA GPU")
    config = DeepseekConfig.preset("tiny-v3").replace(
        hidden_size=args.hidden, intermediate_size=4 * args.hidden, moe_intermediate_size=args.hidden // 2,
        q_lora_rank=args.hidden // 2, num_hidden_layers=4)
    batches = load_batches(args.data, args.steps, args.batch, args.seq, args.seed)
    runs = {name: train(config, batches, fp8, args.lr, args.seed) for name, fp8 in (("bf16", False), ("fp8", True))}
    print(f"tiny V3: hidden {config.hidden_size}, {config.num_hidden_layers} layers + MTP, "
          f"{config.n_routed_experts} experts; {args.steps} steps x {args.batch} x {args.seq} tokens; "
          f"{runs['fp8']['fp8_linears']} FP8 linears")
    print("\n| step | bf16 lm loss | fp8 lm loss | relative gap |\n|---|---|---|---|")
    gaps = []
    for step in list(range(25, args.steps + 1, 25)) or [args.steps]:
        bf16, fp8 = (window_mean(runs[n]["lm_loss"], step) for n in ("bf16", "fp8"))
        gaps.append((fp8 - bf16) / bf16)
        print(f"| {step} | {bf16:.4f} | {fp8:.4f} | {gaps[-1]:+.2%} |")
    print(f"\nmax |relative gap| (20-step means, from step 25): {max(abs(g) for g in gaps):.2%}")
    for name, run in runs.items():
        print(f"time {name}: {timing(run['step_seconds'])}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": config.to_hf_dict(), "args": vars(args), "runs": runs}, f)


if __name__ == "__main__":
    main()
