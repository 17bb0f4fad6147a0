"""Graph lint, second check (issue 21): optimizer hyperparameters learned from another
problem's variables (``optimizer_hyperparameters()``, e.g. a learnable learning rate) on
a problem whose method does not step through a window get a hypergradient of exactly 0.

- For each implicit / finite-difference method (``cg``, ``neumann``,
  ``finite_difference`` with and without ``scale_by_lr``, its alias ``darts``, ``sama``)
  the first update warns once (``RuntimeWarning``), naming the problem, each learned
  hyperparameter and where it comes from, and ``'unrolled'``; six iterations later still
  one warning; and the claim is true: the learned variable's hypergradient is exactly 0
  at every update while the upper's other variable gets a non-zero one.
- ``unrolled`` never warns, nor do constant hyperparameters (a float, a tensor that no
  variable reaches) under ``cg``.
- ``unrolled`` really differentiates through them: the hypergradient of a learnable
  ``log_lr`` (SGD with momentum, Adam; one lr for every group, and per-group lrs as a
  learnable scale of each group's base lr) equals central finite differences of
  ``log_lr ↦ F(θ_K)`` computed with ``torch.optim`` on the same function (float64).
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import mlo
from mlo import lint

DT = torch.float64
BASE = (0.2, 0.05)     # per-group base lrs (the "per_group" case)


def batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.tensor([1.0, -2.0, 0.5], dtype=DT)
    out = []
    for _ in range(n):
        x = torch.randn(8, 3, generator=g, dtype=DT)
        out.append((x, torch.tanh(x @ w) + 0.1 * x[:, 0] ** 2))
    return out


def predict(theta, x):
    """The lower's model on explicit tensors: ``tanh(x·w1) · w2 + b``."""
    w1, w2, b = theta
    return torch.tanh(x @ w1) @ w2 + b


def lower_loss(theta, lam, batch):
    x, y = batch
    return F.mse_loss(predict(theta, x), y) + lam.exp() * sum((t ** 2).sum() for t in theta)


def upper_loss(theta, batch):
    x, y = batch
    return F.mse_loss(predict(theta, x), y)


class Lower(mlo.Problem):
    """Variables ``w1 [3,4]``, ``w2 [4]``, ``b []``; an upper's ``lam`` weighs an L2 term."""

    def __init__(self, method, options, optimizer, okw, hp, param_groups=None):
        g = torch.Generator().manual_seed(7)
        params = {"w1": 0.5 * torch.randn(3, 4, generator=g, dtype=DT),
                  "w2": 0.5 * torch.randn(4, generator=g, dtype=DT), "b": torch.zeros((), dtype=DT)}
        super().__init__("lo", params=params, data=batches(6), optimizer=optimizer, optimizer_kwargs=okw,
                         param_groups=param_groups,
                         config=mlo.ProblemConfig(method=method, method_options=options, unroll_steps=3))
        self.hp = hp

    def training_step(self, batch):
        p = self.params
        return lower_loss((p["w1"], p["w2"], p["b"]), self.up.params["lam"], batch)

    def optimizer_hyperparameters(self):
        return self.hp(self)


class Upper(mlo.Problem):
    def __init__(self):
        super().__init__("up", params={"lam": torch.tensor(-3.0, dtype=DT), "log_lr": torch.tensor(-2.0, dtype=DT),
                                       "log_m": torch.tensor(-0.5, dtype=DT)},
                         data=batches(1, seed=1), optimizer_kwargs={"lr": 0.1})

    def training_step(self, batch):
        p = self.lo.params
        return upper_loss((p["w1"], p["w2"], p["b"]), batch)


def lr_from_upper(lo):
    return {"lr": lo.up.params["log_lr"].exp()}


HP = {
    "lr": lr_from_upper,
    "lr_and_momentum": lambda lo: {"lr": lo.up.params["log_lr"].exp(), "momentum": torch.sigmoid(lo.up.params["log_m"])},
    "per_group": lambda lo: {"lr": [lo.up.params["log_lr"].exp() * base for base in BASE]},
    "constant_float": lambda lo: {"lr": 0.05},
    "constant_tensor": lambda lo: {"lr": torch.tensor(0.05, dtype=DT, requires_grad=True)},
}
SGD = (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9})
ADAM = (torch.optim.Adam, {"lr": 0.1, "betas": (0.8, 0.95)})
GROUPS = [{"params": ["w1"], "lr": BASE[0]}, {"params": ["w2", "b"], "lr": BASE[1]}]


def build(method, options=None, optimizer=SGD, hp="lr", groups=False):
    up = Upper()
    lo = Lower(method, dict(options or {}), optimizer[0], dict(optimizer[1]), HP[hp],
               param_groups=GROUPS if groups else None)
    lo.up, up.lo = up, lo
    return mlo.Engine([lo, up], {"u2l": {up: [lo]}, "l2u": {lo: [up]}}), lo, up


class Hypers:
    def __init__(self):
        self.seen = []

    def after_update(self, engine, problem):
        if problem.name == "up":
            self.seen.append({k: v.detach().clone() for k, v in engine.last_hypergradient["up"].items()})


def lint_warnings(caught):
    return [w for w in caught if issubclass(w.category, RuntimeWarning) and "graph lint" in str(w.message)
            and "optimizer hyperparameter" in str(w.message)]


IMPLICIT = [
    ("cg", {"max_iter": 20, "damping": 0.5}, SGD),
    ("neumann", {"iterations": 5, "alpha": 0.2}, SGD),
    ("finite_difference", {"epsilon": 0.02}, SGD),
    ("finite_difference", {"epsilon": 0.02, "scale_by_lr": True}, SGD),
    ("darts", {"scale_by_lr": True}, SGD),
    ("sama", {"alpha": 0.5}, ADAM),
]


@pytest.mark.parametrize("method,options,optimizer", IMPLICIT,
                         ids=["cg", "neumann", "fd", "fd_scale_by_lr", "darts", "sama"])
def test_implicit_method_with_a_learned_lr_warns_once(method, options, optimizer):
    eng, lo, up = build(method, options, optimizer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        eng.run(1)                                      # the lower's first update
        first = lint_warnings(caught)
        hypers = Hypers()
        eng.run(8, callbacks=[hypers])
    assert len(first) == 1 and len(lint_warnings(caught)) == 1, [str(w.message) for w in caught]
    msg = str(first[0].message)
    for part in ("problem 'lo'", "'lr' from 'up'", f"method {method!r}", "exactly 0", "'unrolled'"):
        assert part in msg, f"{part!r} not in: {msg}"
    # the warning's claim: the learned variable gets exactly 0, the other one does not
    assert len(hypers.seen) == 3
    for h in hypers.seen:
        assert torch.equal(h["log_lr"], torch.zeros((), dtype=DT))
        assert float(h["lam"].abs()) > 1e-8


def test_every_learned_hyperparameter_and_its_source_named():
    eng, lo, up = build("cg", {"max_iter": 20, "damping": 0.5}, hp="lr_and_momentum")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        eng.run(1)
    (w,) = lint_warnings(caught)
    assert "'lr' from 'up', 'momentum' from 'up'" in str(w.message)
    assert lint.learned_from(eng.problems, lo) == {"lr": ["up"], "momentum": ["up"]}


@pytest.mark.parametrize("hp", ["lr", "lr_and_momentum", "per_group"])
def test_unrolled_does_not_warn(hp):
    eng, lo, up = build("unrolled", hp=hp, groups=(hp == "per_group"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")                  # any warning fails the test
        eng.run(6)
    assert eng.counts() == {"lo": 6, "up": 2}
    assert float(eng.last_hypergradient["up"]["log_lr"].abs()) > 1e-8


@pytest.mark.parametrize("hp", ["constant_float", "constant_tensor"])
def test_constant_hyperparameters_do_not_warn(hp):
    eng, lo, up = build("cg", {"max_iter": 20, "damping": 0.5}, hp=hp)
    assert lint.learned_from(eng.problems, lo) == {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        eng.run(6)


def test_no_override_learns_nothing():
    plain = mlo.Problem("plain", params={"x": torch.zeros(2)})
    assert lint.learned_from({"plain": plain}, plain) == {}


# ===================================================================== unrolled vs central FD
def fd_log_lr(theta0, lam, log_lr, lo_batches, up_batch, optimizer, groups, h=1e-5):
    """Central difference of ``log_lr ↦ F(θ_K)``: ``K`` steps of ``torch.optim`` with
    ``lr = exp(log_lr)`` (times each group's base lr) from ``θ_0``."""

    def phi(a):
        theta = [t.detach().clone().requires_grad_() for t in theta0]
        cls, okw = optimizer
        lr = torch.tensor(a, dtype=DT).exp()
        if groups:
            opt = cls([{"params": [theta[0]], "lr": float(lr * BASE[0])},
                       {"params": theta[1:], "lr": float(lr * BASE[1])}], **{k: v for k, v in okw.items() if k != "lr"})
        else:
            opt = cls(theta, **{**okw, "lr": float(lr)})
        for b in lo_batches:
            g = torch.autograd.grad(lower_loss(theta, lam, b), theta)
            for p, gi in zip(theta, g):
                p.grad = gi
            opt.step()
        with torch.no_grad():
            return float(upper_loss(theta, up_batch))

    return (phi(log_lr + h) - phi(log_lr - h)) / (2 * h)


@pytest.mark.parametrize("optimizer,groups", [(SGD, False), (ADAM, False), (SGD, True)],
                         ids=["sgd_momentum", "adam", "sgd_per_group"])
def test_unrolled_learned_lr_equals_central_differences(measured, optimizer, groups):
    eng, lo, up = build("unrolled", optimizer=optimizer, hp="per_group" if groups else "lr", groups=groups)
    theta0 = [t.detach().clone() for t in lo.variables]
    lam, log_lr = up.params["lam"].detach().clone(), float(up.params["log_lr"].detach())
    eng.run(3)
    assert eng.counts() == {"lo": 3, "up": 1}
    got = float(eng.last_hypergradient["up"]["log_lr"])
    ref = fd_log_lr(theta0, lam, log_lr, batches(6)[:3], batches(1, seed=1)[0], optimizer, groups)
    assert abs(ref) > 1e-4
    name = {id(SGD): "SGD momentum 0.9", id(ADAM): "Adam"}[id(optimizer)] + (", per-group lrs" if groups else "")
    measured(f"unrolled hypergradient of a learnable log lr ({name}) vs central FD", abs(got - ref) / abs(ref), 1e-7)
