"""Generation: absorbed latent cache vs naive recomputation, ragged batches, MTP speculative decoding,
HF dense models through the same function."""
import pytest
import torch

from r1pipe.model import DeepseekConfig, DeepseekForCausalLM
from r1pipe.model.generate import Sampler, generate
from r1pipe.model.layers import LatentCache
from test_model_helpers import single_thread  # noqa: F401  (autouse fixture)

PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [3, 4, 5, 6, 7, 8, 9, 10, 11]]


@pytest.fixture(scope="module")
def sharp_model():
    """Random nano model with large weights, so greedy choices are far from ties."""
    torch.manual_seed(0)
    model = DeepseekForCausalLM(DeepseekConfig.preset("nano-v3"))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8)
    return model.eval()


@pytest.fixture(scope="module")
def trained_model():
    """nano-v3 trained briefly on arithmetic sequences, so the MTP head drafts well."""
    torch.manual_seed(0)
    model = DeepseekForCausalLM(DeepseekConfig.preset("nano-v3").replace(mtp_loss_weight=1.0))
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        start = torch.randint(0, 40, (8, 1), generator=g)
        step = torch.randint(1, 4, (8, 1), generator=g)
        ids = 10 + (start + step * torch.arange(20)) % 40
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.update_expert_bias()
    return model.eval()


def test_absorbed_cache_decoding_matches_naive(sharp_model):
    cached = generate(sharp_model, PROMPTS, 12, temperature=0)
    naive = generate(sharp_model, PROMPTS, 12, temperature=0, use_cache=False)
    assert cached.token_ids == naive.token_ids
    for a, b in zip(cached.logprobs, naive.logprobs, strict=True):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-4, atol=1e-4)


def test_absorbed_attention_matches_naive_logits(sharp_model):
    """One step over the latent cache (absorbed) gives the full-recompute (per-head K/V) logits."""
    config = sharp_model.config
    ids = torch.randint(0, config.vocab_size, (2, 17))
    with torch.no_grad():
        full = sharp_model(ids).logits[:, -1]
        cache = LatentCache(config, 2, 32, config.num_hidden_layers, torch.float32, "cpu")
        sharp_model(ids[:, :-1], cache=cache)
        step = sharp_model(ids[:, -1:], cache=cache).logits[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-5, atol=1e-4)


def test_cache_holds_only_latent_and_rope_key():
    config = DeepseekConfig.preset("tiny-v3")
    cache = LatentCache(config, batch_size=3, max_len=10, num_layers=config.num_hidden_layers,
                        dtype=torch.bfloat16, device="cpu")
    assert cache.bytes_per_token_per_layer() == (512 + 64) * 2 == 1152
    assert cache.nbytes() == 3 * 10 * config.num_hidden_layers * 1152


def test_ragged_batch_equals_one_by_one(sharp_model):
    batch = generate(sharp_model, PROMPTS, 8, temperature=0)
    for prompt, tokens in zip(PROMPTS, batch.token_ids, strict=True):
        assert generate(sharp_model, [prompt], 8, temperature=0).token_ids[0] == tokens


def test_eos_and_sampling_are_seeded(sharp_model):
    a = generate(sharp_model, PROMPTS, 10, temperature=1.0, top_p=0.9, seed=3)
    b = generate(sharp_model, PROMPTS, 10, temperature=1.0, top_p=0.9, seed=3)
    assert a.token_ids == b.token_ids and a.token_ids != generate(sharp_model, PROMPTS, 10, seed=4).token_ids
    stop = a.token_ids[0][3]
    c = generate(sharp_model, PROMPTS, 10, temperature=1.0, top_p=0.9, seed=3, eos_token_id=stop)
    assert c.token_ids[0][-1] == stop and len(c.token_ids[0]) <= 4 and not c.truncated[0]
    assert all(len(t) == len(lp) for t, lp in zip(c.token_ids, c.logprobs, strict=True))


def test_mtp_speculative_greedy_is_identical(trained_model, sharp_model):
    prompts = [[10, 12, 14, 16], [20, 21, 22], [30, 33, 36, 39, 42, 45]]
    plain = generate(trained_model, prompts, 16, temperature=0)
    spec = generate(trained_model, prompts, 16, temperature=0, use_mtp=True)
    assert spec.token_ids == plain.token_ids
    assert spec.acceptance_rate > 0.3  # a briefly trained draft head is often right here
    # also with a random (always-wrong) draft head, and against the naive path
    random_spec = generate(sharp_model, PROMPTS, 10, temperature=0, use_mtp=True)
    assert random_spec.token_ids == generate(sharp_model, PROMPTS, 10, temperature=0).token_ids
    naive_spec = generate(trained_model, prompts, 16, temperature=0, use_mtp=True, use_cache=False)
    assert naive_spec.token_ids == plain.token_ids


def test_speculative_sampling_keeps_the_target_distribution():
    """Accept d ~ q with min(1, p/q), else resample from max(p - q, 0): the emitted token is ~ p exactly."""
    g = torch.Generator().manual_seed(0)
    p = torch.rand(5, generator=g).softmax(0) ** 2
    p, q = p / p.sum(), torch.rand(5, generator=g).softmax(0)
    n = 200_000
    sampler = Sampler(temperature=1.0, top_p=1.0, seed=0, device="cpu")
    draft = sampler.sample(q.expand(n, 5))
    accepted, token = sampler.verify(draft, p.expand(n, 5), q.expand(n, 5))
    empirical = torch.bincount(token, minlength=5).float() / n
    assert (empirical - p).abs().max() < 0.005
    assert abs(accepted.float().mean() - torch.minimum(p, q).sum()) < 0.005  # acceptance = sum min(p, q)


def test_hf_dense_model_through_the_same_function():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    ours = generate(model, PROMPTS, 6, temperature=0)
    for prompt, tokens in zip(PROMPTS, ours.token_ids, strict=True):
        hf = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                            pad_token_id=0)
        assert hf[0, len(prompt):].tolist() == tokens


@pytest.mark.parametrize("use_mtp", [False, True])
def test_recorded_routes_are_the_teacher_forced_ones(trained_model, use_mtp):
    """R3: every fed token's experts, per decoder MoE layer, as a teacher-forced forward over prompt +
    completion chooses them (fp32: same choices up to rounding near-ties); the last token, never fed, is -1.
    With MTP drafting, rejected drafts' routes are dropped and their positions refilled."""
    result = generate(trained_model, PROMPTS, 10, temperature=1.0, seed=3, use_mtp=use_mtp, record_routes=True)
    layers = trained_model.routed_layers()
    matched = total = 0
    for prompt, tokens, routes in zip(PROMPTS, result.token_ids, result.routes, strict=True):
        sequence = prompt + tokens
        assert routes.shape == (len(sequence), len(layers), trained_model.config.num_experts_per_tok)
        with torch.no_grad():
            live = trained_model(torch.tensor([sequence]), return_hidden=True, return_routes=True).routes[0]
        recorded = routes[:-1]  # every token but the last was fed to the model
        assert (recorded >= 0).all()
        same = (recorded.sort(-1).values == live[:-1].sort(-1).values).all(-1)
        matched, total = matched + int(same.sum()), total + same.numel()
    assert matched / total > 0.98, f"{matched}/{total} (token, layer) expert sets as teacher-forced"


def test_replayed_routes_drive_the_forward(trained_model):
    """A forward given routes uses exactly them (gate weights from the live scores, gradient into the
    router); -1 rows route themselves."""
    ids = torch.tensor([[10, 13, 16, 19, 22, 25, 28]])
    with torch.no_grad():
        own = trained_model(ids, return_routes=True)
    other = torch.roll(own.routes, 1, dims=-1) + 1  # other experts, same shape
    other = other % trained_model.config.n_routed_experts
    other[:, 0] = -1  # the first token keeps its own choice
    trained_model.zero_grad()
    replayed = trained_model(ids, routes=other, return_routes=True)
    assert torch.equal(replayed.routes[:, 1:], other[:, 1:]) and torch.equal(replayed.routes[:, 0], own.routes[:, 0])
    assert not torch.allclose(replayed.logits[:, 1:], own.logits[:, 1:])
    replayed.logits.sum().backward()
    layer = trained_model.routed_layers()[0]
    assert trained_model.moe_layers()[layer].gate.weight.grad.abs().sum() > 0
    with torch.no_grad():
        again = trained_model(ids, routes=own.routes)
    torch.testing.assert_close(again.logits, own.logits, rtol=0, atol=0)
