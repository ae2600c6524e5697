"""FP8 checkpoints in the released DeepSeek-V3 format (float8_e4m3fn + weight_scale_inv, 128x128 blocks)."""
import json

import torch
from safetensors.torch import load_file, save_file

from r1pipe.kernels.export import quantize_state_dict_fp8
from r1pipe.kernels.fp8 import weight_dequant
from r1pipe.model import DeepseekConfig, DeepseekForCausalLM
from test_model_helpers import single_thread, tiny_v3_scaled  # noqa: F401  (single_thread: autouse fixture)


def test_fp8_checkpoint_loads_and_matches_bf16(tmp_path):
    model = tiny_v3_scaled()
    model.save_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    tensors = load_file(tmp_path / "bf16" / "model.safetensors")
    quantized, quant_config = quantize_state_dict_fp8(tensors)
    fp8_dir = tmp_path / "fp8"
    fp8_dir.mkdir()
    save_file(quantized, fp8_dir / "model.safetensors")
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    (fp8_dir / "config.json").write_text(json.dumps({**config, "quantization_config": quant_config}))
    name = "model.layers.1.mlp.experts.5.up_proj.weight"
    assert quantized[name].dtype == torch.float8_e4m3fn and quantized[name + "_scale_inv"].shape == (1, 2)
    assert quantized["model.layers.0.self_attn.kv_b_proj.weight_scale_inv"].shape == (8, 4)

    reference = DeepseekForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32).eval()
    loaded = DeepseekForCausalLM.from_pretrained(fp8_dir, dtype=torch.float32).eval()
    assert loaded.config.quantization_config["weight_block_size"] == [128, 128]
    # every weight is exactly the block dequantization of its FP8 tensor, experts included, and within
    # e4m3 precision (3 mantissa bits: ~2.7% RMS) of the bf16 weight
    ours = dict(loaded.hf_named_tensors())
    for key, value in quantized.items():
        if value.dtype == torch.float8_e4m3fn:
            dequantized = weight_dequant(value, quantized[key + "_scale_inv"], dtype=torch.float32)
            assert torch.equal(ours[key], dequantized), key
            original = tensors[key].float()
            assert (dequantized - original).norm() / original.norm() < 0.035, key
    ids = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        a, b = reference(ids).logits, loaded(ids).logits
    # end to end the ~3% weight noise of every layer adds up (and flips a few expert choices)
    assert ((a - b).norm() / a.norm()).item() < 0.3
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.7
    # saving a loaded FP8 model writes plain weights and drops quantization_config
    loaded.save_pretrained(tmp_path / "resaved")
    assert "quantization_config" not in json.loads((tmp_path / "resaved" / "config.json").read_text())


def test_fp8_compute_path_on_cpu(tmp_path):
    torch.manual_seed(0)
    model = DeepseekForCausalLM(DeepseekConfig.preset("nano-v3"))
    model.save_pretrained(tmp_path)
    fp8 = DeepseekForCausalLM.from_pretrained(tmp_path, keep_fp8=True).eval()
    assert type(fp8.model.layers[0].self_attn.kv_b_proj).__name__ == "FP8Linear"
    assert type(fp8.lm_head).__name__ == "Linear"
    ids = torch.randint(0, 512, (1, 12))
    with torch.no_grad():
        a, b = model.eval()(ids).logits, fp8(ids).logits
    assert ((a - b).norm() / a.norm()).item() < 0.1
