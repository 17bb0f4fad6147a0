"""MetaMAE pretraining as ONE mlo problem: the plain objective of ``problems.latent_adaptation``.

    min_{θ, φ, ψ}  E_x  L_rec(g_φ(Z*); Q) + λ · InfoNCE(h_ψ(pool Z), h_ψ(pool Z*)),
    Z = f_θ(x_visible),   Z* = Z − α ∇_Z [N · L_rec(g_φ(Z); S̃)]      (Nearby-S support S̃)

The problem's module is :class:`MetaMAEModel` (the MAE + the task projector) and its
``training_step`` returns :func:`problems.latent_adaptation.metamae_loss`: the inner
latent step is written inside the loss (second order by default, ``first_order`` as an
option), so the engine sees a single-level problem and takes plain gradient steps.
:class:`~problems.latent_adaptation.MetaMAEOptions` carries the ablation switches of
the paper's Table 4 (``adapt``, ``contrastive_weight = 0``) and Table 6's ``r``; the
linear vs Transformer decoder switch is the MAE's ``decoder_depth`` (0 = linear).
With ``adapt=False, contrastive_weight=0`` the loss is exactly the MAE loss (the query
is every masked token), which is the "MAE" row.

Not here yet: the engine-level graph of issue 10 item 1 (the latent ``Z`` as a lower
problem whose variables are the per-sample latents of the window's batch, initialised
from the encoder when the window opens, adapted by the engine's unrolled method) waits
on the Engine v2 issue (per-window variables). This module is the single-problem form
of the same objective and the reference such a graph must match.

Second order differentiates through the decoder's attention: build the MAE with
``attn_impl="math"``; ``training_step`` also runs under
:func:`problems.transformer.math_attention` whenever second-order adaptation is on.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import Tensor, nn

import mlo
from problems.latent_adaptation import MetaMAEOptions, metamae_loss
from problems.task_contrastive import TaskProjector
from problems.transformer import math_attention

__all__ = ["MetaMAEModel", "MetaMAEPretrain", "MetaMAEOptions"]


class MetaMAEModel(nn.Module):
    """The trained modules of MetaMAE: ``mae`` (encoder + decoder) and ``projector``.

    Args:
        mae: a single-segment :class:`problems.mae.MaskedAutoencoder`.
        projector: the task projector; None → :class:`TaskProjector` ``(D → hidden → out)``.
        projector_hidden, projector_out: its widths (paper: 1024, 128).
    """

    def __init__(self, mae: nn.Module, projector: Optional[nn.Module] = None,
                 projector_hidden: int = 1024, projector_out: int = 128):
        super().__init__()
        self.mae = mae
        self.projector = projector if projector is not None else \
            TaskProjector(mae.embed_dim, projector_hidden, projector_out)

    def forward(self, x: Tensor, opts: MetaMAEOptions,
                generator: Optional[torch.Generator] = None) -> Dict[str, Tensor]:
        """:func:`metamae_loss` of the batch ``x``."""
        projector = self.projector if opts.contrastive_weight else None
        return metamae_loss(self.mae, x, opts, projector, generator)

    def features(self, x: Tensor, pool: str = "mean") -> Tensor:
        """Frozen-encoder features for the linear probe (``mae.features``)."""
        return self.mae.features(x, pool=pool)


class MetaMAEPretrain(mlo.Problem):
    """MetaMAE's loss on ``batch[0]``; variables: MAE and projector parameters.

    Args:
        mae: a :class:`problems.mae.MaskedAutoencoder` (``attn_impl="math"`` for second order).
        data: iterable of batches; ``batch[0]`` (or the batch itself if a tensor) is x.
        options: :class:`MetaMAEOptions` (α, K, first order, switches, λ, τ, r).
        projector: optional task projector (default :class:`TaskProjector` of the MAE width).
        projector_hidden, projector_out: widths of the default projector.
        generator: optional ``torch.Generator`` for the Nearby-S draws.
        name: problem name.
        optimizer, optimizer_kwargs: default AdamW(lr 1e-4, weight decay 1e-4), the paper's.
        **kwargs: the remaining :class:`mlo.Problem` arguments (scheduler, config, ...).

    ``training_step`` returns ``{"loss", "query", "contrastive"}`` (the last two
    detached, logged as extras).
    """

    def __init__(self, mae: nn.Module, data=None, *, options: Optional[MetaMAEOptions] = None,
                 projector: Optional[nn.Module] = None, projector_hidden: int = 1024,
                 projector_out: int = 128, generator: Optional[torch.Generator] = None,
                 name: str = "metamae", optimizer=torch.optim.AdamW,
                 optimizer_kwargs: Optional[Dict[str, Any]] = None, **kwargs):
        if optimizer_kwargs is None and optimizer is torch.optim.AdamW:
            optimizer_kwargs = {"lr": 1e-4, "weight_decay": 1e-4}
        self.options = options or MetaMAEOptions()
        model = MetaMAEModel(mae, projector, projector_hidden, projector_out)
        if not self.options.contrastive_weight:       # an unused projector: no variables
            model.projector.requires_grad_(False)
        super().__init__(name, module=model, optimizer=optimizer,
                         optimizer_kwargs=optimizer_kwargs, data=data, **kwargs)
        self.generator = generator

    @property
    def mae(self) -> nn.Module:
        return self.module.mae

    def training_step(self, batch) -> Dict[str, Tensor]:
        x = batch if isinstance(batch, Tensor) else batch[0]
        opts = self.options
        with math_attention(opts.adapt and not opts.first_order):
            out = self(x, opts, self.generator)
        return {"loss": out["loss"], "query": out["query"].detach(),
                "contrastive": out["contrastive"].detach()}
