"""The settings of an MLO-MAE run (:class:`MLOMAESettings`) and their validation.

Fields are documented in ``problems/mlo_mae.py``'s module docstring (the method, the
hypergradient weighting, the masking network's input, the paper preset's pipeline
settings); presets are YAML files in ``examples/configs/`` holding these fields.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Dict, Optional, Tuple

__all__ = ["VARIANTS", "SAMPLINGS", "WEIGHTINGS", "SCALED_METHODS", "LEVELS", "MLOMAESettings"]

VARIANTS = ("mlo-mae", "blo-mae", "mae", "frozen-mask")
SAMPLINGS = ("topk", "gumbel")    # how the masked set is drawn from p (problems/mlo_mae.py)
WEIGHTINGS = ("paper", "official")
# methods whose best-response Jacobian uses H⁻¹ ≈ s·I, s chosen by the weighting
SCALED_METHODS = ("finite_difference", "darts")   # (sama already carries η: u = η D ⊙ v)
LEVELS = ("pretrain", "finetune", "mask")   # names of augment / cosine_final / *_weight_decay


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
    mask_sampling: str = "topk"      # "topk": mask the k highest p (paper); "gumbel": sample k ∝ p
    mask_budget: float = 0.0         # λ of λ·mean_n (mean_i p − k/L)² in the mask loss (not in the paper)
    num_classes: int = 10
    head_dropout: float = 0.1
    learnable_pos: bool = False      # encoder + decoder position tables learnable (sin-cos init)
    # input pipeline (module docstring)
    normalize: Optional[Tuple[Tuple[float, ...], Tuple[float, ...]]] = None  # (mean, std) per channel
    augment: Tuple[str, ...] = ()    # levels whose batches get random crop + flip
    augment_padding: int = 4         # RandomCrop's padding (0: flip only)
    # optimization
    batch_size: int = 128
    pretrain_lr: float = 1e-4
    finetune_lr: float = 1e-3
    mask_lr: float = 1e-3
    betas: Tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 1e-3
    pretrain_weight_decay: Optional[float] = None   # None: weight_decay
    finetune_weight_decay: Optional[float] = None   # None: weight_decay
    mask_weight_decay: Optional[float] = None       # None: weight_decay
    no_decay_1d: bool = False        # pretrain: no decay on ndim<=1 / *.bias (timm's rule)
    cosine: bool = True              # cosine annealing over `steps` iterations
    cosine_final: Dict[str, float] = field(default_factory=dict)  # level -> lr fraction at the end (0)
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
        if self.mask_budget < 0:
            raise ValueError(f"MLOMAESettings: mask_budget must be >= 0, got {self.mask_budget}")
        if self.mask_sampling not in SAMPLINGS:
            raise ValueError(f"MLOMAESettings: mask_sampling must be one of {list(SAMPLINGS)}, "
                             f"got {self.mask_sampling!r}")
        unknown = set(self.configs) - {"pretrain", "finetune", "mask"}
        if unknown:
            raise ValueError(f"MLOMAESettings.configs: unknown problem(s) {sorted(unknown)}; "
                             f"problems: pretrain, finetune, mask")
        self._check_pipeline()

    def _check_pipeline(self) -> None:
        """``normalize``, ``augment``, ``*_weight_decay``, ``cosine_final``."""
        if self.normalize is not None:
            pair = self.normalize
            if isinstance(pair, (str, bytes)) or not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise ValueError("MLOMAESettings.normalize must be null or [mean, std], two lists of "
                                 f"{self.in_chans} numbers, got {pair!r}")
            out = []
            for what, v in zip(("mean", "std"), pair):
                if (isinstance(v, (str, bytes)) or not isinstance(v, (list, tuple)) or len(v) != self.in_chans
                        or not all(isinstance(e, (int, float)) and not isinstance(e, bool)
                                   and math.isfinite(e) for e in v)):
                    raise ValueError(f"MLOMAESettings.normalize: {what} must be {self.in_chans} finite "
                                     f"numbers (one per channel), got {v!r}")
                out.append(tuple(float(e) for e in v))
            if any(e <= 0 for e in out[1]):
                raise ValueError(f"MLOMAESettings.normalize: std must be > 0, got {list(out[1])}")
            self.normalize = tuple(out)
        aug = self.augment
        if isinstance(aug, (str, bytes)) or not isinstance(aug, (list, tuple)) \
                or not all(isinstance(a, str) for a in aug):
            raise ValueError(f"MLOMAESettings.augment must be a list of level names {list(LEVELS)}, "
                             f"got {aug!r}")
        bad = sorted(set(aug) - set(LEVELS))
        if bad:
            raise ValueError(f"MLOMAESettings.augment: unknown level(s) {bad}; levels: {list(LEVELS)}")
        self.augment = tuple(a for a in LEVELS if a in aug)
        if self.augment_padding < 0:
            raise ValueError(f"MLOMAESettings.augment_padding must be >= 0, got {self.augment_padding}")
        for level in LEVELS:
            key = f"{level}_weight_decay"
            v = getattr(self, key)
            if isinstance(v, str):
                try:
                    v = float(v)
                except ValueError:
                    raise TypeError(f"MLOMAESettings.{key} must be null or a number, got {v!r}") from None
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                                  or not math.isfinite(v) or v < 0):
                raise ValueError(f"MLOMAESettings.{key} must be null or a number >= 0, got {v!r}")
            setattr(self, key, None if v is None else float(v))
        cf = self.cosine_final
        if not isinstance(cf, dict):
            raise ValueError(f"MLOMAESettings.cosine_final must be a mapping level -> fraction, got {cf!r}")
        bad = sorted(set(cf) - set(LEVELS), key=str)
        if bad:
            raise ValueError(f"MLOMAESettings.cosine_final: unknown level(s) {bad}; levels: {list(LEVELS)}")
        out = {}
        for level, f in cf.items():
            if isinstance(f, str):
                try:
                    f = float(f)
                except ValueError:
                    pass
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 <= f < 1.0:
                raise ValueError(f"MLOMAESettings.cosine_final[{level!r}] must be a number in [0, 1) "
                                 f"(the fraction of the lr reached at the end), got {f!r}")
            out[level] = float(f)
        if any(out.values()) and not self.cosine:
            raise ValueError("MLOMAESettings.cosine_final needs cosine: true")
        self.cosine_final = out

    def level_weight_decay(self, level: str) -> float:
        """The weight decay of ``level`` (``pretrain``/``finetune``/``mask``)."""
        v = getattr(self, f"{level}_weight_decay")
        return self.weight_decay if v is None else v

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
