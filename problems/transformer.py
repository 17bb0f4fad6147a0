"""Pre-norm Transformer (ViT) blocks with a switchable attention implementation.

One block computes, for tokens ``x: [N, L, D]``::

    x = x + Attn(LN(x)),      Attn(x) = softmax(Q Kᵀ / √d_h) V   (per head, d_h = D / H)
    x = x + MLP(LN(x)),       MLP(x)  = W₂ GELU(W₁ x)             (hidden = mlp_ratio · D)

Two implementations of ``softmax(Q Kᵀ / √d_h) V`` are available:

- ``"fused"``: ``F.scaled_dot_product_attention``. Fast, but its CPU kernel
  (``_scaled_dot_product_flash_attention_for_cpu``) has no double backward: with
  torch 2.13 on CPU, differentiating a gradient that was computed with
  ``create_graph=True`` raises ``RuntimeError: derivative for
  aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented``
  (float32 and float64).
- ``"math"``: the explicit formula in plain autograd ops; supports derivatives of any
  order. Needed wherever a hypergradient differentiates through a gradient of a
  loss that passes through attention (MetaMAE latent adaptation, unrolled or
  implicit engines that build Hessian-vector products through the model).

The implementation is chosen per module (``attn_impl="fused"|"math"``, default
``None`` = fused) and can be forced to ``"math"`` for everything inside the
``math_attention()`` context manager.
"""

import contextlib
import math
import threading
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ATTN_IMPLS",
    "attention",
    "math_attention",
    "resolve_attn_impl",
    "Attention",
    "Mlp",
    "Block",
    "Transformer",
]

ATTN_IMPLS = ("fused", "math")

_state = threading.local()


def _forced_math() -> bool:
    return getattr(_state, "force_math", False)


@contextlib.contextmanager
def math_attention(enabled: bool = True) -> Iterator[None]:
    """Force the explicit (double-differentiable) attention path inside the block.

    Args:
        enabled: if False, the context is a no-op (handy as
            ``with math_attention(create_graph): ...``).

    Example:
        >>> with math_attention():
        ...     g, = torch.autograd.grad(loss_fn(z), z, create_graph=True)
    """
    previous = _forced_math()
    _state.force_math = previous or bool(enabled)
    try:
        yield
    finally:
        _state.force_math = previous


def resolve_attn_impl(attn_impl: Optional[str]) -> str:
    """Effective implementation: ``"math"`` when forced, else ``attn_impl`` or fused."""
    if attn_impl is not None and attn_impl not in ATTN_IMPLS:
        raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}")
    if _forced_math():
        return "math"
    return attn_impl or "fused"


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float = 0.0,
    impl: Optional[str] = None,
) -> torch.Tensor:
    """Scaled dot-product attention ``softmax(q kᵀ / √d) v``.

    Args:
        q, k, v: ``[N, H, L, d]``.
        dropout_p: dropout on the attention weights (pass 0 in eval mode).
        impl: ``"fused"``, ``"math"`` or None (see module docstring).

    Returns:
        ``[N, H, L, d]``.
    """
    if resolve_attn_impl(impl) == "fused":
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # [N, H, L, L]
    weights = scores.softmax(dim=-1)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    return weights @ v  # [N, H, L, d]


class Attention(nn.Module):
    """Multi-head self-attention with a fused or explicit kernel.

    Args:
        dim: token width ``D``; divisible by ``num_heads``.
        num_heads: number of heads ``H``.
        qkv_bias: bias in the joint QKV projection.
        attn_dropout: dropout on attention weights (training only).
        proj_dropout: dropout after the output projection.
        attn_impl: ``"fused"``, ``"math"`` or None (fused unless ``math_attention()``).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        attn_dropout: float = 0.0,
        proj_dropout: float = 0.0,
        attn_impl: Optional[str] = None,
    ):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim {dim} not divisible by num_heads {num_heads}")
        resolve_attn_impl(attn_impl)  # validate early
        self.num_heads = num_heads
        self.attn_impl = attn_impl
        self.attn_dropout = attn_dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: [N, L, D] -> [N, L, D]``."""
        n, length, dim = x.shape
        qkv = self.qkv(x).reshape(n, length, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [N, H, L, d]
        drop = self.attn_dropout if self.training else 0.0
        out = attention(q, k, v, dropout_p=drop, impl=self.attn_impl)  # [N, H, L, d]
        out = out.transpose(1, 2).reshape(n, length, dim)  # [N, L, D]
        return self.proj_drop(self.proj(out))


class Mlp(nn.Module):
    """Two-layer GELU MLP: ``x: [N, L, D] -> [N, L, D]`` with hidden width ``hidden``."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm ViT block: ``x + Attn(LN(x))`` then ``x + MLP(LN(x))``.

    Args:
        dim: token width ``D``.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width = ``mlp_ratio · D``.
        dropout: dropout in the MLP and after the attention projection.
        attn_dropout: dropout on attention weights.
        attn_impl: ``"fused"``, ``"math"`` or None.
        qkv_bias: bias in the QKV projection.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        attn_impl: Optional[str] = None,
        qkv_bias: bool = True,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_dropout, dropout, attn_impl)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: [N, L, D] -> [N, L, D]``."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """A stack of ``depth`` pre-norm blocks followed by a final LayerNorm.

    ``depth=0`` is allowed: the stack is then only the final norm (or the identity
    with ``final_norm=False``), which is how a linear MAE decoder is built.

    Args:
        dim: token width ``D``.
        depth: number of blocks.
        num_heads: attention heads per block.
        mlp_ratio: MLP hidden width / ``D``.
        dropout: MLP / projection dropout.
        attn_dropout: attention-weight dropout.
        attn_impl: ``"fused"``, ``"math"`` or None for every block.
        final_norm: apply ``LayerNorm`` after the last block.
        qkv_bias: bias in the QKV projections.

    Shapes:
        ``forward(x)``: ``x: [N, L, D] -> [N, L, D]``.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        attn_impl: Optional[str] = None,
        final_norm: bool = True,
        qkv_bias: bool = True,
    ):
        super().__init__()
        self.dim = dim
        self.depth = depth
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, mlp_ratio, dropout, attn_dropout, attn_impl, qkv_bias)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6) if final_norm else nn.Identity()
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def _init_weights(module: nn.Module) -> None:
    """MAE initialisation: Xavier-uniform linear weights, zero biases, unit LayerNorm."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
