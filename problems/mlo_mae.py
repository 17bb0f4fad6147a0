"""MLO-MAE and its baselines as problem graphs (docs/design.md#mlo-mae).

Three levels (Guo et al., MLO-MAE), from the bottom up::

    pretrain  θ*(φ) = argmin_θ  Σ_x Σ_{i masked} p_i(x) ℓ_i(θ; x) / #masked     all training images
                      masked = top-k of p(x) = σ(MLP_φ(vec(E_θ(x))))  (ratio r)
    finetune  ψ*(θ) = argmin_ψ  CE(head_ψ(cls_θ*(x)), y)                         finetune split (80 %)
    mask      min_φ  CE(head_ψ*(cls_θ*(φ)(x)), y)                                mask split (20 %)

``E_θ(x)`` are the MAE's own patch + position embeddings, not detached: the
pretraining gradient also reaches them through the probabilities. The masking
network ``φ`` has no direct gradient (unless ``mask_budget > 0``, below); its only
signal is the hypergradient of the mask-split cross-entropy along two paths,
``mask → pretrain → mask`` and ``mask → pretrain → finetune → mask``::

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
Fashion-MNIST the official form collapses the masking network outright (every masked
patch's ``p → 0``: reconstruction switched off); the paper's form keeps it alive on every
seed measured (on Fashion-MNIST 17–62 % of the masked patches still end below p = 0.1),
with a better validation probe, which is why it is the default
(docs/mlo_mae.md#fashion-mnist-study). The setting selects
``scale_by_lr`` of the ``finite_difference``/``darts`` methods; the other methods
(``cg``, ``neumann``, ``unrolled``, and ``sama``, whose ``u = η D ⊙ v`` carries η
already) have no ``H⁻¹ ≈ s·I`` to choose and accept only ``"paper"`` (unrolled *is*
the η-weighted form at one step).

Masking-network input (``mask_input_position``, ``mask_input_norm``): the paper feeds
the MAE's patch + position embeddings; position-free input (patch part only) and a
LayerNorm per token are offered so masks can depend on the image.

Keeping the masker alive (docs/mlo_mae.md#keeping-the-masker-alive; neither is in the
paper): ``mask_budget = λ`` adds ``λ · mean_n (mean_i p_{n,i} − k/L)²`` to the mask
level's loss (on detached embeddings), so each image's probabilities sum to the ``k``
patches it masks and "reconstruct less" (every ``p → 0``) stops being a descent direction;
``mask_sampling = "gumbel"`` masks ``k`` patches sampled without replacement ∝ ``p``
(the noise drawn with the batch, so every re-evaluation of the loss masks the same
patches) instead of the top-k.

Every problem uses AdamW with betas (0.9, 0.95) and weight decay 1e-3 (lr 1e-4
encoder, 1e-3 head and masking network), optionally with a cosine schedule over the
run. The best-response method of the lower levels is finite differences (DARTS) by
default as in the paper; any registered method is selectable, per problem through
``configs``.

The official code's CIFAR-10 choices (Alexiland/MLO-MAE ``main_cifar10.py``), each a
setting whose default keeps the behaviour above (the ``paper`` preset turns them on):

* ``normalize = (mean, std)``: per-channel normalization *inside the model* (the image
  tokenizer normalizes before patching, :class:`NormalizedImageTokenizer`), so the
  encoder, the masking network's embeddings and the reconstruction targets see
  normalized pixels as in the official code, while every caller — training streams,
  linear probe, head accuracy, mask statistics, plots — passes ``[0, 1]`` pixels.
* ``augment = [levels]``: RandomCrop(H, padding ``augment_padding``) + horizontal flip
  on the named levels' batches (:mod:`problems.datasets.augment`, one seeded generator
  per stream, black padding as torchvision's before Normalize).
* ``pretrain_weight_decay`` / ``finetune_weight_decay`` / ``mask_weight_decay``
  (default ``weight_decay``) and ``no_decay_1d``: weight decay 0 on the pretrain
  level's parameters with ``ndim <= 1`` or a name ending in ``.bias`` — timm's
  ``param_groups_weight_decay`` as the official code calls it: norms and biases; the
  ``[1, 1, D]`` CLS/mask tokens and the position tables are decayed there and here.
* ``cosine_final = {level: f}``: the level's cosine ends at ``f``·lr. The official code
  gives all three schedulers ``T_max`` = the pretrain step count while the head and the
  masker update every ``unroll_steps`` = 2 steps, so theirs stop halfway down the
  cosine, at lr/2; ``f`` reproduces that shape: ``T_max = updates · π / arccos(2f − 1)``
  (``f = 0``: ``T_max = updates``, today's; ``f = 0.5``: ``2 · updates``).
* ``learnable_pos``: the encoder's and the decoder's position tables are parameters
  initialised with sin-cos (the official ``pos_embed`` / ``decoder_pos_embed``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import mlo
from problems.datasets.augment import augment_stream
from problems.datasets.splits import infinite_loader, split
from problems.mae import MaskedAutoencoder, num_masked
from problems.masking_net import MaskingNetwork
from problems.pretrain import MAEPretrain
from problems.tokenizers import ImageTokenizer

__all__ = ["VARIANTS", "WEIGHTINGS", "LEVELS", "MLOMAESettings", "MLOMAEGraph", "ClassifierHead",
           "NormalizedImageTokenizer", "build", "build_mae_model", "head_accuracy", "mask_split",
           "no_decay_names"]

from problems.mlo_mae_settings import LEVELS, SCALED_METHODS, VARIANTS, WEIGHTINGS, MLOMAESettings


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


class NormalizedImageTokenizer(ImageTokenizer):
    """An :class:`ImageTokenizer` fed ``[0, 1]`` pixels that works on ``(x − mean) / std``
    per channel: ``patchify`` (hence the token embeddings and the reconstruction targets)
    returns normalized patches; ``unpatchify`` gives normalized images back.

    The statistics are non-persistent buffers (not in a checkpoint, moved by ``.to``),
    repeated to the patch layout ``(row, col, c)``: ``[p·p·C]``, channel fastest."""

    def __init__(self, image_size, patch_size: int, in_chans: int, embed_dim: int,
                 mean: Sequence[float], std: Sequence[float], learnable_pos: bool = False):
        super().__init__(image_size, patch_size, in_chans, embed_dim, learnable_pos=learnable_pos)
        if len(mean) != in_chans or len(std) != in_chans:
            raise ValueError(f"NormalizedImageTokenizer: mean and std need {in_chans} values, got "
                             f"{list(mean)} and {list(std)}")
        pp = patch_size * patch_size
        self.register_buffer("pixel_mean", torch.tensor(mean, dtype=torch.float32).repeat(pp),
                             persistent=False)  # [p·p·C]
        self.register_buffer("pixel_std", torch.tensor(std, dtype=torch.float32).repeat(pp),
                             persistent=False)  # [p·p·C]

    def patchify(self, x: Tensor) -> Tensor:
        """``x: [N, C, H, W]`` in [0, 1] ``-> [N, L, p·p·C]`` normalized."""
        p = super().patchify(x)  # [N, L, p·p·C]
        return (p - self.pixel_mean.to(p.dtype)) / self.pixel_std.to(p.dtype)


def build_mae_model(s: MLOMAESettings) -> MaskedAutoencoder:
    """The MAE of the settings (image tokenizer, CLS token, transformer decoder); with
    ``s.normalize`` its tokenizer normalizes the ``[0, 1]`` input pixels."""
    if s.normalize is None:
        tok = ImageTokenizer(s.image_size, s.patch_size, s.in_chans, s.embed_dim,
                             learnable_pos=s.learnable_pos)
    else:
        tok = NormalizedImageTokenizer(s.image_size, s.patch_size, s.in_chans, s.embed_dim,
                                       *s.normalize, learnable_pos=s.learnable_pos)
    return MaskedAutoencoder(tok, depth=s.depth, num_heads=s.num_heads, mlp_ratio=s.mlp_ratio,
                             decoder_dim=s.decoder_dim, decoder_depth=s.decoder_depth,
                             decoder_heads=s.decoder_heads, mask_ratio=s.mask_ratio,
                             norm_pix=s.norm_pix, learnable_decoder_pos=s.learnable_pos)


@torch.no_grad()
def head_accuracy(graph: "MLOMAEGraph", x: Tensor, y: Tensor, batch_size: int = 512) -> Optional[float]:
    """Accuracy of the trained classifier head on the encoder's unmasked CLS feature
    (eval mode, restored after): for ``mlo-mae`` the stage-II head — the official code's
    test accuracy, the paper's CIFAR "linear probing" numbers; for ``blo-mae`` the merged
    lower's head. ``None`` for variants without a head (``mae``, ``frozen-mask``)."""
    if graph.head is None:
        return None
    modules = (graph.mae, graph.head)
    was = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        correct = 0
        for i in range(0, len(x), batch_size):
            logits = graph.head(graph.mae.features(x[i:i + batch_size], pool="cls"))  # [B, C]
            correct += int((logits.argmax(-1) == y[i:i + batch_size].to(logits.device)).sum())
    finally:
        for m, w in zip(modules, was):
            m.train(w)
    return correct / max(1, len(x))


def mask_split(n: int, finetune_fraction: float = 0.8, seed: int = 0) -> Tuple[Tensor, Tensor]:
    """Disjoint index sets (finetune, mask) covering ``range(n)`` (seeded)."""
    ft, mk = split(n, (finetune_fraction, 1.0 - finetune_fraction), seed)
    return ft, mk


# --------------------------------------------------------------------- problems
def _probability_masker(net, detach: bool = False, normalize: bool = False, ratio: float = 0.75,
                        position: bool = True):
    """``masker(x, pretrain[, noise]) -> (scores, weights)``: the masked patches' losses × ``p``.

    Without ``noise`` the top-k of ``p`` are masked (the paper). With ``noise``
    (``u [N, L]`` uniform, drawn with the batch: ``mask_sampling: gumbel``) the k
    masked patches are *sampled* without replacement with probabilities ∝ ``p``
    (Gumbel top-k: the k largest ``log p − log(−log u)``), so masks keep MAE's
    diversity while the masking network shifts where they fall.

    ``net`` is the mask problem (its current state) or a fixed module. Ablations:
    ``detach`` feeds the embeddings to the masking network as constants (by default
    the pretraining gradient also flows through ``p`` into them); ``normalize``
    weights the masked losses by ``p_i / mean_{j masked} p_j`` per sample, so the
    masking network can move weight between patches but not scale the loss down;
    ``position=False`` feeds the embeddings' patch part alone (no position)."""
    def masker(x: Tensor, pre: MAEPretrain, noise: Optional[Tensor] = None):
        emb = pre.patch_embeddings(x, position=position)  # [N, L, D]
        p = net(emb.detach() if detach else emb)  # [N, L]
        scores = p if noise is None else gumbel_scores(p, noise)
        if not normalize:
            return scores, p
        k = num_masked(p.shape[1], ratio)
        masked = scores.detach().topk(k, dim=1).indices  # [N, k], the masked patches
        return scores, p / p.gather(1, masked).mean(dim=1, keepdim=True)
    return masker


def gumbel_scores(p: Tensor, noise: Tensor) -> Tensor:
    """``log p − log(−log u)`` ``[N, L]``: the ``k`` largest are ``k`` draws without
    replacement with probabilities ∝ ``p`` (Gumbel top-k). A selection, never
    differentiated (``p`` is detached)."""
    logp = p.detach().clamp_min(torch.finfo(p.dtype).tiny).log()
    return logp - (-noise.clamp(1e-12, 1.0 - 1e-7).log()).log()


def with_mask_noise(stream, num_tokens: int, seed: int):
    """``{"x": x, "noise": u [N, L]}`` for each batch ``(x, ...)`` of ``stream``: the
    uniform noise of a sampled mask, from the stream's own seeded generator (so a
    resumed run that replays the stream draws the same masks)."""
    gen = torch.Generator().manual_seed(seed)
    for batch in stream:
        x = batch[0]
        u = torch.rand(x.shape[0], num_tokens, generator=gen, dtype=x.dtype)  # [N, L]
        yield {"x": x, "noise": u.to(x.device)}


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
    the levels below (``classify(x) -> logits``). No direct gradient — unless
    ``budget > 0``: then ``budget · mean_n (mean_i p_{n,i} − k/L)²`` is added, with
    ``p [N, L]`` the network's output on the (detached) embeddings of ``source``, the
    problem it masks. Read as masking probabilities, each image's ``p`` should sum to
    the ``k`` patches it masks (``share = k/L``); the term keeps them there while the
    hypergradient moves them between patches (``mask_budget``; not in the paper)."""

    def __init__(self, net: MaskingNetwork, classify, data, source: Optional[MAEPretrain] = None,
                 position: bool = True, budget: float = 0.0, share: float = 0.75, **kw):
        super().__init__("mask", module=net, data=data, **kw)
        self.classify = classify
        self.source, self.position, self.budget, self.share = source, position, budget, share

    def training_step(self, batch):
        x, y = batch
        logits = self.classify(x)  # [N, C]
        ce = F.cross_entropy(logits, y)
        out = {"loss": ce, "acc": (logits.argmax(-1) == y).float().mean()}
        if self.budget:
            p = self(self.source.patch_embeddings(x, position=self.position).detach())  # [N, L]
            gap = p.mean(dim=1) - self.share  # [N]: Σ_i p / L − k / L
            out["loss"] = ce + self.budget * gap.pow(2).mean()
            out["ce"], out["budget_gap"] = ce.detach(), gap.detach().abs().mean()
        return out


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


def _adamw(lr: float, s: MLOMAESettings, level: str) -> Dict[str, Any]:
    return {"optimizer": torch.optim.AdamW,
            "optimizer_kwargs": {"lr": lr, "betas": tuple(s.betas),
                                 "weight_decay": s.level_weight_decay(level)}}


def _budget(s: MLOMAESettings, tokens: int, source: MAEPretrain) -> Dict[str, Any]:
    """MaskLevel's budget arguments (``mask_budget``: the weight; ``k/L`` the share of
    the ``L = tokens`` patches of ``source``)."""
    if not s.mask_budget:
        return {}
    return {"source": source, "position": s.mask_input_position, "budget": s.mask_budget,
            "share": num_masked(tokens, s.mask_ratio) / tokens}


def _schedule(s: MLOMAESettings, updates: int, level: str) -> Dict[str, Any]:
    """Cosine over ``updates`` of ``level``, ending at ``cosine_final[level]`` · lr: the
    first ``arccos(2f − 1)/π`` of a cosine to 0 (the official code's shape, module docstring)."""
    if not s.cosine:
        return {}
    t_max = max(1, updates)
    final = s.cosine_final.get(level, 0.0)
    if final:
        t_max = t_max * math.pi / math.acos(2.0 * final - 1.0)
        t_max = int(t_max) if t_max.is_integer() else t_max
    return {"scheduler": torch.optim.lr_scheduler.CosineAnnealingLR,
            "scheduler_kwargs": {"T_max": t_max}}


def no_decay_names(module: nn.Module, prefix: str = "") -> list:
    """Names (with ``prefix``) of the trainable parameters timm's
    ``param_groups_weight_decay`` exempts from weight decay, as the official code's
    pretrain optimizer: ``ndim <= 1`` or a name ending in ``.bias``."""
    return [prefix + n for n, p in module.named_parameters()
            if p.requires_grad and (p.ndim <= 1 or n.endswith(".bias"))]


def _stream(s: MLOMAESettings, level: str, tensors: Tuple[Tensor, ...], seed: int):
    """The endless batches of ``level``; random crop + flip when ``level in s.augment``
    (the stream's own generator, seeded from ``seed`` and the level)."""
    data = infinite_loader(tensors, s.batch_size, seed=seed)
    if level in s.augment:
        data = augment_stream(data, seed=seed + 1000 * (1 + LEVELS.index(level)),
                              padding=s.augment_padding)
    return data


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
    pre_data = _stream(s, "pretrain", (x,), seed)
    if s.mask_sampling == "gumbel" and variant != "mae":
        pre_data = with_mask_noise(pre_data, mae.num_tokens, seed + 5000)
    ft_data = _stream(s, "finetune", (x[ft_idx], y[ft_idx]), seed + 1)
    mk_data = _stream(s, "mask", (x[mk_idx], y[mk_idx]), seed + 2)
    no_decay = [{"params": no_decay_names(mae), "weight_decay": 0.0}] if s.no_decay_1d else None
    upper_updates = math.ceil(s.steps / s.unroll_steps)
    mask_updates = max(1, s.steps // max(s.mask_every, s.unroll_steps))
    hold = {"unroll_steps": s.unroll_steps}

    if variant in ("mae", "frozen-mask"):
        masker = None
        if variant == "frozen-mask":
            net.requires_grad_(False)
            masker = _probability_masker(net, s.detach_mask_input, s.normalize_weights, s.mask_ratio,
                                         s.mask_input_position)
        pre = MAEPretrain(mae, pre_data, masker=masker, **_adamw(s.pretrain_lr, s, "pretrain"),
                          param_groups=no_decay, **_schedule(s, s.steps, "pretrain"),
                          config=_config("pretrain", s, **hold))
        engine = mlo.Engine([pre], config=engine_config)
        return MLOMAEGraph(variant, engine, {"pretrain": pre}, mae, None,
                           net if variant == "frozen-mask" else None, s)

    mask_cfg = dict(s.configs.get("mask", {}))
    mask_cfg.setdefault("update_every_iterations", s.mask_every if s.mask_every > 1 else None)
    if variant == "mlo-mae":
        pre = MAEPretrain(mae, pre_data, **_adamw(s.pretrain_lr, s, "pretrain"), param_groups=no_decay,
                          **_schedule(s, s.steps, "pretrain"), config=_config("pretrain", s, **hold))
        fin = Finetune(head, pre, ft_data, **_adamw(s.finetune_lr, s, "finetune"),
                       **_schedule(s, upper_updates, "finetune"), config=_config("finetune", s))
        mask = MaskLevel(net, lambda xb: fin(pre.call("features", xb, pool="cls")), mk_data,
                         **_budget(s, mae.num_tokens, pre),
                         **_adamw(s.mask_lr, s, "mask"), **_schedule(s, mask_updates, "mask"),
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
    groups = [{"params": head_names, "lr": s.finetune_lr,
               "weight_decay": s.level_weight_decay("finetune")}]
    if s.no_decay_1d:   # the MAE's part; the head keeps its decay on every parameter
        groups.append({"params": no_decay_names(mae, "mae."), "weight_decay": 0.0})
    lower = MergedLower(merged, zip_batches(pre_data, ft_data), s.blo_weight,
                        **_adamw(s.pretrain_lr, s, "pretrain"), **_schedule(s, s.steps, "pretrain"),
                        param_groups=groups, config=_config("pretrain", s, **hold))
    mask = MaskLevel(net, lambda xb: lower.call("classify", xb), mk_data,
                     **_budget(s, mae.num_tokens, lower),
                     **_adamw(s.mask_lr, s, "mask"), **_schedule(s, mask_updates, "mask"),
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
