"""A shuffling sampler that can start mid-epoch and splits work across ranks itself, so a resumed (or requeued)
run sees exactly the samples an uninterrupted run would have seen next."""

from typing import Iterator

import torch
from torch.utils.data import Sampler


class ResumableShuffleSampler(Sampler[int]):
    """Epoch ``e`` is the permutation seeded by ``seed + e`` (or the identity when ``shuffle`` is False), truncated
    to a multiple of ``world_size``; rank ``r`` takes positions ``r, r + world_size, ...`` after ``start`` global
    samples have been skipped (``start`` applies to the first epoch iterated after it is set)."""

    def __init__(self, num_samples: int, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        self.num_samples, self.seed, self.shuffle = num_samples, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_at(self, epoch: int, start: int) -> None:
        self.epoch, self.start = epoch, start

    def _order(self) -> torch.Tensor:
        usable = self.num_samples - self.num_samples % self.world_size
        if self.shuffle:
            order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.num_samples)
        return order[:usable]

    def __iter__(self) -> Iterator[int]:
        order = self._order()[self.start:]
        self.start = 0
        return iter(order[self.rank::self.world_size].tolist())

    def __len__(self) -> int:
        return (self.num_samples - self.num_samples % self.world_size - self.start) // self.world_size
