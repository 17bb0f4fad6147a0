"""Batched image augmentation on tensors: random crop with zero padding + horizontal flip.

``random_crop_flip`` is torchvision's ``RandomCrop(H, padding=p) + RandomHorizontalFlip()``
(the official MLO-MAE CIFAR pipeline) for a whole batch at once, on the batch's device,
with no Python loop over samples: each image is padded by ``p`` pixels of ``fill`` on
every side and an ``H × W`` window at a random offset ``(dy, dx) ∈ [0, 2p]²`` is read
out of it (two ``gather``s), then mirrored left-right with probability ½::

    x   [N, C, H, W]
    pad [N, C, H+2p, W+2p]                        F.pad(x, (p, p, p, p), value=fill)
    out[n, c, i, j] = pad[n, c, dy_n + i, dx_n + j']     j' = W-1-j if flip_n else j

``augment_stream`` applies it to the first tensor of every batch of a data stream,
drawing from a ``torch.Generator`` the stream owns (seeded, created on the first
batch's device): the same seed gives the same batches, and the global RNG is not
touched (turning augmentation on changes nothing else in a run).
"""
from __future__ import annotations

from typing import Iterable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["random_crop_flip", "augment_stream"]


def random_crop_flip(x: Tensor, padding: int = 4, flip: bool = True,
                     generator: Optional[torch.Generator] = None, fill: float = 0.0) -> Tensor:
    """Per-sample random crop of the ``fill``-padded images and random horizontal flip.

    Args:
        x: images ``[N, C, H, W]`` (any dtype; pixels in [0, 1] for the CIFAR pipeline,
            whose padding is black, ``fill = 0``).
        padding: ``p``, pixels added on each side before cropping (0: no crop).
        flip: mirror each image left-right with probability ½.
        generator: the random stream (on ``x``'s device); the default RNG if None.
        fill: value of the padding pixels.

    Returns:
        ``[N, C, H, W]``, same dtype and device as ``x``. Draws, in this order,
        ``dy [N]``, ``dx [N]`` (when ``padding > 0``) and ``u [N]`` (when ``flip``).
    """
    if x.dim() != 4:
        raise ValueError(f"random_crop_flip expects images [N, C, H, W], got shape {tuple(x.shape)}")
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"random_crop_flip: padding must be an integer >= 0, got {padding!r}")
    n, c, h, w = x.shape
    dev = x.device
    rows = torch.arange(h, device=dev).expand(n, h)              # [N, H]
    cols = torch.arange(w, device=dev).expand(n, w)              # [N, W]
    if padding:
        dy = torch.randint(0, 2 * padding + 1, (n, 1), generator=generator, device=dev)  # [N, 1]
        dx = torch.randint(0, 2 * padding + 1, (n, 1), generator=generator, device=dev)  # [N, 1]
        rows, cols = rows + dy, cols + dx
        x = F.pad(x, (padding, padding, padding, padding), value=fill)   # [N, C, H+2p, W+2p]
    if flip:
        mirror = torch.rand(n, 1, generator=generator, device=dev) < 0.5  # [N, 1]
        cols = torch.where(mirror, cols.flip(1), cols)           # [N, W], reversed where mirrored
    if not padding and not flip:
        return x
    x = x.gather(2, rows[:, None, :, None].expand(n, c, h, x.shape[3]))   # [N, C, H, W+2p]
    return x.gather(3, cols[:, None, None, :].expand(n, c, h, w))         # [N, C, H, W]


def augment_stream(stream: Iterable[tuple], seed: int, padding: int = 4, flip: bool = True,
                   fill: float = 0.0) -> Iterator[tuple]:
    """Endless ``stream`` of batches ``(x [N, C, H, W], ...)`` with ``x`` augmented by
    :func:`random_crop_flip`; the other tensors pass unchanged.

    The stream owns its generator, seeded with ``seed`` and created on the first batch's
    device (again if a batch arrives on another device)."""
    gen: Optional[torch.Generator] = None
    for batch in stream:
        x, *rest = batch
        if gen is None or gen.device != x.device:
            gen = torch.Generator(device=x.device).manual_seed(int(seed))
        yield (random_crop_flip(x, padding, flip, gen, fill), *rest)
