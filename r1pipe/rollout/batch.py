"""What a GRPO rollout becomes for training: each prompt's scored group, the batch of right-padded
sequences built from them, and the policy's log-probs over those sequences.

    groups = [RolloutGroup(prompt_index, completions, rewards, per_reward), ...]
    batch = RolloutBatch(advantages=..., **pack_sequences(prompt_ids, completions, pad_id))
    for micro in batch.micro_batches(micro_batch_size): ...   # dicts of [micro, length] tensors
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from r1pipe.rollout.base import Completion


@dataclass
class RolloutGroup:
    """One prompt's G completions as scored: what dynamic sampling keeps, or keeps aside as a spare."""

    prompt_index: int
    completions: list[Completion]
    rewards: torch.Tensor  # [G] total reward; NaN where no reward could score the completion
    per_reward: dict[str, list[float]]  # each reward's G scores (NaN: could not score)


@dataclass
class RolloutBatch:
    """One rollout batch as right-padded sequences (prompt + completion), token tensors aligned to them.

    ``completion_mask`` marks the completion tokens that carry loss; ``rollout_logp`` the engine's
    log-probs there; ``advantages`` one value per sequence. ``old_logp`` fills at the first update.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor
    rollout_logp: torch.Tensor
    advantages: torch.Tensor
    ref_logp: torch.Tensor | None = None
    routes: torch.Tensor | None = None  # the engine's experts per token [B, L, MoE layers, K] (routing replay R3)
    old_logp: list[torch.Tensor | None] = field(default_factory=list)
    old_routes: list[torch.Tensor | None] = field(default_factory=list)  # per micro batch, first forward's (R2)

    def micro_batches(self, size: int) -> list[dict]:
        out = []
        for index, start in enumerate(range(0, len(self.input_ids), size)):
            rows = slice(start, start + size)
            length = int(self.attention_mask[rows].sum(1).max())
            part = {
                "input_ids": self.input_ids[rows, :length],
                "attention_mask": self.attention_mask[rows, :length],
                "completion_mask": self.completion_mask[rows, :length],
                "rollout_logp": self.rollout_logp[rows, :length],
                "advantages": self.advantages[rows],
                "index": index,
            }
            if self.ref_logp is not None:
                part["ref_logp"] = self.ref_logp[rows, :length]
            if self.routes is not None:
                part["routes"] = self.routes[rows, :length]
            out.append(part)
        if len(self.old_logp) != len(out):
            self.old_logp = [None] * len(out)
        if len(self.old_routes) != len(out):
            self.old_routes = [None] * len(out)
        return out

    def full_width(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """Per-micro-batch [micro, length] tensors (trimmed to each micro batch's length) as one [B, L]."""
        width = self.input_ids.shape[1]
        return torch.cat([torch.nn.functional.pad(part, (0, width - part.shape[1])) for part in parts])

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def pack_sequences(prompts: list[list[int]], completions: list[Completion], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded prompt+completion ids with masks; engine log-probs placed at completion positions."""
    length = max(len(p) + len(c.token_ids) for p, c in zip(prompts, completions, strict=True))
    n = len(completions)
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(n, length, dtype=torch.long)
    completion_mask = torch.zeros(n, length)
    rollout_logp = torch.zeros(n, length)
    recorded = [c.routes for c in completions if c.routes is not None]
    routes = torch.full((n, length, *recorded[0].shape[1:]), -1, dtype=torch.int16) if recorded else None
    for row, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        p, c = len(prompt), len(completion.token_ids)
        input_ids[row, : p + c] = torch.tensor(prompt + completion.token_ids, dtype=torch.long)
        attention_mask[row, : p + c] = 1
        completion_mask[row, p : p + c] = 1
        if completion.logprobs:
            rollout_logp[row, p : p + c] = torch.tensor(completion.logprobs)
        if routes is not None:
            routes[row, : len(completion.routes)] = completion.routes
    packed = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "completion_mask": completion_mask,
        "rollout_logp": rollout_logp,
    }
    if routes is not None:  # the engine's experts per token (routing replay), -1 where it recorded none
        packed["routes"] = routes
    return packed


def sequence_logprobs(policy, batch: dict, temperature: float, chunk_size: int,
                      aux_labels: torch.Tensor | None = None, return_entropy: bool = True,
                      routes: torch.Tensor | None = None, return_routes: bool = False):
    """Log-prob and entropy of every completion token given its prefix under logits / temperature,
    aligned to input_ids ([B, L]; prompt and padding positions get 0). The policy projects only the
    completion positions onto the vocabulary, in chunks of `chunk_size` tokens: never a [B, L, V] fp32
    tensor. With `aux_labels` a V3 policy also returns its MTP + balance loss on them (None for dense
    models) and those metrics; `routes` replays recorded experts, `return_routes` returns the ones used.
    -> r1pipe.model.policy.TokenScores, logp and entropy aligned to input_ids."""
    mask = batch["attention_mask"]
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    scores = policy.token_logprobs_and_aux(
        batch["input_ids"], mask, position_ids, chunk_size=chunk_size, temperature=temperature,
        return_entropy=return_entropy, aux_labels=aux_labels, only=batch["completion_mask"][:, 1:].bool(),
        routes=routes, return_routes=return_routes,
    )
    pad = torch.nn.functional.pad
    scores.logp = pad(scores.logp, (1, 0))
    scores.entropy = pad(scores.entropy, (1, 0)) if return_entropy else None
    return scores
