"""Built-in graphs for :func:`mlo.compare.compare` and their registry.

A graph for the comparison tool is a :class:`GraphSpec`: a *factory*
``factory(method, options) -> (engine, upper_name)``, an exact reference, the
default method settings and the number of warm-up lower steps. Built in:

* ``ridge`` — P1 (docs/design.md#p1): ridge regression with per-feature weight decay ``λ``
  on synthetic data. Lower ``½‖Xw − y‖² + ½Σλ_j w_j²`` (SGD), upper
  ``½‖X_v w − y_v‖²``. Reference: the dense closed form ``−w ⊙ H⁻¹ g(w)``,
  ``H = XᵀX + diag(λ)``, at the evaluated iterate ``w``.
* ``logreg`` — logistic regression with per-feature weight decay on scikit-learn's
  breast-cancer data. Lower: weights + bias, ``BCE + ½Σ exp(λ_j) w_j²`` (SGD with
  momentum), trained to near-optimum; upper: validation BCE; ``λ`` = per-feature log
  weight decay. Reference: CG to relative residual 1e-12 in float64.
* ``three_level_quadratic`` (deprecated old name ``p4``) — the MLO-MAE-shaped linear
  three-level graph (docs/design.md#p4, with non-identity level metrics): pretrain
  ``½(E − AM)ᵀS_E(E − AM) + a/2‖E‖²`` (reads mask), finetune
  ``½(C − FE)ᵀS_C(C − FE) + c/2‖C‖²`` (reads pretrain), mask ``½‖GE + QC − t‖²``
  (reads both); two paths into ``mask``. ``S_E``, ``S_C`` are fixed SPD matrices
  (condition number 30 by default), so the lower Hessians ``S_E + aI``, ``S_C + cI``
  are not multiples of the identity and CG, Neumann and finite differences differ.
  The method under test is used at both lower levels. Reference: closed form per path
  at the evaluated ``(E, C)`` with the best-response Jacobians
  ``J_E = (S_E + aI)⁻¹S_E A``, ``J_C = (S_C + cI)⁻¹S_C F``: ``J_Eᵀ Gᵀ r`` and
  ``J_Eᵀ (Q J_C)ᵀ r``, ``r = GE + QC − t``.

More graphs come from code that may import what ``mlo`` must not (``mlo`` knows
nothing about masked autoencoders): :func:`register_graph` at run time, or a plug-in
— a Python entry point in the group ``mlo.compare_graphs`` (:data:`ENTRY_POINT_GROUP`)
naming a builder ``builder(quick: bool = False) -> GraphSpec``, e.g. in setup.cfg::

    [options.entry_points]
    mlo.compare_graphs =
        mlo_mae = problems.compare_graphs:mlo_mae

Entry points are listed by :func:`available_graphs` without being imported, and
loaded by :func:`get_graph` the first time their name is asked for (built-in and
registered names take precedence). A deprecated old name (:data:`DEPRECATED_NAMES`)
still builds its graph, with a ``DeprecationWarning`` naming the new one. This package
declares ``mlo_mae`` (a tiny float64 MLO-MAE from ``problems``:
:mod:`problems.compare_graphs`).
"""
from __future__ import annotations

import importlib.metadata
import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ProblemConfig
from ..engine import Engine
from ..problem import Problem
from .runner import Reference, Setting

__all__ = ["GraphSpec", "register_graph", "get_graph", "available_graphs", "default_settings",
           "UnknownGraphError", "ENTRY_POINT_GROUP", "HOLD", "DEPRECATED_NAMES", "ridge", "logreg",
           "three_level_quadratic", "p4"]

DT = torch.float64
#: ``unroll_steps`` for the problems directly below the upper: the upper never
#: becomes ready, so ``engine.step()`` trains the lower problems only.
HOLD = 10 ** 12

Factory = Callable[[str, dict], Tuple[Engine, str]]


@dataclass
class GraphSpec:
    """A graph for the comparison tool.

    Attributes:
        name: short name (table titles, file names).
        factory: ``factory(method, options) -> (engine, upper)`` (see :mod:`mlo.compare`).
        reference: a :class:`Setting` evaluated by the engine, or a callable
            ``reference(engine, upper) -> {"grad": {...}, "paths": {...}}``.
        settings: the method settings to compare.
        warmup: lower steps from the factory's initial state to the evaluated state.
        description: one line for the report header.
    """

    name: str
    factory: Factory
    reference: Reference
    settings: List[Setting]
    warmup: int
    description: str = ""
    reference_name: str = ""
    data: Dict[str, object] = field(default_factory=dict)   # the graph's tensors (for tests)


_GRAPHS: Dict[str, Callable[..., GraphSpec]] = {}

#: Entry-point group of plug-in graphs: ``name = module:builder``.
ENTRY_POINT_GROUP = "mlo.compare_graphs"

#: Old graph names that still work (with a ``DeprecationWarning``): old -> new.
DEPRECATED_NAMES: Dict[str, str] = {"p4": "three_level_quadratic"}


class UnknownGraphError(KeyError):
    """No built-in, registered or plug-in graph of that name (``str()``: the one-line
    message, not ``KeyError``'s quoted repr)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def register_graph(name: str, builder: Callable[..., GraphSpec]) -> None:
    """Registers ``builder(quick: bool = False) -> GraphSpec`` as ``name``."""
    _GRAPHS[name] = builder


def _plugins() -> Dict[str, importlib.metadata.EntryPoint]:
    """The installed ``mlo.compare_graphs`` entry points by name (not loaded)."""
    try:
        eps = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    except TypeError:  # pragma: no cover - Python 3.9: a dict of groups
        eps = importlib.metadata.entry_points().get(ENTRY_POINT_GROUP, ())
    return {ep.name: ep for ep in eps}


def _warn_deprecated(old: str, stacklevel: int) -> str:
    """Warns that graph name ``old`` is deprecated; returns its new name."""
    new = DEPRECATED_NAMES[old]
    warnings.warn(f"graph name {old!r} is deprecated; use {new!r}", DeprecationWarning,
                  stacklevel=stacklevel + 1)
    return new


def get_graph(name: str, quick: bool = False) -> GraphSpec:
    """Builds the graph ``name`` (``quick``: fewer, cheaper settings).

    Built-in and :func:`register_graph` names first, then the ``mlo.compare_graphs``
    entry points (loaded now, then registered). A name of :data:`DEPRECATED_NAMES`
    builds its new name's graph and warns (``DeprecationWarning``).

    Raises:
        UnknownGraphError: no such graph (the message lists the available ones).
        ImportError: the plug-in's entry point could not be loaded.
    """
    if name in DEPRECATED_NAMES and name not in _GRAPHS:
        name = _warn_deprecated(name, stacklevel=2)
    builder = _GRAPHS.get(name)
    if builder is None:
        ep = _plugins().get(name)
        if ep is None:
            raise UnknownGraphError(f"unknown graph {name!r}; available: "
                                    f"{', '.join(available_graphs())}")
        try:
            builder = ep.load()
        except Exception as e:
            raise ImportError(f"graph {name!r}: entry point {ep.value!r} (group "
                              f"{ENTRY_POINT_GROUP!r}) could not be loaded: "
                              f"{type(e).__name__}: {e}") from e
        register_graph(name, builder)
    return builder(quick=quick)


def available_graphs() -> Tuple[str, ...]:
    """Built-in, registered and plug-in (entry point) graph names, sorted (deprecated
    names, :data:`DEPRECATED_NAMES`, are not listed)."""
    return tuple(sorted(set(_GRAPHS) | set(_plugins())))


def default_settings(n_lower: int, alphas=(0.5, 1.0), unroll=(1, 5, 20, 100),
                     neumann=(5, 20, 100), cg=(1, 3, 10), eps=(1e-2, 1e-4),
                     quick: bool = False) -> List[Setting]:
    """Unrolled K, Neumann K × α, CG iterations (plus ``n_lower``, exact in exact
    arithmetic), finite differences ε (and DARTS's ``×lr`` scaling)."""
    if quick:
        unroll, neumann, cg, eps, alphas = unroll[:2], neumann[:2], cg[:1], eps[:1], alphas[-1:]
    out = [Setting("unrolled", {}, steps=k) for k in unroll]
    out += [Setting("neumann", {"iterations": k, "alpha": a}, curve=f"neumann α={a:g}")
            for a in alphas for k in neumann]
    out += [Setting("cg", {"max_iter": k, "tol": 0.0}) for k in sorted(set(cg) | {n_lower})]
    out += [Setting("finite_difference", {"epsilon": e}) for e in eps]
    out.append(Setting("finite_difference", {"epsilon": eps[0], "scale_by_lr": True},
                       curve="finite_difference ×lr"))
    return out


class _Fn(Problem):
    """A problem whose loss is ``loss(self, batch)``; other problems are attributes."""

    def __init__(self, name, loss, **kw):
        super().__init__(name, **kw)
        self._loss = loss

    def training_step(self, batch):
        return self._loss(self, batch)


def _cfg(method, options, hold=False) -> ProblemConfig:
    return ProblemConfig(method=method, method_options=dict(options),
                         unroll_steps=HOLD if hold else 1)


# --------------------------------------------------------------------- ridge
def ridge(quick: bool = False, n: int = 60, d: int = 20, seed: int = 0, eta: float = 1.0,
          warmup: int = 150) -> GraphSpec:
    """P1 ridge; ``‖XᵀX‖₂ = 1`` and ``λ ∈ [0.1, 0.5]`` so ``H``'s spectrum is in
    ``[0.1, 1.5]``: SGD with ``η = 1`` contracts by ≤ 0.9 per step."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=gen, dtype=DT)
    X = X / torch.linalg.matrix_norm(X.T @ X, ord=2) ** 0.5
    y = torch.randn(n, generator=gen, dtype=DT)
    Xv = torch.randn(n, d, generator=gen, dtype=DT) / n ** 0.5
    yv = torch.randn(n, generator=gen, dtype=DT)
    lam = 0.1 + 0.4 * torch.rand(d, generator=gen, dtype=DT)

    def factory(method, options):
        up = _Fn("upper", lambda s, b: 0.5 * ((Xv @ s.lo.params["w"] - yv) ** 2).sum()
                 + 0 * s.params["lam"].sum(), params={"lam": lam})
        lo = _Fn("lower", lambda s, b: 0.5 * ((X @ s.params["w"] - y) ** 2).sum()
                 + 0.5 * (s.up.params["lam"] * s.params["w"] ** 2).sum(),
                 params={"w": torch.zeros(d, dtype=DT)}, optimizer_kwargs={"lr": eta},
                 config=_cfg(method, options, hold=True))
        up.lo, lo.up = lo, up
        return Engine([lo, up], {"u2l": {up: [lo]}, "l2u": {lo: [up]}}), "upper"

    def reference(engine, upper):
        w = engine.problems["lower"].params["w"].detach()
        lam_ = engine.problems[upper].params["lam"].detach()
        H = X.T @ X + torch.diag(lam_)
        g = -w * torch.linalg.solve(H, Xv.T @ (Xv @ w - yv))
        return {"grad": {"lam": g}}

    return GraphSpec("ridge", factory, reference, default_settings(d, quick=quick), warmup,
                     f"P1 ridge, {d} features, {n} samples; lower SGD lr {eta:g}",
                     "dense closed form −w ⊙ H⁻¹g(w) at the evaluated w",
                     dict(X=X, y=y, Xv=Xv, yv=yv, lam=lam, eta=eta))


# -------------------------------------------------------------------- logreg
def _breast_cancer(seed: int, n_train: int, n_val: int):
    try:
        from sklearn.datasets import load_breast_cancer
    except ImportError as e:  # pragma: no cover - optional dependency
        raise ImportError("the 'logreg' graph needs scikit-learn (pip install scikit-learn)") from e
    X, y = load_breast_cancer(return_X_y=True)
    X, y = torch.tensor(X, dtype=DT), torch.tensor(y, dtype=DT)
    idx = torch.randperm(len(X), generator=torch.Generator().manual_seed(seed))
    tr, va = idx[:n_train], idx[n_train:n_train + n_val]
    mu, sd = X[tr].mean(0), X[tr].std(0) + 1e-8          # training statistics only
    X = (X - mu) / sd
    return (X[tr], y[tr]), (X[va], y[va])


def _bce(z, y):
    """Mean binary cross-entropy with logits, ``softplus(z) − y z`` (the same value as
    ``F.binary_cross_entropy_with_logits``, which takes milliseconds per call on
    this CPU build for 100 elements and would dominate every timing)."""
    return (F.softplus(z) - y * z).mean()


def logreg(quick: bool = False, n_train: int = 100, n_val: int = 150, seed: int = 0,
           lr: float = 0.5, momentum: float = 0.5, warmup: int = 300) -> GraphSpec:
    """Logistic regression, per-feature log weight decay, breast cancer (30 features)."""
    train, val = _breast_cancer(seed, n_train, n_val)
    D = train[0].shape[1]
    gen = torch.Generator().manual_seed(seed + 1)
    log_wd = math.log(0.05) + math.log(6.0) * torch.rand(D, generator=gen, dtype=DT)  # λ ∈ [0.05, 0.3]

    def factory(method, options):
        up = _Fn("upper", lambda s, b: _bce(s.lo(b[0]).squeeze(-1), b[1]) + 0 * s.params["log_wd"].sum(),
                 params={"log_wd": log_wd}, data=[val])
        model = nn.Linear(D, 1).to(DT)
        with torch.no_grad():
            model.weight.zero_()
            model.bias.zero_()

        def lower_loss(s, b):
            x, t = b
            w = s.params["weight"].squeeze(0)
            return (_bce(s(x).squeeze(-1), t)
                    + 0.5 * (s.up.params["log_wd"].exp() * w * w).sum())

        lo = _Fn("lower", lower_loss, module=model, data=[train],
                 optimizer_kwargs={"lr": lr, "momentum": momentum},
                 config=_cfg(method, options, hold=True))
        up.lo, lo.up = lo, up
        return Engine([lo, up], {"u2l": {up: [lo]}, "l2u": {lo: [up]}}), "upper"

    settings = default_settings(D + 1, alphas=(0.3, 0.6), cg=(1, 3, 10), quick=quick)
    ref = Setting("cg", {"tol": 1e-12, "max_iter": 1000})
    return GraphSpec("logreg", factory, ref, settings, warmup,
                     f"logistic regression, breast cancer ({n_train} train / {n_val} val, {D} "
                     f"features), lower SGD lr {lr:g} momentum {momentum:g}",
                     "CG to relative residual 1e-12 (float64) at the evaluated state",
                     dict(train=train, val=val, log_wd=log_wd))


# ----------------------------------------------------- three_level_quadratic
def _spd(r, n: int, top: float, cond: float) -> torch.Tensor:
    """``U diag(s) Uᵀ``: random orthogonal ``U``, ``s`` geometric from ``top/cond`` to ``top``."""
    U, _ = torch.linalg.qr(r(n, n))
    s = top * cond ** -torch.linspace(1.0, 0.0, n, dtype=DT)
    S = (U * s) @ U.T
    return (S + S.T) / 2


def three_level_quadratic(quick: bool = False, m: int = 8, e: int = 12, c: int = 6,
                          o: int = 10, a: float = 0.1, cc: float = 0.05, cond: float = 30.0,
                          lr: float = 0.6, seed: int = 0, warmup: int = 500) -> GraphSpec:
    """Three quadratic levels (docs/design.md#p4): pretrain (E), finetune (C), mask (M);
    lower Hessians ``S_E + aI``, ``S_C + cI``.

    ``S_E`` (spectrum ``[0.05, 1.5]``) and ``S_C`` (``[0.04, 1.2]``) of condition number
    ``cond = 30`` give Hessians with spectra ``[0.15, 1.6]`` and ``[0.09, 1.25]``
    (condition numbers ≈ 11 and ≈ 14): CG needs several iterations, Neumann with
    ``α ≤ 1`` converges at a rate set by ``α`` and ``K``, and finite differences
    (``H⁻¹ ≈ I``) are off by a matrix, not a scalar. SGD with ``lr = 0.6`` contracts by
    ≤ 0.95 per step; after ``warmup = 500`` steps both lowers are at their best
    responses to ~1e-13, so the per-path reference is also the exact total derivative.
    """
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=DT)  # noqa: E731
    A, Fm, G, Q, t, M0 = r(e, m), r(c, e) / 2, r(o, e) / 2, r(o, c), r(o), r(m)
    E0, C0 = r(e), r(c)
    SE, SC = _spd(r, e, 1.5, cond), _spd(r, c, 1.2, cond)

    def factory(method, options):
        mask = _Fn("mask", lambda s, b: 0.5 * ((G @ s.pre.params["E"] + Q @ s.fin.params["C"] - t) ** 2).sum(),
                   params={"M": M0})

        def pre_loss(s, b):
            dE = s.params["E"] - A @ s.mask.params["M"]
            return 0.5 * dE @ SE @ dE + 0.5 * a * (s.params["E"] ** 2).sum()

        def fin_loss(s, b):
            dC = s.params["C"] - Fm @ s.pre.params["E"]
            return 0.5 * dC @ SC @ dC + 0.5 * cc * (s.params["C"] ** 2).sum()

        pre = _Fn("pretrain", pre_loss, params={"E": E0}, optimizer_kwargs={"lr": lr},
                  config=_cfg(method, options))
        # finetune's unroll_steps holds mask back; pretrain (1 step) lets finetune
        # step every iteration: each engine.step() moves E then C once.
        fin = _Fn("finetune", fin_loss, params={"C": C0}, optimizer_kwargs={"lr": lr},
                  config=_cfg(method, options, hold=True))
        mask.pre, mask.fin, pre.mask, fin.pre = pre, fin, mask, pre
        eng = Engine([mask, pre, fin], {"u2l": {mask: [pre]},
                                        "l2u": {pre: [fin, mask], fin: [mask]}})
        return eng, "mask"

    # best-response Jacobians E*(M) = JE M, C*(E) = JC E (constant: the levels are quadratic)
    JE = torch.linalg.solve(SE + a * torch.eye(e, dtype=DT), SE @ A)
    JC = torch.linalg.solve(SC + cc * torch.eye(c, dtype=DT), SC @ Fm)

    def reference(engine, upper):
        E = engine.problems["pretrain"].params["E"].detach()
        C = engine.problems["finetune"].params["C"].detach()
        res = G @ E + Q @ C - t
        t1 = JE.T @ (G.T @ res)
        t2 = JE.T @ ((Q @ JC).T @ res)
        return {"grad": {"M": t1 + t2},
                "paths": {("mask", "pretrain", "mask"): {"M": t1},
                          ("mask", "pretrain", "finetune", "mask"): {"M": t2}}}

    settings = default_settings(e, alphas=(0.3, 1.0), quick=quick)
    return GraphSpec("three_level_quadratic", factory, reference, settings, warmup,
                     f"MLO-MAE-shaped three quadratic levels (M {m}, E {e}, C {c}), SPD level "
                     f"metrics of condition {cond:g}; lowers SGD lr {lr:g}; the method is used at both lower levels",
                     "closed form per path at the evaluated (E, C)",
                     dict(A=A, F=Fm, G=G, Q=Q, t=t, M=M0, E0=E0, C0=C0, a=a, c=cc, lr=lr, SE=SE, SC=SC,
                          JE=JE, JC=JC))


register_graph("ridge", ridge)
register_graph("logreg", logreg)
register_graph("three_level_quadratic", three_level_quadratic)


def p4(*args, **kwargs) -> GraphSpec:
    """Deprecated old name of :func:`three_level_quadratic` (warns, then builds it)."""
    _warn_deprecated("p4", stacklevel=2)
    return three_level_quadratic(*args, **kwargs)
