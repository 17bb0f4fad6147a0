"""Deterministic splits and small loader helpers.

``split(n, fractions, seed)`` permutes ``range(n)`` with a seeded generator and cuts
it into consecutive, disjoint pieces whose sizes follow ``fractions``::

    sizes_i = floor(f_i · n), the remainder (< number of parts) given to the first parts

so the same ``(n, fractions, seed)`` always yields the same indices, on any machine.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset

__all__ = ["Splits", "split", "split_tensors", "loader", "infinite_loader", "as_tensors", "take"]


@dataclass
class Splits:
    """Train / validation / test datasets (``val`` may be empty) and label names.

    Unpacks like a tuple: ``train, val, test = splits``.
    """

    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    classes: List[str] = field(default_factory=list)
    info: Dict[str, Any] = field(default_factory=dict)

    def __iter__(self):
        return iter((self.train, self.val, self.test))


def split(n: int, fractions: Sequence[float], seed: int = 0) -> List[Tensor]:
    """Disjoint random index sets covering ``range(n)``.

    Args:
        n: number of items.
        fractions: non-negative fractions, one per part, summing to 1.
        seed: seed of the permutation.

    Returns:
        One ``LongTensor`` of indices per fraction; together a permutation of ``range(n)``.
    """
    fractions = [float(f) for f in fractions]
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not fractions or any(f < 0 for f in fractions):
        raise ValueError(f"fractions must be non-negative, got {fractions}")
    if not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise ValueError(f"fractions must sum to 1, got {fractions} (sum {sum(fractions)})")
    sizes = [int(math.floor(f * n)) for f in fractions]
    for i in range(n - sum(sizes)):  # leftover items, at most len(fractions) - 1 of them
        sizes[i % len(sizes)] += 1
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=g, device="cpu")   # host indices, whatever the default device
    return list(torch.split(perm, sizes))


def split_tensors(tensors: Sequence[Tensor], fractions: Sequence[float], seed: int = 0) -> List[TensorDataset]:
    """``split`` applied to aligned tensors; one ``TensorDataset`` per fraction."""
    n = len(tensors[0])
    if any(len(t) != n for t in tensors):
        raise ValueError("all tensors must have the same length")
    return [TensorDataset(*(t[idx] for t in tensors)) for idx in split(n, fractions, seed)]


def as_tensors(data) -> tuple:
    """``(x, y, ...)`` tensors from a ``TensorDataset`` or a tuple/list of tensors."""
    if isinstance(data, TensorDataset):
        return tuple(data.tensors)
    if isinstance(data, (tuple, list)) and all(isinstance(t, Tensor) for t in data):
        return tuple(data)
    raise TypeError(f"expected a TensorDataset or a tuple of tensors, got {type(data).__name__}")


def loader(dataset: Dataset, batch_size: int, seed: int = 0, shuffle: bool = True,
           drop_last: bool = False) -> DataLoader:
    """A single-process ``DataLoader`` whose shuffling order is fixed by ``seed``."""
    g = torch.Generator().manual_seed(int(seed))
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                      generator=g, num_workers=0)


def infinite_loader(data, batch_size: int, seed: int = 0, shuffle: bool = True,
                    drop_last: bool = True) -> Iterator[tuple]:
    """Endless stream of batches (tuples of tensors) from in-memory tensors.

    Epoch ``e`` uses the permutation seeded by ``seed + e``; with ``drop_last`` every
    batch has exactly ``batch_size`` rows (unless the data is smaller than that). The
    permutation is drawn on the CPU (the same batches on any device); batches are
    gathered on each tensor's own device.
    """
    tensors = as_tensors(data)
    n = len(tensors[0])
    if n == 0:
        raise ValueError("cannot loop over an empty dataset")
    bs = min(batch_size, n)
    epoch = 0
    while True:
        if shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed) + epoch),
                                   device="cpu")
        else:
            order = torch.arange(n, device="cpu")
        # The (seeded, host) order once per epoch on each tensor's device: batches are
        # gathered where the data lives, without a host index copy per batch.
        on = {t.device: order.to(t.device) for t in tensors}
        stop = n - n % bs if drop_last else n
        for i in range(0, stop, bs):
            yield tuple(t[on[t.device][i:i + bs]] for t in tensors)
        epoch += 1


def take(data: TensorDataset, limit: Optional[int]) -> TensorDataset:
    """The first ``limit`` rows (all if ``None``)."""
    if limit is None:
        return data
    return TensorDataset(*(t[:limit] for t in data.tensors))
