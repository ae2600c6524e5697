"""GRPO maths against hand computations on a fixed two-completion batch."""
import math
import statistics

import pytest
import torch

from r1pipe import grpo

# Two completions of one prompt, three token slots; the second completion has two real tokens.
LOGP = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, 0.0]])
OLD = torch.tensor([[-1.1, -1.5, -0.5], [-0.3, -0.5, 0.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
ADV = torch.tensor([1.0, -2.0])
EPS_LOW, EPS_HIGH = 0.2, 0.28

# -min(rho*A, clip(rho)*A) by hand, token by token.
ROW0 = [-math.exp(0.1), -math.exp(-0.5), -1.0]  # A=+1: 1.105 inside the clip range; 0.607 < 0.8 keeps rho
ROW1 = [2.0, 1.6]  # A=-2: rho=1 -> 2; rho=exp(-0.7)=0.497 < 0.8 -> min(-0.993, -1.6) = -1.6 -> 1.6
TOKEN_SUM = sum(ROW0) + sum(ROW1)


def _token_loss(**kwargs):
    return grpo.grpo_token_loss(LOGP, OLD, ADV, eps_low=EPS_LOW, eps_high=EPS_HIGH, **kwargs)


def test_token_loss_matches_hand_values():
    loss = _token_loss()
    assert loss[0].tolist() == pytest.approx(ROW0, abs=1e-6)
    assert loss[1, :2].tolist() == pytest.approx(ROW1, abs=1e-6)


@pytest.mark.parametrize(
    "loss_type, expected",
    [
        ("grpo", (sum(ROW0) / 3 + sum(ROW1) / 2) / 2),
        ("bnpo", TOKEN_SUM / 5),
        ("dapo", TOKEN_SUM / 5),
        ("dr_grpo", TOKEN_SUM / (2 * 4)),
    ],
)
def test_each_loss_type_equals_hand_computation(loss_type, expected):
    loss = grpo.aggregate_loss(_token_loss(), MASK, loss_type, max_completion_length=4)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_accumulated_micro_batches_equal_one_batch(loss_type):
    full = grpo.aggregate_loss(_token_loss(), MASK, loss_type, max_completion_length=4)
    token_loss = _token_loss()
    parts = [
        grpo.aggregate_loss(
            token_loss[i : i + 1], MASK[i : i + 1], loss_type, max_completion_length=4,
            batch_sequences=2, batch_tokens=5.0, micro_batches=2,
        )
        for i in range(2)
    ]
    assert sum(parts).item() == pytest.approx(full.item(), abs=1e-6)


def test_bnpo_normalises_per_micro_batch():
    token_loss = _token_loss()
    parts = [
        grpo.aggregate_loss(token_loss[i : i + 1], MASK[i : i + 1], "bnpo", max_completion_length=4, micro_batches=2)
        for i in range(2)
    ]
    assert sum(parts).item() == pytest.approx((sum(ROW0) / 3 + sum(ROW1) / 2) / 2, abs=1e-6)


def test_k3_kl_term_added_with_beta():
    ref = torch.tensor([[-0.9, -2.5, -0.5], [-0.1, -1.0, 0.0]])
    loss = _token_loss(beta=0.1, ref_logp=ref)

    def k3(lp, rf):
        return math.exp(rf - lp) - (rf - lp) - 1

    assert loss[0, 0].item() == pytest.approx(ROW0[0] + 0.1 * k3(-1.0, -0.9), abs=1e-6)
    assert loss[1, 1].item() == pytest.approx(ROW1[1] + 0.1 * k3(-1.2, -1.0), abs=1e-6)
    assert (grpo.k3_kl(LOGP, ref) >= 0).all()
    with pytest.raises(ValueError, match="ref_logp"):
        _token_loss(beta=0.1)


def test_clipped_tokens_get_no_gradient():
    logp = LOGP.clone().requires_grad_(True)
    loss = grpo.grpo_token_loss(logp, OLD, ADV, eps_low=EPS_LOW, eps_high=EPS_HIGH)
    (loss * MASK).sum().backward()
    # row 1 token 1 is clipped (rho < 1 - eps_low with A < 0): zero gradient; others d/dlogp = -rho*A
    assert logp.grad[1, 1].item() == 0.0
    assert logp.grad[0, 0].item() == pytest.approx(-math.exp(0.1), abs=1e-6)
    stats = grpo.policy_stats(LOGP, OLD, ADV, MASK, eps_low=EPS_LOW, eps_high=EPS_HIGH)
    assert stats["clip_low"] == pytest.approx(1 / 5) and stats["clip_high"] == 0.0


def test_group_advantages_scale_modes():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    adv, zero_std = grpo.group_advantages(rewards, 4, "group")
    std0 = statistics.stdev([1, 0, 0, 0])
    assert adv[:4].tolist() == pytest.approx([0.75 / (std0 + 1e-4)] + [-0.25 / (std0 + 1e-4)] * 3, abs=1e-6)
    assert adv[4:].tolist() == [0.0] * 4
    assert zero_std.tolist() == [False] * 4 + [True] * 4

    adv, _ = grpo.group_advantages(rewards, 4, "batch")
    batch_std = statistics.stdev(rewards.tolist())
    assert adv[0].item() == pytest.approx(0.75 / (batch_std + 1e-4), abs=1e-6)

    adv, _ = grpo.group_advantages(rewards, 4, "none")
    assert adv.tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0])


def test_unscorable_reward_is_left_out_of_its_group():
    adv, _ = grpo.group_advantages(torch.tensor([1.0, float("nan"), 0.0, 0.0]), 4, "group")
    std = statistics.stdev([1, 0, 0])
    assert adv.tolist() == pytest.approx([(2 / 3) / (std + 1e-4), 0.0, -(1 / 3) / (std + 1e-4)] * 1 + [-(1 / 3) / (std + 1e-4)])
    with pytest.raises(ValueError, match="groups of 4"):
        grpo.group_advantages(torch.zeros(6), 4)


def test_dynamic_sampling_and_overlong_filter():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5])
    assert grpo.groups_with_signal(rewards, 2).tolist() == [False, True, False]
    mask = grpo.overlong_filter(MASK, torch.tensor([False, True]))
    assert mask.tolist() == [[1, 1, 1], [0, 0, 0]]


def test_rollout_importance_weights_by_hand():
    trainer = torch.tensor([[-1.0, -1.0], [-1.0, -3.0]])
    rollout = torch.tensor([[-2.0, -1.0], [-1.5, -1.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    expected = {
        "token_truncate": [2.0, 1.0, math.exp(0.5), 1.0],  # exp(1) capped at 2
        "token_mask": [0.0, 1.0, math.exp(0.5), 1.0],  # exp(1) outside [1/2, 2] dropped
        "sequence_truncate": [2.0, math.exp(0.5)],  # product over the completion's tokens
        "sequence_mask": [0.0, math.exp(0.5)],
    }
    for mode, values in expected.items():
        w = grpo.rollout_importance_weights(trainer, rollout, mask, mode, cap=2.0)
        assert w.flatten().tolist() == pytest.approx(values), mode
    assert (grpo.rollout_importance_weights(trainer, rollout, mask, "none", cap=2.0) == 1).all()


# Positive advantages with ratios above 1 + eps_high, and negative ones on both sides of the clip range.
CLIP_LOGP = torch.tensor([[0.5, 0.1, -0.5], [0.5, -0.5, 0.1]])  # old log-probs are 0: rho = exp(logp)
CLIP_ADV = torch.tensor([2.0, -1.0])
CLIP_W = torch.tensor([[0.5, 1.5, 2.0], [1.0, 0.25, 1.0]])  # rollout importance weights (no gradient)
CLIP_REF = torch.tensor([[0.0, 0.2, -1.0], [1.0, 0.0, 0.0]])


def _clip_grad(**kwargs):
    logp = CLIP_LOGP.clone().requires_grad_(True)
    loss = grpo.grpo_token_loss(logp, torch.zeros(2, 3), CLIP_ADV, eps_low=EPS_LOW, eps_high=EPS_HIGH, **kwargs)
    loss.sum().backward()
    return loss.detach(), logp.grad


def test_upper_clip_stops_positive_advantages_only():
    """rho = e^0.5 = 1.65 > 1.28: clipped with A > 0 (constant loss, no gradient), kept with A < 0 (the
    pessimistic bound); rho = e^-0.5 = 0.61 < 0.8: clipped with A < 0, kept with A > 0."""
    loss, grad = _clip_grad()
    rho = CLIP_LOGP.exp()
    expected_loss = [[-(1 + EPS_HIGH) * 2.0, -rho[0, 1] * 2.0, -rho[0, 2] * 2.0],
                     [rho[1, 0] * 1.0, (1 - EPS_LOW) * 1.0, rho[1, 2] * 1.0]]
    expected_grad = [[0.0, -rho[0, 1] * 2.0, -rho[0, 2] * 2.0],  # d(-rho A)/dlogp = -rho A
                     [rho[1, 0] * 1.0, 0.0, rho[1, 2] * 1.0]]
    torch.testing.assert_close(loss, torch.tensor(expected_loss), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grad, torch.tensor(expected_grad), atol=1e-6, rtol=1e-6)
    stats = grpo.policy_stats(CLIP_LOGP, torch.zeros(2, 3), CLIP_ADV, torch.ones(2, 3), eps_low=EPS_LOW,
                              eps_high=EPS_HIGH)
    assert stats["clip_high"] == pytest.approx(1 / 6) and stats["clip_low"] == pytest.approx(1 / 6)


def test_importance_weights_scale_the_policy_term_and_not_the_kl():
    """loss = w * surrogate + beta * k3: gradients w * d(surrogate) + beta * (1 - exp(ref - logp))."""
    beta = 0.3
    plain_loss, plain_grad = _clip_grad()
    loss, grad = _clip_grad(importance_weights=CLIP_W, beta=beta, ref_logp=CLIP_REF)
    k3 = grpo.k3_kl(CLIP_LOGP, CLIP_REF)
    torch.testing.assert_close(loss, CLIP_W * plain_loss + beta * k3, atol=1e-6, rtol=1e-6)
    kl_grad = beta * (1 - torch.exp(CLIP_REF - CLIP_LOGP))
    torch.testing.assert_close(grad, CLIP_W * plain_grad + kl_grad, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(grad, CLIP_W * (plain_grad + kl_grad))  # the weights must not touch the KL term


def test_group_with_an_unscorable_reward_and_equal_others_has_no_signal():
    rewards = torch.tensor([1.0, float("nan"), 1.0, 1.0,  # equal scored rewards: no signal
                            1.0, float("nan"), 0.0, 1.0,  # spread among the scored ones
                            float("nan"), float("nan"), 1.0, float("nan"),  # one scored value
                            0.0, 0.0, 0.0, 0.0])
    assert grpo.groups_with_signal(rewards, 4).tolist() == [False, True, False, False]
    advantages, _ = grpo.group_advantages(rewards, 4)
    assert not advantages[:4].any() and not advantages[8:].any()


def test_batch_scaling_takes_the_whole_steps_std():
    """One rank's share scaled by the std of the whole step's rewards equals that share of the whole batch."""
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    whole, _ = grpo.group_advantages(rewards, 4, "batch")
    share, _ = grpo.group_advantages(rewards[:4], 4, "batch", batch_std=grpo.nan_std(rewards))
    torch.testing.assert_close(share, whole[:4])
    assert not torch.allclose(grpo.group_advantages(rewards[:4], 4, "batch")[0], whole[:4])
