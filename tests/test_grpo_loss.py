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
    assert (grpo.kl_estimate(LOGP, ref, "k3") >= 0).all()
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
    k3 = grpo.kl_estimate(CLIP_LOGP, CLIP_REF, "k3")
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


# ----------------------------------------------------------------------------------------------
# Policy objectives beyond the token-level clip: GSPO, CISPO, dual-clip; KL estimators; entropy bonus


def _grad(level="token", logp=LOGP, old=OLD, adv=ADV, mask=MASK, **kwargs):
    """Token losses and d(sum of masked token losses)/d logp."""
    logp = logp.clone().requires_grad_(True)
    loss = grpo.grpo_token_loss(logp, old, adv, eps_low=kwargs.pop("eps_low", EPS_LOW),
                                eps_high=kwargs.pop("eps_high", EPS_HIGH), mask=mask, level=level, **kwargs)
    (loss * mask).sum().backward()
    return loss.detach(), logp.grad


# Sequence ratios of the fixed batch: the geometric mean of the token ratios over each completion.
S0 = math.exp((0.1 - 0.5 + 0.0) / 3)  # 0.875, A=+1: inside [0.8, 1.28]
S1 = math.exp((0.0 - 0.7) / 2)  # 0.705 < 0.8 with A=-2: clipped for the whole sequence (padding slot ignored)


@pytest.mark.parametrize("level", ["sequence", "sequence_token"])
def test_gspo_clips_whole_sequences(level):
    """GSPO: every token of a completion carries -min(s*A, clip(s)*A); the unclipped one's tokens each get
    the gradient -s*A (sequence: d s/d logp_t = s/|y| summed over |y| equal tokens; sequence_token: s per
    token), the clipped one's get none, although its first token's own ratio (1.0) is inside the range."""
    loss, grad = _grad(level)
    torch.testing.assert_close(loss[0], torch.full((3,), -S0), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(loss[1, :2], torch.full((2,), 1.6), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grad, torch.tensor([[-S0] * 3, [0.0, 0.0, 0.0]]), atol=1e-6, rtol=1e-6)
    token_loss, token_grad = _grad("token")
    assert token_grad[1, 0].item() == pytest.approx(2.0)  # token level: rho = 1 there, gradient -rho*A
    stats = grpo.policy_stats(LOGP, OLD, ADV, MASK, eps_low=EPS_LOW, eps_high=EPS_HIGH, level=level)
    assert stats["clip_low"] == pytest.approx(2 / 5) and stats["clip_high"] == 0.0  # both tokens of completion 1
    assert stats["ratio_min"] == pytest.approx(S1) and stats["ratio_max"] == pytest.approx(S0)
    assert stats["ratio_mean"] == pytest.approx((3 * S0 + 2 * S1) / 5)


def test_gspo_aggregated_as_in_the_paper():
    """loss_type grpo (mean over sequences of the token mean) on a sequence ratio is GSPO's
    mean_i -min(s_i A_i, clip(s_i) A_i); the paper's tiny clip range clips completion 1 (s = 0.705 < 1 - 3e-4)."""
    ratio = grpo.importance_ratio(LOGP, OLD, MASK, "sequence")
    assert ratio.flatten().tolist() == pytest.approx([S0, S1])
    loss, _ = _grad("sequence", eps_low=3e-4, eps_high=4e-4)
    total = grpo.aggregate_loss(loss, MASK, "grpo", max_completion_length=4)
    assert total.item() == pytest.approx((-S0 * 1.0 + (1 - 3e-4) * 2.0) / 2, abs=1e-6)


# rho = exp(CLIP_LOGP) (old log-probs 0): [[1.65, 1.11, 0.61], [1.65, 0.61, 1.11]], A = [2, -1]
RHO = [[math.exp(0.5), math.exp(0.1), math.exp(-0.5)], [math.exp(0.5), math.exp(-0.5), math.exp(0.1)]]
W_CISPO = [[1 + EPS_HIGH, RHO[0][1], 1 - EPS_LOW], [1 + EPS_HIGH, 1 - EPS_LOW, RHO[1][2]]]  # clip(rho), detached


def test_cispo_keeps_the_gradient_of_clipped_tokens():
    """CISPO: loss -w*A*logp with w = sg(clip(rho)); gradient -w*A on every token, the clipped ones included
    (the clip surrogate gives 0 at (0,0) and (1,1))."""
    loss, grad = _grad(logp=CLIP_LOGP, old=torch.zeros(2, 3), adv=CLIP_ADV, mask=torch.ones(2, 3),
                       policy_loss="cispo")
    adv = [2.0, -1.0]
    expected_loss = [[-W_CISPO[i][t] * adv[i] * float(CLIP_LOGP[i, t]) for t in range(3)] for i in range(2)]
    expected_grad = [[-W_CISPO[i][t] * adv[i] for t in range(3)] for i in range(2)]
    torch.testing.assert_close(loss, torch.tensor(expected_loss), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grad, torch.tensor(expected_grad), atol=1e-6, rtol=1e-6)
    assert (grad != 0).all()
    stats = grpo.policy_stats(CLIP_LOGP, torch.zeros(2, 3), CLIP_ADV, torch.ones(2, 3), eps_low=EPS_LOW,
                              eps_high=EPS_HIGH, policy_loss="cispo")
    assert stats["clip_high"] == pytest.approx(2 / 6) and stats["clip_low"] == pytest.approx(2 / 6)
    with pytest.raises(ValueError, match="clip_ratio_c"):
        _grad(policy_loss="cispo", clip_ratio_c=3.0)


def test_cispo_without_lower_bound():
    """eps_low = 1 (MiniMax: upper bound only): weights below 1 are the raw ratios."""
    _, grad = _grad(logp=CLIP_LOGP, old=torch.zeros(2, 3), adv=CLIP_ADV, mask=torch.ones(2, 3),
                    policy_loss="cispo", eps_low=1.0)
    assert grad[0, 2].item() == pytest.approx(-RHO[0][2] * 2.0)
    assert grad[1, 1].item() == pytest.approx(-RHO[1][1] * -1.0)


def test_dual_clip_caps_negative_advantages():
    """clip_ratio_c = 1.5: completion 1 (A = -1), token 0 has rho = 1.65 > c: its loss -rho*A = 1.65 is capped
    at c*|A| = 1.5 and gets no gradient; tokens below c keep the plain clipped loss; A > 0 is untouched."""
    plain_loss, plain_grad = _grad(logp=CLIP_LOGP, old=torch.zeros(2, 3), adv=CLIP_ADV, mask=torch.ones(2, 3))
    loss, grad = _grad(logp=CLIP_LOGP, old=torch.zeros(2, 3), adv=CLIP_ADV, mask=torch.ones(2, 3), clip_ratio_c=1.5)
    assert plain_loss[1, 0].item() == pytest.approx(RHO[1][0]) and plain_grad[1, 0].item() == pytest.approx(RHO[1][0])
    assert loss[1, 0].item() == pytest.approx(1.5) and grad[1, 0].item() == 0.0
    assert loss[1, 1:].tolist() == pytest.approx([1 - EPS_LOW, RHO[1][2]])  # below c: unchanged
    torch.testing.assert_close(loss[0], plain_loss[0])
    torch.testing.assert_close(grad[0], plain_grad[0])
    torch.testing.assert_close(grad[1, 1:], plain_grad[1, 1:])
    stats = grpo.policy_stats(CLIP_LOGP, torch.zeros(2, 3), CLIP_ADV, torch.ones(2, 3), eps_low=EPS_LOW,
                              eps_high=EPS_HIGH, clip_ratio_c=1.5)
    assert stats["clip_dual"] == pytest.approx(1 / 6)
    assert stats["clip_fraction"] == pytest.approx(3 / 6)  # + one clipped on each side


@pytest.mark.parametrize(
    "estimator, value, slope",
    [
        ("k1", lambda d: d, lambda d: 1.0),
        ("k2", lambda d: d * d / 2, lambda d: d),
        ("k3", lambda d: math.exp(-d) + d - 1, lambda d: 1 - math.exp(-d)),
        ("low_var_kl", lambda d: math.exp(-d) + d - 1, lambda d: 1 - math.exp(-d)),
    ],
)
def test_kl_estimators_values_and_gradients(estimator, value, slope):
    """d = logp - ref on CLIP_LOGP / CLIP_REF; beta * kl is added to the loss, its gradient beta * dkl/dd."""
    beta = 0.5
    d = (CLIP_LOGP - CLIP_REF).tolist()
    base_loss, base_grad = _grad(logp=CLIP_LOGP, old=torch.zeros(2, 3), adv=CLIP_ADV, mask=torch.ones(2, 3))
    loss, grad = _grad(logp=CLIP_LOGP, old=torch.zeros(2, 3), adv=CLIP_ADV, mask=torch.ones(2, 3), beta=beta,
                       kl_estimator=estimator, ref_logp=CLIP_REF)
    expected = [[value(x) for x in row] for row in d]
    torch.testing.assert_close(grpo.kl_estimate(CLIP_LOGP, CLIP_REF, estimator), torch.tensor(expected))
    torch.testing.assert_close(loss - base_loss, beta * torch.tensor(expected), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grad - base_grad, beta * torch.tensor([[slope(x) for x in row] for row in d]),
                               atol=1e-6, rtol=1e-6)


def test_low_var_kl_is_clamped():
    """verl's low_var_kl: d clamped to [-20, 20], the estimate to [-10, 10] (flat there: no gradient)."""
    logp = torch.tensor([[-30.0, 25.0, 0.3]], requires_grad=True)
    kl = grpo.kl_estimate(logp, torch.zeros(1, 3), "low_var_kl")
    kl.sum().backward()
    assert kl[0].tolist() == pytest.approx([10.0, 10.0, math.exp(-0.3) + 0.3 - 1])
    assert logp.grad[0].tolist() == pytest.approx([0.0, 0.0, 1 - math.exp(-0.3)])
    assert grpo.kl_estimate(logp.detach(), torch.zeros(1, 3), "k3")[0, 0].item() == pytest.approx(math.exp(30) - 31)


def test_kl_folded_into_the_reward():
    """r_i - beta * sum_t k3_t over completion i's unmasked tokens; no gradient reaches the log-probs."""
    ref = torch.tensor([[-0.9, -2.5, -0.5], [-0.1, -1.0, 7.0]])  # the masked slot's 7.0 must not count
    logp = LOGP.clone().requires_grad_(True)
    penalised = grpo.kl_penalised_rewards(torch.tensor([1.0, 0.0]), logp, ref, MASK, 0.1, "k3")

    def k3(lp, rf):
        return math.exp(rf - lp) - (rf - lp) - 1

    expected0 = 1.0 - 0.1 * (k3(-1.0, -0.9) + k3(-2.0, -2.5) + k3(-0.5, -0.5))
    expected1 = 0.0 - 0.1 * (k3(-0.3, -0.1) + k3(-1.2, -1.0))
    assert penalised.tolist() == pytest.approx([expected0, expected1], abs=1e-6)
    assert not penalised.requires_grad


def test_entropy_bonus_is_the_steps_mean_token_entropy():
    """-coef * sum H / N over the whole step: gradient -coef / N per unmasked token, and two micro-batches
    with the step's token count sum to the one-batch value."""
    entropy = torch.tensor([[1.0, 2.0, 0.5], [0.2, 0.4, 9.0]], requires_grad=True)
    bonus = grpo.entropy_loss(entropy, MASK, 0.01)
    bonus.backward()
    assert bonus.item() == pytest.approx(-0.01 * (1.0 + 2.0 + 0.5 + 0.2 + 0.4) / 5)
    torch.testing.assert_close(entropy.grad, -0.01 / 5 * MASK)
    parts = [grpo.entropy_loss(entropy[i : i + 1], MASK[i : i + 1], 0.01, batch_tokens=5.0) for i in range(2)]
    assert sum(parts).item() == pytest.approx(bonus.item())


def test_ppo_kl_and_ratio_extrema():
    """ppo_kl = mean(old - logp) over unmasked tokens (k1 of KL(old || new), verl); ratio extrema skip padding."""
    stats = grpo.policy_stats(LOGP, OLD, ADV, MASK, eps_low=EPS_LOW, eps_high=EPS_HIGH)
    assert stats["ppo_kl"] == pytest.approx((-0.1 + 0.5 + 0.0 + 0.0 + 0.7) / 5)
    assert stats["ratio_min"] == pytest.approx(math.exp(-0.7)) and stats["ratio_max"] == pytest.approx(math.exp(0.1))


# ----------------------------------------------------------------------------------------------
# Advantage estimators

REWARDS = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0])


def test_rloo_leave_one_out_baseline():
    adv, _ = grpo.group_advantages(REWARDS, 4, "none", estimator="rloo")
    assert adv.tolist() == pytest.approx([1.0, -1 / 3, -1 / 3, -1 / 3, 1 / 3, 1 / 3, -1.0, 1 / 3])
    # an unscored completion is left out of the others' baselines: [1, NaN, 0, 0] -> baselines 0, -, 1/2, 1/2
    adv, _ = grpo.group_advantages(torch.tensor([1.0, float("nan"), 0.0, 0.0]), 4, "none", estimator="rloo")
    assert adv.tolist() == pytest.approx([1.0, 0.0, -0.5, -0.5])
    # = G/(G-1) x the GRPO advantage, so with group scaling too
    grpo_adv, _ = grpo.group_advantages(REWARDS, 4, "group")
    torch.testing.assert_close(grpo.group_advantages(REWARDS, 4, "group", estimator="rloo")[0], grpo_adv * 4 / 3)


def test_passk_credits_only_a_unique_best():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.2, 0.7, 0.5, 0.1, 0.3, float("nan"), 0.9, 0.9])
    adv, _ = grpo.group_advantages(rewards, 4, "none", estimator="passk")
    assert adv.tolist() == pytest.approx([1.0, 0, 0, 0,  # max 1 - max of the others 0
                                          0, 0, 0, 0,  # tied best: no completion is decisive
                                          0, 0.7 - 0.5, 0, 0,  # r_max - r_second
                                          0, 0, 0, 0])  # tie among the scored ones
    adv, _ = grpo.group_advantages(rewards[8:12], 4, "group", estimator="passk")
    assert adv[1].item() == pytest.approx(0.2 / (statistics.stdev([0.2, 0.7, 0.5, 0.1]) + 1e-4))


def test_reinforce_pp_whitens_over_the_batch_by_tokens():
    """x_i whitened with the token-weighted mean and unbiased variance of the whole batch."""
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, float("nan"), 1.0])
    tokens = torch.tensor([2.0, 1.0, 3.0, 0.0, 1.0, 2.0, 4.0, 1.0])
    weights = tokens * (~rewards.isnan())  # the unscored completion and the empty one do not count
    for estimator, x in [("reinforce_pp", [1, 0, 0, 0, 1, 1, 0, 1]),
                         ("reinforce_pp_baseline", [0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0])]:
        values, _ = grpo.group_advantages(rewards, 4, "none", estimator=estimator)
        assert values.tolist() == pytest.approx(x)
        w = weights.tolist()
        mean = sum(wi * xi for wi, xi in zip(w, x, strict=True)) / sum(w)
        var = sum(wi * (xi - mean) ** 2 for wi, xi in zip(w, x, strict=True)) / (sum(w) - 1)
        expected = [(xi - mean) / math.sqrt(var + 1e-8) if wi > 0 else 0.0 for wi, xi in zip(w, x, strict=True)]
        assert grpo.batch_whiten(values, weights).tolist() == pytest.approx(expected, abs=1e-6)
        # one rank's share whitened with the whole step's statistics = that share of the whole
        share = grpo.batch_whiten(values[:4], weights[:4], values, weights)
        torch.testing.assert_close(share, grpo.batch_whiten(values, weights)[:4])
    with pytest.raises(ValueError, match="batch_whiten"):
        grpo.group_advantages(rewards, 4, "group", estimator="reinforce_pp")
