"""Checkpoint parity with transformers' DeepseekV3/V2: HF-saved tiny checkpoints load into ours with the
same logits and loss, and ours load back into transformers unchanged."""
import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, \
    DeepseekV3ForCausalLM

from r1pipe.model import DeepseekConfig, DeepseekForCausalLM
from test_model_helpers import single_thread  # noqa: F401  (autouse fixture)

SHAPES = dict(vocab_size=96, hidden_size=48, intermediate_size=80, moe_intermediate_size=24, num_hidden_layers=3,
              num_attention_heads=4, first_k_dense_replace=1, kv_lora_rank=32, qk_rope_head_dim=16, v_head_dim=24,
              qk_nope_head_dim=16, max_position_embeddings=256)
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
        "mscale": 0.707, "mscale_all_dim": 0.707, "rope_theta": 10000.0}


def randomize(model, seed=0):
    """Weights big enough that routing, norms and RoPE all matter for the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.2 * torch.randn(b.shape, generator=g))
    return model


def hf_v3(tmp_path):
    config = DeepseekV3Config(**SHAPES, q_lora_rank=40, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3,
                              n_group=4, topk_group=2, routed_scaling_factor=2.5,
                              rope_parameters={**YARN, "mscale": 1.0, "mscale_all_dim": 1.0})
    model = randomize(DeepseekV3ForCausalLM(config)).eval()
    model.save_pretrained(tmp_path / "hf")
    return model


def hf_v2(tmp_path, topk_method="greedy"):
    """V2-Lite shape: softmax gate, no q_lora, 2 shared experts, norm_topk_prob false."""
    groups = dict(n_group=4, topk_group=2) if topk_method == "group_limited_greedy" else {}
    config = DeepseekV2Config(**SHAPES, q_lora_rank=None, n_routed_experts=8, n_shared_experts=2,
                              num_experts_per_tok=3, topk_method=topk_method, norm_topk_prob=False,
                              routed_scaling_factor=1.0, rope_parameters=YARN, **groups)
    model = randomize(DeepseekV2ForCausalLM(config)).eval()
    model.save_pretrained(tmp_path / "hf")
    return model


def compare(hf_model, ours, atol=1e-4):
    torch.manual_seed(1)
    ids = torch.randint(0, SHAPES["vocab_size"], (3, 40))
    with torch.no_grad():
        a = hf_model(ids, labels=ids)
        b = ours(ids, labels=ids)
    assert a.logits.abs().max() > 1.0  # a meaningful comparison
    assert (a.logits - b.logits).abs().max().item() <= atol
    assert abs(a.loss.item() - b.aux["lm_loss"]) <= 1e-5


@pytest.mark.parametrize("make", [hf_v3, hf_v2, lambda p: hf_v2(p, "group_limited_greedy")],
                         ids=["v3", "v2-lite", "v2-grouped"])
def test_hf_checkpoint_loads_with_same_logits(tmp_path, make):
    hf_model = make(tmp_path)
    with pytest.warns(UserWarning, match="MTP") if hf_model.config.model_type == "deepseek_v3" else nullcontext():
        ours = DeepseekForCausalLM.from_pretrained(tmp_path / "hf").eval()
    compare(hf_model, ours)


def test_our_checkpoint_loads_in_transformers(tmp_path):
    hf_model = hf_v3(tmp_path)
    with pytest.warns(UserWarning, match="MTP"):
        ours = DeepseekForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ours.save_pretrained(tmp_path / "ours", max_shard_size=40_000)
    index = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    ids = torch.randint(0, SHAPES["vocab_size"], (2, 33))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, hf_model(ids).logits)
    saved = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert saved["topk_method"] == "noaux_tc" and saved["scoring_func"] == "sigmoid"  # what vLLM needs


def test_mtp_saved_at_layer_num_hidden_layers(tmp_path):
    config = DeepseekConfig.preset("nano-v3")
    torch.manual_seed(0)
    model = DeepseekForCausalLM(config)
    model.save_pretrained(tmp_path / "m")
    with safe_open(tmp_path / "m" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        mtp = f"model.layers.{config.num_hidden_layers}"
        for suffix in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                       "shared_head.head.weight", "embed_tokens.weight", "self_attn.kv_b_proj.weight",
                       "mlp.experts.0.gate_proj.weight", "mlp.gate.e_score_correction_bias", "input_layernorm.weight"):
            assert f"{mtp}.{suffix}" in keys
        assert f.get_tensor(f"{mtp}.mlp.gate.e_score_correction_bias").dtype == torch.float32
    back = DeepseekForCausalLM.from_pretrained(tmp_path / "m")
    ids = torch.randint(0, config.vocab_size, (2, 10))
    model.eval(), back.eval()
    with torch.no_grad():
        assert torch.equal(model(ids, labels=ids).loss, back(ids, labels=ids).loss)


class nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_long_context_yarn_matches_transformers(tmp_path):
    """The released V3 RoPE (YaRN factor 40 over 4096, full 64-dim rope) out to 3000 positions."""
    config = DeepseekV3Config(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                              num_hidden_layers=2, num_attention_heads=2, n_routed_experts=4, num_experts_per_tok=2,
                              n_group=1, topk_group=1, first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16,
                              qk_rope_head_dim=64, qk_nope_head_dim=8, v_head_dim=8, max_position_embeddings=163840,
                              rope_parameters={"rope_type": "yarn", "factor": 40.0, "beta_fast": 32, "beta_slow": 1,
                                               "original_max_position_embeddings": 4096, "mscale": 1.0,
                                               "mscale_all_dim": 1.0, "rope_theta": 10000.0})
    hf_model = randomize(DeepseekV3ForCausalLM(config)).eval()
    hf_model.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="MTP"):
        ours = DeepseekForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 64, (1, 3000))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf_model(ids).logits, atol=1e-4, rtol=1e-4)
