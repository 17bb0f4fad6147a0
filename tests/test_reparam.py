"""``mlo.fastpath.Slots`` is exactly ``torch.func.functional_call`` (float64, bitwise).

``Slots`` runs a module with other tensors in place of its parameters by assigning
``owner._parameters[leaf]`` directly and restoring the originals in ``finally``; it
falls back to ``functional_call`` for tied weights, parametrized modules and slots
that no longer hold the parameter they held when resolved. Every comparison here is
``torch.equal`` (recorded through ``measured`` as a max-abs error with tolerance 0):

1. outputs, module buffers (BatchNorm running statistics in train mode), first and
   second derivatives w.r.t. the substituted tensors: an ``nn.Sequential`` MLP
   (nested names), a frozen parameter + BatchNorm (eval / train), a subset of the
   names, ``method=`` — on the fast path and on the forced fallback;
2. the module's ``_parameters`` hold the original ``nn.Parameter`` objects after a
   run, after a forward that raises and after a ``state`` missing a name;
3. the fallback is taken (``mlo.fastpath.functional_call`` wrapped with a counter)
   and right for tied weights, ``parametrize``, a parameter replaced after the
   slots were resolved, and a nested call of the same ``Slots`` (directly and via
   ``Problem.call``); the fast path takes no fallback;
4. ``Problem.__call__`` / ``Problem.call`` outside an engine, and two-problem engines
   (``"unrolled"`` with ``unroll_steps=2``, ``"cg"``) whose applied hypergradients,
   parameters and ``engine.gradient`` are identical with the fast path disabled.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.utils import parametrize

import mlo
from _helpers import RecSGD
from mlo import fastpath
from mlo.fastpath import Slots

DT = torch.float64


# ===================================================================== helpers
@pytest.fixture
def fallbacks(monkeypatch):
    """Counts the calls ``Slots.run`` makes to ``functional_call`` (its fallback)."""
    calls = []
    real = fastpath.functional_call

    def counting(*args, **kwargs):
        calls.append(type(args[0]).__name__)
        return real(*args, **kwargs)

    monkeypatch.setattr(fastpath, "functional_call", counting)
    return calls


def _flat(x):
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, dict):
        return [t for k in sorted(x) for t in _flat(x[k])]
    return [t for v in x for t in _flat(v)]


def same(measured, check, got, ref):
    """``torch.equal`` on every tensor of ``got`` / ``ref`` (recorded as max |diff|, tol 0)."""
    got, ref = _flat(got), _flat(ref)
    assert len(got) == len(ref) and len(ref) > 0
    err = 0.0
    for a, b in zip(got, ref):
        assert a.shape == b.shape and a.dtype == b.dtype, f"{check}: {a.shape}/{a.dtype} vs {b.shape}/{b.dtype}"
        if a.numel():
            err = max(err, float((a.detach().double() - b.detach().double()).abs().max()))
    measured(check, err, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(got, ref)), check


def slot_objects(m):
    """Every parameter slot of ``m`` and what it holds: ``[(module, leaf, object)]``."""
    return [(mod, leaf, p) for mod in m.modules() for leaf, p in mod._parameters.items()]


def assert_restored(before):
    for mod, leaf, p in before:
        assert mod._parameters[leaf] is p, f"{type(mod).__name__}.{leaf} not restored"


def trainable(m):
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    return names, [p for n, p in m.named_parameters() if p.requires_grad]


def new_state(m, names, seed, grad=False):
    """Fresh float64 tensors for ``names`` (other values than the module's)."""
    g = torch.Generator().manual_seed(seed)
    shapes = dict(m.named_parameters())
    return {n: (0.7 * torch.randn(shapes[n].shape, generator=g, dtype=DT)).requires_grad_(grad) for n in names}


class _Forward(nn.Module):
    """The reference's way to run ``m.<method>`` through ``functional_call``."""

    def __init__(self, m, method):
        super().__init__()
        self.m, self.method = m, method

    def forward(self, *args):
        return getattr(self.m, self.method)(*args)


def reference(m, state, args, method=None, tie_weights=True):
    if method is None:
        return functional_call(m, state, args, tie_weights=tie_weights)
    return functional_call(_Forward(m, method), {"m." + k: v for k, v in state.items()}, args,
                           tie_weights=tie_weights)


def run_slots(s, m, state, args, method=None):
    return s.run(m if method is None else getattr(m, method), state, args, {}, method=method)


# ===================================================================== modules
def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(DT)


class FrozenBN(nn.Module):
    """A frozen parameter (``requires_grad=False``, not a variable) and a BatchNorm."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)
        self.scale = nn.Parameter(torch.tensor([1.5, -0.5, 2.0, 0.75]), requires_grad=False)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.bn(self.lin(x)) * self.scale))


def frozen_bn(train, seed=0):
    torch.manual_seed(seed)
    m = FrozenBN().to(DT)
    with torch.no_grad():                           # non-trivial running statistics
        m.bn.running_mean.copy_(torch.randn(4, dtype=DT))
        m.bn.running_var.copy_(torch.rand(4, dtype=DT) + 0.5)
    return m.train(train)


class Net(nn.Module):
    """An MLP with an extra method (``features``) and nested names."""

    def __init__(self, d=3, h=4):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d, h), nn.Tanh())
        self.head = nn.Linear(h, 1)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.features(x)).squeeze(-1)


def net(seed=0):
    torch.manual_seed(seed)
    return Net().to(DT)


# (module factory, names (None: every trainable one), method)
CASES = {
    "mlp": (mlp, None, None),
    "frozen_bn_eval": (lambda: frozen_bn(False), None, None),
    "frozen_bn_train": (lambda: frozen_bn(True), None, None),
    "subset": (mlp, ["0.weight", "2.bias"], None),
    "method": (net, None, "features"),
}


def build_case(name):
    make, names, method = CASES[name]
    m = make()
    all_names, all_tensors = trainable(m)
    if names is None:
        names = all_names
    tensors = [dict(zip(all_names, all_tensors))[n] for n in names]
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(1), dtype=DT)
    return m, names, tensors, x, method


# ===================================================================== 1. values and gradients
@pytest.mark.parametrize("path", ["fast", "fallback"])
@pytest.mark.parametrize("case", list(CASES))
def test_run_equals_functional_call(measured, fallbacks, case, path):
    m, names, tensors, x, method = build_case(case)
    assert "scale" not in names                     # frozen: not a variable
    m_ref = copy.deepcopy(m)
    s = Slots(m, names, tensors, tied=False)
    assert s._slots is not None                     # these modules take the fast path
    if path == "fallback":
        s._slots = None
    before = slot_objects(m)
    buffers0 = {k: b.clone() for k, b in m.named_buffers()}
    state = new_state(m, names, seed=2)
    got = run_slots(s, m, state, (x,), method)
    ref = reference(m_ref, state, (x,), method)
    same(measured, f"Slots.run vs functional_call: output ({case}, {path})", got, ref)
    assert fallbacks == ([] if path == "fast" else [("Sequential" if case in ("mlp", "subset") else
                                                     "_Method" if method else type(m).__name__)])
    assert_restored(before)
    # the state was used (not the module's parameters) ...
    direct = copy.deepcopy(m)                       # (a copy: train mode would move the stats)
    assert not torch.equal(got, (getattr(direct, method) if method else direct)(x))
    # ... and buffers moved exactly as functional_call moved them (BatchNorm in train mode)
    if buffers0:
        same(measured, f"Slots.run vs functional_call: buffers ({case}, {path})",
             dict(m.named_buffers()), dict(m_ref.named_buffers()))
    if case == "frozen_bn_train":
        assert not torch.equal(m.bn.running_mean, buffers0["bn.running_mean"])
        assert int(m.bn.num_batches_tracked) == 1
    elif buffers0:
        same(measured, f"buffers untouched in eval ({case}, {path})", dict(m.named_buffers()), buffers0)


@pytest.mark.parametrize("path", ["fast", "fallback"])
@pytest.mark.parametrize("case", list(CASES))
def test_gradients_equal_functional_call(measured, fallbacks, case, path):
    """∇ and a second derivative (∇ of ‖∇‖²) w.r.t. the substituted tensors."""
    m, names, tensors, x, method = build_case(case)
    m_ref = copy.deepcopy(m)
    s = Slots(m, names, tensors, tied=False)
    if path == "fallback":
        s._slots = None
    before = slot_objects(m)

    def derivatives(out, state):
        vals = [state[n] for n in names]
        loss = (torch.tanh(out) ** 2).sum() + out.sum()
        # (``features`` does not use the head: its gradients are None on both sides)
        g = torch.autograd.grad(loss, vals, create_graph=True, allow_unused=True)
        gn = sum((gi ** 2).sum() for gi in g if gi is not None)
        h = torch.autograd.grad(gn, vals, allow_unused=True)
        unused = [i for i, gi in enumerate(g) if gi is None]
        zeros = lambda ts: [torch.zeros_like(v) if t is None else t for t, v in zip(ts, vals)]
        return zeros(g), zeros(h), unused

    state = new_state(m, names, seed=3, grad=True)
    g, h, unused = derivatives(run_slots(s, m, state, (x,), method), state)
    g_ref, h_ref, unused_ref = derivatives(reference(m_ref, state, (x,), method), state)
    assert unused == unused_ref and len(unused) == (2 if method else 0)
    same(measured, f"Slots.run vs functional_call: gradient ({case}, {path})", g, g_ref)
    same(measured, f"Slots.run vs functional_call: ∇‖∇‖² ({case}, {path})", h, h_ref)
    assert sum(float(t.abs().max()) > 0 for t in h) >= 2    # a real second derivative
    assert len(fallbacks) == (0 if path == "fast" else 1)
    assert_restored(before)
    # nothing accumulated into the module's own parameters
    assert all(p.grad is None for p in m.parameters())


# ===================================================================== 2. restoring the originals
def test_originals_restored_after_run(fallbacks):
    m, names, tensors, x, _ = build_case("frozen_bn_train")
    s = Slots(m, names, tensors, tied=False)
    before = slot_objects(m)
    state = new_state(m, names, seed=4)
    seen = {}
    m.lin.register_forward_pre_hook(lambda mod, a: seen.update(w=mod.weight))
    run_slots(s, m, state, (x,))
    assert seen["w"] is state["lin.weight"]         # the state sat in the slot during forward
    assert_restored(before)
    run_slots(s, m, state, (x,))                    # and the next call is fast again
    assert fallbacks == []


class Boom(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 3)
        self.seen = None
        self.explode = True

    def forward(self, x):
        self.seen = (self.a.weight, self.b.weight)
        y = self.b(torch.tanh(self.a(x)))
        if self.explode:
            raise ValueError("boom")
        return y


def test_originals_restored_when_forward_raises(measured, fallbacks):
    torch.manual_seed(0)
    m = Boom().to(DT)
    names, tensors = trainable(m)
    s = Slots(m, names, tensors, tied=False)
    before = slot_objects(m)
    state = new_state(m, names, seed=5)
    x = torch.randn(4, 3, dtype=DT)
    with pytest.raises(ValueError, match="boom"):
        run_slots(s, m, state, (x,))
    assert m.seen[0] is state["a.weight"] and m.seen[1] is state["b.weight"]
    assert_restored(before)
    assert fallbacks == []
    # the slots are intact: the next run is fast and right
    m.explode = False
    m_ref = copy.deepcopy(m)
    same(measured, "Slots.run after a raising forward vs functional_call",
         run_slots(s, m, state, (x,)), reference(m_ref, state, (x,)))
    assert fallbacks == []
    assert_restored(before)


def test_originals_restored_when_state_lacks_a_name(measured, fallbacks):
    torch.manual_seed(0)
    m = Boom().to(DT)
    m.explode = False
    names, tensors = trainable(m)
    assert names[-1] == "b.bias"
    s = Slots(m, names, tensors, tied=False)
    before = slot_objects(m)
    state = new_state(m, names, seed=6)
    del state["b.bias"]                             # the earlier slots are swapped by then
    x = torch.randn(4, 3, dtype=DT)
    with pytest.raises(KeyError, match="b.bias"):
        run_slots(s, m, state, (x,))
    assert m.seen is None                           # forward never ran
    assert_restored(before)
    state["b.bias"] = torch.zeros(3, dtype=DT)
    m_ref = copy.deepcopy(m)
    same(measured, "Slots.run after a KeyError vs functional_call",
         run_slots(s, m, state, (x,)), reference(m_ref, state, (x,)))
    assert fallbacks == []
    assert_restored(before)


# ===================================================================== 3. fallbacks
class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 3)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def test_tied_weights_fall_back(measured, fallbacks):
    torch.manual_seed(0)
    m = Tied().to(DT)
    names, tensors = trainable(m)
    assert names == ["a.weight", "a.bias", "b.bias"]
    s = Slots(m, names, tensors, tied=True)
    assert s._slots is None
    before = slot_objects(m)
    state = new_state(m, names, seed=7, grad=True)
    x = torch.randn(4, 3, dtype=DT)
    m_ref = copy.deepcopy(m)
    got = run_slots(s, m, state, (x,))
    assert fallbacks == ["Tied"]
    same(measured, "Slots.run tied weights vs functional_call(tie_weights=True)",
         got, reference(m_ref, state, (x,), tie_weights=True))
    # the tie is honoured: b.weight is the substituted a.weight too
    W = state["a.weight"]
    by_hand = torch.tanh(x @ W.T + state["a.bias"]) @ W.T + state["b.bias"]
    assert float((got - by_hand).detach().abs().max()) < 1e-14
    assert_restored(before)
    assert m.b.weight is m.a.weight


class Symmetric(nn.Module):
    def forward(self, X):
        return X.triu() + X.triu(1).transpose(-1, -2)


def test_parametrized_module_falls_back(measured, fallbacks):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2)).to(DT)
    parametrize.register_parametrization(m[0], "weight", Symmetric())
    names, tensors = trainable(m)
    assert "0.parametrizations.weight.original" in names
    s = Slots(m, names, tensors, tied=False)
    assert s._slots is None
    before = slot_objects(m)
    state = new_state(m, names, seed=8, grad=True)
    x = torch.randn(4, 3, dtype=DT)
    m_ref = copy.deepcopy(m)
    got = run_slots(s, m, state, (x,))
    assert fallbacks == ["Sequential"]
    same(measured, "Slots.run parametrized module vs functional_call",
         got, reference(m_ref, state, (x,)))
    W = Symmetric()(state["0.parametrizations.weight.original"])
    by_hand = torch.tanh(x @ W.T + state["0.bias"]) @ state["2.weight"].T + state["2.bias"]
    assert float((got - by_hand).detach().abs().max()) < 1e-14
    g = torch.autograd.grad(got.sum(), [state[n] for n in names])
    g_ref = torch.autograd.grad(reference(m_ref, state, (x,)).sum(), [state[n] for n in names])
    same(measured, "Slots.run parametrized module: gradient vs functional_call", g, g_ref)
    assert_restored(before)


def test_parameter_replaced_after_resolving(measured, fallbacks):
    m = mlp()
    names, tensors = trainable(m)
    s = Slots(m, names, tensors, tied=False)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(1), dtype=DT)
    state = new_state(m, names, seed=9)
    run_slots(s, m, state, (x,))
    assert fallbacks == []
    # an untracked slot (a Slots over a subset) may change: still fast, sees the new value
    sub = Slots(m, ["0.weight"], [m[0].weight], tied=False)
    m[2].weight = nn.Parameter(torch.randn(2, 5, dtype=DT))
    sub_state = {"0.weight": state["0.weight"]}
    same(measured, "Slots.run (subset) after an untracked slot was replaced vs functional_call",
         run_slots(sub, m, sub_state, (x,)), reference(copy.deepcopy(m), sub_state, (x,)))
    assert fallbacks == []
    # a tracked slot replaced: the fallback, with the module's new state; the new parameter stays
    new = nn.Parameter(torch.randn(5, 3, dtype=DT))
    m[0].weight = new
    before = slot_objects(m)
    got = run_slots(s, m, state, (x,))
    assert fallbacks == ["Sequential"]
    same(measured, "Slots.run after a tracked slot was replaced vs functional_call",
         got, reference(copy.deepcopy(m), state, (x,)))
    assert m[0].weight is new
    assert_restored(before)


class Recursive(nn.Module):
    """``body`` calls ``hook`` (set by the test) once, then uses its parameters again."""

    def __init__(self):
        super().__init__()
        self.lin1 = nn.Linear(3, 3)
        self.lin2 = nn.Linear(3, 3)
        self.hook = None
        self.depth = 0

    def body(self, x):
        y = torch.tanh(self.lin1(x))
        if self.hook is not None and self.depth == 0:
            self.depth += 1
            try:
                y = y + self.hook(y)
            finally:
                self.depth -= 1
        return self.lin2(y)

    def forward(self, x):
        return self.body(x)


class Plain(mlo.Problem):
    def training_step(self, batch):
        raise AssertionError("not run by an engine here")


@pytest.mark.parametrize("via", ["slots", "problem.call"])
def test_nested_call_falls_back(measured, fallbacks, via):
    torch.manual_seed(0)
    m = Recursive().to(DT)
    names, tensors = trainable(m)
    m_ref = copy.deepcopy(m)
    x = torch.randn(4, 3, dtype=DT)
    outer = new_state(m, names, seed=10, grad=True)
    if via == "slots":
        inner = new_state(m, names, seed=11, grad=True)
        s = Slots(m, names, tensors, tied=False)
        m.hook = lambda y: s.run(m, inner, (y,), {})
        before = slot_objects(m)
        got = s.run(m, outer, (x,), {})
        m_ref.hook = lambda y: functional_call(m_ref, inner, (y,))
        ref = functional_call(m_ref, outer, (x,))
        assert fallbacks == ["Recursive"]                # only the inner call
    else:
        inner = outer
        p = Plain("p", module=m)
        assert p._slots._slots is not None
        p._run.iterates = outer                          # a state other than the parameters
        m.hook = lambda y: p.call("body", y)
        before = slot_objects(m)
        got = p.call("body", x)
        m_ref.hook = lambda y: reference(m_ref, inner, (y,), "body")
        ref = reference(m_ref, outer, (x,), "body")
        assert fallbacks == ["_Method"]
    same(measured, f"nested Slots.run vs nested functional_call ({via})", got, ref)
    vals = [outer[n] for n in names] + ([inner[n] for n in names] if inner is not outer else [])
    same(measured, f"nested Slots.run: gradient vs nested functional_call ({via})",
         torch.autograd.grad(got.sum(), vals), torch.autograd.grad(ref.sum(), vals))
    assert_restored(before)


# ===================================================================== 4. the public API
class Lower(mlo.Problem):
    def __init__(self, data, method, opts):
        super().__init__("lo", module=net(), data=data, optimizer_kwargs={"lr": 0.2},
                         config=mlo.ProblemConfig(method=method, method_options=opts, unroll_steps=2))
        self.up = None

    def training_step(self, batch):
        x, y = batch
        lam = self.up.params["lam"].exp()
        p = self.params
        return F.mse_loss(self(x), y) + lam[0] * (p["body.0.weight"] ** 2).sum() \
            + lam[1] * (p["head.weight"] ** 2).sum()


class Upper(mlo.Problem):
    def __init__(self, data):
        super().__init__("up", params={"lam": torch.tensor([-1.0, -0.5], dtype=DT)}, data=data,
                         optimizer=RecSGD, optimizer_kwargs={"lr": 0.5})
        self.lo = None

    def training_step(self, batch):
        x, y = batch
        return F.mse_loss(self.lo(x), y) + 0.1 * self.lo.call("features", x).pow(2).mean()


def engine(method, opts, fast):
    g = torch.Generator().manual_seed(0)
    w = torch.tensor([1.0, -2.0, 0.5], dtype=DT)

    def batch(n):
        x = torch.randn(n, 3, generator=g, dtype=DT)
        return x, torch.sin(x @ w)

    up = Upper([batch(8)])
    lo = Lower([batch(8) for _ in range(3)], method, opts)
    up.lo, lo.up = lo, up
    eng = mlo.Engine([lo, up], {"u2l": {up: [lo]}, "l2u": {lo: [up]}})
    for P in (lo, up):
        assert P._slots._slots is not None
        if not fast:
            P._slots._slots = None
    return eng, lo, up


def test_problem_call_outside_engine(measured, fallbacks):
    lo = Lower([], "cg", {})
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(1), dtype=DT)
    same(measured, "problem(x) vs module(x) outside an engine", lo(x), lo.module(x))
    same(measured, "problem.call('features', x) vs module.features(x) outside an engine",
         lo.call("features", x), lo.module.features(x))
    assert fallbacks == []
    # with a state other than the parameters (as inside a window): the Slots path
    state = new_state(lo.module, lo.param_names, seed=12)
    before = slot_objects(lo.module)
    lo._run.iterates = state
    try:
        m_ref = copy.deepcopy(lo.module)
        same(measured, "problem(x) with iterates vs functional_call", lo(x), reference(m_ref, state, (x,)))
        same(measured, "problem.call('features') with iterates vs functional_call",
             lo.call("features", x), reference(m_ref, state, (x,), "features"))
        assert fallbacks == []
        assert_restored(before)
    finally:
        lo._run.iterates = None
    with pytest.raises(AttributeError, match="no method 'nope'"):
        lo.call("nope", x)


@pytest.mark.parametrize("method,opts", [("unrolled", {}), ("cg", {"max_iter": 3, "damping": 0.5})],
                         ids=["unrolled", "cg"])
def test_engine_hypergradient_same_without_fast_path(measured, fallbacks, method, opts):
    fast, lo_f, up_f = engine(method, opts, fast=True)
    fast.run(3)
    n_fast = len(fallbacks)
    slow, lo_s, up_s = engine(method, opts, fast=False)
    slow.run(3)
    assert n_fast == 0, f"the fast engine fell back {n_fast} times"
    assert len(fallbacks) > 0                       # the slow engine really used functional_call
    assert fast.counts() == slow.counts() == {"lo": 3, "up": 1}
    applied_f, applied_s = up_f.optimizer.record, up_s.optimizer.record
    assert len(applied_f) == len(applied_s) == 1
    assert float(applied_f[0].abs().max()) > 1e-6   # a non-trivial hypergradient (∂F/∂λ own = 0)
    same(measured, f"engine applied hypergradient, fast vs functional_call ({method}, 3 steps)",
         applied_f, applied_s)
    same(measured, f"engine parameters after 3 steps, fast vs functional_call ({method})",
         [*lo_f.variables, *up_f.variables], [*lo_s.variables, *up_s.variables])
    n = len(fallbacks)
    g_f = fast.gradient("up", by_path=True)
    assert len(fallbacks) == n
    g_s = slow.gradient("up", by_path=True)
    assert len(fallbacks) > n
    assert g_f["loss"] == g_s["loss"]
    same(measured, f"engine.gradient('up'), fast vs functional_call ({method})",
         [g_f["grad"], g_f["paths"]], [g_s["grad"], g_s["paths"]])


def test_lstm_equals_functional_call_and_a_module_holding_the_values(measured, fallbacks):
    """``nn.LSTM`` keeps flat-weight views refreshed by ``__setattr__``; neither
    ``functional_call`` (torch ≥ 2.x assigns ``_parameters`` directly, as Slots does) nor
    Slots goes through it — both must still see the substituted tensors."""
    torch.manual_seed(0)
    m = nn.LSTM(3, 4, batch_first=True).to(DT)
    names, tensors = trainable(m)
    s = Slots(m, names, tensors, tied=False)
    assert s._slots is not None
    state = new_state(m, names, seed=3, grad=True)
    x = torch.randn(2, 5, 3, dtype=DT)
    got = s.run(m, state, (x,), {})[0]
    assert fallbacks == []
    same(measured, "Slots.run nn.LSTM vs functional_call", got, functional_call(m, dict(state), (x,))[0])
    held = nn.LSTM(3, 4, batch_first=True).to(DT)
    with torch.no_grad():
        for n, p in held.named_parameters():
            p.copy_(state[n])
    err = float((got - held(x)[0]).detach().abs().max())
    measured("Slots.run nn.LSTM vs an LSTM holding the values", err, 1e-14)
    g = torch.autograd.grad(got.sum(), [state[n] for n in names])
    assert all(t is not None and float(t.abs().sum()) > 0 for t in g)
