"""Batches for training and evaluation, from raw images or from the feature cache.

:class:`PairCollator` turns a list of :class:`Pair` (raw images, preprocessed with the model's
``preprocess``) or :class:`CachedPair` (cached backbone features) into a :class:`Batch`, removing
:class:`Skipped` markers and carrying them in ``Batch.skipped`` so the main process can count skips made
inside DataLoader workers. :func:`build_dataloader` wires a source to a DataLoader with a resumable,
rank-aware sampler for map-style sources.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, Sampler

from lexvla.data.cache import CachedPair
from lexvla.data.sources import Pair, Skipped


@dataclass
class Batch:
    """One batch of pairs. Exactly one of ``pixels`` / ``features`` / ``images`` is set.

    ``pixels``: (B, 3, H, W) preprocessed images; ``features``: (B, P, C) float32 cached backbone features;
    ``images``: the decoded PIL images when no preprocess function was given.
    """

    captions: list[str]
    ids: list[str]
    image_ids: list[str]
    pixels: torch.Tensor | None = None
    features: torch.Tensor | None = None
    images: list[Any] | None = None
    skipped: list[Skipped] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """Tensors moved to ``device`` (Accelerate's ``send_to_device`` calls this)."""
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return t.to(device, non_blocking=non_blocking) if t is not None else None

        return replace(self, pixels=move(self.pixels), features=move(self.features))


class PairCollator:
    """Collate pairs into a :class:`Batch`.

    ``preprocess(list_of_PIL) -> (B, 3, H, W)`` is the model's preprocess (runs in the DataLoader
    worker). A batch whose every sample was skipped comes back with ``len(batch) == 0``.
    """

    def __init__(self, preprocess: Callable[[list[Any]], torch.Tensor] | None = None) -> None:
        self.preprocess = preprocess

    def __call__(self, items: Sequence[Pair | CachedPair | Skipped]) -> Batch:
        skipped = [i for i in items if isinstance(i, Skipped)]
        good = [i for i in items if not isinstance(i, Skipped)]
        kinds = {type(i) for i in good}
        if len(kinds) > 1:
            raise TypeError(f"a batch mixes {sorted(k.__name__ for k in kinds)}; use one source kind per loader")
        for i in good:
            if not isinstance(i, (Pair, CachedPair)):
                raise TypeError(f"cannot collate {type(i).__name__}; sources must yield Pair or CachedPair")
        batch = Batch(captions=[i.caption for i in good], ids=[i.id for i in good],
                      image_ids=[i.image_id for i in good], skipped=skipped)
        if not good:
            return batch
        if isinstance(good[0], CachedPair):
            # numpy stacking, then one conversion: torch.stack of many small tensors with intra-op threads
            # was 50x slower on a loaded 2-core machine
            batch.features = torch.from_numpy(np.stack([i.features.numpy() for i in good])).float()
        elif self.preprocess is not None:
            batch.pixels = self.preprocess([i.image for i in good])
        else:
            batch.images = [i.image for i in good]
        return batch


class EpochSampler(Sampler[int]):
    """Deterministic per-epoch order (seed + epoch), split across ranks, resumable mid-epoch.

    Rank ``r`` of ``world_size`` takes every ``world_size``-th index of the epoch's order (padded by
    wrapping, as DistributedSampler does, so all ranks get the same count). ``set_start(k)`` skips this
    rank's first ``k`` indices of the current epoch (to resume from a checkpoint).
    """

    def __init__(self, length: int, shuffle: bool = True, seed: int = 0, rank: int = 0,
                 world_size: int = 1) -> None:
        if length < 1:
            raise ValueError("cannot sample from an empty dataset")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.length, self.shuffle, self.seed = length, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.start = epoch, 0

    def set_start(self, start: int) -> None:
        self.start = start

    def per_rank(self) -> int:
        return math.ceil(self.length / self.world_size)

    def __len__(self) -> int:
        return max(0, self.per_rank() - self.start)

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.length, generator=g).tolist()
        else:
            order = list(range(self.length))
        total = self.per_rank() * self.world_size
        order += order[: total - len(order)] if total > len(order) else []
        mine = order[self.rank:total:self.world_size]
        return iter(mine[self.start:])


def build_dataloader(
    source: Any,
    batch_size: int,
    preprocess: Callable[[list[Any]], torch.Tensor] | None = None,
    shuffle: bool = True,
    seed: int = 0,
    num_workers: int = 0,
    drop_last: bool = False,
    rank: int = 0,
    world_size: int = 1,
    persistent_workers: bool = False,
) -> DataLoader:
    """A DataLoader of :class:`Batch` over a pair source (raw, cached or streamed).

    Map-style sources get an :class:`EpochSampler` (reach it as ``loader.sampler`` to call
    ``set_epoch``/``set_start``); ``rank``/``world_size`` split them across processes. Iterable sources
    (tar shards) split themselves, so ``shuffle``/``rank`` do not apply to them.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    collate = PairCollator(preprocess)
    common: dict[str, Any] = {"batch_size": batch_size, "collate_fn": collate, "num_workers": num_workers,
                              "drop_last": drop_last,
                              "persistent_workers": persistent_workers and num_workers > 0}
    if isinstance(source, IterableDataset):
        return DataLoader(source, **common)
    sampler = EpochSampler(len(source), shuffle=shuffle, seed=seed, rank=rank, world_size=world_size)
    return DataLoader(source, sampler=sampler, **common)
