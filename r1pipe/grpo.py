"""GRPO maths: each equation of GRPO / DAPO / Dr. GRPO as one function on plain tensors.

Shapes: B completions (G per prompt, prompts contiguous), T completion tokens (right padded);
``mask`` [B, T] is 1 on real completion tokens. Log-probs are per sampled token ([B, T]).

The stage (``r1pipe.stages.grpo``) composes them; nothing here knows about models or engines, so
every function is checked against a hand computation in tests/test_grpo_loss.py.
"""
from __future__ import annotations

from typing import Literal

import torch

LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]
ScaleRewards = Literal["group", "batch", "none"]
ImportanceCorrection = Literal["none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]

ADVANTAGE_EPS = 1e-4


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
    batch_std: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO advantage ``A_i = (r_i - mean_group(r)) / (std + eps)``, one value per completion.

    ``scale_rewards``: "group" divides by the group's std (GRPO), "batch" by the std of the whole
    batch (more robust when groups are nearly uniform), "none" does not divide (Dr. GRPO).
    ``batch_std``: the std of the whole optimizer step's rewards when ``rewards`` is one rank's share
    of it (default: the std of ``rewards``).
    A NaN reward (a completion no reward could score, e.g. an unparseable gold answer) is left out of
    its group's mean/std and gets advantage 0, so it neither teaches nor biases the baseline.
    Returns (advantages [B], zero_std [B] bool: the completion's group has no reward spread).
    """
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards: expected a flat tensor of groups of {group_size}, got shape {tuple(rewards.shape)}")
    grouped = rewards.view(-1, group_size)
    group_mean = grouped.nanmean(dim=1, keepdim=True)
    group_std = nan_std(grouped, dim=1)[:, None].expand_as(grouped)
    centred = grouped - group_mean
    if scale_rewards == "group":
        advantages = centred / (group_std + eps)
    elif scale_rewards == "batch":
        advantages = centred / ((nan_std(rewards) if batch_std is None else batch_std) + eps)
    elif scale_rewards == "none":
        advantages = centred
    else:
        raise ValueError(f"scale_rewards: unknown value {scale_rewards!r} (group, batch, none)")
    zero_std = group_std < 1e-8
    return advantages.nan_to_num(0.0).reshape(-1), zero_std.reshape(-1)


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


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi || ref) per token: ``exp(ref - logp) - (ref - logp) - 1`` >= 0."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


def clipped_surrogate(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, eps_low: float, eps_high: float
) -> torch.Tensor:
    """PPO/GRPO token loss ``-min(rho*A, clip(rho, 1-eps_low, 1+eps_high)*A)``, rho = exp(logp - old).

    eps_high > eps_low is DAPO's clip-higher. ``advantages`` is [B] (one per completion).
    """
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None]
    return -torch.min(ratio * adv, ratio.clamp(1 - eps_low, 1 + eps_high) * adv)


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
    beta: float = 0.0,
    ref_logp: torch.Tensor | None = None,
    importance_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token GRPO objective: ``w * clipped_surrogate + beta * k3`` ([B, T]).

    ``importance_weights`` (from ``rollout_importance_weights``) multiply the policy-gradient term
    only; the KL term is exact on the trainer side. beta > 0 needs ``ref_logp``.
    """
    loss = clipped_surrogate(logp, old_logp, advantages, eps_low, eps_high)
    if importance_weights is not None:
        loss = loss * importance_weights
    if beta > 0:
        if ref_logp is None:
            raise ValueError("beta > 0 needs reference log-probs (ref_logp)")
        loss = loss + beta * k3_kl(logp, ref_logp)
    return loss


def policy_stats(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float,
    eps_high: float,
    ref_logp: torch.Tensor | None = None,
) -> dict[str, float]:
    """Policy-gradient diagnostics over unmasked tokens (the printed loss is ~0 when mu=1, beta=0).

    clip_low / clip_high: share of tokens whose clipped term is active (no gradient) on each side;
    kl: mean k3 to the reference (when given); ratio_mean: mean of rho.
    """
    with torch.no_grad():
        ratio = torch.exp(logp - old_logp)
        adv = advantages[:, None].expand_as(ratio)
        tokens = mask.sum().clamp(min=1.0)
        low = ((ratio < 1 - eps_low) & (adv < 0)).float()
        high = ((ratio > 1 + eps_high) & (adv > 0)).float()
        stats = {
            "clip_low": float((low * mask).sum() / tokens),
            "clip_high": float((high * mask).sum() / tokens),
            "ratio_mean": float((ratio * mask).sum() / tokens),
        }
        stats["clip_fraction"] = stats["clip_low"] + stats["clip_high"]
        if ref_logp is not None:
            stats["kl"] = float((k3_kl(logp, ref_logp) * mask).sum() / tokens)
    return stats
