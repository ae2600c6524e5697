"""The Hugging Face adapter: our names -> checkpoint names -> ours (experts, MTP copies, tied head), the
shard plan, and PEFT names."""
import torch

from r1pipe.model import DeepseekConfig, DeepseekForCausalLM
from r1pipe.model.hf_adapter import DeepseekStateDictAdapter, merged_peft_name, plan_shards
from test_model_helpers import single_thread  # noqa: F401  (autouse fixture)


def test_state_dict_round_trips_through_hf_names_with_mtp():
    config = DeepseekConfig.preset("tiny-v3")  # 2 layers (layer 1 MoE with 8 experts) + 1 MTP module
    torch.manual_seed(0)
    ours = DeepseekForCausalLM(config).state_dict()
    adapter = DeepseekStateDictAdapter(config)
    hf = dict(adapter.to_hf(ours))
    assert adapter.mtp_prefixes == ("model.layers.2.",)
    assert set(adapter.mtp_copies) == {"model.layers.2.embed_tokens.weight", "model.layers.2.shared_head.head.weight"}
    assert torch.equal(hf["model.layers.2.shared_head.head.weight"], ours["lm_head.weight"])
    assert "model.layers.2.eh_proj.weight" in hf and "model.layers.1.mlp.experts.7.up_proj.weight" in hf
    assert not any(".gate_up_proj" in name for name in hf)
    used = set()
    for name, tensor in ours.items():
        parts = adapter.hf_parts(name, tuple(tensor.shape))
        assert all(tuple(hf[part].shape) == shape for part, shape in parts.items()), name
        assert torch.equal(adapter.merge(name, [hf[part] for part in parts]), tensor), name
        used |= set(parts)
    assert set(hf) - used == set(adapter.mtp_copies)
    assert adapter.unused([*hf, "model.layers.0.mlp.down_proj.weight_scale_inv"], used) == []


def test_tied_head_is_not_stored():
    config = DeepseekConfig.preset("tiny-v3").replace(tie_word_embeddings=True, num_nextn_predict_layers=0)
    adapter = DeepseekStateDictAdapter(config)
    hf = dict(adapter.to_hf(DeepseekForCausalLM(config).state_dict()))
    assert "lm_head.weight" not in hf and not adapter.is_stored("lm_head.weight") and adapter.mtp_prefixes == ()


def test_shard_plan_keeps_order_and_gives_an_oversized_unit_its_own_file():
    plan = plan_shards({"a": 4, "b": 12, "c": 4, "d": 5}, 10)
    assert plan.filename_to_tensors == {"model-00001-of-00003.safetensors": ["b"],
                                        "model-00002-of-00003.safetensors": ["a", "c"],
                                        "model-00003-of-00003.safetensors": ["d"]}
    assert plan.metadata == {"total_size": 25}
    assert plan_shards({"a": 4, "b": 5}, "1KB").filename_to_tensors == {"model.safetensors": ["a", "b"]}


def test_peft_names_map_to_the_base_model():
    assert merged_peft_name("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight") == \
        "model.layers.0.self_attn.q_proj.weight"
    assert merged_peft_name("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight") is None
    assert merged_peft_name("base_model.model.lm_head.modules_to_save.default.weight") is None
