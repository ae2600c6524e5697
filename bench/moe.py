"""MoE layer forward+backward throughput: r1pipe's DeepSeekMoE vs transformers' DeepseekV3MoE.

V2-Lite-shaped layer (hidden 2048, 64 routed experts, top-6, expert width 1408, 2 shared experts),
8192 tokens, bf16, on one GPU. transformers is timed with its `eager` (loop over experts) and
`grouped_mm` experts paths; ours with its default path (torch._grouped_mm over expert-sorted tokens)
and under torch.compile. Same weights in all; outputs are checked against each other first.

    python bench/moe.py [--tokens 8192] [--iters 20]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
try:
    import r1pipe.model  # noqa: F401
except ImportError:  # not pip-installed (e.g. on the GPU machine): map r1pipe.model/kernels to the repo folders
    sys.path.insert(0, str(ROOT))
    import r1pipe

    r1pipe.__path__.append(str(ROOT))

from r1pipe.model import DeepseekConfig  # noqa: E402
from r1pipe.model.moe import MoE  # noqa: E402


def layer_config() -> DeepseekConfig:
    """V2-Lite's MoE shape with the V3 gate (sigmoid + bias), the gate transformers' DeepseekV3 has."""
    return DeepseekConfig.preset("deepseek-v2-lite-16b").replace(
        model_type="deepseek_v3", topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True,
        n_group=1, topk_group=1, num_hidden_layers=2, num_nextn_predict_layers=0)


def hf_moe(config: DeepseekConfig, implementation: str):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    hf_config = DeepseekV3Config(**{k: v for k, v in config.to_hf_dict().items()
                                    if k in ("hidden_size", "moe_intermediate_size", "n_routed_experts",
                                             "n_shared_experts", "num_experts_per_tok", "n_group", "topk_group",
                                             "routed_scaling_factor", "norm_topk_prob")})
    hf_config._experts_implementation = implementation
    return DeepseekV3MoE(hf_config)


def copy_weights(ours: MoE, hf) -> None:
    with torch.no_grad():
        hf.gate.weight.copy_(ours.gate.weight)
        hf.gate.e_score_correction_bias.copy_(ours.gate.e_score_correction_bias)
        hf.experts.gate_up_proj.copy_(ours.experts.gate_up_proj)
        hf.experts.down_proj.copy_(ours.experts.down_proj)
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(hf.shared_experts, name).weight.copy_(getattr(ours.shared_experts, name).weight)


def time_fwd_bwd(fn, x: torch.Tensor, grad: torch.Tensor, iters: int) -> float:
    """Median seconds of forward + backward (CUDA events)."""
    for _ in range(3):
        fn(x).backward(grad)
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(x).backward(grad)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/moe.py needs a CUDA GPU")
    device, dtype = "cuda", torch.bfloat16
    torch.manual_seed(0)
    config = layer_config()
    ours = MoE(config).to(device, dtype)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.02)
        ours.gate.e_score_correction_bias.normal_(0, 0.01)
    x = torch.randn(1, args.tokens, config.hidden_size, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(x)

    variants = {}
    for implementation in ("eager", "grouped_mm"):
        hf = hf_moe(config, implementation).to(device, dtype)
        copy_weights(ours, hf)
        variants[f"transformers {implementation}"] = hf
    variants["r1pipe"] = lambda t: ours(t)[0]
    if not args.no_compile:
        compiled = torch.compile(ours)
        variants["r1pipe + torch.compile"] = lambda t: compiled(t)[0]

    with torch.no_grad():
        reference = variants["transformers eager"](x).float()
        for name, fn in variants.items():
            err = ((fn(x).float() - reference).norm() / reference.norm()).item()
            print(f"check {name:28s} rel err vs transformers eager {err:.2e}")
            assert err < 2e-2, name

    rows = []
    for name, fn in variants.items():
        t0 = time.perf_counter()
        seconds = time_fwd_bwd(fn, x, grad, args.iters)
        rows.append((name, seconds, time.perf_counter() - t0))
    best_hf = max(args.tokens / s for n, s, _ in rows if n.startswith("transformers"))
    print(f"\nMoE fwd+bwd, {torch.cuda.get_device_name()}, torch {torch.__version__}, {args.tokens} tokens, bf16, "
          f"hidden {config.hidden_size}, {config.n_routed_experts} experts top-{config.num_experts_per_tok}, "
          f"width {config.moe_intermediate_size}, {config.n_shared_experts} shared")
    print("| variant | ms | tokens/s | vs best transformers |\n|---|---|---|---|")
    for name, seconds, _ in rows:
        print(f"| {name} | {seconds * 1e3:.2f} | {args.tokens / seconds:,.0f} | {args.tokens / seconds / best_hf:.2f}x |")


if __name__ == "__main__":
    main()
