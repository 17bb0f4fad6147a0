"""Differentiable twins of RMSprop, Adagrad, Adamax, NAdam, RAdam, Adadelta and ASGD
(``mlo.optim_rules.RULES``, one shared set of tests over the registry).

float64 parameters, torch's single-tensor path (``foreach=False``):

* forward **bitwise** equal to ``torch.optim`` over each optimizer's option grid
  (lr, weight_decay, maximize and the optimizer's own options), the twin taking over
  torch's state at step 0 and mid-run (``from_torch``), stepping 4 times, handing the
  state back (``state_to_torch``) and torch stepping on: every iterate and the final
  state (keys, dtypes, values) equal a pure ``torch.optim`` run; a fresh twin
  (``fresh``, lazy state) too, under both default dtypes (scalar state in float32 /
  float64 as torch makes it);
* meta-gradients through 3 unrolled steps w.r.t. the window's initial parameters
  (a random direction) and a learnable hyperparameter (lr, weight_decay and one or
  two of the optimizer's own) equal central differences of ``torch.optim`` runs;
  a parameter whose gradient is exactly 0 yet graph-connected keeps every
  derivative finite (with plain ``sqrt`` it turns NaN — checked);
* through ``mlo.Engine``: an unrolled lower with each optimizer, two windows, its
  upper's hypergradient (a loss parameter λ and a learnable log-lr) against central
  differences of plain ``torch.optim`` runs.
"""
from __future__ import annotations

import itertools

import pytest
import torch

import mlo
import mlo.optim_rules as rules
from _helpers import Vars, recording, rel
from test_optim import _with
from mlo.optim import FunctionalOptimizer, FunctionalRule

DT = torch.float64
O = torch.optim
X = torch.randn(5, 3, dtype=DT, generator=torch.Generator().manual_seed(1))
Y = torch.randn(5, 2, dtype=DT, generator=torch.Generator().manual_seed(2))
SHAPES = [(3, 2), (2,), ()]
W = [torch.randn(s, dtype=DT, generator=torch.Generator().manual_seed(7)) for s in SHAPES + [(2,)]]


@pytest.fixture
def float64_default():
    """Default dtype float64: torch's scalar state (step, mu_product, eta) in float64,
    so central differences in a hyperparameter are not swamped by float32 rounding."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def make_params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    live = [torch.randn(s, dtype=DT, generator=gen) for s in SHAPES]
    return [p.requires_grad_() for p in live + [torch.zeros(2, dtype=DT)]]


def loss_fn(ps, lam=0.3):
    """Tiny regression, a term in an upper variable ``lam``, and ``dead`` whose gradient
    is exactly 0 but graph-connected (``0·cos(...)``; it starts at 0, so weight decay
    keeps it 0)."""
    w, b, s, dead = ps
    pred = torch.tanh(X @ w + b) * torch.cos(s)
    return (((pred - Y) ** 2).mean() + lam * sum(torch.sin(p).sum() for p in (w, b, s)) + 0.1 * s ** 4
            + (dead * 0 * torch.cos(pred.sum(0) + lam)).sum())


def objective(ps):
    return sum((w * p).sum() for w, p in zip(W, ps))


# ----------------------------------------------------------------- option grids
def _grid(structural: dict, alternating: list) -> list:
    """Every combination of the ``structural`` options; the continuous ones cycle
    through ``alternating`` (so each value meets both settings of every option)."""
    keys, out = list(structural), []
    for i, values in enumerate(itertools.product(*structural.values())):
        out.append(dict(zip(keys, values), **alternating[i % len(alternating)]))
    return out


ON_OFF = (False, True)
GRIDS = {
    O.RMSprop: _grid({"momentum": (0, 0.9), "centered": ON_OFF, "weight_decay": (0, 0.1), "maximize": ON_OFF},
                     [dict(lr=0.01, alpha=0.99, eps=1e-8), dict(lr=0.05, alpha=0.9, eps=1e-3),
                      dict(lr=0.02, alpha=0.8, eps=1e-6)]),
    O.Adagrad: _grid({"lr_decay": (0, 0.1), "initial_accumulator_value": (0, 0.5), "weight_decay": (0, 0.1),
                      "maximize": ON_OFF}, [dict(lr=0.05, eps=1e-10), dict(lr=0.2, eps=1e-3)]),
    O.Adamax: _grid({"betas": ((0.9, 0.999), (0.8, 0.9)), "weight_decay": (0, 0.1), "maximize": ON_OFF},
                    [dict(lr=0.002, eps=1e-8), dict(lr=0.05, eps=1e-3), dict(lr=0.02, eps=1e-6)]),
    O.NAdam: _grid({"weight_decay": (0, 0.1), "decoupled_weight_decay": ON_OFF, "maximize": ON_OFF,
                    "momentum_decay": (4e-3, 0.1), "differentiable": ON_OFF},
                   [dict(lr=0.002, betas=(0.9, 0.999), eps=1e-8), dict(lr=0.05, betas=(0.8, 0.9), eps=1e-3),
                    dict(lr=0.02, betas=(0.85, 0.95), eps=1e-6)]),
    O.RAdam: _grid({"weight_decay": (0, 0.1), "decoupled_weight_decay": ON_OFF, "maximize": ON_OFF,
                    "betas": ((0.9, 0.999), (0.8, 0.9))},
                   [dict(lr=0.001, eps=1e-8), dict(lr=0.05, eps=1e-3), dict(lr=0.02, eps=1e-6)]),
    O.Adadelta: _grid({"rho": (0.9, 0.5), "weight_decay": (0, 0.1), "maximize": ON_OFF},
                      [dict(lr=1.0, eps=1e-6), dict(lr=0.5, eps=1e-3), dict(lr=2.0, eps=1e-4)]),
    O.ASGD: _grid({"t0": (1e6, 2), "lambd": (1e-4, 0.1), "weight_decay": (0, 0.1), "maximize": ON_OFF},
                  [dict(lr=0.01, alpha=0.75), dict(lr=0.05, alpha=0.5), dict(lr=0.03, alpha=1.0)]),
}
GRID = [(cls, kw) for cls, kws in GRIDS.items() for kw in kws]


def test_registry_is_the_grid():
    """Every rule has a grid here and a twin class named after its torch class."""
    assert set(rules.RULES) == set(GRIDS)
    for cls in rules.RULES:
        real = make_params()
        fopt = FunctionalOptimizer.from_torch(cls(real), real)
        assert isinstance(fopt, FunctionalRule) and type(fopt).__name__ == f"Functional{cls.__name__}"
        assert FunctionalOptimizer.supports(cls(real)) and cls.__name__ in FunctionalOptimizer.supported()
    with pytest.raises(TypeError, match="cannot hand state"):
        fopt.state_to_torch(O.RMSprop(real), real)


# ----------------------------------------------------------------- forward, bitwise
def _torch_opt(cls, kw, params):
    return cls(params, **dict(kw, foreach=False))


def _torch_step(opt, params, lam=0.3):
    grads = torch.autograd.grad(loss_fn(params, lam), params)
    with torch.no_grad():    # (torch's differentiable mode updates non-leaf params in place)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
    return [p.detach().clone() for p in params]


def _leaves(kw, seed=0):
    ps = make_params(seed)
    return [p.clone() for p in ps] if kw.get("differentiable") else ps


def torch_run(cls, kw, n):
    ps = _leaves(kw)
    opt = _torch_opt(cls, kw, ps)
    return [_torch_step(opt, ps) for _ in range(n)], opt, ps


def interleaved_run(cls, kw, n0, n1, n2, fresh=False):
    """torch ``n0`` steps → twin ``n1`` (graph-connected grads) → state back → torch ``n2``."""
    ps = _leaves(kw)
    opt = _torch_opt(cls, kw, ps)
    traj = [_torch_step(opt, ps) for _ in range(n0)]
    fopt = FunctionalOptimizer.fresh(opt, len(ps)) if fresh else FunctionalOptimizer.from_torch(opt, ps)
    qs = [p.detach().clone().requires_grad_() for p in ps]
    for _ in range(n1):
        qs = fopt.step(qs, torch.autograd.grad(loss_fn(qs), qs, create_graph=True))
        traj.append([q.detach() for q in qs])
    fopt.state_to_torch(opt, ps)
    with torch.no_grad():
        for p, q in zip(ps, qs):
            p.copy_(q)
    traj += [_torch_step(opt, ps) for _ in range(n2)]
    return traj, opt, ps


def assert_same_run(got, expected):
    (traj_a, opt_a, ps_a), (traj_b, opt_b, ps_b) = got, expected
    assert len(traj_a) == len(traj_b)
    for k, (sa, sb) in enumerate(zip(traj_a, traj_b)):
        for a, b in zip(sa, sb):
            assert torch.equal(a, b), f"step {k + 1}: max |Δ| = {(a - b).abs().max().item():.3e}"
    for pa, pb in zip(ps_a, ps_b):
        st_a, st_b = opt_a.state[pa], opt_b.state[pb]
        assert set(st_a) == set(st_b)
        for key in st_b:
            a, b = st_a[key], st_b[key]
            assert a.dtype == b.dtype and a.device == b.device and torch.equal(a, b), key


@pytest.mark.parametrize("cls,kw", GRID, ids=[f"{c.__name__}-{kw}" for c, kw in GRID])
def test_forward_bitwise_vs_torch(cls, kw):
    """Taken over at step 0 and at step 3 (RAdam's rectified branch starts at step 6)."""
    expected = torch_run(cls, kw, 9)
    assert_same_run(interleaved_run(cls, kw, 3, 4, 2), expected)
    assert_same_run(interleaved_run(cls, kw, 0, 4, 5), expected)


FRESH = [(cls, kws[-1]) for cls, kws in GRIDS.items()]


@pytest.mark.parametrize("default", [torch.float32, torch.float64])
@pytest.mark.parametrize("cls,kw", FRESH, ids=[c.__name__ for c, _ in FRESH])
def test_fresh_twin_creates_torch_state(cls, kw, default):
    """``fresh`` (per-window variables): the twin creates the state torch would, in
    torch's scalar dtype for the default dtype (Adagrad's too, which torch makes in __init__)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(default)
    try:
        expected = torch_run(cls, kw, 6)
        assert_same_run(interleaved_run(cls, kw, 0, 3, 3, fresh=True), expected)
        assert expected[1].state[expected[2][0]]["step"].dtype == default
    finally:
        torch.set_default_dtype(old)


@pytest.mark.parametrize("cls,kw", FRESH, ids=[c.__name__ for c, _ in FRESH])
def test_foreach_path_to_rounding(cls, kw, measured):
    """torch's multi-tensor path is not always bitwise its single-tensor one (NAdam,
    RAdam ~1e-16; ASGD ~3e-8: it folds the decay into the gradient); the twins follow
    the single-tensor path."""
    kw = dict(kw, differentiable=False)     # (torch's foreach has no differentiable mode)
    ps = _leaves(kw)
    opt = cls(ps, **dict(kw, foreach=True))
    ref = [_torch_step(opt, ps) for _ in range(9)]
    got = interleaved_run(cls, kw, 3, 4, 2)[0]
    err = max(((a - b).abs().max() / b.abs().max()).item() for sa, sb in zip(got, ref) for a, b in zip(sa, sb))
    measured("twin vs torch.optim foreach=True (9 steps)", err, 1e-7 if cls is O.ASGD else 1e-14)


def test_inputs_not_modified_none_grad_skipped():
    for cls, kws in GRIDS.items():
        ps = _leaves(kws[-1])
        opt = _torch_opt(cls, kws[-1], ps)
        _torch_step(opt, ps)
        fopt = FunctionalOptimizer.from_torch(opt, ps)
        qs = [p.detach().clone().requires_grad_() for p in ps]
        grads = list(torch.autograd.grad(loss_fn(qs), qs))
        grads[1] = None
        watched = qs + [g for g in grads if g is not None] + [t for st in fopt.state for t in st.values()]
        before = [(t.clone(), t._version) for t in watched]
        torch_state = {k: v.clone() for k, v in opt.state[ps[0]].items()}
        state1 = dict(fopt.state[1])
        new = fopt.step(qs, grads)
        assert all(t._version == v and torch.equal(t, c) for t, (c, v) in zip(watched, before)), cls
        assert new[1] is qs[1] and all(fopt.state[1][k] is v for k, v in state1.items())
        assert all(n is not q for i, (n, q) in enumerate(zip(new, qs)) if i != 1)
        assert all(torch.equal(v, opt.state[ps[0]][k]) for k, v in torch_state.items())


# ----------------------------------------------------------------- meta-gradients
META = {  # (torch options, hyperparameters made learnable one at a time)
    O.RMSprop: (dict(lr=0.02, alpha=0.9, eps=1e-8, momentum=0.5, centered=True, weight_decay=0.1),
                ["lr", "weight_decay", "alpha", "momentum"]),
    O.Adagrad: (dict(lr=0.1, lr_decay=0.05, eps=1e-3, weight_decay=0.1), ["lr", "weight_decay", "lr_decay", "eps"]),
    O.Adamax: (dict(lr=0.05, betas=(0.8, 0.9), eps=1e-3, weight_decay=0.1), ["lr", "weight_decay", "beta1", "beta2"]),
    O.NAdam: (dict(lr=0.03, betas=(0.8, 0.9), eps=1e-8, weight_decay=0.1, decoupled_weight_decay=True,
                   momentum_decay=0.1), ["lr", "weight_decay", "beta1", "beta2", "momentum_decay"]),
    O.RAdam: (dict(lr=0.03, betas=(0.8, 0.9), eps=1e-8, weight_decay=0.1), ["lr", "weight_decay", "beta1", "beta2"]),
    O.Adadelta: (dict(lr=1.0, rho=0.8, eps=1e-3, weight_decay=0.1), ["lr", "weight_decay", "rho", "eps"]),
    O.ASGD: (dict(lr=0.05, lambd=0.1, alpha=0.75, t0=2, weight_decay=0.1), ["lr", "weight_decay", "lambd", "alpha"]),
}
META_CASES = [(cls, kw, name) for cls, (kw, names) in META.items() for name in names]
META_CASES += [(O.NAdam, dict(META[O.NAdam][0], differentiable=True, decoupled_weight_decay=False), "lr"),
               (O.RAdam, dict(META[O.RAdam][0], decoupled_weight_decay=True), "lr")]
N0, K, H = 3, 3, 1e-6
U = [torch.randn(s, dtype=DT, generator=torch.Generator().manual_seed(9)) for s in SHAPES] + [torch.zeros(2, dtype=DT)]


def _get(kw, name):
    return kw["betas"][int(name[-1]) - 1] if name.startswith("beta") else kw[name]


def torch_objective(cls, kw, name, value, t=0.0):
    """torch ``N0`` steps, then params ``+= t·U`` and ``name = value`` for ``K`` more."""
    ps = _leaves(kw)
    opt = _torch_opt(cls, kw, ps)
    for _ in range(N0):
        _torch_step(opt, ps)
    with torch.no_grad():
        for p, u in zip(ps, U):
            p.add_(u, alpha=t)
    opt.param_groups[0].update(_with(opt.param_groups[0], name, value))
    for _ in range(K):
        _torch_step(opt, ps)
    return objective(ps).item()


def unrolled(cls, kw, name, sqrt=None):
    """``N0`` torch steps, then ``K`` differentiable twin steps with ``name`` a tensor."""
    ps = _leaves(kw)
    opt = _torch_opt(cls, kw, ps)
    for _ in range(N0):
        _torch_step(opt, ps)
    fopt = FunctionalOptimizer.from_torch(opt, ps)
    t = torch.tensor(_get(kw, name), dtype=DT, requires_grad=True)
    fopt.param_groups[0].update(_with(fopt.param_groups[0], name, t))
    q0 = [p.detach().clone().requires_grad_() for p in ps]
    qs = q0
    for _ in range(K):
        qs = fopt.step(qs, torch.autograd.grad(loss_fn(qs), qs, create_graph=True))
    j = objective(qs)
    return j, torch.autograd.grad(j, q0 + [t])


@pytest.mark.parametrize("cls,kw,name", META_CASES, ids=[f"{c.__name__}-{n}-{kw}" for c, kw, n in META_CASES])
def test_meta_gradients_vs_central_differences(cls, kw, name, float64_default, measured):
    j, grads = unrolled(cls, kw, name)
    assert all(torch.isfinite(g).all() for g in grads)     # incl. the exactly-zero-gradient parameter
    base = _get(kw, name)
    ref = torch_objective(cls, kw, name, base)
    measured("twin with a tensor hyperparameter: forward vs torch.optim (3 steps)",
             abs(j.item() - ref) / abs(ref), 1e-14)
    # (J moves by ~1e-5 per unit momentum_decay, ~2e-4 per unit of ASGD's alpha: a larger step)
    h = 1e-3 if name == "momentum_decay" or (cls is O.ASGD and name == "alpha") else H
    fd_t = (torch_objective(cls, kw, name, base + h) - torch_objective(cls, kw, name, base - h)) / (2 * h)
    fd_u = (torch_objective(cls, kw, name, base, H) - torch_objective(cls, kw, name, base, -H)) / (2 * H)
    d_u = sum((g * u).sum() for g, u in zip(grads[:-1], U)).item()
    measured("twin d/d(hyperparameter) through 3 steps vs central FD", abs(grads[-1].item() - fd_t) / abs(fd_t), 1e-6)
    measured("twin d/d(initial params)·u through 3 steps vs central FD", abs(d_u - fd_u) / abs(fd_u), 1e-6)


SQRT_RULES = [(cls, META[cls][0]) for cls in (O.RMSprop, O.Adagrad, O.NAdam, O.RAdam)]


@pytest.mark.parametrize("cls,kw", SQRT_RULES, ids=[c.__name__ for c, _ in SQRT_RULES])
def test_plain_sqrt_would_give_nan(cls, kw, monkeypatch):
    """The zero-gradient parameter is a real test: with ``Tensor.sqrt`` in the rules
    the meta-gradients are NaN (sqrt'(0) = inf meets a factor 0); with ``_sqrt`` finite."""
    monkeypatch.setattr(rules, "_sqrt", torch.sqrt)
    _, grads = unrolled(cls, kw, "lr")
    assert not all(torch.isfinite(g).all() for g in grads)


# ----------------------------------------------------------------- through the engine
class LearnedLr(Vars):
    """The lower: its lr is ``exp(up.log_lr)`` (a learnable optimizer hyperparameter)."""

    def optimizer_hyperparameters(self):
        return {"lr": self.up.params["log_lr"].exp()}


ENGINE = {cls: META[cls][0] for cls in META}
RecSGD = recording(torch.optim.SGD)


def smooth_problem(seed=3, n=8, d=3):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=DT)  # noqa: E731
    X, y, Xv, yv = r(n, d), r(n), r(n, d), r(n)

    def f(w, lam):   # lower: robust regression with learned per-feature log-weight-decay
        return torch.log(torch.cosh(X @ w - y)).mean() + 0.5 * (lam.exp() * w ** 2).sum()

    def F(w, lam):   # upper: validation loss + a direct term on λ
        return 0.5 * ((Xv @ w - yv) ** 2).mean() + 0.01 * (lam ** 2).sum()

    return f, F, 0.3 * r(d), r(d)


@pytest.mark.parametrize("cls", list(ENGINE), ids=[c.__name__ for c in ENGINE])
def test_engine_unrolled_vs_central_differences(cls, float64_default, measured):
    """Lower unrolled with ``cls`` (lr learnable: ``exp(log_lr)`` from the upper), two
    windows of K=4 (state handed back and taken over); the upper's hypergradient in
    (λ, log_lr) at each update against central differences of plain torch.optim runs."""
    kw, K, h = ENGINE[cls], 4, 1e-6
    f, F, lam0, w0 = smooth_problem()
    log_lr0 = torch.tensor(kw["lr"], dtype=DT).log()
    up = Vars("up", {"lam": lam0, "log_lr": log_lr0}, lambda s: F(s.lo.params["w"], s.params["lam"]),
              optimizer=RecSGD, optimizer_kwargs={"lr": 0.5, "momentum": 0.5})
    lo = LearnedLr("lo", {"w": w0}, lambda s: f(s.params["w"], s.up.params["lam"]),
                   optimizer=cls, optimizer_kwargs=kw, config=mlo.ProblemConfig(method="unrolled", unroll_steps=K))
    up.lo, lo.up = lo, up
    eng = mlo.Engine([lo, up], {"u2l": {up: [lo]}, "l2u": {lo: [up]}})
    hist = []
    for _ in range(2):
        hist.append((up.module.lam.detach().clone(), up.module.log_lr.detach().clone()))
        eng.run(K)

    def reference(windows):
        w = w0.clone().requires_grad_()
        o = cls([w], **kw)
        for lam, log_lr in windows:
            for _ in range(K):
                o.param_groups[0]["lr"] = float(log_lr.exp())
                w.grad, = torch.autograd.grad(f(w, lam), w)
                o.step()
        return w.detach()

    # (a tensor lr: the same ops as torch's float lr — measured bitwise here; pow/sqrt of
    # Python floats vs 0-dim tensors may differ by an ulp elsewhere, hence not 0)
    measured("unrolled window trajectory (new twins) vs plain torch.optim",
             rel(lo.module.w.detach(), reference(hist)), 1e-14)
    errs = []
    for j, (lam, log_lr) in enumerate(hist):
        x0 = torch.cat([lam, log_lr[None]])
        fd = torch.zeros_like(x0)
        for i in range(x0.numel()):
            e = torch.zeros_like(x0)
            e[i] = h
            vals = []
            for x in (x0 + e, x0 - e):
                vals.append(F(reference(hist[:j] + [(x[:-1], x[-1])]), x[:-1]))
            fd[i] = (vals[0] - vals[1]) / (2 * h)
        errs.append(rel(torch.cat([up.optimizer.record[j][0], up.optimizer.record[j][1][None]]), fd))
    measured("unrolled new twins (engine, 2 windows K=4, λ and log-lr) vs central FD", max(errs), 1e-6)
