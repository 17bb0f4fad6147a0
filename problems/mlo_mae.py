"""MLO-MAE and its baselines as problem graphs (DESIGN.md, "MLO-MAE").

Three levels (Guo et al., MLO-MAE), from the bottom up::

    pretrain  θ*(φ) = argmin_θ  Σ_x Σ_{i masked} p_i(x) ℓ_i(θ; x) / #masked     all training images
                      masked = top-k of p(x) = σ(MLP_φ(vec(E_θ(x))))  (ratio r)
    finetune  ψ*(θ) = argmin_ψ  CE(head_ψ(cls_θ*(x)), y)                         finetune split (80 %)
    mask      min_φ  CE(head_ψ*(cls_θ*(φ)(x)), y)                                mask split (20 %)

``E_θ(x)`` are the MAE's own patch + position embeddings, not detached: the
pretraining gradient also reaches them through the probabilities. The masking
network ``φ`` has no direct gradient; its only signal is the hypergradient of the
mask-split cross-entropy along two paths, ``mask → pretrain → mask`` and
``mask → pretrain → finetune → mask``::

    u2l = {mask: [pretrain]}          (pretrain's loss reads the masking network)
    l2u = {pretrain: [finetune, mask], finetune: [mask]}

Variants (one argument of :func:`build`, same models, splits and budgets):

* ``"mlo-mae"`` — the three levels above.
* ``"blo-mae"`` — the paper's ablation: levels I and II merged into one lower
  (reconstruction + ``blo_weight`` · CE of the head on the finetune split), the
  masking network above it.
* ``"mae"`` — random masking (uniform noise scores, no probability weighting), the
  pretrain level alone.
* ``"frozen-mask"`` — a control: the untrained masking network's top-k and weights,
  held fixed (no hypergradient).

Hypergradient weighting (``hypergrad_weighting``). With finite differences (DARTS,
``H⁻¹ ≈ s·I`` per level) the mask hypergradient is, writing ``B_θ = ∂²_{φθ} L_pre`` and
``B_ψ = ∂²_{θψ} L_ft``::

    "paper"     g = −η_θ B_θ ∇_θ L_val + η_θ η_ψ B_θ B_ψ ∇_ψ L_val       (s = η per level)
    "official"  g = −    B_θ ∇_θ L_val +         B_θ B_ψ ∇_ψ L_val       (s = 1)

``"paper"`` is the one-step unrolled derivation of the paper's Appendix A
(``θ' = θ − η_θ ∇_θ L_pre``, ``ψ' = ψ − η_ψ ∇_ψ L_ft``): each level's best-response
Jacobian carries its learning rate. ``"official"`` is what the official code runs
(Betty ``darts`` without a learning-rate factor): the path through the head is weighted
``1/η_ψ`` (≈ 1000×) more, relative to the direct path, than in the paper. On digits and
Fashion-MNIST the official form collapses the masking network (every masked patch's
``p → 0``: reconstruction switched off); the paper's form does not, which is why it is
the default (README, "MLO-MAE on Fashion-MNIST"). The setting selects
``scale_by_lr`` of the ``finite_difference``/``darts``/``sama`` methods; the other
methods (``cg``, ``neumann``, ``unrolled``) have no ``H⁻¹ ≈ s·I`` to choose and accept
only ``"paper"`` (unrolled *is* the η-weighted form at one step).

Masking-network input (``mask_input_position``, ``mask_input_norm``): the paper feeds
the MAE's patch + position embeddings; position-free input (patch part only) and a
LayerNorm per token are offered so masks can depend on the image.

Every problem uses AdamW with betas (0.9, 0.95) and weight decay 1e-3 as in the
official code (lr 1e-4 encoder, 1e-3 head and masking network), optionally with a
cosine schedule over the run. The best-response method of the lower levels is
finite differences (DARTS) by default as in the paper; any registered method is
selectable, per problem through ``configs``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import mlo
from problems.datasets.splits import infinite_loader, split
from problems.mae import MaskedAutoencoder, num_masked
from problems.masking_net import MaskingNetwork
from problems.pretrain import MAEPretrain
from problems.tokenizers import ImageTokenizer

__all__ = ["VARIANTS", "WEIGHTINGS", "MLOMAESettings", "MLOMAEGraph", "ClassifierHead", "build",
           "build_mae_model", "mask_split"]

VARIANTS = ("mlo-mae", "blo-mae", "mae", "frozen-mask")
WEIGHTINGS = ("paper", "official")
# methods whose best-response Jacobian uses H⁻¹ ≈ s·I, s chosen by the weighting
SCALED_METHODS = ("finite_difference", "darts", "sama")


@dataclass
class MLOMAESettings:
    """Model, optimization and schedule of an MLO-MAE run (defaults: the paper's
    CIFAR-10 set-up, ViT-B/2 with a 512×8 decoder)."""

    # model
    image_size: int = 32
    patch_size: int = 2
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    mask_ratio: float = 0.75
    norm_pix: bool = True
    mask_hidden: int = 512
    detach_mask_input: bool = False  # ablation: the official code does NOT detach E_θ(x)
    mask_input_position: bool = True  # masker reads patch + position embeddings (paper); False: patch part only
    mask_input_norm: bool = False     # LayerNorm each token before the masker (not in the paper)
    normalize_weights: bool = False  # ablation: weights p / mean_masked(p) (loss scale fixed)
    num_classes: int = 10
    head_dropout: float = 0.1
    # optimization
    batch_size: int = 128
    pretrain_lr: float = 1e-4
    finetune_lr: float = 1e-3
    mask_lr: float = 1e-3
    betas: Tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 1e-3
    cosine: bool = True              # cosine annealing over `steps` iterations
    steps: int = 1000                # pretraining iterations (the schedule's length)
    unroll_steps: int = 2            # pretrain steps per finetune/mask update
    method: str = "finite_difference"
    method_options: Dict[str, Any] = field(default_factory=dict)
    hypergrad_weighting: str = "paper"  # "paper" (η-weighted, Appendix A) or "official" (unscaled)
    mask_every: int = 1              # update the masking network once per N iterations
    blo_weight: float = 1.0          # BLO-MAE: weight of the CE term in the merged lower
    finetune_fraction: float = 0.8   # finetune / mask split of the training set
    configs: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # per-problem overrides

    def __post_init__(self):
        self._check_types()
        if isinstance(self.betas, list):
            self.betas = tuple(self.betas)
        if self.image_size % self.patch_size:
            raise ValueError(f"MLOMAESettings: image_size {self.image_size} is not a multiple of "
                             f"patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"MLOMAESettings: embed_dim {self.embed_dim} is not divisible by "
                             f"num_heads {self.num_heads}")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"MLOMAESettings: mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if not 0.0 < self.finetune_fraction < 1.0:
            raise ValueError("MLOMAESettings: finetune_fraction must be in (0, 1), got "
                             f"{self.finetune_fraction}")
        for k in ("steps", "unroll_steps", "mask_every", "batch_size"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"MLOMAESettings: {k} must be an integer >= 1, got {v!r}")
        if self.hypergrad_weighting not in WEIGHTINGS:
            raise ValueError(f"MLOMAESettings: hypergrad_weighting must be one of {list(WEIGHTINGS)}, "
                             f"got {self.hypergrad_weighting!r}")
        unknown = set(self.configs) - {"pretrain", "finetune", "mask"}
        if unknown:
            raise ValueError(f"MLOMAESettings.configs: unknown problem(s) {sorted(unknown)}; "
                             f"problems: pretrain, finetune, mask")

    def _check_types(self) -> None:
        """Numbers must be numbers, flags bools. YAML 1.1 reads ``1e-3`` (no dot) as a
        string: numeric strings are converted, anything else is a named error."""
        for f in fields(self):
            v, kind = getattr(self, f.name), f.type
            if kind == "bool" and not isinstance(v, bool):
                raise TypeError(f"MLOMAESettings.{f.name} must be true or false, got {v!r}")
            if kind in ("int", "float") and isinstance(v, str):
                try:
                    v = float(v) if kind == "float" else int(v)
                except ValueError:
                    raise TypeError(f"MLOMAESettings.{f.name} must be a number, got {v!r}") from None
                setattr(self, f.name, v)
            if kind == "float" and (isinstance(v, bool) or not isinstance(v, (int, float))
                                    or not math.isfinite(v)):
                raise TypeError(f"MLOMAESettings.{f.name} must be a finite number, got {v!r}")
            if kind == "float":
                setattr(self, f.name, float(v))
            if kind == "int" and (isinstance(v, bool) or not isinstance(v, int)):
                raise TypeError(f"MLOMAESettings.{f.name} must be an integer, got {v!r}")
        if not isinstance(self.method, str):
            raise TypeError(f"MLOMAESettings.method must be a method name, got {self.method!r}")

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "MLOMAESettings":
        """Settings from a plain dict (e.g. a YAML preset); unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown MLO-MAE setting(s) {unknown}; known: {sorted(known)}")
        return cls(**d)


class ClassifierHead(nn.Module):
    """MLO-MAE's classification head: ``LayerNorm → Dropout → Linear``, ``[N, D] → [N, C]``."""

    def __init__(self, dim: int, num_classes: int, dropout: float = 0.1):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, h: Tensor) -> Tensor:
        return self.fc(self.drop(self.norm(h)))


class MAEWithHead(nn.Module):
    """BLO-MAE's merged lower: the MAE and the head as one set of variables."""

    def __init__(self, mae: MaskedAutoencoder, head: ClassifierHead):
        super().__init__()
        self.mae, self.head = mae, head

    def forward(self, x, mask_ratio=None, scores=None, token_weights=None):
        return self.mae(x, mask_ratio=mask_ratio, scores=scores, token_weights=token_weights)

    def patch_embeddings(self, x: Tensor, position: bool = True) -> Tensor:
        return self.mae.patch_embeddings(x, position=position)

    def features(self, x: Tensor, pool: str = "cls") -> Tensor:
        return self.mae.features(x, pool=pool)

    def classify(self, x: Tensor) -> Tensor:
        """Logits ``[N, C]`` of the head on the unmasked CLS feature."""
        return self.head(self.mae.features(x, pool="cls"))


def build_mae_model(s: MLOMAESettings) -> MaskedAutoencoder:
    """The MAE of the settings (image tokenizer, CLS token, transformer decoder)."""
    tok = ImageTokenizer(s.image_size, s.patch_size, s.in_chans, s.embed_dim)
    return MaskedAutoencoder(tok, depth=s.depth, num_heads=s.num_heads, mlp_ratio=s.mlp_ratio,
                             decoder_dim=s.decoder_dim, decoder_depth=s.decoder_depth,
                             decoder_heads=s.decoder_heads, mask_ratio=s.mask_ratio,
                             norm_pix=s.norm_pix)


def mask_split(n: int, finetune_fraction: float = 0.8, seed: int = 0) -> Tuple[Tensor, Tensor]:
    """Disjoint index sets (finetune, mask) covering ``range(n)`` (seeded)."""
    ft, mk = split(n, (finetune_fraction, 1.0 - finetune_fraction), seed)
    return ft, mk


# --------------------------------------------------------------------- problems
def _probability_masker(net, detach: bool = False, normalize: bool = False, ratio: float = 0.75,
                        position: bool = True):
    """``masker(x, pretrain) -> (scores, weights)``: top-k of ``p`` masked, losses × ``p``.

    ``net`` is the mask problem (its current state) or a fixed module. Ablations:
    ``detach`` feeds the embeddings to the masking network as constants (by default
    the pretraining gradient also flows through ``p`` into them); ``normalize``
    weights the masked losses by ``p_i / mean_{j masked} p_j`` per sample, so the
    masking network can move weight between patches but not scale the loss down;
    ``position=False`` feeds the embeddings' patch part alone (no position)."""
    def masker(x: Tensor, pre: MAEPretrain):
        emb = pre.patch_embeddings(x, position=position)  # [N, L, D]
        p = net(emb.detach() if detach else emb)  # [N, L]
        if not normalize:
            return p, p
        k = num_masked(p.shape[1], ratio)
        top = p.topk(k, dim=1).values  # [N, k], the masked patches' probabilities
        return p, p / top.mean(dim=1, keepdim=True)
    return masker


class Finetune(mlo.Problem):
    """Level II: ``CE(head(cls(x)), y)`` on the finetune split; reads the pretrain level."""

    def __init__(self, head: nn.Module, pretrain: mlo.Problem, data, **kw):
        super().__init__("finetune", module=head, data=data, **kw)
        self.pretrain = pretrain

    def training_step(self, batch):
        x, y = batch
        logits = self(self.pretrain.call("features", x, pool="cls"))  # [N, C]
        return {"loss": F.cross_entropy(logits, y), "acc": (logits.argmax(-1) == y).float().mean()}


class MaskLevel(mlo.Problem):
    """Level III: the masking network; its loss is the CE on the mask split through
    the levels below (``classify(x) -> logits``). No direct gradient."""

    def __init__(self, net: MaskingNetwork, classify, data, **kw):
        super().__init__("mask", module=net, data=data, **kw)
        self.classify = classify

    def training_step(self, batch):
        x, y = batch
        logits = self.classify(x)  # [N, C]
        return {"loss": F.cross_entropy(logits, y), "acc": (logits.argmax(-1) == y).float().mean()}


class MergedLower(MAEPretrain):
    """BLO-MAE's lower: reconstruction on a training batch + ``w`` · CE on a finetune batch."""

    def __init__(self, model: MAEWithHead, data, weight: float, **kw):
        super().__init__(model, data, **kw)
        self.weight = weight

    def training_step(self, batch):
        pre_batch, (x, y) = batch
        rec = super().training_step(pre_batch)["loss"]
        ce = F.cross_entropy(self.call("classify", x), y)
        return {"loss": rec + self.weight * ce, "recon": rec.detach(), "ce": ce.detach()}


# ------------------------------------------------------------------------ graph
@dataclass
class MLOMAEGraph:
    """What :func:`build` returns: the engine, its problems and the models."""

    variant: str
    engine: mlo.Engine
    problems: Dict[str, mlo.Problem]
    mae: MaskedAutoencoder
    head: Optional[ClassifierHead]
    masker: Optional[MaskingNetwork]
    settings: MLOMAESettings


def _adamw(lr: float, s: MLOMAESettings) -> Dict[str, Any]:
    return {"optimizer": torch.optim.AdamW,
            "optimizer_kwargs": {"lr": lr, "betas": tuple(s.betas), "weight_decay": s.weight_decay}}


def _schedule(s: MLOMAESettings, updates: int) -> Dict[str, Any]:
    if not s.cosine:
        return {}
    return {"scheduler": torch.optim.lr_scheduler.CosineAnnealingLR,
            "scheduler_kwargs": {"T_max": max(1, updates)}}


def _config(name: str, s: MLOMAESettings, **fixed) -> mlo.ProblemConfig:
    d = {"method": s.method, "method_options": dict(s.method_options), **fixed}
    d.update(s.configs.get(name, {}))
    d["method_options"] = _weighted(name, d.get("method", "finite_difference"),
                                    dict(d.get("method_options") or {}), s.hypergrad_weighting)
    return mlo.ProblemConfig.from_dict(d)


def _weighted(name: str, method: str, options: Dict[str, Any], weighting: str) -> Dict[str, Any]:
    """``options`` with ``scale_by_lr`` set by the weighting (module docstring)."""
    if method not in SCALED_METHODS:
        if weighting != "paper":
            raise ValueError(f"MLOMAESettings.hypergrad_weighting={weighting!r} selects H⁻¹ ≈ I of "
                             f"the finite-difference methods {list(SCALED_METHODS)}; problem {name!r} "
                             f"uses {method!r}, which has no such choice: use 'paper'")
        return options
    scaled = weighting == "paper"
    if options.get("scale_by_lr", scaled) != scaled:
        raise ValueError(f"problem {name!r}: method_options scale_by_lr={options['scale_by_lr']!r} "
                         f"contradicts hypergrad_weighting={weighting!r} (which means "
                         f"scale_by_lr={scaled}); set one of them")
    options["scale_by_lr"] = scaled
    return options


def build(variant: str, settings: MLOMAESettings, train: Sequence[Tensor], seed: int = 0,
          engine_config: Optional[mlo.EngineConfig] = None,
          split_seed: Optional[int] = None) -> MLOMAEGraph:
    """Builds one variant's graph on the training tensors ``(x [N, C, H, W], y [N])``.

    Args:
        variant: one of :data:`VARIANTS`.
        settings: :class:`MLOMAESettings`.
        train: the training set; pretraining sees all of it, the finetune and mask
            levels its ``finetune_fraction`` / remaining parts.
        seed: seeds the models' initialisation and the batch order.
        engine_config: passed to :class:`mlo.Engine`.
        split_seed: seed of the finetune/mask split (default ``seed``).

    Returns:
        :class:`MLOMAEGraph`; run it with ``graph.engine.run(settings.steps)``.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown MLO-MAE variant {variant!r}; choose from {list(VARIANTS)}")
    s = settings
    x, y = train[0], train[1]
    if x.dim() != 4 or tuple(x.shape[1:]) != (s.in_chans, s.image_size, s.image_size):
        raise ValueError(f"training images have shape {tuple(x.shape)}; the settings expect "
                         f"[N, {s.in_chans}, {s.image_size}, {s.image_size}]")
    torch.manual_seed(seed)
    mae = build_mae_model(s)
    head = ClassifierHead(s.embed_dim, s.num_classes, s.head_dropout)
    net = MaskingNetwork(mae.num_tokens, s.embed_dim, s.mask_hidden, input_norm=s.mask_input_norm)
    ft_idx, mk_idx = mask_split(len(x), s.finetune_fraction, seed if split_seed is None else split_seed)
    bs = s.batch_size
    pre_data = infinite_loader((x,), bs, seed=seed)
    ft_data = infinite_loader((x[ft_idx], y[ft_idx]), bs, seed=seed + 1)
    mk_data = infinite_loader((x[mk_idx], y[mk_idx]), bs, seed=seed + 2)
    upper_updates = math.ceil(s.steps / s.unroll_steps)
    mask_updates = max(1, s.steps // max(s.mask_every, s.unroll_steps))
    hold = {"unroll_steps": s.unroll_steps}

    if variant in ("mae", "frozen-mask"):
        masker = None
        if variant == "frozen-mask":
            net.requires_grad_(False)
            masker = _probability_masker(net, s.detach_mask_input, s.normalize_weights, s.mask_ratio,
                                         s.mask_input_position)
        pre = MAEPretrain(mae, pre_data, masker=masker, **_adamw(s.pretrain_lr, s),
                          **_schedule(s, s.steps), config=_config("pretrain", s, **hold))
        engine = mlo.Engine([pre], config=engine_config)
        return MLOMAEGraph(variant, engine, {"pretrain": pre}, mae, None,
                           net if variant == "frozen-mask" else None, s)

    mask_cfg = dict(s.configs.get("mask", {}))
    mask_cfg.setdefault("update_every_iterations", s.mask_every if s.mask_every > 1 else None)
    if variant == "mlo-mae":
        pre = MAEPretrain(mae, pre_data, **_adamw(s.pretrain_lr, s), **_schedule(s, s.steps),
                          config=_config("pretrain", s, **hold))
        fin = Finetune(head, pre, ft_data, **_adamw(s.finetune_lr, s),
                       **_schedule(s, upper_updates), config=_config("finetune", s))
        mask = MaskLevel(net, lambda xb: fin(pre.call("features", xb, pool="cls")), mk_data,
                         **_adamw(s.mask_lr, s), **_schedule(s, mask_updates),
                         config=mlo.ProblemConfig.from_dict(mask_cfg))
        pre.masker = _probability_masker(mask, s.detach_mask_input, s.normalize_weights, s.mask_ratio,
                                         s.mask_input_position)
        engine = mlo.Engine([pre, fin, mask], dependencies={
            "u2l": {mask: [pre]}, "l2u": {pre: [fin, mask], fin: [mask]}}, config=engine_config)
        return MLOMAEGraph(variant, engine, {"pretrain": pre, "finetune": fin, "mask": mask},
                           mae, head, net, s)

    # blo-mae: one lower (MAE + head), masking network above.
    merged = MAEWithHead(mae, head)
    head_names = ["head." + k for k, _ in head.named_parameters()]
    lower = MergedLower(merged, zip_batches(pre_data, ft_data), s.blo_weight,
                        **_adamw(s.pretrain_lr, s), **_schedule(s, s.steps),
                        param_groups=[{"params": head_names, "lr": s.finetune_lr}],
                        config=_config("pretrain", s, **hold))
    mask = MaskLevel(net, lambda xb: lower.call("classify", xb), mk_data,
                     **_adamw(s.mask_lr, s), **_schedule(s, mask_updates),
                     config=mlo.ProblemConfig.from_dict(mask_cfg))
    lower.masker = _probability_masker(mask, s.detach_mask_input, s.normalize_weights, s.mask_ratio,
                                         s.mask_input_position)
    engine = mlo.Engine([lower, mask], dependencies={"u2l": {mask: [lower]}, "l2u": {lower: [mask]}},
                        config=engine_config)
    return MLOMAEGraph(variant, engine, {"pretrain": lower, "mask": mask}, mae, head, net, s)


def zip_batches(*streams):
    """Endless tuples of one batch from each endless stream."""
    while True:
        yield tuple(next(st) for st in streams)
