"""Shared submodules and shared parameters: each distinct tensor is one variable, each
parameter slot is substituted once and restored once (``mlo.fastpath.Slots``).

Three ways one tensor is reachable under two names, each with an *unshared
equivalent* — the same function written with every tensor reachable once:

- ``sequential``: ``nn.Sequential(proj, act, proj)`` (one ``Linear`` at two indices);
- ``attributes``: ``self.a = lin; self.b = lin`` (one ``Linear`` under two attributes);
- ``tied``: ``self.b.weight = self.a.weight`` (one tensor in two modules' slots).

The equivalent of the first two is one ``Linear`` applied twice through one attribute;
of the third, ``a``'s weight used in ``b``'s place by hand. Checks, in float64:

(a) after every kind of run — an unrolled window (SGD and Adam twins; also while it is
    open), CG, finite differences and SAMA lowers stepping in place with SGD and Adam,
    and ``engine.gradient`` reports — every slot of the module (every name of
    ``named_parameters(remove_duplicate=False)``) holds the problem's variable itself: a
    leaf, no stale substituted tensor; also ``Slots.run`` on its own (forward and
    ``method=``), fast path and ``functional_call`` path;
(b) the shared model's trajectory (every variable after every update, and every applied
    hypergradient) equals the unshared equivalent's over 20 iterations, for
    ``unrolled``, ``cg`` and ``finite_difference`` at non-default options, with the fast
    paths on and off (tolerance 1e-12; measured: 0, bitwise);
(c) hypergradients through a shared lower: ``unrolled`` against central finite
    differences of ``λ ↦ F(θ_K(λ))`` computed with ``torch.optim`` on the pure function;
    ``cg`` against a dense implicit-function-theorem solve on the pure function at the
    same iterate and batch; ``finite_difference`` against its formula evaluated by hand
    (both at the second upper update, after a hypergradient has run on the module).

Before the fix (``functional_call(..., tie_weights=True)`` on the module: a shared
slot is assigned once per path and restored in the wrong order) (a) finds non-leaf
tensors in the module after an unrolled window and stale values after CG/FD, and (b)
and (c) fail for ``cg`` and ``finite_difference``.
"""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mlo
from mlo import fastpath
from mlo.fastpath import Slots, distinct_slots

DT = torch.float64
KINDS = ("sequential", "attributes", "tied")


# ===================================================================== the modules
class SequentialShared(nn.Module):
    """``nn.Sequential(proj, Tanh, proj)`` and a head: ``proj`` at indices 0 and 2."""

    def __init__(self):
        super().__init__()
        proj = nn.Linear(3, 3)
        self.net = nn.Sequential(proj, nn.Tanh(), proj)
        self.head = nn.Linear(3, 1)

    def features(self, x):
        return torch.tanh(self.net(x))

    def forward(self, x):
        return self.head(self.features(x)).squeeze(-1)


class AttributesShared(nn.Module):
    """One ``Linear`` under two attributes (``a`` and ``b``) and a head."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = self.a
        self.head = nn.Linear(3, 1)

    def features(self, x):
        return torch.tanh(self.b(torch.tanh(self.a(x))))

    def forward(self, x):
        return self.head(self.features(x)).squeeze(-1)


class Twice(nn.Module):
    """The unshared equivalent of both: one ``Linear`` applied twice through one attribute."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 3)
        self.head = nn.Linear(3, 1)

    def features(self, x):
        return torch.tanh(self.proj(torch.tanh(self.proj(x))))

    def forward(self, x):
        return self.head(self.features(x)).squeeze(-1)


class TiedShared(nn.Module):
    """Two ``Linear`` layers with one weight (``b.weight = a.weight``) and a head."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 3)
        self.b.weight = self.a.weight
        self.head = nn.Linear(3, 1)

    def features(self, x):
        return torch.tanh(self.b(torch.tanh(self.a(x))))

    def forward(self, x):
        return self.head(self.features(x)).squeeze(-1)


class _Bias(nn.Module):
    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(3))


class TiedEquivalent(nn.Module):
    """The unshared equivalent of :class:`TiedShared`: ``a``'s weight used twice by hand."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = _Bias()
        self.head = nn.Linear(3, 1)

    def features(self, x):
        return torch.tanh(F.linear(torch.tanh(self.a(x)), self.a.weight, self.b.bias))

    def forward(self, x):
        return self.head(self.features(x)).squeeze(-1)


def shared_module(kind, seed=0):
    torch.manual_seed(seed)
    return {"sequential": SequentialShared, "attributes": AttributesShared, "tied": TiedShared}[kind]().to(DT)


def unshared_module(kind, shared):
    """The unshared equivalent of ``shared``, holding copies of its variables' values."""
    m = (TiedEquivalent if kind == "tied" else Twice)().to(DT)
    with torch.no_grad():
        for p, q in zip(m.parameters(), shared.parameters()):       # (both: each tensor once)
            assert p.shape == q.shape
            p.copy_(q)
    return m


def pure(kind, theta, x):
    """The models' function of explicit tensors (the references' model)."""
    if kind == "tied":
        w, ab, bb, hw, hb = theta
        h = torch.tanh(F.linear(torch.tanh(F.linear(x, w, ab)), w, bb))
    else:
        w, b, hw, hb = theta
        h = torch.tanh(F.linear(torch.tanh(F.linear(x, w, b)), w, b))
    return F.linear(h, hw, hb).squeeze(-1)


# ===================================================================== the problems
class Lower(mlo.Problem):
    def training_step(self, batch):
        x, y = batch
        lam = self.up.params["lam"]
        reg = sum((p ** 2).sum() for p in self.params.values())
        return F.mse_loss(self(x), y) + lam.exp() * reg + 0.1 * lam * self(x).mean()


class Upper(mlo.Problem):
    def training_step(self, batch):
        x, y = batch
        return F.mse_loss(self.lo(x), y) + 0.1 * self.lo.call("features", x).pow(2).mean()


def lower_loss(kind, theta, lam, batch):
    """:class:`Lower`'s loss on explicit tensors."""
    x, y = batch
    out = pure(kind, theta, x)
    return F.mse_loss(out, y) + lam.exp() * sum((p ** 2).sum() for p in theta) + 0.1 * lam * out.mean()


def upper_loss(kind, theta, batch):
    """:class:`Upper`'s loss on explicit tensors."""
    x, y = batch
    w = theta[0]
    bb = theta[2] if kind == "tied" else theta[1]
    feats = torch.tanh(F.linear(torch.tanh(F.linear(x, w, theta[1])), w, bb))
    return F.mse_loss(pure(kind, theta, x), y) + 0.1 * feats.pow(2).mean()


OPTIONS = {    # non-default options of each method
    "unrolled": {},
    "cg": {"max_iter": 7, "damping": 0.3, "tol": 0.0},   # (tol 0: exactly max_iter iterations)
    "finite_difference": {"epsilon": 0.02, "scale_by_lr": True},
    "sama": {"alpha": 0.5},
}
OPTIMIZERS = {
    "sgd": (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3}),
    "adam": (torch.optim.Adam, {"lr": 0.01, "betas": (0.8, 0.95), "weight_decay": 1e-3}),
}


def batches(n_lower, seed=0):
    g = torch.Generator().manual_seed(seed)

    def batch(n):
        x = torch.randn(n, 3, generator=g, dtype=DT)
        return x, torch.cos(x.sum(-1))

    return [batch(8) for _ in range(n_lower)], [batch(8)]


def build(module, method, optimizer="sgd", unroll=3, options=None):
    """A two-level engine: ``Lower`` on ``module`` under ``method``, ``Upper`` with ``λ``."""
    lo_data, up_data = batches(4)
    opt, okw = OPTIMIZERS[optimizer]
    opts = OPTIONS[method] if options is None else options
    lo = Lower("lo", module=module, data=lo_data, optimizer=opt, optimizer_kwargs=dict(okw),
               config=mlo.ProblemConfig(method=method, method_options=dict(opts), unroll_steps=unroll))
    up = Upper("up", params={"lam": torch.tensor(-1.5, dtype=DT)}, data=up_data,
               optimizer=torch.optim.SGD, optimizer_kwargs={"lr": 0.3})
    lo.up, up.lo = up, lo
    return mlo.Engine([lo, up], {"u2l": {up: [lo]}, "l2u": {lo: [up]}}), lo, up


def assert_slots_hold_variables(lo, where):
    """Every slot of ``lo.module`` holds one of ``lo``'s variables (a leaf), every variable
    is in a slot, and the slot names map to the variable of the same tensor."""
    variables = {id(p): n for n, p in zip(lo.param_names, lo.variables)}
    seen = set()
    for name, p in lo.module.named_parameters(remove_duplicate=False):
        assert id(p) in variables, f"{where}: slot {name!r} holds a tensor that is not a variable " \
                                   f"(leaf={p.is_leaf}, grad_fn={p.grad_fn})"
        assert p.is_leaf and isinstance(p, nn.Parameter), f"{where}: slot {name!r} holds a non-leaf"
        seen.add(id(p))
    assert seen == set(variables), f"{where}: some variable is in no slot"


class SlotCheck:
    """A callback checking the module's slots after every update of ``lo``."""

    def __init__(self, lo):
        self.lo, self.n = lo, 0

    def after_update(self, engine, problem):
        self.n += 1
        assert_slots_hold_variables(self.lo, f"after update {self.n} of {problem.name!r}")


# ===================================================================== discovery
def test_each_distinct_tensor_is_one_variable_and_every_slot_is_listed():
    seq = shared_module("sequential")
    lo = Lower("lo", module=seq)
    assert lo.param_names == ["net.0.weight", "net.0.bias", "head.weight", "head.bias"]
    assert lo._tied
    # one module object, two paths: its slots once (under the first path)
    assert distinct_slots(seq, lo.param_names, lo.variables) == [
        ("net.0.weight", "net.0.weight"), ("net.0.bias", "net.0.bias"),
        ("head.weight", "head.weight"), ("head.bias", "head.bias")]
    attrs = shared_module("attributes")
    lo = Lower("lo", module=attrs)
    assert lo.param_names == ["a.weight", "a.bias", "head.weight", "head.bias"]
    assert [p for p, _ in distinct_slots(attrs, lo.param_names, lo.variables)] == lo.param_names
    # one tensor in two modules: two slots, one variable
    tied = shared_module("tied")
    lo = Lower("lo", module=tied)
    assert lo.param_names == ["a.weight", "a.bias", "b.bias", "head.weight", "head.bias"]
    assert distinct_slots(tied, lo.param_names, lo.variables) == [
        ("a.weight", "a.weight"), ("a.bias", "a.bias"), ("b.weight", "a.weight"), ("b.bias", "b.bias"),
        ("head.weight", "head.weight"), ("head.bias", "head.bias")]
    # an untied module: the slots are the names
    twice = unshared_module("sequential", seq)
    lo = Lower("lo", module=twice)
    assert not lo._tied
    assert distinct_slots(twice, lo.param_names, lo.variables) == [(n, n) for n in lo.param_names]


# ===================================================================== (a) the slots after runs
@pytest.mark.parametrize("path", ["fast", "plain"])
@pytest.mark.parametrize("kind", KINDS)
def test_slots_run_substitutes_every_path_once_and_restores(measured, kind, path):
    """``Slots.run`` on its own: during the call every path sees the substituted tensor,
    afterwards every slot holds its variable again; the output equals the unshared
    equivalent's with the same values (forward and ``method=``)."""
    m = shared_module(kind)
    names = [n for n, _ in m.named_parameters()]
    tensors = list(m.parameters())
    # The fast path takes tied modules when asked (Problem asks for the plain path).
    s = Slots(m, names, tensors, tied=(path == "plain"))
    assert (s._slots is not None) == (path == "fast")
    g = torch.Generator().manual_seed(3)
    state = {n: torch.randn(t.shape, generator=g, dtype=DT, requires_grad=True) for n, t in zip(names, tensors)}
    x = torch.randn(5, 3, generator=g, dtype=DT)
    seen = []
    hooks = [mod.register_forward_pre_hook(lambda mod, a: seen.append(mod.weight))
             for mod in m.modules() if isinstance(mod, nn.Linear) and mod.out_features == 3]
    try:
        out = s.run(m, state, (x,), {})
        feats = s.run(m.features, state, (x,), {}, method="features")
    finally:
        for h in hooks:
            h.remove()
    assert len(seen) == 4 and all(w is state[names[0]] for w in seen)    # both paths, both calls
    for lo_name, p in m.named_parameters(remove_duplicate=False):
        assert p.is_leaf and any(p is t for t in tensors), f"slot {lo_name!r} not restored"
    theta = [state[n] for n in names]
    ref = pure(kind, theta, x)
    measured(f"Slots.run on a {kind}-shared module ({path}) vs the pure function",
             float((out - ref).detach().abs().max()), 1e-14)
    eq = unshared_module(kind, m)
    with torch.no_grad():
        for p, t in zip(eq.parameters(), theta):
            p.copy_(t)
    measured(f"Slots.run(method='features') on a {kind}-shared module ({path}) vs the unshared equivalent",
             float((feats - eq.features(x)).detach().abs().max()), 0.0)
    # the gradient reaches the shared tensor through both uses
    gw = torch.autograd.grad(out.sum(), theta)
    gr = torch.autograd.grad(ref.sum(), theta)
    measured(f"Slots.run on a {kind}-shared module ({path}): gradient vs the pure function",
             max(float((a - b).abs().max()) for a, b in zip(gw, gr)), 1e-14)


RUNS = [  # (method, optimizer, iterations): every kind of run of the lower
    ("unrolled", "sgd", 7), ("unrolled", "adam", 7),
    ("cg", "sgd", 7), ("cg", "adam", 7),
    ("finite_difference", "sgd", 7), ("finite_difference", "adam", 7),
    ("sama", "adam", 7),
]


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "plain"])
@pytest.mark.parametrize("method,optimizer,iterations", RUNS)
@pytest.mark.parametrize("kind", KINDS)
def test_module_holds_the_variables_after_every_kind_of_run(kind, method, optimizer, iterations, fast):
    switch = fastpath.disabled() if not fast else _nothing()
    with switch:
        eng, lo, up = build(shared_module(kind), method, optimizer)
        check = SlotCheck(lo)
        eng.run(iterations, callbacks=[check])
        assert check.n == iterations + iterations // 3          # (also inside open windows)
        assert_slots_hold_variables(lo, f"after {iterations} iterations ({method}, {optimizer})")
        if method == "unrolled":
            assert eng.open_windows() == {"lo": iterations % 3}
        before = [p.detach().clone() for p in lo.variables]
        rep = eng.gradient("up")             # (unrolled: through the open window's step)
        assert float(rep["grad"]["lam"].abs()) > 0
        assert_slots_hold_variables(lo, "after engine.gradient")
        assert all(torch.equal(a, b) for a, b in zip(before, lo.variables))
        if method == "unrolled":
            eng.close_windows()
            assert_slots_hold_variables(lo, "after closing the windows")
        # the module, called directly, computes with the variables
        x = lo.data[0][0]
        got = lo.module(x)
        ref = pure(kind, list(lo.variables), x)
        assert torch.equal(got, ref) or float((got - ref).abs().max()) < 1e-14


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# ===================================================================== (b) trajectories
class Trajectory:
    """Every variable after every update, and every applied hypergradient."""

    def __init__(self):
        self.rows = []

    def after_update(self, engine, problem):
        self.rows.append((problem.name, [p.detach().clone() for p in problem.own_state().values()]))
        if problem.name == "up":
            self.rows.append(("hyper", [engine.last_hypergradient["up"]["lam"].detach().clone()]))


def trajectory(module, method, fast, iterations=20):
    with (_nothing() if fast else fastpath.disabled()):
        eng, lo, up = build(module, method, "sgd" if method != "finite_difference" else "adam")
        rec = Trajectory()
        eng.run(iterations, callbacks=[rec])
    return rec.rows, eng


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "plain"])
@pytest.mark.parametrize("method", ["unrolled", "cg", "finite_difference"])
@pytest.mark.parametrize("kind", KINDS)
def test_trajectory_equals_the_unshared_equivalent(measured, kind, method, fast):
    shared = shared_module(kind)
    unshared = unshared_module(kind, shared)
    got, eng_s = trajectory(shared, method, fast)
    ref, eng_u = trajectory(unshared, method, fast)
    assert eng_s.counts() == eng_u.counts() == {"lo": 20, "up": 6}
    assert [n for n, _ in got] == [n for n, _ in ref]
    err = 0.0
    for (_, a), (_, b) in zip(got, ref):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            err = max(err, float((x - y).abs().max()))
    hyper = [t for n, ts in got if n == "hyper" for t in ts]
    assert min(float(h.abs()) for h in hyper) > 1e-6            # a real hypergradient each time
    measured(f"shared ({kind}) vs unshared trajectory, {method}, 20 iterations "
             f"({'fast' if fast else 'plain'})", err, 1e-12)


# ===================================================================== (c) hypergradients
def fd_unrolled(kind, theta0, lam, lo_batches, up_batch, optimizer, h=1e-5):
    """Central difference of ``λ ↦ F(θ_K(λ))``: the lower's ``K`` steps with ``torch.optim``
    on the pure function (from the same ``θ_0``), the upper's loss at ``θ_K``."""

    def phi(lam_value):
        theta = [t.detach().clone().requires_grad_() for t in theta0]
        opt_cls, okw = OPTIMIZERS[optimizer]
        opt = opt_cls(theta, **okw)
        lam_t = torch.tensor(lam_value, dtype=DT)
        for b in lo_batches:
            g = torch.autograd.grad(lower_loss(kind, theta, lam_t, b), theta)
            for p, gi in zip(theta, g):
                p.grad = gi
            opt.step()
        with torch.no_grad():
            return float(upper_loss(kind, theta, up_batch))

    return (phi(lam + h) - phi(lam - h)) / (2 * h)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("kind", KINDS)
def test_unrolled_hypergradient_equals_central_differences(measured, kind, optimizer):
    module = shared_module(kind)
    theta0 = [p.detach().clone() for p in module.parameters()]
    eng, lo, up = build(module, "unrolled", optimizer, unroll=3)
    lam = float(up.params["lam"].detach())
    eng.run(3)
    assert eng.counts() == {"lo": 3, "up": 1}
    got = float(eng.last_hypergradient["up"]["lam"])
    lo_data, up_data = batches(4)
    ref = fd_unrolled(kind, theta0, lam, lo_data[:3], up_data[0], optimizer)
    assert abs(ref) > 1e-4
    measured(f"unrolled hypergradient through a {kind}-shared lower ({optimizer}) vs central FD",
             abs(got - ref) / abs(ref), 1e-7)


class AtLowerUpdate:
    """Keeps the lower's iterate and batch after each of its updates (what the upper's
    implicit hypergradient is evaluated at)."""

    def after_update(self, engine, problem):
        if problem.name == "lo":
            self.theta = [p.detach().clone() for p in problem.variables]
            self.batch = problem.last_batch
            self.lam = engine.problems["up"].params["lam"].detach().clone()   # (before its update)


def flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


def unflat(v, like):
    out, i = [], 0
    for t in like:
        out.append(v[i:i + t.numel()].view_as(t))
        i += t.numel()
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_cg_hypergradient_equals_a_dense_implicit_solve(measured, kind):
    """``cg`` run to its tolerance (more iterations than unknowns) with damping δ equals
    ``−∂²_{λθ} f · (H + δI)⁻¹ ∇_θ F`` with ``H`` materialised on the pure function."""
    module = shared_module(kind)
    opts = {"max_iter": 200, "damping": 0.3, "tol": 1e-13}
    eng, lo, up = build(module, "cg", "sgd", unroll=3, options=opts)
    at = AtLowerUpdate()
    eng.run(6, callbacks=[at])                    # (the second hypergradient: after one has run)
    assert eng.counts() == {"lo": 6, "up": 2}
    got = float(eng.last_hypergradient["up"]["lam"])
    lam = at.lam.clone().requires_grad_()
    theta = [t.clone().requires_grad_() for t in at.theta]
    n = sum(t.numel() for t in theta)
    H = torch.autograd.functional.hessian(lambda v: lower_loss(kind, unflat(v, theta), lam.detach(), at.batch),
                                          flat(theta).detach())
    v = flat(torch.autograd.grad(upper_loss(kind, theta, up.data[0]), theta))
    u = torch.linalg.solve(H + 0.3 * torch.eye(n, dtype=DT), v)
    gth = torch.autograd.grad(lower_loss(kind, theta, lam, at.batch), theta, create_graph=True)
    ref = -float(torch.autograd.grad((flat(gth) * u).sum(), lam)[0])
    assert abs(ref) > 1e-4
    measured(f"cg hypergradient through a {kind}-shared lower vs a dense implicit solve",
             abs(got - ref) / abs(ref), 1e-9)


@pytest.mark.parametrize("kind", KINDS)
def test_finite_difference_hypergradient_equals_its_formula(measured, kind):
    """``finite_difference`` (``epsilon=0.02``, ``scale_by_lr``) equals
    ``−η [∇_λ f(θ + εv) − ∇_λ f(θ − εv)] / (2ε)``, ``ε = 0.02/‖v‖``, by hand."""
    module = shared_module(kind)
    eng, lo, up = build(module, "finite_difference", "sgd", unroll=3)
    at = AtLowerUpdate()
    eng.run(6, callbacks=[at])                    # (the second hypergradient: after one has run)
    assert eng.counts() == {"lo": 6, "up": 2}
    got = float(eng.last_hypergradient["up"]["lam"])
    lam = at.lam.clone().requires_grad_()
    theta = [t.clone().requires_grad_() for t in at.theta]
    v = torch.autograd.grad(upper_loss(kind, theta, up.data[0]), theta)
    eps = 0.02 / float(flat(v).norm())

    def grad_lam(sign):
        moved = [(t + sign * eps * vi).detach() for t, vi in zip(theta, v)]
        return float(torch.autograd.grad(lower_loss(kind, moved, lam, at.batch), lam)[0])

    ref = -OPTIMIZERS["sgd"][1]["lr"] * (grad_lam(1) - grad_lam(-1)) / (2 * eps)
    assert abs(ref) > 1e-5
    measured(f"finite_difference hypergradient through a {kind}-shared lower vs its formula by hand",
             abs(got - ref) / abs(ref), 1e-10)
