"""The policy interface shared by our DeepSeek model and HF dense models; padding and packing."""
import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from r1pipe.model import DeepseekForCausalLM
from r1pipe.model.policy import Policy, PolicyError, load_policy
from test_model_helpers import single_thread  # noqa: F401  (autouse fixture)


@pytest.fixture(scope="module", params=["deepseek", "qwen2"])
def policy(request, tmp_path_factory):
    torch.manual_seed(0)
    if request.param == "deepseek":
        return load_policy("nano-v3")
    path = tmp_path_factory.mktemp("qwen")
    Qwen2ForCausalLM(Qwen2Config(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(path)
    return load_policy(path)


def full_logits(policy: Policy, ids, mask=None):
    if policy.is_deepseek:
        return policy.module(ids, attention_mask=mask).logits
    return policy.module(input_ids=ids, attention_mask=mask).logits


def test_chunked_logprobs_and_entropy_match_full_logits(policy):
    policy.module.eval()
    ids = torch.randint(0, 512, (2, 13))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    logp, entropy = policy.token_logprobs(ids, mask, chunk_size=5, return_entropy=True)
    full = full_logits(policy, ids, mask)[:, :-1].float().log_softmax(-1)
    real = mask[:, 1:].bool()
    torch.testing.assert_close(logp[real], full.gather(-1, ids[:, 1:, None])[..., 0][real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy[real], -(full.exp() * full).sum(-1)[real], atol=1e-4, rtol=1e-4)
    assert logp.shape == (2, 12)


def test_logprobs_of_selected_positions_only(policy):
    """GRPO projects only completion positions onto the vocabulary: same values and gradients there, 0 elsewhere."""
    policy.module.eval()
    ids = torch.randint(0, 512, (2, 13))
    only = torch.zeros(2, 12, dtype=torch.bool)
    only[0, 6:], only[1, 9:] = True, True
    full, full_entropy = policy.token_logprobs(ids, chunk_size=5, return_entropy=True)
    scores = policy.token_logprobs_and_aux(ids, chunk_size=3, return_entropy=True, only=only)
    picked, entropy = scores.logp, scores.entropy
    torch.testing.assert_close(picked[only], full[only], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy[only], full_entropy[only], atol=1e-5, rtol=1e-5)
    assert not picked[~only].any() and not entropy[~only].any()
    head = policy.output_layer().weight
    grads = []
    for logp in (policy.token_logprobs(ids, chunk_size=5), policy.token_logprobs_and_aux(ids, chunk_size=3, only=only).logp):
        head.grad = None
        (logp * only).sum().backward()
        grads.append(head.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-4)


def test_padding_and_packing_change_nothing(policy):
    policy.module.eval()
    a, b = torch.randint(0, 512, (1, 5)), torch.randint(0, 512, (1, 7))
    with torch.no_grad():
        alone = torch.cat([policy.hidden_states(a), policy.hidden_states(b)], 1)
        packed = policy.hidden_states(torch.cat([a, b], 1), position_ids=torch.cat([torch.arange(5), torch.arange(7)])[None])
        padded = policy.hidden_states(torch.cat([torch.zeros(1, 3, dtype=torch.long), a], 1),
                                      attention_mask=torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]]))
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded[:, 3:], alone[:, :5], atol=1e-5, rtol=1e-5)


def test_train_loss_gradients_and_after_step(policy):
    policy.module.train()
    ids = torch.randint(0, 512, (2, 10))
    labels = ids.clone()
    labels[:, :3] = -100
    loss, metrics = policy.train_loss({"input_ids": ids, "labels": labels})
    loss.backward()
    assert metrics["loss"] == pytest.approx(loss.item())
    assert all(p.grad is not None for p in policy.module.parameters() if p.requires_grad)
    after = policy.after_optimizer_step()
    if policy.is_deepseek:
        assert {"lm_loss", "mtp_loss", "balance_loss"} <= set(metrics) and "expert_load_max_over_mean" in after
    else:
        assert after == {}
    policy.module.zero_grad()


def test_grad_through_chunked_logprobs(policy):
    policy.module.train()
    ids = torch.randint(0, 512, (2, 9))
    policy.token_logprobs(ids, chunk_size=4).sum().backward()
    head = policy.output_layer().weight
    assert head.grad is not None and head.grad.abs().sum() > 0
    policy.module.zero_grad()


def test_load_policy_errors_and_presets(tmp_path):
    with pytest.raises(PolicyError, match="neither a model directory nor a preset"):
        load_policy("no-such-model")
    with pytest.raises(PolicyError, match="no config.json"):
        load_policy(tmp_path)
    policy = load_policy("nano-v3", vocab_size=128)
    assert isinstance(policy.module, DeepseekForCausalLM) and policy.module.config.vocab_size == 128
    policy.save_pretrained(tmp_path / "saved")
    assert load_policy(tmp_path / "saved").module.config.vocab_size == 128


@pytest.mark.parametrize("bias", [False, True])
def test_fused_head_equals_the_module_call(bias):
    """TRL's fused chunked projection (plain Linear heads) gives the checkpointed module call's log-probs,
    entropies and gradients (hidden, weight, bias) in fp32, with the vocabulary split into several tiles;
    heads it must not read directly (wrapped, ZeRO-3 partitions) keep the module call."""
    from r1pipe.model.policy import chunk_logprobs, fusable_head, fused_logprobs

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 2600, bias=bias)
    hidden = torch.randn(37, 16, requires_grad=True)
    targets = torch.randint(0, 2600, (37,))
    results = []
    for fused in (True, False):
        hidden.grad, head.weight.grad = None, None
        if bias:
            head.bias.grad = None
        if fused:
            logp, entropy = fused_logprobs(hidden, head, targets, 0.7, True, logits_per_block=37 * 1024)
        else:
            logp, entropy = (t[0] for t in chunk_logprobs(hidden[None], head, targets[None], 0.7, True))
        (logp.sin().sum() + 0.3 * entropy.sum()).backward()
        results.append([logp, entropy, hidden.grad, head.weight.grad] + ([head.bias.grad] if bias else []))
    for fused, plain in zip(*results, strict=True):
        torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-4)
    assert fusable_head(head) and not fusable_head(torch.nn.Sequential(head))
    head.weight.ds_id = 0  # what DeepSpeed ZeRO-3 marks its partitioned parameters with
    assert not fusable_head(head)
