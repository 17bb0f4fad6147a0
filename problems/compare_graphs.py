"""Comparison graphs built from ``problems`` for :mod:`mlo.compare` (a plug-in).

``mlo`` knows nothing about masked autoencoders; this module is registered as the
``mlo.compare_graphs`` entry point ``mlo_mae`` (``setup.cfg``), which
``python -m mlo.compare --graphs mlo_mae`` loads on demand.

``mlo_mae`` — a tiny MLO-MAE (docs/design.md#mlo-mae) from the real blocks, float64::

    pretrain  θ: MAE (ImageTokenizer 4×4×1, patch 2 → 4 tokens, width 8, depth 1,
                 2 heads, MLP ratio 2, decoder 8×1, norm_pix), mask ratio 0.5;
                 f_pre = s_pre · L_rec(θ; x, top-k(p), p) + μ_pre/2 ‖θ − θ₀‖²,
                 p = σ(MLP_φ(vec(E_θ(x))))  (the masking network, hidden 8)
    finetune  ψ: LayerNorm → Linear head on the CLS feature (dropout 0):
                 f_ft = s_ft · CE(head_ψ(cls_θ(x)), y) + μ_ft/2 ‖ψ − ψ₀‖²
    mask      φ: F = CE(head_ψ(cls_θ(x)), y) on the mask split (no direct term)

with two paths into ``mask``: ``mask → pretrain → mask`` and
``mask → pretrain → finetune → mask``. Both lowers use plain (full-batch) SGD with
fixed batches, so every engine built by the factory follows the same trajectory.

Making the IFT reference meaningful (stationary lowers, positive-definite Hessians):

* **Damping in the losses' definition**: proximal L2 terms ``μ/2 ‖θ − θ₀‖²``,
  ``μ/2 ‖ψ − ψ₀‖²`` around the seeded initialisation (``μ_pre = 0.1``, ``μ_ft = 0.2``)
  — part of ``f``, so ``H = s ∇²L + μI`` is what every method and the reference see
  (not an optimizer weight decay). The loss scales ``s_pre = 0.05``, ``s_ft = 0.3``
  change neither the best response nor its Jacobian ``−H⁻¹ ∂²f/∂θ∂λ``; they put
  both spectra below 2 so that SGD (lr 2 and 1.2) and Neumann with ``α ≤ 1`` are
  stable at both levels (one method setting applies to both).
* **Warm-up**: the builder runs ``prewarm = 200`` full-batch SGD steps of both lowers
  once (mask network held) and the factory starts every engine from that state;
  ``warmup = 20`` more steps (≥ the largest unrolled K) reach the evaluated state.
  Measured there (seed 1): ``‖∇f_pre‖ ≈ 4e-16``, ``‖∇f_ft‖ ≈ 2e-16``; spectra
  ``H_pre ∈ [0.070, 0.498]``, ``H_ft ∈ [0.168, 1.205]`` (condition ≈ 7 each, so
  ``2/λ_max ≈ 1.66`` and CG, Neumann and finite differences are discriminated);
  the builder recomputes and checks these (``GraphSpec.data``).
* **Smooth pieces**: ``f_pre`` is only piecewise smooth in ``θ`` — the masking
  network's ReLU (its input, the MAE embeddings, moves with ``θ``) and the top-k
  switch. The evaluated state must lie inside one piece: smallest
  ``|ReLU pre-activation|`` ≈ 2.5e-3 and smallest gap between the k-th and (k+1)-th
  probability ≈ 3.0e-3 (``data["margins"]``). With seed 0 plain SGD instead
  stalls on a ReLU kink (the gradient flips sign every few steps at ‖∇f‖ ≈ 4e-5),
  with seed 2 on a top-k switch; hence seed 1.
* The CLS and mask tokens are re-initialised at unit scale (MAE's 0.02 gives the
  LayerNorm of the CLS token a ``1/σ²`` curvature of ~3000, far above the rest).

The top-k selection is piecewise constant; all methods differentiate the smooth
parts with the selection held (``random_masking`` detaches the scores). The
reference (:func:`dense_reference`) is the IFT hypergradient at the evaluated lower
iterates with the same convention, computed without ``engines`` or the engine,
from the losses written out on flat vectors: dense Hessians ``H_pre = ∂²f_pre/∂θ²``
(all 1396 MAE parameters) and ``H_ft = ∂²f_ft/∂ψ²``, dense mixed derivatives
``∂²f_pre/∂θ∂φ`` and ``∂²f_ft/∂θ∂ψ`` (reverse-over-reverse ``torch.func``, one VJP
per row), Cholesky solves, then per path (docs/design.md#p4, generalised)::

    mask → pretrain → mask:            −(∂²f_pre/∂φ∂θ) H_pre⁻¹ ∂F/∂θ
    mask → pretrain → finetune → mask: −(∂²f_pre/∂φ∂θ) H_pre⁻¹ [−(∂²f_ft/∂θ∂ψ) H_ft⁻¹ ∂F/∂ψ]

``mask`` has no direct term (``F`` does not read ``φ``), so the two terms sum to
the hypergradient. All implicit and finite-difference settings are evaluated at
bitwise the same state and share one reference; an unrolled window ends at that
state up to rounding (≤ 2e-16 here) and, unless bitwise equal, gets its own.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vjp, vmap

import mlo
from mlo.compare import HOLD, GraphSpec, Setting
from problems.masking_net import MaskingNetwork
from problems.mlo_mae import (ClassifierHead, Finetune, MaskLevel, MLOMAESettings,
                              _probability_masker, build_mae_model, mask_split)
from problems.pretrain import MAEPretrain
from problems.transformer import math_attention

__all__ = ["tiny_settings", "tiny_data", "DampedPretrain", "DampedFinetune", "TinyMLOMAE",
           "hessians", "reference_at", "dense_reference", "method_settings", "mlo_mae"]

DT = torch.float64
PATHS = (("mask", "pretrain", "mask"), ("mask", "pretrain", "finetune", "mask"))


def tiny_settings(**overrides) -> MLOMAESettings:
    """The tiny MLO-MAE model: 4×4×1 images, patch 2 (4 tokens), width 8, depth 1,
    2 heads, MLP ratio 2, decoder 8×1, mask ratio 0.5, masking network hidden 8,
    3 classes, head dropout 0 (deterministic losses)."""
    d = dict(image_size=4, patch_size=2, in_chans=1, embed_dim=8, depth=1, num_heads=2,
             mlp_ratio=2.0, decoder_dim=8, decoder_depth=1, decoder_heads=2, mask_ratio=0.5,
             norm_pix=True, mask_hidden=8, num_classes=3, head_dropout=0.0,
             finetune_fraction=2 / 3)
    d.update(overrides)
    return MLOMAESettings(**d)


def tiny_data(s: MLOMAESettings, n: int = 12, noise: float = 0.5, seed: int = 0):
    """Synthetic labelled images ``x [n, C, H, W]`` (class prototype + Gaussian noise),
    ``y [n]``, and the finetune / mask index split."""
    gen = torch.Generator().manual_seed(seed)
    shape = (s.in_chans, s.image_size, s.image_size)
    protos = torch.randn(s.num_classes, *shape, generator=gen, dtype=DT, device="cpu")   # host data
    y = torch.arange(n, device="cpu") % s.num_classes
    x = protos[y] + noise * torch.randn(n, *shape, generator=gen, dtype=DT, device="cpu")
    ft, mk = mask_split(n, s.finetune_fraction, seed)
    return x, y, ft, mk


def _sqdist(state: Mapping[str, Tensor], anchor: Mapping[str, Tensor]) -> Tensor:
    return sum(((state[k] - a) ** 2).sum() for k, a in anchor.items())


class DampedPretrain(MAEPretrain):
    """``f_pre = scale · L_rec + damping/2 ‖θ − anchor‖²`` (level I with a proximal term)."""

    def __init__(self, mae, data, *, scale: float, damping: float,
                 anchor: Mapping[str, Tensor], **kw):
        super().__init__(mae, data, **kw)
        self.scale, self.damping, self.anchor = scale, damping, dict(anchor)

    def training_step(self, batch):
        rec = super().training_step(batch)["loss"]
        return {"loss": self.scale * rec + 0.5 * self.damping * _sqdist(self.params, self.anchor),
                "recon": rec.detach()}


class DampedFinetune(Finetune):
    """``f_ft = scale · CE + damping/2 ‖ψ − anchor‖²`` (level II with a proximal term)."""

    def __init__(self, head, pretrain, data, *, scale: float, damping: float,
                 anchor: Mapping[str, Tensor], **kw):
        super().__init__(head, pretrain, data, **kw)
        self.scale, self.damping, self.anchor = scale, damping, dict(anchor)

    def training_step(self, batch):
        out = super().training_step(batch)
        out["ce"] = out["loss"].detach()
        out["loss"] = self.scale * out["loss"] + 0.5 * self.damping * _sqdist(self.params, self.anchor)
        return out


class TinyMLOMAE:
    """The tiny float64 MLO-MAE graph: models, data, loss constants, and engines on it.

    Args:
        settings: model settings (default :func:`tiny_settings`).
        n: number of training images (all pretrain; ``finetune_fraction`` finetune,
            the rest mask).
        seed: initialisation and data seed.
        pre_scale, ft_scale: loss scales ``s_pre``, ``s_ft``.
        pre_damping, ft_damping: proximal weights ``μ_pre``, ``μ_ft``.
        pre_lr, ft_lr: SGD learning rates of the lowers.
    """

    def __init__(self, settings: Optional[MLOMAESettings] = None, n: int = 12, seed: int = 1,
                 pre_scale: float = 0.05, ft_scale: float = 0.3, pre_damping: float = 0.1,
                 ft_damping: float = 0.2, pre_lr: float = 2.0, ft_lr: float = 1.2):
        self.s = settings or tiny_settings()
        self.seed = seed
        self.pre_scale, self.ft_scale = pre_scale, ft_scale
        self.pre_damping, self.ft_damping = pre_damping, ft_damping
        self.pre_lr, self.ft_lr = pre_lr, ft_lr
        self.x, self.y, ft, mk = tiny_data(self.s, n, seed=seed)
        self.pre_batch = (self.x,)
        self.ft_batch = (self.x[ft], self.y[ft])
        self.mk_batch = (self.x[mk], self.y[mk])
        self.start: Optional[Dict[str, Dict[str, Tensor]]] = None   # factory's initial state
        mae, head, net = self.modules()
        self.anchor_pre = {k: v.detach().clone() for k, v in mae.named_parameters()}
        self.anchor_ft = {k: v.detach().clone() for k, v in head.named_parameters()}

    def modules(self) -> Tuple[nn.Module, nn.Module, MaskingNetwork]:
        """Fresh seeded MAE, head and masking network (float64), at ``self.start`` if set."""
        s = self.s
        with torch.random.fork_rng():          # seeded without touching the caller's RNG
            torch.manual_seed(self.seed)
            mae = build_mae_model(s).to(DT)
            with torch.no_grad():              # unit-scale tokens (module docstring)
                mae.cls_token.normal_()
                mae.mask_token.normal_()
            head = ClassifierHead(s.embed_dim, s.num_classes, s.head_dropout).to(DT)
            net = MaskingNetwork(mae.num_tokens, s.embed_dim, s.mask_hidden).to(DT)
        if self.start is not None:
            for m, k in ((mae, "pretrain"), (head, "finetune"), (net, "mask")):
                m.load_state_dict(self.start[k])
        return mae, head, net

    def engine(self, method: str = "cg", options: Optional[dict] = None):
        """A fresh engine (``method`` at both lowers; ``mask`` never becomes ready)."""
        options = dict(options or {})
        mae, head, net = self.modules()
        cfg = dict(method=method, method_options=options)
        pre = DampedPretrain(mae, [self.pre_batch], scale=self.pre_scale, damping=self.pre_damping,
                             anchor=self.anchor_pre, optimizer=torch.optim.SGD,
                             optimizer_kwargs={"lr": self.pre_lr},
                             config=mlo.ProblemConfig(unroll_steps=1, **cfg))
        # finetune's unroll_steps holds mask back: each engine.step() moves θ, then ψ
        fin = DampedFinetune(head, pre, [self.ft_batch], scale=self.ft_scale,
                             damping=self.ft_damping, anchor=self.anchor_ft,
                             optimizer=torch.optim.SGD, optimizer_kwargs={"lr": self.ft_lr},
                             config=mlo.ProblemConfig(unroll_steps=HOLD, **cfg))
        mask = MaskLevel(net, lambda xb: fin(pre.call("features", xb, pool="cls")), [self.mk_batch],
                         optimizer=torch.optim.SGD, optimizer_kwargs={"lr": 1e-3})
        pre.masker = _probability_masker(mask)
        eng = mlo.Engine([pre, fin, mask], {"u2l": {mask: [pre]},
                                            "l2u": {pre: [fin, mask], fin: [mask]}})
        return eng, "mask"

    def prewarm(self, steps: int) -> None:
        """Runs ``steps`` lower steps once; later engines start from there."""
        eng, _ = self.engine()
        eng.run(steps)
        self.start = {k: {n: t.detach().clone() for n, t in eng.problems[k].module.state_dict().items()}
                      for k in ("pretrain", "finetune", "mask")}


# ------------------------------------------------------------------ reference
def _flat(ts: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.detach().reshape(-1) for t in ts])


def _unflat(v: Tensor, names: Sequence[str], like: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    out, i = {}, 0
    for k in names:
        n = like[k].numel()
        out[k] = v[i:i + n].view_as(like[k])
        i += n
    return out


def _jacobian(fn: Callable[[Tensor], Tensor], at: Tensor, chunk: Optional[int] = 700) -> Tensor:
    """``∂fn/∂at`` as a dense ``[out, in]`` matrix: one vector-Jacobian product per
    output (basis cotangents), batched with ``vmap``."""
    out, pull = vjp(fn, at)
    return vmap(pull, chunk_size=chunk)(torch.eye(out.numel(), dtype=out.dtype, device=out.device))[0]


class _Functions:
    """The three losses of the graph as functions of flat vectors ``θ, ψ, φ``
    (``functional_call`` on template modules; written from the graph's definition,
    not through the problems or the engine)."""

    def __init__(self, g: "TinyMLOMAE", states: Mapping[str, Mapping[str, Tensor]]):
        self.g = g
        self.mae, self.head, self.net = g.modules()
        self.names = {k: list(states[k]) for k in ("pretrain", "finetune", "mask")}
        self.like = {k: {n: t.detach() for n, t in states[k].items()} for k in self.names}
        self.vec = {k: _flat([states[k][n] for n in self.names[k]]) for k in self.names}
        self.anchor = {"pretrain": _flat([g.anchor_pre[n] for n in self.names["pretrain"]]),
                       "finetune": _flat([g.anchor_ft[n] for n in self.names["finetune"]])}

    def _d(self, k, v):
        return _unflat(v, self.names[k], self.like[k])

    def f_pre(self, th: Tensor, ph: Tensor) -> Tensor:
        g, (x,) = self.g, self.g.pre_batch
        with math_attention():
            emb = _call(self.mae, "patch_embeddings", self._d("pretrain", th), x)   # [N, L, D]
            p = functional_call(self.net, self._d("mask", ph), (emb,))               # [N, L]
            rec, _, _ = functional_call(self.mae, self._d("pretrain", th), (x,),
                                        {"scores": p, "token_weights": p})
        return g.pre_scale * rec + 0.5 * g.pre_damping * ((th - self.anchor["pretrain"]) ** 2).sum()

    def f_ft(self, th: Tensor, ps: Tensor) -> Tensor:
        g, (x, y) = self.g, self.g.ft_batch
        with math_attention():
            logits = functional_call(self.head, self._d("finetune", ps),
                                     (_call(self.mae, "features", self._d("pretrain", th), x),))
        return (g.ft_scale * F.cross_entropy(logits, y)
                + 0.5 * g.ft_damping * ((ps - self.anchor["finetune"]) ** 2).sum())

    def upper(self, th: Tensor, ps: Tensor) -> Tensor:
        x, y = self.g.mk_batch
        with math_attention():
            logits = functional_call(self.head, self._d("finetune", ps),
                                     (_call(self.mae, "features", self._d("pretrain", th), x),))
        return F.cross_entropy(logits, y)


class _Method(nn.Module):
    def __init__(self, m: nn.Module, method: str):
        super().__init__()
        self.m, self.method = m, method

    def forward(self, *a, **kw):
        return getattr(self.m, self.method)(*a, **kw)


def _call(module: nn.Module, method: str, params: Mapping[str, Tensor], *args):
    return functional_call(_Method(module, method), {"m." + k: v for k, v in params.items()},
                           args, strict=False)


def hessians(g: "TinyMLOMAE", states) -> Dict[str, object]:
    """Dense ``H_pre = ∂²f_pre/∂θ²``, ``H_ft = ∂²f_ft/∂ψ²`` and mixed
    ``B_pre = ∂²f_pre/∂θ∂φ [θ, φ]``, ``B_ft = ∂²f_ft/∂θ∂ψ [θ, ψ]`` at ``states``
    (``"fn"``: the loss functions on flat vectors)."""
    fn = _Functions(g, states)
    th, ps, ph = fn.vec["pretrain"], fn.vec["finetune"], fn.vec["mask"]
    H_pre = _jacobian(grad(lambda t: fn.f_pre(t, ph)), th)             # [θ, θ]
    B_pre = _jacobian(lambda t: grad(fn.f_pre, 1)(t, ph), th).T        # ∂(∇φ f)/∂θ, transposed
    H_ft = _jacobian(grad(lambda q: fn.f_ft(th, q)), ps)               # [ψ, ψ]
    B_ft = _jacobian(lambda t: grad(fn.f_ft, 1)(t, ps), th).T          # [θ, ψ]
    return {"H_pre": (H_pre + H_pre.T) / 2, "B_pre": B_pre, "H_ft": (H_ft + H_ft.T) / 2,
            "B_ft": B_ft, "fn": fn}


def _states(engine: mlo.Engine) -> Dict[str, Dict[str, Tensor]]:
    return {k: {n: t.detach().clone() for n, t in engine.problems[k].own_state().items()}
            for k in ("pretrain", "finetune", "mask")}


def reference_at(g: "TinyMLOMAE", states) -> Dict[str, object]:
    """The dense per-path IFT hypergradient of ``mask`` at ``states`` (module docstring).

    Returns ``{"grad": {φ name: tensor}, "paths": {path: {...}}, "spectra":
    {"pretrain": eigenvalues of H_pre, "finetune": ...}}``. Raises if a lower Hessian
    is not positive definite (Cholesky)."""
    h = hessians(g, states)
    fn = h["fn"]
    th, ps = fn.vec["pretrain"], fn.vec["finetune"]
    dF_th, dF_ps = grad(fn.upper, (0, 1))(th, ps)                 # ∂F/∂θ, ∂F/∂ψ
    chol = {}
    for k, H in (("pretrain", h["H_pre"]), ("finetune", h["H_ft"])):
        L, info = torch.linalg.cholesky_ex(H)
        if int(info):
            raise RuntimeError(f"mlo_mae reference: the {k} Hessian is not positive definite at the "
                               f"evaluated state (λ_min = {float(torch.linalg.eigvalsh(H)[0]):.3g})")
        chol[k] = L

    def solve(k, b):
        return torch.cholesky_solve(b.unsqueeze(-1), chol[k]).squeeze(-1)

    v_ft = -h["B_ft"] @ solve("finetune", dF_ps)                  # J_ftᵀ ∂F/∂ψ, on θ
    t1 = -h["B_pre"].T @ solve("pretrain", dF_th)                 # J_preᵀ ∂F/∂θ, on φ
    t2 = -h["B_pre"].T @ solve("pretrain", v_ft)                  # J_preᵀ J_ftᵀ ∂F/∂ψ
    names, like = fn.names["mask"], fn.like["mask"]
    return {"grad": _unflat(t1 + t2, names, like),
            "paths": {PATHS[0]: _unflat(t1, names, like), PATHS[1]: _unflat(t2, names, like)},
            "spectra": {"pretrain": torch.linalg.eigvalsh(h["H_pre"]),
                        "finetune": torch.linalg.eigvalsh(h["H_ft"])}}


def dense_reference(g: "TinyMLOMAE") -> Callable[[mlo.Engine, str], Dict[str, object]]:
    """``reference(engine, upper)`` for :func:`mlo.compare.compare`: :func:`reference_at`
    at the engine's current state, memoised on bitwise-equal states (all implicit and
    finite-difference settings are evaluated at the same state)."""
    cache: List[Tuple[Dict[str, Dict[str, Tensor]], Dict[str, object]]] = []

    def reference(engine: mlo.Engine, upper: str) -> Dict[str, object]:
        if upper != "mask":
            raise ValueError(f"the mlo_mae reference is for 'mask', got {upper!r}")
        states = _states(engine)
        for st, out in cache:
            if all(torch.equal(st[k][n], t) for k in st for n, t in states[k].items()):
                return out
        out = reference_at(g, states)
        cache.append((states, out))
        del cache[:-4]
        return out

    return reference


def _margins(g: "TinyMLOMAE", states) -> Dict[str, float]:
    """How far the state is from the non-smooth set: smallest |ReLU pre-activation| of
    the masking network and smallest gap between the k-th and (k+1)-th probability
    (the top-k boundary) over the pretraining batch."""
    mae, _, net = g.modules()
    mae.load_state_dict({**mae.state_dict(), **states["pretrain"]})
    net.load_state_dict({**net.state_dict(), **states["mask"]})
    (x,) = g.pre_batch
    with torch.no_grad():
        emb = mae.patch_embeddings(x)                                  # [N, L, D]
        pre_act = net.fc1(emb.reshape(len(x), -1))                     # [N, hidden]
        p = net(emb).sort(dim=1, descending=True).values               # [N, L]
    k = mae.num_tokens - int(mae.num_tokens * (1 - g.s.mask_ratio))   # masked count
    return {"relu": float(pre_act.abs().min()), "topk": float((p[:, k - 1] - p[:, k]).min())}


def method_settings(quick: bool = False, alphas: Sequence[float] = (0.5, 1.0)) -> List[Setting]:
    """Unrolled K ∈ {1, 5, 20}, Neumann K ∈ {5, 20, 100} × α, CG iterations
    ∈ {1, 5, 20, 100}, finite differences ε ∈ {1e-1, 1e-2, 1e-3, 1e-4} (``quick``:
    unrolled {1, 5}, Neumann {5, 20} at the largest α, CG {1, 5}, ε 1e-2)."""
    unroll, neumann, cg, eps = (1, 5, 20), (5, 20, 100), (1, 5, 20, 100), (1e-1, 1e-2, 1e-3, 1e-4)
    if quick:
        unroll, neumann, cg, eps, alphas = (1, 5), (5, 20), (1, 5), (1e-2,), tuple(alphas)[-1:]
    out = [Setting("unrolled", {}, steps=k) for k in unroll]
    out += [Setting("neumann", {"iterations": k, "alpha": a}, curve=f"neumann α={a:g}")
            for a in alphas for k in neumann]
    out += [Setting("cg", {"max_iter": k, "tol": 0.0}) for k in cg]
    out += [Setting("finite_difference", {"epsilon": e}) for e in eps]
    return out


def mlo_mae(quick: bool = False, seed: int = 1, prewarm: int = 200, warmup: int = 20,
            alphas: Sequence[float] = (0.5, 1.0), **graph_kw) -> GraphSpec:
    """The ``mlo_mae`` comparison graph (:class:`mlo.compare.GraphSpec`).

    Runs ``prewarm`` lower steps once (the factory's initial state), then checks the
    evaluated state (``warmup`` steps later): lower gradient norms, positive-definite
    Hessians (spectra in ``data``), ``max(alphas) < 2/λ_max`` at both levels, and the
    distance to the ReLU kinks / top-k boundary.

    Args:
        quick: fewer settings (:func:`method_settings`).
        seed: model and data seed (seed 1: the damped lowers converge to a point in
            the interior of a smooth piece; other seeds may stall on a ReLU kink or
            a top-k switch, which this builder reports as an error).
        prewarm: lower steps before the factory's initial state.
        warmup: lower steps from there to the evaluated state (≥ the largest unrolled K).
        alphas: Neumann step sizes.
        **graph_kw: :class:`TinyMLOMAE` arguments.
    """
    g = TinyMLOMAE(seed=seed, **graph_kw)
    g.prewarm(prewarm)
    eng, upper = g.engine()
    eng.run(warmup)
    grad_norms = {k: eng.records[k]["grad_norm"] for k in ("pretrain", "finetune")}
    reference = dense_reference(g)
    ref = reference(eng, upper)            # the evaluated state; memoised for the run
    spectra = {k: (float(ev[0]), float(ev[-1])) for k, ev in ref["spectra"].items()}
    lam_max = max(hi for _, hi in spectra.values())
    if max(alphas) >= 2 / lam_max:
        raise ValueError(f"mlo_mae: Neumann α = {max(alphas):g} is not below 2/λ_max = "
                         f"{2 / lam_max:.3g}; Neumann would diverge")
    margins = _margins(g, _states(eng))
    if max(grad_norms.values()) > 1e-8 or min(margins.values()) <= 0.0:
        raise RuntimeError(f"mlo_mae: the lowers did not reach a stationary point inside a smooth "
                           f"piece (gradient norms {grad_norms}, distance to the ReLU kinks / "
                           f"top-k switch {margins}); try more prewarm steps or another seed")
    n = {k: sum(t.numel() for t in eng.problems[k].own_state().values())
         for k in ("pretrain", "finetune", "mask")}
    s = g.s
    desc = (f"tiny MLO-MAE, float64: MAE {s.image_size}×{s.image_size}×{s.in_chans} patch "
            f"{s.patch_size}, width {s.embed_dim}, depth {s.depth}, decoder {s.decoder_dim}×"
            f"{s.decoder_depth} ({n['pretrain']} θ), head {n['finetune']} ψ, masking network "
            f"{n['mask']} φ, mask ratio {s.mask_ratio:g}; lowers SGD lr {g.pre_lr:g}/{g.ft_lr:g} "
            f"at ‖∇f_pre‖ = {grad_norms['pretrain']:.0e}, ‖∇f_ft‖ = {grad_norms['finetune']:.0e}; "
            f"spectra H_pre [{spectra['pretrain'][0]:.3f}, {spectra['pretrain'][1]:.3f}], "
            f"H_ft [{spectra['finetune'][0]:.3f}, {spectra['finetune'][1]:.3f}] "
            f"(α < 2/λ_max = {2 / lam_max:.2f}); the method is used at both lower levels")
    return GraphSpec("mlo_mae", g.engine, reference, method_settings(quick, alphas), warmup, desc,
                     "dense IFT per path at the evaluated state (explicit Hessians, Cholesky; "
                     "top-k selection held)",
                     dict(graph=g, spectra=spectra, grad_norms=grad_norms, margins=margins,
                          sizes=n, reference=ref, prewarm=prewarm))
