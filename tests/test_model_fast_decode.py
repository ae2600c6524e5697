"""The native engine's fast path (static cache, compaction, device-side sampling) on small random Llama /
Qwen2 / Qwen3 models in fp32, checked teacher-forced: the log-prob it reports for every token it emitted
equals, within 1e-4, the log-prob of that token under one plain forward of the model over the prompt and
the tokens before it (what holds across kernels and CPUs, which sum attention in different orders); greedy
tokens are the argmax of that forward within the same tolerance; rows end at their stop token or length."""
import pytest
import torch

from r1pipe.model import fast_decode
from r1pipe.model.generate import generate

transformers = pytest.importorskip("transformers")

TOLERANCE = 1e-4


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


def assert_teacher_forced(model, prompts, result, temperature: float) -> None:
    """Each row's reported log-probs against one uncached forward of that row alone; greedy: argmax too."""
    for prompt, tokens, logprobs in zip(prompts, result.token_ids, result.logprobs, strict=True):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1].float()
        logp = (logits / (temperature or 1.0)).log_softmax(-1)
        chosen = logp.gather(-1, torch.tensor(tokens)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(logprobs), chosen, atol=TOLERANCE)
        if temperature == 0:
            assert bool((chosen >= logp.max(-1).values - TOLERANCE).all())


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
def test_greedy_decoding_is_the_models_argmax_with_its_log_probs(model_type, monkeypatch):
    model = tiny(model_type)
    assert fast_decode.supports(model)
    free = generate(model, PROMPTS, max_new_tokens=40, temperature=0.0, static_cache=False)
    # stop tokens that end most rows early (each row's 3rd greedy token), so the batch gets compacted
    stops = sorted({row[2] for row in free.token_ids[:6]})
    compactions = []
    compact = fast_decode.StaticDecoder.compact
    monkeypatch.setattr(fast_decode.StaticDecoder, "compact",
                        lambda self, keep: (compactions.append(len(keep)), compact(self, keep)))
    fast = generate(model, PROMPTS, max_new_tokens=40, temperature=0.0, eos_token_id=stops, pad_token_id=0)
    assert compactions, "no row finished early enough to exercise compaction"
    assert_teacher_forced(model, PROMPTS, fast, temperature=0.0)
    for tokens, truncated in zip(fast.token_ids, fast.truncated, strict=True):
        assert not set(tokens[:-1]) & set(stops)  # nothing emitted after a stop token
        assert truncated == (tokens[-1] not in stops) and (len(tokens) == 40 or not truncated)
    assert fast.cache_bytes > 0


def test_sampled_log_probs_hold_and_the_workspace_is_reused_while_the_weights_stay():
    model = tiny("llama")
    workspace = fast_decode.DecodeWorkspace()
    kwargs = dict(max_new_tokens=24, temperature=0.8, top_p=0.9, seed=3, pad_token_id=0)
    assert_teacher_forced(model, PROMPTS, generate(model, PROMPTS, workspace=workspace, **kwargs), 0.8)
    step = workspace.step
    again = generate(model, PROMPTS[::-1], workspace=workspace, **kwargs)
    assert workspace.step is step  # same batch shape and weights: cache and graphs reused
    assert_teacher_forced(model, PROMPTS[::-1], again, 0.8)
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
