"""Native engine decode speed: r1pipe's fast path (static KV cache, CUDA graphs, device-side sampling,
compaction) vs transformers `generate` vs r1pipe's plain loop, at batch 128 on one GPU; and whether the fast
path's greedy output equals the plain path's on real prompts.

Same model, prompts (GSM8K train questions under SmolLM2's chat template) and sampling (temperature 1,
top-p 1, no stop token: every row decodes `--max-new` tokens) on every side; bf16 weights.

    python bench/native_decode.py --models smollm2 qwen0.5b v3-lite --batch 128 --max-new 256
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import KINDS, REPO, prepare_model  # noqa: E402


def prompts(tokenizer, data: Path, count: int) -> list[list[int]]:
    """The first `count` rows' questions (GSM8K `question`, the demo's `prompt`) under the chat template."""
    rows = [json.loads(line) for line in data.read_text().splitlines()[:count]]
    return [tokenizer.apply_chat_template([{"role": "user", "content": r.get("question", r.get("prompt"))}],
                                          add_generation_prompt=True, tokenize=True, return_dict=False) for r in rows]


def timed(fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - start


def hf_generate(model, batch: list[list[int]], max_new: int, pad: int):
    from transformers import GenerationConfig

    width = max(len(p) for p in batch)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device="cuda")
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device="cuda")
    config = GenerationConfig(max_new_tokens=max_new, min_new_tokens=max_new, do_sample=True, temperature=1.0,
                              top_p=1.0, top_k=0, pad_token_id=pad, eos_token_id=None)
    return model.generate(input_ids=ids, attention_mask=mask, generation_config=config)


def bench_model(kind: str, args) -> list[dict]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from r1pipe.model.fast_decode import DecodeWorkspace
    from r1pipe.model.generate import generate
    from r1pipe.model.policy import load_policy

    directory = prepare_model(kind, Path(args.models_dir))
    tokenizer = AutoTokenizer.from_pretrained(directory)
    data = REPO / "recipes/demo/data/rl.jsonl" if kind == "demo-v3" else Path(args.data)
    batch = prompts(tokenizer, data, args.batch)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    hf = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16).cuda().eval()
    with torch.no_grad():
        hf_generate(hf, batch[:8], 8, pad)  # warm-up
        seconds = timed(partial(hf_generate, hf, batch, args.max_new, pad))[1]
    rows = [{"model": kind, "side": "transformers generate", "tokens_per_s": len(batch) * args.max_new / seconds}]
    deepseek = kind in ("v3-lite", "demo-v3")
    ours = load_policy(directory, dtype=torch.bfloat16, device="cuda").model.eval() if deepseek else hf
    run = partial(generate, ours, batch, max_new_tokens=args.max_new, temperature=1.0, seed=0, pad_token_id=pad)
    generate(ours, batch[:8], max_new_tokens=8, pad_token_id=pad, static_cache=False)  # warm-up
    workspace = DecodeWorkspace()
    run(workspace=workspace)  # warm-up: allocates the static cache and captures the graphs a GRPO run reuses
    sides = [("r1pipe plain loop", {"static_cache": False}), ("r1pipe fast path", {"workspace": workspace})]
    if getattr(ours.config, "num_nextn_predict_layers", 0):
        sides.append(("r1pipe + MTP speculative decoding", {"use_mtp": True}))
    for side, extra in sides:
        result, seconds = timed(partial(run, **extra))
        rows.append({"model": kind, "side": side, "tokens_per_s": sum(len(t) for t in result.token_ids) / seconds})
        if result.acceptance_rate is not None:
            rows[-1]["side"] += f" (acceptance {result.acceptance_rate:.2f})"
    for row in rows:
        row["vs_transformers"] = row["tokens_per_s"] / rows[0]["tokens_per_s"]
    workspace.release()
    if not deepseek:
        load = lambda dtype: AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).cuda().eval()
        rows += greedy_agreement(kind, load, {}, "fast", batch[: args.greedy_prompts], tokenizer, args.greedy_new)
    elif getattr(ours.config, "num_nextn_predict_layers", 0):
        load = lambda dtype: load_policy(directory, dtype=dtype, device="cuda").model.eval()
        rows += greedy_agreement(kind, load, {"use_mtp": True}, "MTP speculative", batch[: args.greedy_prompts],
                                 tokenizer, args.greedy_new)
    return rows


def greedy_agreement(kind, load, variant: dict, label: str, batch, tokenizer, max_new) -> list[dict]:
    """Greedy output of `variant` (the fast path: {}; MTP speculation: {"use_mtp": True}) vs the plain loop,
    with the prompts' own stop token; fp32 (TF32 off) and bf16. `load(dtype)` gives the model."""
    from r1pipe.model.generate import generate

    rows = []
    torch.backends.cuda.matmul.allow_tf32 = False
    for dtype in (torch.float32, torch.bfloat16):
        model = load(dtype)
        kwargs = dict(max_new_tokens=max_new, temperature=0.0, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id or 0)
        tested = generate(model, batch, **variant, **kwargs).token_ids
        plain = generate(model, batch, static_cache=False, **kwargs).token_ids
        same = sum(a == b for a, b in zip(tested, plain, strict=True))
        rows.append({"model": kind, "side": f"greedy {label} == plain ({str(dtype)[6:]})", "identical": same,
                     "of": len(batch)})
        del model
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--max-new", type=int, default=256)
    parser.add_argument("--greedy-prompts", type=int, default=64)
    parser.add_argument("--greedy-new", type=int, default=128)
    parser.add_argument("--models-dir", default=str(REPO / "runs" / "bench-models"))
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "gsm8k_train.jsonl"))
    parser.add_argument("--out", help="also write the rows here as JSON lines")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/native_decode.py needs a CUDA GPU")
    rows = []
    for kind in args.models:
        rows += bench_model(kind, args)
        print("\n".join(json.dumps(r) for r in rows), flush=True)
        torch.cuda.empty_cache()
    print(f"\nNative decode, {torch.cuda.get_device_name()}, torch {torch.__version__}, batch {args.batch}, "
          f"{args.max_new} new tokens, bf16, {time.strftime('%Y-%m-%d')}")
    print("| model | side | tokens/s | vs transformers generate |")
    print("|---|---|---|---|")
    for row in rows:
        if "identical" in row:
            print(f"| {row['model']} | {row['side']} | {row['identical']}/{row['of']} sequences identical | |")
        else:
            print(f"| {row['model']} | {row['side']} | {row['tokens_per_s']:,.0f} | {row['vs_transformers']:.2f}x |")
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
