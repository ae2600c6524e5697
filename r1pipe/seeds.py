"""Deterministic randomness the stages share: seeds derived from the run seed, epoch-shuffled orders.

Both are functions of their arguments only, so a resumed run samples and visits exactly what an
uninterrupted one would have, whatever the point it was interrupted at.
"""

from __future__ import annotations

import numpy as np


def derive_seed(run_seed: int, position: int, *, source: int = 0, round_index: int = 0, rank: int = 0) -> int:
    """The sampling seed of one unit of work: its `position` in the run (the optimizer step, or the chunk of
    prompts), the `source` it draws from (e.g. which benchmark), the dynamic-sampling round within a step and
    the data-parallel rank; a 31-bit value, as engines take."""
    return (run_seed * 1_000_003 + source * 104_729 + position * 7919 + round_index * 131 + rank) % 2**31


class EpochOrder:
    """The order in which `count` items are visited, epoch after epoch: each epoch a permutation drawn from
    `seed + epoch` (in order without `shuffle`). `order[position]` is the item visited `position`-th overall."""

    def __init__(self, count: int, seed: int, shuffle: bool):
        self.count, self.seed, self.shuffle = count, seed, shuffle
        self._epoch, self._order = -1, None

    def __getitem__(self, position: int) -> int:
        epoch, offset = divmod(position, self.count)
        if epoch != self._epoch:
            rng = np.random.default_rng(self.seed + epoch)
            self._order = rng.permutation(self.count) if self.shuffle else np.arange(self.count)
            self._epoch = epoch
        return int(self._order[offset])
