"""Position embeddings for token sequences: fixed sin-cos (1-D, 2-D) or learnable.

The fixed tables follow the Transformer / MAE recipe. For a position ``t`` and a
channel pair ``i`` in ``[0, D/2)``::

    ω_i = 1 / 10000^(2i / D)
    e(t) = [sin(t ω_0), ..., sin(t ω_{D/2-1}), cos(t ω_0), ..., cos(t ω_{D/2-1})]

The 2-D table embeds the row index with half of the channels and the column index
with the other half: ``e(r, c) = [e_{D/2}(r), e_{D/2}(c)]``; tokens are ordered
row-major (the order produced by ``patchify`` of an image).

Fixed tables are stored as non-persistent buffers: they carry no information a
checkpoint needs, they follow ``.to(dtype)``/``.double()``, and they are not
parameters, so ``torch.func.functional_call`` never needs them in its dict.
"""

import math
from typing import Sequence, Tuple, Union

import torch
from torch import nn

__all__ = ["sincos_1d", "sincos_2d", "sincos_table", "PositionEmbedding"]


def sincos_1d(dim: int, positions: Union[int, torch.Tensor]) -> torch.Tensor:
    """Fixed 1-D sin-cos embedding.

    Args:
        dim: embedding width ``D``; must be even.
        positions: number of positions ``L`` (positions ``0..L-1``) or a float tensor
            of positions ``[L]``.

    Returns:
        Table ``[L, D]`` in float32 (float64 arithmetic, then cast).
    """
    if dim % 2 != 0:
        raise ValueError(f"sin-cos embedding needs an even width, got {dim}")
    if isinstance(positions, int):
        positions = torch.arange(positions, dtype=torch.float64)
    pos = positions.to(torch.float64).reshape(-1)  # [L]
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000.0 ** omega  # [D/2]
    angles = pos[:, None] * omega[None, :]  # [L, D/2]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()  # [L, D]


def sincos_2d(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Fixed 2-D sin-cos embedding for a ``grid_h x grid_w`` grid, row-major.

    Args:
        dim: embedding width ``D``; must be divisible by 4.
        grid_h: number of rows.
        grid_w: number of columns.

    Returns:
        Table ``[grid_h * grid_w, D]``; first ``D/2`` channels encode the row,
        the last ``D/2`` the column.
    """
    if dim % 4 != 0:
        raise ValueError(f"2-D sin-cos embedding needs width divisible by 4, got {dim}")
    rows = torch.arange(grid_h, dtype=torch.float64).repeat_interleave(grid_w)  # [H*W]
    cols = torch.arange(grid_w, dtype=torch.float64).repeat(grid_h)  # [H*W]
    return torch.cat([sincos_1d(dim // 2, rows), sincos_1d(dim // 2, cols)], dim=1)


def sincos_table(dim: int, grid: Sequence[int]) -> torch.Tensor:
    """Dispatch on the grid rank: ``(L,)`` → 1-D table, ``(H, W)`` → 2-D table.

    Returns:
        Table ``[prod(grid), D]``.
    """
    grid = tuple(int(g) for g in grid)
    if len(grid) == 1:
        return sincos_1d(dim, grid[0])
    if len(grid) == 2:
        return sincos_2d(dim, grid[0], grid[1])
    raise ValueError(f"grid must have 1 or 2 dimensions, got {grid}")


class PositionEmbedding(nn.Module):
    """Adds a position embedding to a token sequence: ``x + P``.

    Args:
        dim: token width ``D``.
        grid: token layout, ``(L,)`` for sequences or ``(H, W)`` for images
            (tokens row-major). ``L = prod(grid)``.
        learnable: if True, ``P`` is an ``nn.Parameter`` initialised with the
            sin-cos table (or ``init_std`` normal noise if ``init="normal"``); if False,
            ``P`` is the fixed sin-cos table held as a buffer.
        init: ``"sincos"`` or ``"normal"`` (learnable only).
        init_std: standard deviation for ``init="normal"``.

    Shapes:
        ``forward(x)``: ``x: [N, L, D] -> [N, L, D]``.
    """

    def __init__(
        self,
        dim: int,
        grid: Union[int, Sequence[int]],
        learnable: bool = False,
        init: str = "sincos",
        init_std: float = 0.02,
    ):
        super().__init__()
        self.grid: Tuple[int, ...] = (grid,) if isinstance(grid, int) else tuple(grid)
        self.dim = dim
        self.num_tokens = int(math.prod(self.grid))
        self.learnable = learnable
        if init == "sincos":
            table = sincos_table(dim, self.grid)
        elif init == "normal":
            if not learnable:
                raise ValueError("init='normal' only makes sense with learnable=True")
            table = torch.randn(self.num_tokens, dim) * init_std
        else:
            raise ValueError(f"unknown init {init!r}")
        if learnable:
            self.table = nn.Parameter(table)  # [L, D]
        else:
            self.register_buffer("table", table, persistent=False)  # [L, D]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``x + P``; ``x: [N, L, D]``."""
        if x.shape[-2] != self.num_tokens:
            raise ValueError(f"expected {self.num_tokens} tokens, got {x.shape[-2]}")
        return x + self.table.to(x.dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, grid={self.grid}, learnable={self.learnable}"
