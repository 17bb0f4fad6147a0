"""MetaMAE's objective in plain PyTorch: latent adaptation + query loss + task contrast.

For one batch (MetaMAE, docs/design.md#metamae; the official code's choices noted)::

    Z, mask, ids = encoder(x)                            # amortized latent [N, 1+K, D] (CLS first)
    S = nearby_support(mask, grid, r)                    # visible ∪ Bernoulli(r) masked neighbours
    Z_{k+1} = Z_k − α ∇_Z [N · L_rec(decoder(Z_k); S)],  k < K   (second order unless first_order)
    L = L_rec(decoder(Z_K); mask) + λ · InfoNCE(proj(pool Z), proj(pool Z_K))

Only the latent adapts; the decoder is fixed inside the inner steps. ``L_rec`` is
the MAE's masked-token loss (``MaskedAutoencoder.forward_loss``: mean over the
selected tokens of the batch); as in the official code its gradient is taken of
``N · L_rec`` so that ``α`` is a per-sample step. ``first_order`` detaches the
inner gradient (``create_graph=False``): the outer gradient then lacks the
second-order term ``−α ∇²_Z L_s`` along the adaptation.

Second-order use differentiates through attention: call inside
``problems.transformer.math_attention()`` or build the MAE with
``attn_impl="math"`` (fused CPU attention has no double backward).

This module is the hand-written reference of the method (and usable as is); the
engine-level graph, where the latents are a lower problem's per-window variables
(``mlo.WindowProblem``), is ``problems.meta_mae.build_graph`` and is tested against it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from problems.nearby_support import nearby_support
from problems.task_contrastive import task_contrastive_loss

__all__ = ["MetaMAEOptions", "adapt_latent", "draw_support", "metamae_loss"]


@dataclass
class MetaMAEOptions:
    """Switches of the method (the paper's Table 4 ablation rows and Table 6's r)."""

    alpha: float = 0.5               # inner step size
    steps: int = 1                   # inner steps K
    first_order: bool = False        # detach the inner gradient
    adapt: bool = True               # latent adaptation on/off
    contrastive_weight: float = 1.0  # λ; 0 turns the task contrast off
    tau: float = 0.5                 # InfoNCE temperature
    support_ratio: float = 0.1       # Nearby-S r


def adapt_latent(latent: Tensor, support_loss, alpha: float, steps: int = 1,
                 first_order: bool = False) -> Tensor:
    """``Z_{k+1} = Z_k − α ∇_Z support_loss(Z_k)`` for ``steps`` steps.

    Args:
        latent: ``Z_0`` (part of the outer graph).
        support_loss: ``Z -> scalar`` (already scaled as wanted, e.g. ``N · L_s``).
        alpha: step size.
        steps: number of inner steps.
        first_order: ``create_graph=False`` (the inner gradient is a constant).
    """
    z = latent
    for _ in range(steps):
        if first_order and not z.requires_grad:
            z = z.detach().requires_grad_()
        (g,) = torch.autograd.grad(support_loss(z), z, create_graph=not first_order)
        z = z - alpha * g
    return z


def draw_support(mae: nn.Module, x: Tensor, mask: Tensor, ratio: float,
                 generator: Optional[torch.Generator] = None) -> Tensor:
    """Nearby-S support ``[N, L]`` of ``mask`` on the MAE's token grid (pads excluded)."""
    grid = getattr(mae.tokenizer, "grid", (mask.shape[1],))
    return nearby_support(mask, grid, ratio, mae.padding(x), generator)


def metamae_loss(mae: nn.Module, x: Tensor, opts: MetaMAEOptions,
                 projector: Optional[nn.Module] = None,
                 generator: Optional[torch.Generator] = None,
                 masks: Optional[Tuple[Tensor, Tensor]] = None) -> Dict[str, Tensor]:
    """MetaMAE's loss on a batch (see the module docstring).

    Args:
        mae: a single-segment :class:`problems.mae.MaskedAutoencoder`.
        x: the batch.
        opts: :class:`MetaMAEOptions`.
        projector: the task projector (needed when ``contrastive_weight > 0``).
        generator: for the Nearby-S draws.
        masks: optional fixed ``(scores [N, L], support [N, L])`` — the masking
            scores and the support — for deterministic evaluations (tests).

    Returns:
        ``{"loss", "query", "contrastive", "z0", "z"}``.
    """
    scores, support = masks if masks is not None else (None, None)
    z0, mask, ids = mae.forward_encoder(x, scores=scores)            # [N, 1+K, D], [N, L], [N, L]
    if support is None:
        support = draw_support(mae, x, mask, opts.support_ratio, generator)
    n = x.shape[0]
    z = z0
    if opts.adapt:
        def support_loss(zz):
            return n * mae.forward_loss(x, mae.forward_decoder(zz, ids), support)
        z = adapt_latent(z0, support_loss, opts.alpha, opts.steps, opts.first_order)
    query = mae.forward_loss(x, mae.forward_decoder(z, ids), mask)
    contrast = query.new_zeros(())
    if opts.contrastive_weight:
        if projector is None:
            raise ValueError("metamae_loss: contrastive_weight > 0 needs a projector")
        contrast = task_contrastive_loss(z0, z, projector, opts.tau)
    return {"loss": query + opts.contrastive_weight * contrast, "query": query,
            "contrastive": contrast, "z0": z0, "z": z}
