"""GRPO maths: each equation of GRPO and its variants as one function on plain tensors.

Shapes: B completions (G per prompt, prompts contiguous), T completion tokens (right padded);
``mask`` [B, T] is 1 on real completion tokens. Log-probs are per sampled token ([B, T]).
Advantages are one value per completion ([B]).

The stage (``r1pipe.stages.grpo``) composes them; nothing here knows about models or engines, so
every function is checked against a hand computation in tests/test_grpo_loss.py.
"""
from __future__ import annotations

from typing import Literal

import torch

LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]
ScaleRewards = Literal["group", "batch", "none"]
Advantage = Literal["grpo", "rloo", "passk", "reinforce_pp", "reinforce_pp_baseline"]
PolicyLoss = Literal["clip", "cispo"]
RatioLevel = Literal["token", "sequence", "sequence_token"]
KlEstimator = Literal["k1", "k2", "k3", "low_var_kl"]
ImportanceCorrection = Literal["none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]

ADVANTAGE_EPS = 1e-4
WHITEN_EPS = 1e-8


def nan_std(values: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Unbiased std ignoring NaNs (torch has no nanstd); 0 where fewer than two values exist."""
    valid = ~values.isnan()
    count = valid.sum() if dim is None else valid.sum(dim)
    mean = values.nanmean() if dim is None else values.nanmean(dim, keepdim=True)
    squared = torch.where(valid, (values - mean) ** 2, torch.zeros_like(values))
    total = squared.sum() if dim is None else squared.sum(dim)
    return torch.where(count > 1, (total / (count - 1).clamp(min=1)).sqrt(), torch.zeros_like(total))


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale_rewards: ScaleRewards = "group", eps: float = ADVANTAGE_EPS,
    batch_std: torch.Tensor | float | None = None, estimator: Advantage = "grpo",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-baseline advantages, one value per completion: ``A_i = (r_i - b_i) / scale``.

    The baseline ``b_i`` by ``estimator``, from the scored rewards of completion i's group:
    - grpo: the group mean (GRPO, Shao et al. 2024, DeepSeekMath).
    - rloo: the mean of the other completions, ``b_i = (sum_j r_j - r_i) / (G - 1)``, i.e.
      ``A_i = G / (G - 1) * (r_i - mean)`` (RLOO, Ahmadian et al. 2024, "Back to Basics").
    - passk: the group's best reward is every completion's reward and the leave-one-out best its
      baseline, ``A_i = max_j r_j - max_{j != i} r_j``: only a group's unique best completion gets
      credit, ``r_max - r_second``, the others 0 (leave-one-out pass@G, Tang et al. 2025, "Optimizing
      language models for inference time objectives using RL"; verl ``grpo_passk``).
    - reinforce_pp: no baseline (``A_i = r_i``, any scored reward counts); reinforce_pp_baseline: the
      group mean. Both are then whitened over the whole step by ``batch_whiten`` (REINFORCE++, Hu
      2025), so ``scale_rewards`` must be "none" for them.
    ``scale_rewards``: "group" divides by the group's std (GRPO), "batch" by the std of the whole
    batch's rewards (more robust when groups are nearly uniform), "none" does not divide (Dr. GRPO).
    ``batch_std``: the std of the whole optimizer step's rewards when ``rewards`` is one rank's share
    of it (default: the std of ``rewards``).
    A NaN reward (a completion no reward could score, e.g. an unparseable gold answer) is left out of
    its group's baseline and std and gets advantage 0, so it neither teaches nor biases the baseline;
    so does every completion of a group with fewer than two scored rewards (but for reinforce_pp, which
    needs no baseline).
    Returns (advantages [B], zero_std [B] bool: the completion's group has no reward spread).
    """
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards: expected a flat tensor of groups of {group_size}, got shape {tuple(rewards.shape)}")
    if estimator.startswith("reinforce_pp") and scale_rewards != "none":
        raise ValueError(f"estimator {estimator}: whitened over the batch by batch_whiten; pass scale_rewards='none'")
    grouped = rewards.view(-1, group_size)
    valid = ~grouped.isnan()
    scored = valid.sum(dim=1, keepdim=True)
    group_std = nan_std(grouped, dim=1)[:, None].expand_as(grouped)
    if estimator in ("grpo", "reinforce_pp_baseline"):
        centred = grouped - grouped.nanmean(dim=1, keepdim=True)
    elif estimator == "rloo":
        centred = grouped - (grouped.nansum(dim=1, keepdim=True) - grouped) / (scored - 1).clamp(min=1)
    elif estimator == "passk":
        best = torch.where(valid, grouped, torch.full_like(grouped, -torch.inf))
        top2 = best.topk(min(2, group_size), dim=1).values
        # the best of the others: the group's best, except for the (first) best completion: the runner-up
        is_top = torch.zeros_like(valid).scatter_(1, best.argmax(dim=1, keepdim=True), True)
        centred = top2[:, :1] - torch.where(is_top, top2[:, -1:], top2[:, :1])
    elif estimator == "reinforce_pp":
        centred = grouped
    else:
        raise ValueError(f"advantage: unknown estimator {estimator!r} (grpo, rloo, passk, reinforce_pp, "
                         "reinforce_pp_baseline)")
    counted = valid if estimator == "reinforce_pp" else valid & (scored > 1)  # a baseline needs another reward
    centred = torch.where(counted, centred, torch.zeros_like(centred))
    if scale_rewards == "group":
        advantages = centred / (group_std + eps)
    elif scale_rewards == "batch":
        advantages = centred / ((nan_std(rewards) if batch_std is None else batch_std) + eps)
    elif scale_rewards == "none":
        advantages = centred
    else:
        raise ValueError(f"scale_rewards: unknown value {scale_rewards!r} (group, batch, none)")
    zero_std = group_std < 1e-8
    return advantages.reshape(-1), zero_std.reshape(-1)


def batch_whiten(
    values: torch.Tensor, weights: torch.Tensor,
    batch_values: torch.Tensor | None = None, batch_weights: torch.Tensor | None = None, eps: float = WHITEN_EPS,
) -> torch.Tensor:
    """REINFORCE++ batch normalisation (Hu 2025): ``A_i = (x_i - mu) / sqrt(var + 1e-8)``.

    ``mu`` and ``var`` are the weighted mean and unbiased variance of the whole step's values,
    ``mu = sum_j w_j x_j / W``, ``var = sum_j w_j (x_j - mu)^2 / (W - 1)``, W = sum_j w_j. With
    ``w_i`` = completion i's loss tokens (0 for an unscored one) this is verl's ``masked_whiten`` of
    the outcome advantage broadcast over the tokens. ``batch_values`` / ``batch_weights``: the whole
    step's over all ranks when ``values`` is one rank's share (default: ``values`` / ``weights``).
    A completion with weight 0 gets advantage 0.
    """
    all_values = values if batch_values is None else batch_values
    all_weights = weights if batch_weights is None else batch_weights
    total = all_weights.sum()
    mean = (all_weights * all_values).sum() / total.clamp(min=1e-12)
    var = (all_weights * (all_values - mean) ** 2).sum() / (total - 1).clamp(min=1.0)
    whitened = (values - mean) / torch.sqrt(var + eps)
    return torch.where(weights > 0, whitened, torch.zeros_like(whitened))


def groups_with_signal(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """DAPO dynamic sampling: True for each group whose scored rewards are not all equal ([B / G] bool).

    A group with equal rewards has zero advantage everywhere and only dilutes the batch. A NaN
    (unscorable) reward is left out, as in ``group_advantages``: [1, NaN, 1, 1] has no signal.
    """
    grouped = rewards.view(-1, group_size)
    valid = ~grouped.isnan()
    high = torch.where(valid, grouped, torch.full_like(grouped, -torch.inf)).amax(dim=1)
    low = torch.where(valid, grouped, torch.full_like(grouped, torch.inf)).amin(dim=1)
    return (valid.sum(dim=1) > 1) & ((high - low) > 1e-8)


def overlong_filter(mask: torch.Tensor, truncated: torch.Tensor) -> torch.Tensor:
    """DAPO overlong filtering: drop every token of completions cut at the length limit.

    A truncated completion never got its chance to answer; punishing it teaches brevity by noise.
    """
    return mask * (~truncated.bool())[:, None].to(mask.dtype)


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: KlEstimator = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from the sampled tokens' log-probs, d = logp - ref_logp.

    Schulman 2020, "Approximating KL divergence":
    - k1 = d (unbiased, can be negative; as a loss its expected gradient is 0);
    - k2 = d^2 / 2 (biased, >= 0; as a loss its gradient is the true reverse-KL gradient on-policy);
    - k3 = exp(-d) + d - 1 (unbiased, >= 0; GRPO's choice);
    - low_var_kl = k3 with d clamped to [-20, 20] and the result to [-10, 10] (verl's low_var_kl).
    """
    d = logp - ref_logp
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d**2
    if estimator == "k3":
        return torch.exp(-d) + d - 1
    if estimator == "low_var_kl":
        d = d.clamp(-20.0, 20.0)
        return (torch.exp(-d) + d - 1).clamp(-10.0, 10.0)
    raise ValueError(f"kl_estimator: unknown value {estimator!r} (k1, k2, k3, low_var_kl)")


def kl_penalised_rewards(
    rewards: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, beta: float,
    estimator: KlEstimator = "k3",
) -> torch.Tensor:
    """KL folded into the reward: ``r_i - beta * sum_t kl_t`` over completion i's tokens ([B]).

    The per-token KL penalty of RLHF-PPO (Ouyang et al. 2022; verl ``use_kl_in_reward``), summed
    over the completion because every advantage here is one value per completion; ``logp`` are
    the rollout policy's (old) log-probs, so the penalty carries no gradient.
    """
    return rewards - beta * (kl_estimate(logp, ref_logp, estimator).detach() * mask).sum(dim=1)


def importance_ratio(
    logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor, level: RatioLevel = "token"
) -> torch.Tensor:
    """The ratio pi_theta / pi_old the surrogate clips: [B, T] per token, [B, 1] per sequence.

    - token: ``r_t = exp(logp_t - old_t)`` (PPO / GRPO).
    - sequence: ``s_i = exp(sum_t mask_t (logp_t - old_t) / |y_i|)``, the geometric mean of the token
      ratios over the completion, its gradient through every token (GSPO, Zheng et al. 2025;
      TRL ``importance_sampling_level: sequence``).
    - sequence_token: ``s_i,t = sg[s_i] * exp(logp_t - sg[logp_t])``, the value of ``s_i`` with a
      per-token gradient (GSPO-token; verl ``gspo``). For one advantage per completion it gives
      GSPO's gradient.
    """
    log_ratio = logp - old_logp
    if level == "token":
        return torch.exp(log_ratio)
    sequence = (log_ratio * mask).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1.0)
    if level == "sequence":
        return torch.exp(sequence)
    if level == "sequence_token":
        return torch.exp(sequence.detach() + logp - logp.detach())
    raise ValueError(f"importance_sampling_level: unknown value {level!r} (token, sequence, sequence_token)")


def clipped_surrogate(
    ratio: torch.Tensor, advantages: torch.Tensor, eps_low: float, eps_high: float, clip_ratio_c: float | None = None
) -> torch.Tensor:
    """PPO/GRPO token loss ``-min(rho*A, clip(rho, 1-eps_low, 1+eps_high)*A)`` (Schulman et al. 2017).

    eps_high > eps_low is DAPO's clip-higher. ``clip_ratio_c`` = c > 1 is dual-clip PPO (Ye et al.
    2020, "Mastering complex control in MOBA games"; verl ``clip_ratio_c``): for A < 0 the objective
    is ``max(min(rho*A, clip(rho)*A), c*A)``, so the loss of a token whose ratio ran away upwards is
    capped at ``-c*A`` (and gets no gradient). ``ratio`` is [B, T] or [B, 1] (``importance_ratio``);
    ``advantages`` is [B] (one per completion).
    """
    adv = advantages[:, None]
    loss = -torch.min(ratio * adv, ratio.clamp(1 - eps_low, 1 + eps_high) * adv)
    if clip_ratio_c is not None:
        loss = torch.where(adv < 0, torch.min(loss, -clip_ratio_c * adv), loss)
    return loss


def cispo_surrogate(
    ratio: torch.Tensor, logp: torch.Tensor, advantages: torch.Tensor, eps_low: float, eps_high: float
) -> torch.Tensor:
    """CISPO token loss ``-sg(clip(rho, 1-eps_low, 1+eps_high)) * A * logp`` (MiniMax-M1, 2025).

    The importance weight is clipped and detached instead of the update: REINFORCE weighted by the
    clipped ratio, so a token outside the clip range keeps its gradient ``-w*A``. MiniMax set only
    the upper bound (eps_low = 1 here: no lower bound). ``ratio`` is [B, T] or [B, 1].
    """
    weight = ratio.detach().clamp(1 - eps_low, 1 + eps_high)
    return -weight * advantages[:, None] * logp


def entropy_loss(entropy: torch.Tensor, mask: torch.Tensor, coef: float, batch_tokens: float | None = None
                 ) -> torch.Tensor:
    """Entropy bonus as a loss term: ``-coef * sum_t H_t / N`` (PPO's entropy bonus, Schulman et al. 2017).

    H_t is the policy's entropy at completion token t, N the unmasked tokens of the whole optimizer
    step (``batch_tokens``, over all ranks; default: this micro-batch's), so micro-batches and ranks
    sum to ``-coef x`` the step's mean token entropy, whatever ``loss_type`` is.
    """
    return -coef * aggregate_loss(entropy, mask, "dapo", max_completion_length=1, batch_tokens=batch_tokens)


def rollout_importance_weights(
    trainer_logp: torch.Tensor,
    rollout_logp: torch.Tensor,
    mask: torch.Tensor,
    mode: ImportanceCorrection,
    cap: float,
) -> torch.Tensor:
    """Importance weights ``pi_trainer / pi_rollout`` for the rollout engine's sampling mismatch.

    The engine (vLLM, bf16, other kernels) samples from a slightly different distribution than the
    trainer's forward. Truncated importance sampling (Yao et al. 2025, "Your efficient RL framework
    secretly brings you off-policy RL training") reweights each token loss by that ratio:
    ``*_truncate`` caps it at ``cap``; ``*_mask`` zeroes the ones outside ``[1/cap, cap]``.
    ``token_*`` uses per-token ratios ([B, T]); ``sequence_*`` the product over the completion
    ([B, 1]). Weights carry no gradient. "none" returns ones.
    """
    if mode == "none":
        return torch.ones_like(trainer_logp)
    log_ratio = (trainer_logp - rollout_logp).detach() * mask
    if mode.startswith("sequence"):
        log_ratio = log_ratio.sum(dim=1, keepdim=True)
    ratio = torch.exp(log_ratio.clamp(max=20.0))
    if mode.endswith("truncate"):
        return ratio.clamp(max=cap)
    if mode.endswith("mask"):
        return torch.where((ratio <= cap) & (ratio >= 1.0 / cap), ratio, torch.zeros_like(ratio))
    raise ValueError(f"importance_correction: unknown mode {mode!r}")


def aggregate_loss(
    token_loss: torch.Tensor,
    mask: torch.Tensor,
    loss_type: LossType,
    *,
    max_completion_length: int,
    batch_sequences: int | None = None,
    batch_tokens: float | None = None,
    micro_batches: int = 1,
) -> torch.Tensor:
    """Reduce [B, T] token losses of one micro-batch to the scalar whose sum over micro-batches is the loss.

    ``batch_sequences`` / ``batch_tokens`` / ``micro_batches`` are the completions / unmasked tokens /
    micro-batches of the whole optimizer step over all ranks (default: this micro-batch), so
    gradient accumulation and data parallelism give the same gradient as one big batch:
    - grpo:    mean over each sequence's tokens, then mean over sequences (GRPO paper).
    - bnpo:    sum / tokens of this micro-batch, averaged over all micro-batches (TRL's bnpo).
    - dapo:    sum / tokens of the whole optimizer step (DAPO's token-level loss).
    - dr_grpo: sum / (sequences * max_completion_length) (Dr. GRPO, no length bias).
    A [B, 1] loss (a sequence-level ratio) counts once per unmasked token.
    """
    masked = token_loss * mask
    sequences = batch_sequences if batch_sequences is not None else token_loss.shape[0]
    if loss_type == "grpo":
        return (masked.sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)).sum() / sequences
    if loss_type == "bnpo":
        return masked.sum() / mask.sum().clamp(min=1.0) / micro_batches
    if loss_type == "dapo":
        tokens = batch_tokens if batch_tokens is not None else mask.sum()
        return masked.sum() / max(float(tokens), 1.0)
    if loss_type == "dr_grpo":
        return masked.sum() / (sequences * max_completion_length)
    raise ValueError(f"loss_type: unknown value {loss_type!r} (grpo, bnpo, dr_grpo, dapo)")


def grpo_token_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    *,
    eps_low: float,
    eps_high: float,
    mask: torch.Tensor | None = None,
    policy_loss: PolicyLoss = "clip",
    level: RatioLevel = "token",
    clip_ratio_c: float | None = None,
    beta: float = 0.0,
    kl_estimator: KlEstimator = "k3",
    ref_logp: torch.Tensor | None = None,
    importance_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token objective: ``w * surrogate(ratio) + beta * kl`` ([B, T]).

    ``ratio`` from ``importance_ratio`` at ``level`` (``mask`` [B, T] for the sequence levels;
    default: every token); ``surrogate`` is ``clipped_surrogate`` (policy_loss "clip", dual-clipped
    with ``clip_ratio_c``) or ``cispo_surrogate``; ``kl`` is ``kl_estimate`` by ``kl_estimator``.
    ``importance_weights`` (from ``rollout_importance_weights``) multiply the policy-gradient term
    only; the KL term is exact on the trainer side. beta > 0 needs ``ref_logp``.
    """
    mask = torch.ones_like(logp) if mask is None else mask
    ratio = importance_ratio(logp, old_logp, mask, level)
    if policy_loss == "clip":
        loss = clipped_surrogate(ratio, advantages, eps_low, eps_high, clip_ratio_c)
    elif policy_loss == "cispo":
        if clip_ratio_c is not None:
            raise ValueError("clip_ratio_c: dual-clip applies to policy_loss 'clip', not 'cispo'")
        loss = cispo_surrogate(ratio, logp, advantages, eps_low, eps_high)
    else:
        raise ValueError(f"policy_loss: unknown value {policy_loss!r} (clip, cispo)")
    loss = loss.expand_as(logp)
    if importance_weights is not None:
        loss = loss * importance_weights
    if beta > 0:
        if ref_logp is None:
            raise ValueError("beta > 0 needs reference log-probs (ref_logp)")
        loss = loss + beta * kl_estimate(logp, ref_logp, kl_estimator)
    return loss


def policy_stats(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float,
    eps_high: float,
    policy_loss: PolicyLoss = "clip",
    level: RatioLevel = "token",
    clip_ratio_c: float | None = None,
    kl_estimator: KlEstimator = "k3",
    ref_logp: torch.Tensor | None = None,
) -> dict[str, float]:
    """Policy-gradient diagnostics over unmasked tokens (the printed loss is ~0 when mu=1, beta=0).

    Token means: clip_low / clip_high, the share of tokens clipped on each side (clip: the clipped
    term is active, no gradient: rho < 1-eps_low with A < 0, rho > 1+eps_high with A > 0; cispo: the
    IS weight is clipped, whatever the sign of A); clip_dual: tokens whose dual-clip cap is active
    (A < 0, rho > c); clip_fraction = low + high + dual; ratio_mean; ppo_kl = mean(old - logp), the
    k1 estimate of KL(pi_old || pi_theta) (verl's ppo_kl); kl: the ``kl_estimator`` to the reference
    (when given). Extrema (keys ending in _min / _max: reduce them with min / max, not a mean; absent
    without unmasked tokens): ratio_min, ratio_max. A sequence-level ratio counts once per token.
    """
    with torch.no_grad():
        ratio = importance_ratio(logp, old_logp, mask, level).expand_as(logp)
        adv = advantages[:, None].expand_as(ratio)
        tokens = mask.sum().clamp(min=1.0)
        below, above = ratio < 1 - eps_low, ratio > 1 + eps_high
        if policy_loss == "clip":
            below, above = below & (adv < 0), above & (adv > 0)
        dual = (adv < 0) & (ratio > clip_ratio_c) if clip_ratio_c is not None else torch.zeros_like(below)

        def mean(values: torch.Tensor) -> float:
            return float((values.float() * mask).sum() / tokens)

        real = mask > 0
        stats = {
            "clip_low": mean(below),
            "clip_high": mean(above),
            "clip_dual": mean(dual),
            "ratio_mean": mean(ratio),
            "ppo_kl": mean(old_logp - logp),
        }
        if real.any():
            stats.update(ratio_min=float(ratio[real].min()), ratio_max=float(ratio[real].max()))
        stats["clip_fraction"] = stats["clip_low"] + stats["clip_high"] + stats["clip_dual"]
        if ref_logp is not None:
            stats["kl"] = mean(kl_estimate(logp, ref_logp, kl_estimator))
    return stats
