"""Deterministic batch order: one seeded permutation per epoch, addressed by the step number.

Because batch ``step`` is a pure function of (seed, step), resuming at a step replays exactly
the batches an uninterrupted run would have seen: no sample is repeated or skipped.

With several processes and gradient accumulation the global batch of a step is cut into
``world_size * accumulation`` equal micro-batches: micro-batch ``j`` holds positions
``[j * m, (j + 1) * m)`` of the batch and rank ``r`` takes ``j = r * accumulation + a`` for
``a < accumulation``. The ranks share the global batch, not the dataset, so the split is exact
whatever the dataset size.
"""
from __future__ import annotations

import numpy as np
import torch

from ..config import ConfigError


def split_global_batch(global_batch: int, world_size: int, micro_batch: int | None) -> tuple[int, int]:
    """(micro-batch size, accumulation steps) that cover ``global_batch`` with ``world_size`` processes.

    ``micro_batch=None`` means one micro-batch per process. Raises ConfigError naming the keys
    when the numbers do not divide.
    """
    if global_batch % world_size:
        raise ConfigError(f"train.global_batch: {global_batch} is not divisible by the {world_size} processes")
    per_rank = global_batch // world_size
    micro = per_rank if micro_batch is None else micro_batch
    if per_rank % micro:
        raise ConfigError(f"train.micro_batch: {micro} does not divide the {per_rank} samples per process "
                          f"(train.global_batch={global_batch} over {world_size} processes)")
    return micro, per_rank // micro


def micro_batch_seed(seed: int, step: int, index: int) -> int:
    """RNG seed of micro-batch ``index`` of step ``step``: noise, masks and dropout of a sample then
    depend on its place in the global batch, not on how many processes share the batch."""
    return int(np.random.SeedSequence([seed, step, index]).generate_state(1, np.uint64)[0])


class EpochBatches:
    """Indices of batch ``step`` for a dataset of ``size`` samples (the last partial batch of an
    epoch is dropped, so every batch has ``batch_size`` samples)."""

    def __init__(self, size: int, batch_size: int, seed: int):
        if batch_size > size:
            raise ValueError(f"batch size {batch_size} is larger than the dataset ({size} samples)")
        self.size = size
        self.batch_size = batch_size
        self.seed = seed
        self.batches_per_epoch = size // batch_size
        self._epoch = -1
        self._perm = torch.empty(0, dtype=torch.long)

    def epoch_permutation(self, epoch: int) -> torch.Tensor:
        """(size,) int64: the order of epoch ``epoch``."""
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._epoch = torch.randperm(self.size, generator=g), epoch
        return self._perm

    def __call__(self, step: int) -> torch.Tensor:
        """(batch_size,) int64 indices of the batch used at ``step`` (0-based)."""
        epoch, index = divmod(step, self.batches_per_epoch)
        start = index * self.batch_size
        return self.epoch_permutation(epoch)[start:start + self.batch_size]

    def micro_batches(self, step: int, rank: int, world_size: int, accumulation: int) -> list[tuple[int, torch.Tensor]]:
        """Rank ``rank``'s share of batch ``step``: ``accumulation`` pairs (micro-batch index j in the
        global batch, (m,) int64 indices), m = batch_size / (world_size * accumulation)."""
        parts = world_size * accumulation
        if self.batch_size % parts:
            raise ValueError(f"batch size {self.batch_size} does not split into {parts} equal micro-batches")
        m = self.batch_size // parts
        batch = self(step)
        first = rank * accumulation
        return [(j, batch[j * m:(j + 1) * m]) for j in range(first, first + accumulation)]
