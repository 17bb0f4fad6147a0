"""MetaMAE pretraining as mlo problems: a problem graph, and the one-problem form.

    min_{θ, φ, ψ}  E_x  L_rec(g_φ(Z_K); Q) + λ · InfoNCE(h_ψ(pool Z_0), h_ψ(pool Z_K)),
    Z_0 = f_θ(x_visible),   Z_{k+1} = Z_k − α ∇_Z [N · L_rec(g_φ(Z_k); S̃)]   (Nearby-S support S̃)

**The graph** (:func:`build_graph`), two problems over the same batch::

    latent   (mlo.WindowProblem, lower)  variables: the per-sample latents Z [N, 1+K, D]
             window opens:  Z_0, mask, ids = upper.forward_encoder(x); S̃ = Nearby-S(mask)
             loss:          N · L_rec(g_φ(Z); S̃)              SGD, lr α, K = unroll_steps
    metamae  (mlo.Problem, upper)        variables: θ, φ, ψ (MetaMAEModel: MAE + projector)
             loss:          L_rec(g_φ(Z_K); mask) + λ · InfoNCE(h_ψ(pool Z_0), h_ψ(pool Z_K))

    u2l = {metamae: [latent]},  l2u = {latent: [metamae]}

The engine opens the latent's window on a batch (``Z_0`` stays in the graph of the
encoder), takes the ``K`` inner steps with a differentiable SGD (second order unless
``first_order``) and backpropagates the upper's loss through them: its gradient is
that of :func:`problems.latent_adaptation.metamae_loss` (tested to 1e-10). Without
adaptation there is no latent problem: the upper alone is the MAE (+ contrast of
``Z`` with itself).

**The one-problem form** (:class:`MetaMAEPretrain`): the inner step is written inside
the loss (``metamae_loss``), so the engine sees a single-level problem. Same
objective, same switches; kept as the reference of the graph.

:class:`~problems.latent_adaptation.MetaMAEOptions` carries the ablation switches of
the paper's Table 4 (``adapt``, ``contrastive_weight = 0``) and Table 6's ``r``; the
linear vs Transformer decoder switch is the MAE's ``decoder_depth`` (0 = linear).
With ``adapt=False, contrastive_weight=0`` the loss is exactly the MAE loss (the query
is every masked token), which is the "MAE" row.

Batches are ``x``, ``(x,)`` or ``(x, scores, support)``: fixed masking scores
``[N, L]`` (the MAE keeps the lowest) and support ``[N, L]`` make a step
deterministic (tests); otherwise masking is uniform noise and the support is drawn.

Second order differentiates through the decoder's attention: build the MAE with
``attn_impl="math"``; the inner losses also run under
:func:`problems.transformer.math_attention` whenever second-order adaptation is on.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterable, Optional, Tuple

import torch
from torch import Tensor, nn

import mlo
from problems.latent_adaptation import MetaMAEOptions, draw_support, metamae_loss
from problems.mae import MaskedAutoencoder
from problems.task_contrastive import TaskProjector, task_contrastive_loss
from problems.transformer import math_attention

__all__ = ["MetaMAEModel", "MetaMAEPretrain", "MetaMAEOptions", "MetaMAELatent", "MetaMAEUpper",
           "build_graph", "unpack_batch"]


def unpack_batch(batch) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """``(x, scores, support)`` of a batch ``x``, ``(x,)`` or ``(x, scores, support)``."""
    if isinstance(batch, Tensor):
        return batch, None, None
    if not isinstance(batch, (tuple, list)) or len(batch) not in (1, 3):
        raise TypeError(f"a MetaMAE batch is x, (x,) or (x, scores, support), got "
                        f"{type(batch).__name__}" + (f" of length {len(batch)}"
                                                     if isinstance(batch, (tuple, list)) else ""))
    return (batch[0], None, None) if len(batch) == 1 else tuple(batch)


class MetaMAEModel(nn.Module):
    """The trained modules of MetaMAE: ``mae`` (encoder + decoder) and ``projector``.

    Args:
        mae: a single-segment :class:`problems.mae.MaskedAutoencoder`.
        projector: the task projector; None → :class:`TaskProjector` ``(D → hidden → out)``.
        projector_hidden, projector_out: its widths (paper: 1024, 128).

    Besides ``forward`` (the whole objective, one-problem form) it exposes the pieces
    the graph's problems call through ``problem.call``: :meth:`forward_encoder`,
    :meth:`reconstruction` and :meth:`contrast`.
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

    def forward_encoder(self, x: Tensor, scores: Optional[Tensor] = None):
        """``Z_0 [N, 1+K, D]`` (CLS first), ``mask [N, L]``, ``ids_restore [N, L]``."""
        return self.mae.forward_encoder(x, scores=scores)

    def reconstruction(self, x: Tensor, z: Tensor, ids_restore: Tensor, selection: Tensor) -> Tensor:
        """``L_rec(decoder(z); selection)``: the MAE loss over the selected tokens ``[N, L]``."""
        return self.mae.forward_loss(x, self.mae.forward_decoder(z, ids_restore), selection)

    def contrast(self, z0: Tensor, z: Tensor, tau: float) -> Tensor:
        """Task contrast ``InfoNCE(proj(pool z0), proj(pool z))`` (no CLS in the pool)."""
        return task_contrastive_loss(z0, z, self.projector, tau)

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


# ------------------------------------------------------------------ the graph
class MetaMAEUpper(mlo.Problem):
    """The upper problem: query reconstruction from ``Z_K`` + λ · task contrast.

    ``L = L_rec(g_φ(Z_K); mask) + λ · InfoNCE(h_ψ(pool Z_0), h_ψ(pool Z_K))`` with
    ``Z_K, Z_0, mask`` read from :attr:`latent` (its window's batch). Without a latent
    problem (no adaptation) it encodes its own batch: ``Z_K = Z_0 = f_θ(x)``.

    Args:
        model: a :class:`MetaMAEModel`; its trainable parameters are the variables.
        data: batches — only used without a latent problem (else the latent's batch).
        options: :class:`MetaMAEOptions` (λ, τ are read here).
        name: problem name.
        optimizer, optimizer_kwargs: default AdamW(lr 1e-4, weight decay 1e-4), the paper's.
        **kwargs: the remaining :class:`mlo.Problem` arguments (scheduler, config, ...).

    :attr:`latent` (a :class:`MetaMAELatent` or None) is wired by :func:`build_graph`.
    ``training_step`` returns ``{"loss", "query", "contrastive"}`` (the last two detached).
    """

    def __init__(self, model: MetaMAEModel, data: Optional[Iterable] = None, *,
                 options: MetaMAEOptions, name: str = "metamae", optimizer=torch.optim.AdamW,
                 optimizer_kwargs: Optional[Dict[str, Any]] = None, **kwargs):
        if optimizer_kwargs is None and optimizer is torch.optim.AdamW:
            optimizer_kwargs = {"lr": 1e-4, "weight_decay": 1e-4}
        super().__init__(name, module=model, optimizer=optimizer,
                         optimizer_kwargs=optimizer_kwargs, data=data, **kwargs)
        self.options = options
        self.latent: Optional[MetaMAELatent] = None

    def training_step(self, batch) -> Dict[str, Tensor]:
        lat = self.latent
        if lat is None:                              # no adaptation: Z_K = Z_0
            x, scores, _ = unpack_batch(batch)
            z0, mask, ids = self.call("forward_encoder", x, scores=scores)   # [N, 1+K, D]
            z = z0
        else:
            x = unpack_batch(lat.batch)[0]
            z0, z = lat.initial["z"], lat.params["z"]                         # Z_0, Z_K
            mask, ids = lat.outputs["mask"], lat.outputs["ids_restore"]
        query = self.call("reconstruction", x, z, ids, mask)
        lam = self.options.contrastive_weight
        contrast = self.call("contrast", z0, z, self.options.tau) if lam else query.new_zeros(())
        return {"loss": query + lam * contrast, "query": query.detach(),
                "contrastive": contrast.detach()}


class MetaMAELatent(mlo.WindowProblem):
    """The lower problem: the per-sample latents ``Z`` of the window's batch.

    Window opens on a batch ``x``: ``Z_0, mask, ids = upper.forward_encoder(x)`` (CLS
    included, in the encoder's graph) and the Nearby-S support ``S̃`` is drawn. Each
    of the ``K`` steps: ``Z ← Z − α ∇_Z [N · L_rec(g_φ(Z); S̃)]`` (SGD, lr ``α``; the
    gradient of ``N · L_rec`` makes ``α`` a per-sample step, as the official code).

    Args:
        upper: the :class:`MetaMAEUpper` whose encoder and decoder it calls.
        data: batches (``x``, ``(x,)`` or ``(x, scores, support)``); one per window.
        alpha: inner step size ``α``.
        steps: inner steps ``K`` per window (``config.unroll_steps``).
        first_order: detach the inner gradients (first-order adaptation).
        support_ratio: Nearby-S ``r``.
        generator: optional ``torch.Generator`` for the Nearby-S draws.
        name: problem name.
    """

    def __init__(self, upper: MetaMAEUpper, data: Iterable, *, alpha: float, steps: int = 1,
                 first_order: bool = False, support_ratio: float = 0.1,
                 generator: Optional[torch.Generator] = None, name: str = "latent"):
        super().__init__(name, torch.optim.SGD, {"lr": alpha}, data=data,
                         config=mlo.ProblemConfig(method="unrolled", unroll_steps=steps),
                         first_order=first_order)
        self.upper = upper
        self.support_ratio = support_ratio
        self.generator = generator

    def init_window(self, batch):
        x, scores, support = unpack_batch(batch)
        z0, mask, ids = self.upper.call("forward_encoder", x, scores=scores)  # [N, 1+K, D], [N, L]
        if support is None:
            support = draw_support(self.upper.module.mae, x, mask, self.support_ratio, self.generator)
        return {"z": z0}, {"mask": mask, "ids_restore": ids, "support": support}

    def training_step(self, batch) -> Tensor:
        x = unpack_batch(batch)[0]
        out = self.outputs
        with math_attention(not self.first_order):
            return x.shape[0] * self.upper.call("reconstruction", x, self.params["z"],
                                                out["ids_restore"], out["support"])


def _check(name: str, value, kind, what: str) -> None:
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise TypeError(f"build_graph: {name} must be {what}, got {value!r}")


def build_graph(mae: MaskedAutoencoder, data: Iterable, options: Optional[MetaMAEOptions] = None, *,
                projector: Optional[nn.Module] = None, projector_hidden: int = 1024,
                projector_out: int = 128, generator: Optional[torch.Generator] = None,
                optimizer=torch.optim.AdamW, optimizer_kwargs: Optional[Dict[str, Any]] = None,
                engine_config: Optional[mlo.EngineConfig] = None,
                **upper_kwargs) -> Tuple[mlo.Engine, Dict[str, mlo.Problem]]:
    """MetaMAE as a problem graph (see the module): the engine and its problems.

    Args:
        mae: a :class:`problems.mae.MaskedAutoencoder` (``attn_impl="math"`` for second
            order; ``decoder_depth=0`` is the linear decoder).
        data: endless or re-iterable batches ``x``, ``(x,)`` or ``(x, scores, support)``.
        options: :class:`MetaMAEOptions` (default the paper's): ``alpha``, ``steps``
            (= the latent's ``unroll_steps``), ``first_order``, ``adapt`` (off: no
            latent problem), ``contrastive_weight`` (0: no projector variables), ``tau``,
            ``support_ratio``.
        projector, projector_hidden, projector_out: the task projector (see
            :class:`MetaMAEModel`).
        generator: ``torch.Generator`` for the Nearby-S draws.
        optimizer, optimizer_kwargs: the upper's (default AdamW lr 1e-4, wd 1e-4).
        engine_config: an :class:`mlo.EngineConfig`.
        **upper_kwargs: further :class:`mlo.Problem` arguments of the upper (scheduler, ...).

    Returns:
        ``(engine, {"upper": MetaMAEUpper, "latent": MetaMAELatent})`` (no ``"latent"``
        without adaptation). One upper update takes ``options.steps`` engine
        iterations: ``engine.run(updates * options.steps)``.
    """
    _check("mae", mae, MaskedAutoencoder, "a problems.mae.MaskedAutoencoder")
    opts = MetaMAEOptions() if options is None else options
    _check("options", opts, MetaMAEOptions, "a MetaMAEOptions")
    _check("options.steps", opts.steps, int, "an integer >= 1")
    for key in ("alpha", "contrastive_weight", "tau", "support_ratio"):
        _check(f"options.{key}", getattr(opts, key), (int, float), "a number")
    if opts.steps < 1 or not (opts.alpha > 0 and math.isfinite(opts.alpha)):
        raise ValueError(f"build_graph: options need steps >= 1 and a finite alpha > 0, got "
                         f"steps={opts.steps}, alpha={opts.alpha}")
    if opts.contrastive_weight < 0 or not opts.tau > 0 or not 0 <= opts.support_ratio <= 1:
        raise ValueError(f"build_graph: options need contrastive_weight >= 0, tau > 0 and "
                         f"support_ratio in [0, 1], got {opts.contrastive_weight}, {opts.tau}, "
                         f"{opts.support_ratio}")
    _check("options.first_order", opts.first_order, bool, "a bool")
    _check("options.adapt", opts.adapt, bool, "a bool")
    if generator is not None:
        _check("generator", generator, torch.Generator, "a torch.Generator or None")
    if engine_config is not None:
        _check("engine_config", engine_config, mlo.EngineConfig, "an mlo.EngineConfig or None")

    model = MetaMAEModel(mae, projector, projector_hidden, projector_out)
    if not opts.contrastive_weight:                   # an unused projector: no variables
        model.projector.requires_grad_(False)
    upper = MetaMAEUpper(model, None if opts.adapt else data, options=opts, optimizer=optimizer,
                         optimizer_kwargs=optimizer_kwargs, **upper_kwargs)
    if not opts.adapt:
        return mlo.Engine([upper], config=engine_config), {"upper": upper}
    latent = MetaMAELatent(upper, data, alpha=opts.alpha, steps=opts.steps,
                           first_order=opts.first_order, support_ratio=opts.support_ratio,
                           generator=generator)
    upper.latent = latent
    engine = mlo.Engine([latent, upper], {"u2l": {upper: [latent]}, "l2u": {latent: [upper]}},
                        config=engine_config)
    return engine, {"upper": upper, "latent": latent}
