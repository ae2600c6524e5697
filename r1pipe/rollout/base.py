"""What every rollout engine takes and returns, so the GRPO stage never knows which one runs."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class SamplingSettings:
    """Sampling for one rollout batch: ``n`` completions per prompt (the GRPO group size)."""

    n: int
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop_token_ids: tuple[int, ...] = ()


@dataclass
class Completion:
    """One sampled completion.

    ``logprobs`` are the engine's log-probs of the sampled tokens under the distribution it sampled
    from (temperature applied), used for the rollout/trainer importance-sampling correction.
    ``truncated`` is True when generation stopped at ``max_tokens`` rather than at a stop token.
    ``routes`` (MoE policies, when asked) feed routing replay: the trainer's forward over the same
    tokens then uses the rollout's experts.
    """

    prompt_index: int
    token_ids: list[int]
    logprobs: list[float]
    truncated: bool
    # routing replay (R3), engines that record it: the experts each token of prompt + completion was routed
    # to in every decoder MoE layer [P + C, layers, K] (int16), -1 for a token the engine never fed
    routes: torch.Tensor | None = None


class RolloutEngine(Protocol):
    """generate -> completions prompt-major (the n of prompt 0, then prompt 1, ...); push_weights after
    each round of updates (it also wakes a sleeping engine) and returns the seconds it took; sleep frees
    accelerator memory for training where the engine supports it and is a no-op elsewhere.
    ``last_acceptance_rate``: the share of drafted tokens the last generate accepted (MTP speculative
    decoding), None for an engine that does not draft."""

    last_acceptance_rate: float | None

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingSettings, seed: int) -> list[Completion]: ...

    def push_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> float: ...

    def sleep(self) -> None: ...

    def close(self) -> None: ...
