"""Config round trips, presets, parameter counts and clear errors for bad configs and checkpoints."""
import json

import pytest
import torch

from r1pipe.model import ConfigError, DeepseekConfig, DeepseekForCausalLM, parameter_counts
from r1pipe.model.config import preset_names
from r1pipe.model.hf_adapter import CheckpointError
from test_model_helpers import single_thread  # noqa: F401  (autouse fixture)

V3_RELEASED = {  # the config.json of deepseek-ai/DeepSeek-V3 (auto_map trimmed)
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3,
    "hidden_act": "silu", "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432,
    "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256,
    "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 128, "num_experts_per_tok": 8,
    "num_hidden_layers": 61, "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "pretraining_tp": 1,
    "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1", "use_cache": True, "v_head_dim": 128, "vocab_size": 129280,
}


def test_released_v3_config_round_trips():
    config = DeepseekConfig.from_hf_dict(V3_RELEASED)
    assert config.yarn["factor"] == 40 and config.quantization_config["weight_block_size"] == [128, 128]
    assert config.extra["ep_size"] == 1
    out = config.to_hf_dict()
    for key, value in V3_RELEASED.items():
        if key not in ("transformers_version", "torch_dtype", "rope_scaling"):
            assert out[key] == value, key
    assert out["rope_scaling"]["type"] == "yarn"
    # softmax scale: 192^-0.5 * mscale^2, mscale = 0.1 * 1.0 * ln(40) + 1
    assert abs(config.softmax_scale - 192 ** -0.5 * (0.1 * torch.log(torch.tensor(40.0)).item() + 1) ** 2) < 1e-9
    assert DeepseekConfig.from_hf_dict(out) == config


def test_presets_round_trip():
    assert {"deepseek-v3-671b", "deepseek-v2-236b", "deepseek-v2-lite-16b", "tiny-v3", "tiny-v2",
            "nano-v3"} <= set(preset_names())
    for name in preset_names():
        config = DeepseekConfig.preset(name)
        assert DeepseekConfig.from_hf_dict(config.to_hf_dict()) == config
    tiny = DeepseekConfig.preset("tiny-v3")  # vLLM's CPU MLA backend needs the real head dims
    assert (tiny.kv_lora_rank, tiny.qk_rope_head_dim, tiny.qk_nope_head_dim, tiny.v_head_dim) == (512, 64, 128, 128)


def test_parameter_counts_match_published_sizes():
    v3 = parameter_counts(DeepseekConfig.preset("deepseek-v3-671b"))
    assert abs(v3["total"] / 671e9 - 1) < 0.01
    assert abs(v3["activated"] / 37e9 - 1) < 0.03
    assert abs(v3["mtp"] / 11.5e9 - 1) < 0.02
    lite = parameter_counts(DeepseekConfig.preset("deepseek-v2-lite-16b"))
    assert abs(lite["total"] / 15.7e9 - 1) < 0.01
    v2 = parameter_counts(DeepseekConfig.preset("deepseek-v2-236b"))
    assert abs(v2["total"] / 236e9 - 1) < 0.01 and abs(v2["activated"] / 21e9 - 1) < 0.03


@pytest.mark.parametrize("change, key", [
    ({"model_type": "llama"}, "model_type"),
    ({"topk_method": "best"}, "topk_method"),
    ({"n_group": 3}, "n_group"),
    ({"num_experts_per_tok": 99}, "num_experts_per_tok"),
    ({"hidden_size": 64.5}, "hidden_size"),
])
def test_bad_config_names_the_key(change, key):
    d = {**DeepseekConfig.preset("nano-v3").to_hf_dict(), **change}
    with pytest.raises(ConfigError, match=f"'{key}'") as err:
        DeepseekConfig.from_hf_dict(d)
    assert "\n" not in str(err.value)


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    DeepseekForCausalLM(DeepseekConfig.preset("nano-v3")).save_pretrained(tmp_path)
    return tmp_path


def rewrite(path, drop=None, reshape=None):
    from safetensors.torch import load_file, save_file

    tensors = load_file(path / "model.safetensors")
    if drop:
        del tensors[drop]
    if reshape:
        tensors[reshape] = tensors[reshape][:-1]
    save_file(tensors, path / "model.safetensors")


def test_missing_tensor_is_named(saved):
    rewrite(saved, drop="model.layers.1.mlp.experts.3.up_proj.weight")
    with pytest.raises(CheckpointError, match=r"missing tensor model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight"):
        DeepseekForCausalLM.from_pretrained(saved)


def test_wrong_shape_is_named(saved):
    rewrite(saved, reshape="model.layers.0.self_attn.kv_b_proj.weight")
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.kv_b_proj\.weight has shape"):
        DeepseekForCausalLM.from_pretrained(saved)


def test_unknown_model_type_and_missing_files(saved, tmp_path):
    config = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**config, "model_type": "mixtral"}))
    with pytest.raises(ConfigError, match="unknown model_type 'mixtral'"):
        DeepseekForCausalLM.from_pretrained(saved)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        DeepseekForCausalLM.from_pretrained(tmp_path / "empty")
    (saved / "model.safetensors").unlink()
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        DeepseekForCausalLM.from_pretrained(saved)
