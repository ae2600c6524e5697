"""Routing replay (R3) on a V3-family policy: how much rollout/trainer routing and log-probs disagree, with
and without replaying the rollout's experts in the trainer's forward.

The rollout engine samples in bf16 (r1pipe's native engine, KV cache, recording each token's experts);
the trainer scores the same tokens in fp32, once routing live and once replaying the rollout's experts.
Prints, per MoE layer and overall, the share of tokens whose expert set differs, and the per-token
log-prob mismatch |log pi_trainer - log pi_rollout| and importance weights pi_trainer / pi_rollout of the
completion tokens, both ways, in one table.

    python bench/routing_replay.py                         # CPU: tiny V3, 6 MoE layers
    python bench/routing_replay.py --device cuda --layers 12 --prompts 64 --tokens 256
    python bench/routing_replay.py --grpo 6                # also GRPO runs with and without R3

With --grpo N the same policy is trained N GRPO steps (r1pipe's grpo stage, mu 2) twice, with
`grpo.routing_replay` none and rollout, its native engine sampling under bf16 autocast while the
trainer computes in fp32, and the table gives each run's importance weights pi_trainer / pi_rollout.
"""
from __future__ import annotations

import argparse
import copy
import platform
import time

import torch

from r1pipe.model import DeepseekConfig, DeepseekForCausalLM
from r1pipe.model.generate import generate, token_logprob


def trained_policy(layers: int, steps: int, device: str) -> DeepseekForCausalLM:
    """tiny-v3 widened to `layers` decoder layers (the first dense, the rest MoE), trained briefly on
    arithmetic sequences so that its router has preferences (a random router's ties are not realistic)."""
    torch.manual_seed(0)
    config = DeepseekConfig.preset("tiny-v3").replace(num_hidden_layers=layers, first_k_dense_replace=1)
    model = DeepseekForCausalLM(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        start = torch.randint(0, 60, (16, 1), generator=generator)
        stride = torch.randint(1, 5, (16, 1), generator=generator)
        ids = (10 + (start + stride * torch.arange(48)) % 60).to(device)
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.update_expert_bias()
    return model.eval()


def trainer_scores(model, sequences, prompt_lengths, routes=None):
    """fp32 teacher-forced log-probs of each completion token, and the experts chosen per token."""
    logps, chosen = [], []
    with torch.no_grad():
        for k, (sequence, start) in enumerate(zip(sequences, prompt_lengths, strict=True)):
            ids = torch.tensor([sequence], device=next(model.parameters()).device)
            replay = routes[k][None].to(ids.device).long() if routes is not None else None
            out = model(ids, routes=replay, return_routes=True)
            logps.append(token_logprob(out.logits[0, start - 1:-1], ids[0, start:], 1.0).cpu())
            chosen.append(out.routes[0].cpu())
    return logps, chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", type=int, default=7, help="decoder layers (all but the first are MoE)")
    parser.add_argument("--train-steps", type=int, default=60)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--grpo", type=int, default=0, metavar="STEPS", help="also GRPO runs with and without R3")
    args = parser.parse_args()
    start = time.perf_counter()
    trainer = trained_policy(args.layers, args.train_steps, args.device)
    rollout = copy.deepcopy(trainer).to(torch.bfloat16)  # the engine's copy: bf16 weights and activations
    generator = torch.Generator().manual_seed(1)
    prompts = [(10 + torch.randint(0, 60, (1,), generator=generator) + torch.arange(8) * 3 % 60).tolist()
               for _ in range(args.prompts)]
    result = generate(rollout, prompts, args.tokens, temperature=1.0, seed=0, record_routes=True)
    sequences = [p + t for p, t in zip(prompts, result.token_ids, strict=True)]
    lengths = [len(p) for p in prompts]
    rollout_logp = [torch.tensor(lp) for lp in result.logprobs]
    live_logp, live_routes = trainer_scores(trainer, sequences, lengths)
    replay_logp, replay_routes = trainer_scores(trainer, sequences, lengths, result.routes)

    def differ(chosen):
        """Share of (token, layer) whose expert set differs from the rollout's, per layer [L] and overall."""
        rows = []
        for mine, theirs in zip(chosen, result.routes, strict=True):
            recorded = (theirs[:, 0, 0] >= 0)
            a, b = mine[recorded].sort(-1).values, theirs[recorded].long().sort(-1).values
            rows.append((a != b).any(-1).float())
        per_layer = torch.cat(rows).mean(0)
        tokens = torch.cat(rows).any(-1).float().mean()
        return per_layer, tokens

    print(f"tiny V3 x{args.layers} layers ({len(trainer.routed_layers())} MoE, "
          f"{trainer.config.n_routed_experts} experts, top-{trainer.config.num_experts_per_tok}), "
          f"{args.prompts} prompts x {args.tokens} tokens, rollout bf16 vs trainer fp32 on {args.device} "
          f"({platform.processor() or platform.machine()})")
    print("| trainer routing | expert set differs (token x layer) | token differs in any layer | "
          "mean abs dlogp | max abs dlogp | IS weight min / max | IS weights outside [0.5, 2] |")
    print("|---|---|---|---|---|---|---|")
    for name, logp, chosen in (("live (no replay)", live_logp, live_routes),
                               ("R3 replay", replay_logp, replay_routes)):
        per_layer, tokens = differ(chosen)
        delta = torch.cat([a - b for a, b in zip(logp, rollout_logp, strict=True)])
        weights = delta.exp()
        outside = ((weights < 0.5) | (weights > 2)).float().mean()
        print(f"| {name} | {per_layer.mean():.2%} (per layer {', '.join(f'{v:.1%}' for v in per_layer)}) | "
              f"{tokens:.2%} | {delta.abs().mean():.4f} | {delta.abs().max():.3f} | "
              f"{weights.min():.3f} / {weights.max():.3f} | {outside:.2%} |")
    if args.grpo:
        grpo_runs(trainer, args.grpo, args.device)
    print(f"({time.perf_counter() - start:.0f} s)")


def grpo_runs(policy: DeepseekForCausalLM, steps: int, device: str) -> None:
    """GRPO with and without R3 on `policy`, bf16 rollouts against an fp32 trainer; prints IS weight ranges."""
    import json
    import tempfile
    from pathlib import Path

    import yaml

    import r1pipe.rollout
    from r1pipe.runner import load_recipe, run_stage
    from r1pipe.rewards import reward

    @reward("bench_even_tokens")
    def even_tokens(prompt, completion, *, completion_ids=None):
        """Share of even token ids: a reward with spread inside groups."""
        return sum(i % 2 == 0 for i in completion_ids) / max(len(completion_ids), 1)

    build = r1pipe.rollout.build_engine

    def bf16_engine(*args, **kwargs):  # the engine computes in bf16, as a vLLM engine would
        engine = build(*args, **kwargs)
        generate = engine.generate

        def in_bf16(*a, **k):
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
                return generate(*a, **k)

        engine.generate = in_bf16
        return engine

    r1pipe.rollout.build_engine = bf16_engine
    work = Path(tempfile.mkdtemp(prefix="r1pipe-r3-"))
    policy.save_pretrained(work / "policy")
    tokenizer = Path(__file__).resolve().parents[1] / "recipes" / "demo" / "tokenizer"
    (work / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"{i} {i + 3} {i + 6}"}) + "\n" for i in range(64)))
    print("\n| GRPO, routing_replay | step | IS weight min | IS weight max | max abs dlogp (old vs rollout) | mean abs dlogp |")
    print("|---|---|---|---|---|---|")
    for mode in ("none", "rollout"):
        recipe = {"stage": "grpo", "run": {"name": mode, "output_dir": str(work / "runs"), "seed": 0, "report_to": []},
                  "model": {"path": str(work / "policy"), "tokenizer": str(tokenizer)},
                  "data": {"sources": [{"path": str(work / "prompts.jsonl")}], "reward_columns": []},
                  "train": {"max_steps": steps, "batch_size": 32, "micro_batch_size": 16, "lr": 1e-4,
                            "scheduler": "constant", "device": device},
                  "grpo": {"group_size": 4, "mu": 2, "max_completion_length": 24, "max_prompt_length": 32,
                           "routing_replay": mode, "importance_correction": "token_truncate",
                           "importance_cap": 1e6, "log_samples": 0},  # a cap that never bites: the raw weights
                  "rollout": {"engine": "native"}, "rewards": [{"name": "bench_even_tokens"}]}
        (work / f"{mode}.yaml").write_text(yaml.safe_dump(recipe))
        run_stage(load_recipe(work / f"{mode}.yaml"))
        for line in (work / "runs" / mode / "metrics.jsonl").read_text().splitlines():
            m = json.loads(line)
            if "is_weight_min" in m:
                print(f"| {mode} | {m['step']} | {m['is_weight_min']:.3f} | {m['is_weight_max']:.3f} | "
                      f"{m['logprob_mismatch_max']:.3f} | {m['logprob_mismatch']:.4f} |")


if __name__ == "__main__":
    main()
