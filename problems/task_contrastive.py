"""MetaMAE's task-contrastive loss between the amortized latent Z and the adapted Z*.

Each sample's mask-reconstruction task gives two views of its latent: ``Z`` from the
encoder and ``Z*`` after latent adaptation. Both are mean-pooled over the tokens
(no CLS), projected, and contrasted SimCLR-style over the ``2B`` views (symmetric
InfoNCE / NT-Xent, temperature ``τ``, no stop-gradient on either side)::

    u = proj(mean_tokens Z),  u* = proj(mean_tokens Z*)          [B, 128]
    s_ij = cos(w_i, w_j) / τ,   w = [u ; u*]                      [2B, 2B]
    L = 1/(2B) Σ_i −log( exp(s_{i,p(i)}) / Σ_{j≠i} exp(s_ij) ),   p(i) = i ± B

``proj`` = Linear(D, 1024, no bias) → BatchNorm1d → ReLU → Linear(1024, 128, no bias).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["TaskProjector", "info_nce", "mean_pool", "task_contrastive_loss"]


class TaskProjector(nn.Module):
    """``[B, D] → [B, out]``: Linear(D, hidden, no bias) → BatchNorm1d → ReLU → Linear(hidden, out, no bias)."""

    def __init__(self, dim: int, hidden: int = 1024, out: int = 128):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=False)
        self.bn = nn.BatchNorm1d(hidden)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, out, bias=False)

    def forward(self, h: Tensor) -> Tensor:
        return self.fc2(self.act(self.bn(self.fc1(h))))


def mean_pool(z: Tensor, has_cls: bool = True, keep: Optional[Tensor] = None) -> Tensor:
    """Mean over tokens of ``z [B, (1+)L, D]``, without the CLS token.

    Args:
        z: latents; the first token is CLS when ``has_cls``.
        has_cls: drop token 0 before pooling.
        keep: optional ``[B, L]`` weights (e.g. 0 at padding) for a masked mean.
    """
    tokens = z[:, 1:] if has_cls else z                      # [B, L, D]
    if keep is None:
        return tokens.mean(dim=1)
    w = keep.to(tokens.dtype).unsqueeze(-1)                  # [B, L, 1]
    return (tokens * w).sum(1) / w.sum(1).clamp_min(1.0)


def info_nce(a: Tensor, b: Tensor, tau: float = 0.5) -> Tensor:
    """Symmetric InfoNCE (NT-Xent) over ``2B`` views; ``a[i]`` and ``b[i]`` are positives."""
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"info_nce expects two [B, d] tensors of one shape, got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    if not tau > 0:
        raise ValueError(f"temperature tau must be > 0, got {tau}")
    n = a.shape[0]
    w = F.normalize(torch.cat([a, b], dim=0), dim=1)         # [2B, d]
    sim = w @ w.T / tau                                      # [2B, 2B]
    eye = torch.eye(2 * n, dtype=torch.bool, device=w.device)
    sim = sim.masked_fill(eye, float("-inf"))                # j ≠ i
    target = torch.cat([torch.arange(n, 2 * n, device=w.device), torch.arange(0, n, device=w.device)])
    return F.cross_entropy(sim, target)


def task_contrastive_loss(z: Tensor, z_star: Tensor, projector: nn.Module, tau: float = 0.5,
                          has_cls: bool = True, keep: Optional[Tensor] = None) -> Tensor:
    """``info_nce(proj(pool(Z)), proj(pool(Z*)), τ)``; gradients reach both Z and Z*."""
    return info_nce(projector(mean_pool(z, has_cls, keep)), projector(mean_pool(z_star, has_cls, keep)), tau)
