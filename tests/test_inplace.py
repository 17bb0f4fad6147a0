"""``mlo.fastpath.sgd_step`` is exactly ``torch.optim.SGD.step()`` (bitwise), or declines.

``sgd_step(opt, params, grads)`` runs torch's single-tensor SGD arithmetic in place
(no ``opt.step()``) and must leave the parameters *and* ``opt.state`` (momentum
buffers) as ``step()`` with ``params[i].grad = grads[i]`` would; when it cannot
guarantee that it returns ``False`` and changes nothing. Every comparison is
``torch.equal`` (recorded through ``measured`` as a max-abs error with tolerance 0):

1. against a twin ``torch.optim.SGD`` stepped with ``.grad`` + ``step()``, 4 steps with
   fresh random gradients, over lr × momentum/dampening/nesterov × weight_decay ×
   maximize × float32/float64, parameters of several shapes (matrix, vector, 0-d), an
   lr changed by hand between steps; two param groups with different
   hyperparameters (changed by hand too); a parameter of the optimizer not passed
   (and without ``.grad``: skipped, as ``step()`` skips it). The gradients passed are
   never modified and no ``.grad`` is set.
2. ``False`` and nothing changed (parameters, ``.grad``, ``opt.state``, param groups)
   for: Adam, a subclass of SGD, ``foreach=True``, ``fused=True``,
   ``differentiable=True``, tensor lr / weight_decay, step pre/post hooks (the
   optimizer's and global ones), ``step`` wrapped by an LR scheduler or by hand, a
   tensor not in the optimizer, a parameter not passed but with a hand-set ``.grad``,
   an AMP grad scale, complex parameters, sparse gradients; removing the cause
   (hook handle, wrapper, extra tensor, stray ``.grad``) makes it ``True`` again.
3. through the engine (``mlo.step.step_in_place``): two-problem engines (lower SGD
   momentum + weight decay, upper SGD; ``"cg"`` and ``"finite_difference"``) run 5
   steps with the fast path and with ``mlo.step.sgd_step`` patched to decline:
   identical parameters and optimizer states; the fast path was taken on every update.
"""
from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn
from torch.optim import optimizer as torch_optimizer

import mlo
import mlo.step
from mlo import fastpath
from mlo.fastpath import sgd_step

SHAPES = [(3, 4), (4,), ()]                      # a matrix, a vector, a 0-d scalar


# ===================================================================== helpers
def make_params(dtype, seed=0, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in shapes]


def grads_for(params, seed):
    g = torch.Generator().manual_seed(1000 + seed)
    return [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]


def torch_step(opt, params, grads):
    """What ``sgd_step`` must equal: ``.grad`` + ``opt.step()`` (and ``.grad`` cleared)."""
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()
    for p in params:
        p.grad = None


def opt_tensors(opt):
    """Every parameter and state tensor of ``opt``, in param-group order, with the state
    keys (so different optimizers over equal-shaped parameters can be compared)."""
    params, state, keys = [], [], []
    for group in opt.param_groups:
        for p in group["params"]:
            params.append(p)
            st = opt.state[p] if p in opt.state else None
            keys.append(None if st is None else sorted(st))
            if st is not None:
                state += [st[k] for k in sorted(st) if isinstance(st[k], torch.Tensor)]
    return params, state, keys


def hyper(opt):
    return [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]


def same(measured, check, got, ref):
    """``torch.equal`` on every tensor pair (recorded as max |diff|, tolerance 0)."""
    assert len(got) == len(ref), f"{check}: {len(got)} vs {len(ref)} tensors"
    err = 0.0
    for a, b in zip(got, ref):
        assert a.shape == b.shape and a.dtype == b.dtype, f"{check}: {a.shape}/{a.dtype} vs {b.shape}/{b.dtype}"
        if a.numel():
            err = max(err, float((a.detach() - b.detach()).abs().max()))
    measured(check, err, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(got, ref)), check


def same_opt(measured, check, opt, twin):
    """Parameters, ``opt.state`` (entries, keys, tensors) and hyperparameters equal."""
    p, s, k = opt_tensors(opt)
    tp, ts, tk = opt_tensors(twin)
    assert len(opt.state) == len(twin.state), f"{check}: state entries {len(opt.state)} vs {len(twin.state)}"
    assert k == tk, f"{check}: state keys {k} vs {tk}"
    assert hyper(opt) == hyper(twin), check
    same(measured, f"{check}: parameters", p, tp)
    if s or ts:
        same(measured, f"{check}: momentum buffers", s, ts)


# ===================================================================== 1. bitwise equal to step()
def _hp_grid():
    for momentum, dampening, nesterov in [(0.0, 0.0, False), (0.0, 0.3, False), (0.9, 0.0, False),
                                          (0.9, 0.0, True), (0.9, 0.3, False)]:
        for lr, wd, maximize in itertools.product((0.1, 0.37), (0.0, 1e-2), (False, True)):
            yield pytest.param(dict(lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov,
                                    weight_decay=wd, maximize=maximize),
                               id=f"lr{lr}-m{momentum}-d{dampening}-nest{int(nesterov)}-wd{wd}-max{int(maximize)}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("hp", list(_hp_grid()))
def test_equals_torch_step(measured, hp, dtype):
    params = make_params(dtype)
    twin_params = copy.deepcopy(params)
    opt = torch.optim.SGD(params, **hp)
    twin = torch.optim.SGD(twin_params, **hp)
    applied = []
    for step in range(4):
        if step == 2:                            # an lr changed by hand: must be honoured
            for o in (opt, twin):
                o.param_groups[0]["lr"] = 0.5 * hp["lr"] + 0.013
        grads = grads_for(params, step)
        kept = [g.clone() for g in grads]
        assert sgd_step(opt, params, grads) is True
        torch_step(twin, twin_params, grads)
        applied.append((grads, kept))
        assert all(p.grad is None for p in params)
        same_opt(measured, f"sgd_step vs SGD.step() ({dtype}, step {step + 1})", opt, twin)
        if hp["momentum"]:
            assert len(opt.state) == len(params)
            assert all(opt.state[p]["momentum_buffer"].dtype == dtype for p in params)
        else:
            assert len(opt.state) == 0
    # the gradients handed in were never modified (nor aliased by a momentum buffer)
    same(measured, "sgd_step leaves its gradients untouched",
         [g for gs, _ in applied for g in gs], [k for _, ks in applied for k in ks])
    # and the run really moved the parameters
    assert not any(torch.equal(a, b) for a, b in zip(params, make_params(dtype)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_two_param_groups_and_hand_changes(measured, dtype):
    shapes = [(3, 4), (4,), (), (2, 3), (5,)]

    def build(params):
        return torch.optim.SGD([
            {"params": params[:2], "lr": 0.1, "momentum": 0.9, "dampening": 0.3, "weight_decay": 1e-2},
            {"params": params[2:4], "lr": 0.37, "momentum": 0.5, "nesterov": True, "maximize": True},
            {"params": params[4:]},               # the defaults: lr 0.05, no momentum
        ], lr=0.05)

    params = make_params(dtype, seed=1, shapes=shapes)
    twin_params = copy.deepcopy(params)
    opt, twin = build(params), build(twin_params)
    for step in range(4):
        if step == 1:
            for o in (opt, twin):
                o.param_groups[0]["lr"] = 0.21
                o.param_groups[1]["momentum"] = 0.8
                o.param_groups[2]["weight_decay"] = 3e-2
        if step == 3:
            for o in (opt, twin):
                o.param_groups[1]["lr"] = 0.05
                o.param_groups[2]["momentum"] = 0.7       # a buffer appears at step 4
        grads = grads_for(params, 10 + step)
        assert sgd_step(opt, params, grads) is True
        torch_step(twin, twin_params, grads)
        same_opt(measured, f"sgd_step vs SGD.step(), three groups ({dtype}, step {step + 1})", opt, twin)
    assert len(opt.state) == len(params)


def test_parameter_not_passed_without_grad_is_skipped(measured):
    """``step()`` skips a parameter whose ``.grad`` is None: so does sgd_step."""
    params = make_params(torch.float64, seed=2)
    twin_params = copy.deepcopy(params)
    kw = dict(lr=0.1, momentum=0.9, weight_decay=1e-2)
    opt, twin = torch.optim.SGD(params, **kw), torch.optim.SGD(twin_params, **kw)
    for step in range(3):
        sub = [0, 2] if step != 1 else [1]
        grads = grads_for(params, 20 + step)
        assert sgd_step(opt, [params[i] for i in sub], [grads[i] for i in sub]) is True
        torch_step(twin, [twin_params[i] for i in sub], [grads[i] for i in sub])
        same_opt(measured, f"sgd_step on a subset vs SGD.step() (step {step + 1})", opt, twin)
    assert len(opt.state) == 3


# ===================================================================== 2. declines, changes nothing
def snapshot(opt, extra=()):
    params, state, keys = opt_tensors(opt)
    tensors = params + list(extra)
    grads = [p.grad for p in params]
    return ([t.detach().clone() for t in tensors], [t.detach().clone() for t in state], keys,
            copy.deepcopy(hyper(opt)), [None if g is None else (g, g.detach().clone()) for g in grads],
            len(opt.state))


def assert_unchanged(measured, check, opt, before, extra=()):
    tensors, state, keys, hp, grads, n = before
    params, now_state, now_keys = opt_tensors(opt)
    assert now_keys == keys and len(opt.state) == n, f"{check}: state keys changed"
    assert hyper(opt) == hp, f"{check}: param groups changed"
    same(measured, f"declined sgd_step leaves parameters alone: {check}", params + list(extra), tensors)
    if state:
        same(measured, f"declined sgd_step leaves opt.state alone: {check}", now_state, state)
    for p, g in zip(params, grads):               # .grad: still what it was (same object, value)
        if g is None:
            assert p.grad is None, check
        else:
            assert p.grad is g[0] and torch.equal(p.grad, g[1]), check


class SubSGD(torch.optim.SGD):
    pass


def _opt(kind):
    params = make_params(torch.float64, seed=3)
    kw = dict(lr=0.1, momentum=0.9, weight_decay=1e-2)
    if kind == "adam":
        return params, torch.optim.Adam(params, lr=0.1)
    if kind == "subclass":
        return params, SubSGD(params, **kw)
    if kind == "complex":
        params = [nn.Parameter(torch.randn(3, 2, dtype=torch.complex128)), nn.Parameter(torch.randn(4, dtype=torch.complex128))]
        return params, torch.optim.SGD(params, **kw)
    extra = {"foreach": dict(foreach=True), "fused": dict(fused=True),
             "differentiable": dict(differentiable=True), "lr_tensor": dict(lr=torch.tensor(0.1)),
             "wd_tensor": dict(weight_decay=torch.tensor(1e-2, dtype=torch.float64)),
             "plain": {}}[kind]
    return params, torch.optim.SGD(params, **{**kw, **extra})


def _warm(opt, params):
    """One real step (so momentum buffers / Adam moments exist), ``.grad`` cleared."""
    if opt.defaults.get("differentiable"):        # (in-place on a leaf needing grad: not allowed)
        for p in params:
            p.requires_grad_(False)
    torch_step(opt, params, grads_for(params, 99))


KINDS = ["adam", "subclass", "foreach", "fused", "differentiable", "lr_tensor", "wd_tensor", "complex"]


@pytest.mark.parametrize("kind", KINDS)
def test_declines_unsupported_optimizers(measured, kind):
    params, opt = _opt(kind)
    _warm(opt, params)
    assert len(opt.state) == len(params)          # there is state to (not) touch
    before = snapshot(opt)
    assert sgd_step(opt, params, grads_for(params, 5)) is False
    assert_unchanged(measured, kind, opt, before)


def test_declines_sparse_gradient(measured):
    params = [nn.Parameter(torch.randn(4, 3, dtype=torch.float64))]
    opt = torch.optim.SGD(params, lr=0.1)
    before = snapshot(opt)
    g = torch.randn(4, 3, dtype=torch.float64).to_sparse()
    assert sgd_step(opt, params, [g]) is False
    assert_unchanged(measured, "sparse gradient", opt, before)


def test_declines_amp_grad_scale(measured):
    params, opt = _opt("plain")
    _warm(opt, params)
    opt.grad_scale = torch.tensor(1.0)
    before = snapshot(opt)
    assert sgd_step(opt, params, grads_for(params, 6)) is False
    assert_unchanged(measured, "grad_scale", opt, before)
    del opt.grad_scale
    assert sgd_step(opt, params, grads_for(params, 6)) is True


def _hook(*args):
    return None


@pytest.mark.parametrize("which", ["pre", "post", "global_pre", "global_post"])
def test_declines_with_step_hooks(measured, which):
    params, opt = _opt("plain")
    _warm(opt, params)
    register = {"pre": opt.register_step_pre_hook, "post": opt.register_step_post_hook,
                "global_pre": torch_optimizer.register_optimizer_step_pre_hook,
                "global_post": torch_optimizer.register_optimizer_step_post_hook}[which]
    handle = register(_hook)
    try:
        before = snapshot(opt)
        assert sgd_step(opt, params, grads_for(params, 7)) is False
        assert_unchanged(measured, f"{which} hook", opt, before)
    finally:
        handle.remove()
    # the hook was the reason: without it, the fast path is back (and right)
    twin_params = copy.deepcopy(params)
    twin = torch.optim.SGD(twin_params, **hyper(opt)[0])
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))   # (load shares tensors)
    grads = grads_for(params, 8)
    assert sgd_step(opt, params, grads) is True
    torch_step(twin, twin_params, grads)
    same_opt(measured, f"sgd_step after removing a {which} hook vs SGD.step()", opt, twin)


def test_declines_when_a_scheduler_wraps_step(measured):
    params, opt = _opt("plain")
    _warm(opt, params)
    assert "step" not in opt.__dict__
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    assert "step" in opt.__dict__                 # the scheduler wraps step on the instance
    before = snapshot(opt)
    assert sgd_step(opt, params, grads_for(params, 9)) is False
    assert_unchanged(measured, "StepLR", opt, before)
    # that wrapper is exactly what triggers it: without it (scheduler still alive) → True
    del opt.__dict__["step"]
    assert sgd_step(opt, params, grads_for(params, 9)) is True
    del sched
    # a wrapper set by hand too
    calls = []
    real = opt.step
    opt.step = lambda *a, **k: (calls.append(1), real(*a, **k))[1]
    before = snapshot(opt)
    assert sgd_step(opt, params, grads_for(params, 10)) is False
    assert_unchanged(measured, "step patched by hand", opt, before)
    assert calls == []


def test_declines_a_tensor_not_in_the_optimizer(measured):
    params, opt = _opt("plain")
    _warm(opt, params)
    stranger = nn.Parameter(torch.randn(2, 2, dtype=torch.float64))
    before = snapshot(opt, extra=[stranger])
    grads = grads_for(params + [stranger], 11)
    for order in ([*params, stranger], [stranger, *params], [params[0], stranger]):
        g = {id(p): gi for p, gi in zip(params + [stranger], grads)}
        assert sgd_step(opt, order, [g[id(p)] for p in order]) is False
        assert_unchanged(measured, "tensor not in the optimizer", opt, before, extra=[stranger])
        assert stranger.grad is None
    assert sgd_step(opt, params, grads[:len(params)]) is True


def test_declines_a_hand_set_grad_on_a_parameter_not_passed(measured):
    params, opt = _opt("plain")
    _warm(opt, params)
    params[1].grad = torch.randn(params[1].shape, dtype=torch.float64)
    before = snapshot(opt)
    grads = grads_for(params, 12)
    assert sgd_step(opt, [params[0], params[2]], [grads[0], grads[2]]) is False
    assert_unchanged(measured, "hand-set .grad on a parameter not passed", opt, before)
    params[1].grad = None
    assert sgd_step(opt, [params[0], params[2]], [grads[0], grads[2]]) is True


# ===================================================================== 3. through the engine
DT = torch.float64
D = 4


class Lower(mlo.Problem):
    def training_step(self, batch):
        x, y = batch
        return ((self(x).squeeze(-1) - y) ** 2).mean() \
            + (self.up.params["lam"].exp() * self.params["0.weight"] ** 2).sum()


class Upper(mlo.Problem):
    def training_step(self, batch):
        x, y = batch
        return ((self.lo(x).squeeze(-1) - y - self.params["b"]) ** 2).mean() \
            + 0.01 * (self.params["lam"] ** 2).sum()


METHODS = {"cg": {"max_iter": 3, "damping": 0.5}, "finite_difference": {"epsilon": 0.02}}


def build_engine(method):
    gen = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=DT)  # noqa: E731
    train = [(r(8, D), r(8)) for _ in range(5)]
    val = [(r(8, D), r(8)) for _ in range(5)]
    torch.manual_seed(1)
    module = nn.Sequential(nn.Linear(D, 5), nn.Tanh(), nn.Linear(5, 1)).double()
    lo = Lower("lo", module=module, data=train, optimizer=torch.optim.SGD,
               optimizer_kwargs={"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-2},
               config=mlo.ProblemConfig(unroll_steps=1, method=method, method_options=METHODS[method]))
    up = Upper("up", params={"lam": torch.full((5, 1), -1.0, dtype=DT), "b": torch.tensor(0.2, dtype=DT)},
               data=val, optimizer=torch.optim.SGD, optimizer_kwargs={"lr": 0.3})
    lo.up, up.lo = up, lo
    return mlo.Engine([lo, up], {"u2l": {up: [lo]}, "l2u": {lo: [up]}}), lo, up


@pytest.mark.parametrize("method", list(METHODS))
def test_engine_same_with_and_without_fast_path(measured, monkeypatch, method):
    taken = []
    real = fastpath.sgd_step

    def counting(opt, params, grads):
        out = real(opt, params, grads)
        taken.append(out)
        return out

    monkeypatch.setattr(mlo.step, "sgd_step", counting)
    fast, lo_f, up_f = build_engine(method)
    init = [t.detach().clone() for P in (lo_f, up_f) for t in P.variables]
    fast.run(5)
    n_updates = sum(fast.counts().values())
    assert fast.counts()["lo"] == 5 and fast.counts()["up"] >= 1
    assert taken == [True] * n_updates, f"fast path taken {sum(taken)} of {n_updates} updates ({taken})"

    monkeypatch.setattr(mlo.step, "sgd_step", lambda *a: False)
    slow, lo_s, up_s = build_engine(method)
    slow.run(5)
    assert slow.counts() == fast.counts()
    assert len(taken) == n_updates                # the slow engine never reached sgd_step
    for name, (P_f, P_s) in {"lo": (lo_f, lo_s), "up": (up_f, up_s)}.items():
        same_opt(measured, f"engine {name} fast path vs torch.optim ({method}, 5 steps)",
                 P_f.optimizer, P_s.optimizer)
        same(measured, f"engine {name} variables fast path vs torch.optim ({method}, 5 steps)",
             list(P_f.variables), list(P_s.variables))
    assert len(lo_f.optimizer.state) == len(list(lo_f.variables))   # momentum buffers exist
    moved = [not torch.equal(a, b) for a, b in zip([t for P in (lo_f, up_f) for t in P.variables], init)]
    assert all(moved), moved                      # both problems really stepped (hypergradient too)
