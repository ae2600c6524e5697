"""Decode throughput and KV-cache memory at long context: r1pipe's absorbed MLA latent cache vs
transformers' DeepseekV3 (which caches the latent too, but re-expands K/V for the whole context with
kv_b_proj at every step).

Model: DeepSeek-V3 attention and MoE at V2-Lite width (hidden 2048, 16 heads, q_lora 1536, kv_lora 512,
64 experts top-6), 4 layers, bf16; same weights in both (ours loads the checkpoint transformers saves).
For each context: prefill (not timed), then greedy decode steps timed with CUDA sync.

    python bench/decode.py [--contexts 8192 32768] [--batch 4] [--steps 32]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import v3_lite_config  # noqa: E402

from r1pipe.model import DeepseekForCausalLM  # noqa: E402
from r1pipe.model.layers import LatentCache  # noqa: E402


def hf_model(layers: int, max_positions: int):
    from transformers import DeepseekV3ForCausalLM

    config = v3_lite_config(layers, max_positions, rope_parameters={
        "rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32,
        "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0, "rope_theta": 10000.0})
    config._attn_implementation = "sdpa"
    config._experts_implementation = "grouped_mm"
    return DeepseekV3ForCausalLM(config)


def timed(fn, steps: int) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def bench_hf(model, prompt: torch.Tensor, steps: int) -> tuple[float, int, int]:
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    mask = torch.ones(prompt.shape[0], prompt.shape[1] + steps + 4, dtype=torch.long, device=prompt.device)
    with torch.no_grad():
        logits = model(prompt, past_key_values=cache, use_cache=True, attention_mask=mask[:, :prompt.shape[1]],
                       logits_to_keep=1).logits
        state = {"token": logits[:, -1].argmax(-1, keepdim=True), "length": prompt.shape[1]}

        def step():
            state["length"] += 1
            out = model(state["token"], past_key_values=cache, use_cache=True, attention_mask=mask[:, :state["length"]])
            state["token"] = out.logits[:, -1].argmax(-1, keepdim=True)

        step()  # warm-up
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        seconds = timed(step, steps)
    cache_bytes = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    return seconds, cache_bytes, torch.cuda.max_memory_allocated() - base


def bench_ours(model: DeepseekForCausalLM, prompt: torch.Tensor, steps: int) -> tuple[float, int, int]:
    batch, length = prompt.shape
    cache = LatentCache(model.config, batch, length + steps + 4, model.config.num_hidden_layers, torch.bfloat16,
                        prompt.device)
    with torch.no_grad():
        hidden = model(prompt, cache=cache, return_hidden=True).hidden_states
        state = {"token": model.lm_head(hidden[:, -1]).argmax(-1, keepdim=True)}

        def step():
            state["token"] = model(state["token"], cache=cache).logits[:, -1].argmax(-1, keepdim=True)

        step()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        seconds = timed(step, steps)
    used = cache.length
    cache_bytes = cache.bytes_per_token_per_layer() * used * batch * model.config.num_hidden_layers
    return seconds, cache_bytes, torch.cuda.max_memory_allocated() - base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/decode.py needs a CUDA GPU")
    torch.manual_seed(0)
    hf = hf_model(args.layers, max(args.contexts) + args.steps + 8)
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.02) if p.ndim > 1 else p.fill_(1.0)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = DeepseekForCausalLM.from_pretrained(tmp, dtype=torch.bfloat16, device="cuda").eval()
    hf = hf.to("cuda", torch.bfloat16).eval()
    rows = []
    for context in args.contexts:
        prompt = torch.randint(0, 102400, (args.batch, context), device="cuda")
        with torch.no_grad():  # same next-token logits from both on a short prefix
            a = hf(prompt[:, :256]).logits[:, -1].float()
            b = ours(prompt[:, :256]).logits[:, -1].float()
            print(f"check context {context}: rel err of last logits {((a - b).norm() / a.norm()).item():.2e}")
        for name, fn, model in (("transformers DeepseekV3 (sdpa, grouped_mm)", bench_hf, hf),
                                ("r1pipe absorbed latent cache", bench_ours, ours)):
            torch.cuda.empty_cache()
            seconds, cache_bytes, peak = fn(model, prompt, args.steps)
            rows.append((context, name, args.batch * args.steps / seconds, cache_bytes, peak))
    print(f"\nDecode, {torch.cuda.get_device_name()}, torch {torch.__version__}, batch {args.batch}, "
          f"{args.steps} steps, bf16, {args.layers} layers (hidden 2048, 16 heads, kv_lora 512 + rope 64)")
    print("| context | implementation | tokens/s | KV cache (MiB) | peak extra memory during decode (MiB) |")
    print("|---|---|---|---|---|")
    for context, name, tps, cache_bytes, peak in rows:
        print(f"| {context} | {name} | {tps:,.1f} | {cache_bytes / 2**20:,.0f} | {peak / 2**20:,.0f} |")


if __name__ == "__main__":
    main()
