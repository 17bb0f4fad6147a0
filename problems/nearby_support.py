"""MetaMAE's Nearby-S support set: visible tokens plus a few masked neighbours.

MetaMAE adapts its latent on a *support* set of tokens and is scored on the *query*
(all masked tokens). The support is the visible tokens ∪ a Bernoulli(r) sample of
the masked tokens adjacent to a visible one (r = 0.1 in the paper)::

    adjacent_i = mask_i · max_{j ∈ N(i)} (1 − mask_j)       N(i): ±1 position (1-D),
                                                            4-neighbourhood (2-D grid)
    support_i  = (1 − mask_i) + adjacent_i · b_i,   b_i ~ Bernoulli(r)

Tokens are laid out row-major on ``grid`` (``(L,)`` for sequences and tabular rows,
``(H, W)`` for image patches). Padding tokens (``padding``) are never in the support
nor count as visible neighbours.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["adjacent_masked", "nearby_support"]


def _check(mask: Tensor, grid: Sequence[int]) -> Tuple[int, ...]:
    grid = tuple(int(g) for g in grid)
    if len(grid) not in (1, 2) or any(g < 1 for g in grid):
        raise ValueError(f"grid must be (L,) or (H, W) with positive sizes, got {grid}")
    if mask.dim() != 2:
        raise ValueError(f"mask must be [N, L], got shape {tuple(mask.shape)}")
    size = 1
    for g in grid:
        size *= g
    if mask.shape[1] != size:
        raise ValueError(f"mask has {mask.shape[1]} tokens per sample, grid {grid} has {size}")
    return grid


def adjacent_masked(mask: Tensor, grid: Sequence[int], padding: Optional[Tensor] = None) -> Tensor:
    """``[N, L]`` bool: masked (non-pad) tokens with a visible (non-pad) neighbour.

    Args:
        mask: ``[N, L]``, 1 = masked (MAE convention), 0 = visible.
        grid: ``(L,)`` or ``(H, W)``, the token layout (row-major).
        padding: optional ``[N, L]`` bool, True at padding tokens.
    """
    grid = _check(mask, grid)
    masked = mask > 0
    if padding is not None:
        masked = masked & ~padding
        visible = ~(mask > 0) & ~padding
    else:
        visible = ~masked
    v = visible.reshape(mask.shape[0], *grid)               # [N, L] or [N, H, W]
    near = torch.zeros_like(v)
    for axis in range(1, v.dim()):                          # ±1 along each grid axis
        n = v.shape[axis]
        if n < 2:
            continue
        near.narrow(axis, 1, n - 1).logical_or_(v.narrow(axis, 0, n - 1))   # left/up neighbour
        near.narrow(axis, 0, n - 1).logical_or_(v.narrow(axis, 1, n - 1))   # right/down neighbour
    return masked & near.reshape(mask.shape)


def nearby_support(mask: Tensor, grid: Sequence[int], ratio: float = 0.1,
                   padding: Optional[Tensor] = None,
                   generator: Optional[torch.Generator] = None) -> Tensor:
    """Support mask ``[N, L]`` (dtype of ``mask``; 1 = in the support).

    Args:
        mask: ``[N, L]``, 1 = masked, 0 = visible.
        grid: ``(L,)`` or ``(H, W)``.
        ratio: ``r``, probability that an adjacent masked token joins the support.
        padding: optional ``[N, L]`` bool, True at padding tokens.
        generator: optional ``torch.Generator`` for the Bernoulli draws; they are drawn
            on its device and moved to ``mask``'s (a CPU generator works for CUDA masks).

    Returns:
        ``visible ∪ (adjacent ∩ Bernoulli(r))``. The query is ``mask`` itself.
    """
    if not 0.0 <= float(ratio) <= 1.0:
        raise ValueError(f"Nearby-S ratio must be in [0, 1], got {ratio}")
    adj = adjacent_masked(mask, grid, padding)
    visible = mask <= 0
    if padding is not None:
        visible = visible & ~padding
    # Drawn on the generator's device (a CPU generator gives the same supports on any
    # device; torch.rand refuses a CPU generator for CUDA output), then moved to mask's.
    where = mask.device if generator is None else generator.device
    draw = (torch.rand(mask.shape, generator=generator, device=where) < float(ratio)).to(mask.device)
    return (visible | (adj & draw)).to(mask.dtype)
