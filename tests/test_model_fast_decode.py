"""The native engine's fast path (static cache, compaction, device-side sampling) against the plain
DynamicCache loop, on small random Llama / Qwen2 / Qwen3 models in fp32: greedy tokens identical,
log-probs equal within 1e-4 (what holds across CPUs: the two paths sum attention in different orders)."""
import pytest
import torch

from r1pipe.model import fast_decode
from r1pipe.model.generate import generate

transformers = pytest.importorskip("transformers")


def tiny(model_type: str):
    common = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)
    if model_type == "qwen3":
        common["head_dim"] = 16
    config = transformers.AutoConfig.for_model(model_type, **common)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3], [40, 41, 42, 43], [12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23], [7, 7],
           [1, 2, 3], [60, 61, 62, 63, 64], [90, 91, 92, 93, 94, 95]]


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
def test_greedy_matches_the_plain_loop(model_type, monkeypatch):
    model = tiny(model_type)
    assert fast_decode.supports(model)
    free = generate(model, PROMPTS, max_new_tokens=40, temperature=0.0, static_cache=False)
    # stop tokens that end most rows early (each row's 3rd greedy token), so the batch gets compacted
    stops = sorted({row[2] for row in free.token_ids[:6]})
    kwargs = dict(max_new_tokens=40, temperature=0.0, eos_token_id=stops, pad_token_id=0)
    compactions = []
    compact = fast_decode.StaticDecoder.compact
    monkeypatch.setattr(fast_decode.StaticDecoder, "compact",
                        lambda self, keep: (compactions.append(len(keep)), compact(self, keep)))
    fast = generate(model, PROMPTS, **kwargs)
    assert compactions, "no row finished early enough to exercise compaction"
    plain = generate(model, PROMPTS, static_cache=False, **kwargs)
    assert fast.token_ids == plain.token_ids
    assert fast.truncated == plain.truncated
    for a, b in zip(fast.logprobs, plain.logprobs, strict=True):
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-4)
    assert fast.cache_bytes > 0


def test_sampling_matches_the_plain_loop_until_compaction_and_reuses_the_workspace():
    model = tiny("llama")
    workspace = fast_decode.DecodeWorkspace()
    kwargs = dict(max_new_tokens=12, temperature=0.8, top_p=0.9, seed=3, pad_token_id=0)
    fast = generate(model, PROMPTS, workspace=workspace, **kwargs)  # 12 < sync_every: no compaction
    plain = generate(model, PROMPTS, static_cache=False, **kwargs)
    assert fast.token_ids == plain.token_ids
    step = workspace.step
    again = generate(model, PROMPTS[::-1], workspace=workspace, **kwargs)
    assert workspace.step is step  # same batch shape and weights: cache and graphs reused
    assert again.token_ids == generate(model, PROMPTS[::-1], static_cache=False, **kwargs).token_ids
    with torch.no_grad():
        next(model.parameters()).data = next(model.parameters()).data.clone()  # weights moved: rebuilt
    generate(model, PROMPTS, workspace=workspace, **kwargs)
    assert workspace.step is not step


def test_unsupported_models_take_the_plain_loop():
    config = transformers.AutoConfig.for_model("gpt2", vocab_size=97, n_embd=32, n_layer=1, n_head=2)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    assert not fast_decode.supports(model)
    out = generate(model, PROMPTS[:2], max_new_tokens=3, temperature=0.0)
    assert [len(t) for t in out.token_ids] == [3, 3]


def test_prefill_in_row_chunks_gives_the_same_logits_as_in_one():
    from r1pipe.model.generate import left_pad

    model = tiny("qwen2")
    ids, valid = left_pad(PROMPTS, 0, "cpu")
    decoder = fast_decode.StaticDecoder(model, len(PROMPTS), ids.shape[1] + 4, torch.float32, torch.device("cpu"))
    with torch.no_grad():
        whole = decoder.prefill(ids, valid)
        chunked = decoder.prefill(ids, valid, score_budget=1)  # one row at a time
        reference = model(input_ids=ids, attention_mask=valid.long(),
                          position_ids=(valid.long().cumsum(1) - 1).clamp_min(0)).logits[:, -1]
    assert torch.allclose(whole, chunked, atol=1e-5)
    assert torch.allclose(whole, reference, atol=1e-4)


@pytest.mark.parametrize("release", [False, True])
def test_native_engine_keeps_or_releases_its_cache_when_the_trainer_runs(release):
    from r1pipe.model.policy import Policy
    from r1pipe.rollout.base import SamplingSettings
    from r1pipe.rollout.native_engine import NativeEngine

    engine = NativeEngine(Policy(tiny("llama")), release_cache=release)
    completions = engine.generate(PROMPTS[:2], SamplingSettings(n=2, max_tokens=5), seed=0)
    assert [c.prompt_index for c in completions] == [0, 0, 1, 1]
    assert all(len(c.token_ids) == len(c.logprobs) == 5 for c in completions)
    engine.sleep()
    assert (engine.workspace.step is None) == release
