"""Deterministic batch order: one seeded permutation per epoch, addressed by the step number.

Because batch ``step`` is a pure function of (seed, step), resuming at a step replays exactly
the batches an uninterrupted run would have seen: no sample is repeated or skipped.
"""
from __future__ import annotations

import torch


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
