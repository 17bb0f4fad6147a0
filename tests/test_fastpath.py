"""``mlo.fastpath``: the fast paths change nothing — full engine runs agree bit for bit.

Every engine here is built twice from the same seeds and run the same number of
iterations, once with the fast paths on (the default) and once inside
``mlo.fastpath.disabled()`` (the SGD step is ``torch.optim``'s ``p.grad = g;
opt.step()``, the module call ``torch.func.functional_call``, the norms each tensor's
norm read on its own). Compared with ``torch.equal`` (recorded through ``measured`` as a
max-abs error with tolerance 0): every parameter, every iterate of a still-open window,
every optimizer state tensor (and the other state entries and param groups with ``==``),
every ``last_hypergradient`` tensor, and the records' loss and norms after *every*
update (bitwise: ``float.hex``). Each run also counts which paths it took: the fast run
took the in-place SGD step, the ``Slots`` swap and the fast norms wherever they apply;
the plain run never did.

Graphs, each in float64 and float32:

(a) a two-level graph, an SGD lower (momentum 0 and 0.9, weight decay, Nesterov) in
    place under the implicit ``"cg"`` method (``test_inplace``'s problems);
(b) an unrolled window (``unroll_steps=2``) with an Adam lower whose module the upper
    reads through ``call("features")`` (``test_reparam``'s ``Net``);
(c) tied parameters (``test_reparam``'s ``Tied``: one weight in two layers) and a shared
    submodule (one ``Linear`` under two names): ``Slots`` falls back to
    ``functional_call(tie_weights=True)`` on both runs;
(d) ``None`` gradients and a hypergradient: ``test_unused_parameters``' partially used
    module (``b`` never used, ``c`` every other batch) under an Adam upper with idle
    variables — as the top of a hypergradient (no own gradient) and with an own gradient
    for some variables — in place (``"cg"``) and in windows (``"unrolled"``).

Then the switch itself (``enabled``/``set_enabled``/``disabled``, ``MLO_FAST_PATHS``
read at import), the plain path of each piece with the switch off, torch-private
attributes that are missing (the plain path is taken), and ``norms`` against the plain
norms on hand-made groups (``None``, shared tensors, mixed dtypes, non-finite values,
the stacked variant used off the CPU).
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import optimizer as torch_optimizer

import mlo
import mlo.guard
import mlo.step
from mlo import fastpath
from test_inplace import Lower as InplaceLower, Upper as InplaceUpper, grads_for, make_params, same, torch_step
from test_reparam import Net, Tied
from test_unused_parameters import PartiallyUsed

DTYPES = [pytest.param(torch.float64, id="f64"), pytest.param(torch.float32, id="f32")]


# ===================================================================== running both ways
class Updates:
    """A callback keeping ``engine.records[name]`` after every update (minus the timing)."""

    def __init__(self):
        self.seen = []

    def after_update(self, engine, problem):
        rec = engine.records[problem.name]
        self.seen.append((problem.name, {k: v for k, v in rec.items() if k != "seconds"}))


@pytest.fixture
def taken(monkeypatch):
    """Counts the paths an engine run takes: in-place SGD steps taken / declined, calls
    to ``functional_call`` (``Slots``' plain path), fast / plain norms."""
    count = {"sgd_fast": 0, "sgd_plain": 0, "functional_call": 0, "norms_fast": 0, "norms_plain": 0}
    sgd, call, norms = fastpath.sgd_step, fastpath.functional_call, fastpath.norms

    def counting_sgd(*args):
        out = sgd(*args)
        count["sgd_fast" if out else "sgd_plain"] += 1
        return out

    def counting_call(*args, **kwargs):
        count["functional_call"] += 1
        return call(*args, **kwargs)

    def counting_norms(*args):
        out = norms(*args)
        count["norms_plain" if out is None else "norms_fast"] += 1
        return out

    monkeypatch.setattr(mlo.step, "sgd_step", counting_sgd)
    monkeypatch.setattr(fastpath, "functional_call", counting_call)
    monkeypatch.setattr(fastpath, "norms", counting_norms)
    return count


def run(build, iterations, taken, fast):
    """``build()`` → ``(engine, problems)``, run; returns the problems, the records after
    every update, the counts of the paths taken."""
    for k in taken:
        taken[k] = 0
    assert fastpath.enabled()
    updates = Updates()
    if fast:
        engine, problems = build()
        engine.run(iterations, callbacks=[updates])
    else:
        with fastpath.disabled():
            engine, problems = build()
            engine.run(iterations, callbacks=[updates])
    assert fastpath.enabled()
    return engine, problems, updates.seen, dict(taken)


def optimizer_state(P):
    """``(tensors, other entries, param groups)`` of ``P.optimizer`` in param-group order."""
    tensors, other = [], []
    for group in P.optimizer.param_groups:
        for p in group["params"]:
            st = P.optimizer.state.get(p, {})
            other.append(sorted(st))
            for k in sorted(st):
                (tensors if isinstance(st[k], torch.Tensor) else other).append(st[k])
    groups = [{k: v for k, v in g.items() if k != "params"} for g in P.optimizer.param_groups]
    return tensors, other, groups


def bits(x):
    return x.hex() if isinstance(x, float) else x


def assert_same_runs(measured, label, fast, plain):
    eng_f, probs_f, recs_f, _ = fast
    eng_s, probs_s, recs_s, _ = plain
    assert eng_f.counts() == eng_s.counts()
    for P_f, P_s in zip(probs_f, probs_s):
        same(measured, f"{label}: {P_f.name} parameters, fast vs plain", list(P_f.variables), list(P_s.variables))
        it_f, it_s = P_f.params, P_s.params
        assert list(it_f) == list(it_s)
        same(measured, f"{label}: {P_f.name} current iterates, fast vs plain", list(it_f.values()), list(it_s.values()))
        t_f, o_f, g_f = optimizer_state(P_f)
        t_s, o_s, g_s = optimizer_state(P_s)
        assert o_f == o_s and g_f == g_s, f"{label}: {P_f.name} optimizer state entries / param groups"
        if t_f or t_s:
            same(measured, f"{label}: {P_f.name} optimizer state, fast vs plain", t_f, t_s)
    assert sorted(eng_f.last_hypergradient) == sorted(eng_s.last_hypergradient)
    for name, h in eng_f.last_hypergradient.items():
        assert list(h) == list(eng_s.last_hypergradient[name])
        same(measured, f"{label}: {name} last hypergradient, fast vs plain",
             list(h.values()), list(eng_s.last_hypergradient[name].values()))
    assert [n for n, _ in recs_f] == [n for n, _ in recs_s] and recs_f
    for (name, a), (_, b) in zip(recs_f, recs_s):
        assert sorted(a) == sorted(b), f"{label}: {name} record keys {sorted(a)} vs {sorted(b)}"
        assert {k: bits(v) for k, v in a.items()} == {k: bits(v) for k, v in b.items()}, \
            f"{label}: {name} records differ: {a} vs {b}"
    diff = max(abs(a[k] - b[k]) for (_, a), (_, b) in zip(recs_f, recs_s) for k in a if isinstance(a[k], float))
    measured(f"{label}: records' loss and norms after every update, fast vs plain", diff, 0.0)


def assert_paths(fast_counts, plain_counts, n_updates, sgd, swap):
    """The fast run took the fast paths (``sgd``: how many in-place SGD steps it takes;
    ``swap``: Slots swaps without a fallback), the plain run none of them."""
    assert fast_counts["norms_fast"] == n_updates and fast_counts["norms_plain"] == 0, fast_counts
    assert plain_counts["norms_plain"] == n_updates and plain_counts["norms_fast"] == 0, plain_counts
    assert plain_counts["sgd_fast"] == 0, plain_counts
    assert plain_counts["sgd_plain"] == fast_counts["sgd_fast"] + fast_counts["sgd_plain"]
    assert fast_counts["sgd_fast"] == sgd, fast_counts
    assert plain_counts["functional_call"] > 0, plain_counts
    if swap:
        assert fast_counts["functional_call"] == 0, fast_counts


def both_ways(measured, taken, label, build, iterations):
    fast = run(build, iterations, taken, fast=True)
    plain = run(build, iterations, taken, fast=False)
    assert_same_runs(measured, label, fast, plain)
    moved = [not torch.equal(a, b) for P_f, P_0 in zip(fast[1], build()[1])
             for a, b in zip(P_f.variables, P_0.variables)]
    assert sum(moved) >= 2, f"{label}: the runs hardly moved ({moved})"
    return fast, plain


# ===================================================================== (a) SGD lower + cg
SGD_SETTINGS = {
    "plain": {"lr": 0.1},
    "wd": {"lr": 0.1, "weight_decay": 1e-2},
    "momentum": {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-2},
    "nesterov": {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-2, "dampening": 0.0},
}


def sgd_graph(dtype, sgd_kw, d=4):
    gen = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)  # noqa: E731
    train = [(r(8, d), r(8)) for _ in range(5)]
    val = [(r(8, d), r(8)) for _ in range(5)]
    torch.manual_seed(1)
    module = nn.Sequential(nn.Linear(d, 5), nn.Tanh(), nn.Linear(5, 1)).to(dtype)
    lo = InplaceLower("lo", module=module, data=train, optimizer=torch.optim.SGD, optimizer_kwargs=dict(sgd_kw),
                      config=mlo.ProblemConfig(unroll_steps=2, method="cg",
                                               method_options={"max_iter": 3, "damping": 0.5}))
    up = InplaceUpper("up", params={"lam": torch.full((5, 1), -1.0, dtype=dtype), "b": torch.tensor(0.2, dtype=dtype)},
                      data=val, optimizer=torch.optim.SGD, optimizer_kwargs={"lr": 0.3, "momentum": 0.5})
    lo.up, up.lo = up, lo
    return mlo.Engine([lo, up], {"u2l": {up: [lo]}, "l2u": {lo: [up]}}), [lo, up]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("setting", list(SGD_SETTINGS))
def test_sgd_lower_cg(measured, taken, setting, dtype):
    fast, plain = both_ways(measured, taken, f"(a) SGD {setting} + cg, {dtype}",
                            lambda: sgd_graph(dtype, SGD_SETTINGS[setting]), 6)
    n = sum(fast[0].counts().values())
    assert fast[0].counts() == {"lo": 6, "up": 3}
    assert_paths(fast[3], plain[3], n, sgd=n, swap=True)
    if "momentum" in SGD_SETTINGS[setting]:
        assert all("momentum_buffer" in fast[1][0].optimizer.state[p] for p in fast[1][0].variables)


# ===================================================================== (b) unrolled window, Adam
class WindowLower(mlo.Problem):
    def training_step(self, batch):
        x, y = batch
        lam = self.up.params["lam"].exp()
        p = self.params
        return F.mse_loss(self(x), y) + lam[0] * (p["body.0.weight"] ** 2).sum() \
            + lam[1] * (p["head.weight"] ** 2).sum()


class WindowUpper(mlo.Problem):
    def training_step(self, batch):
        x, y = batch
        return F.mse_loss(self.lo(x), y) + 0.1 * self.lo.call("features", x).pow(2).mean() \
            + 1e-3 * (self.params["lam"] ** 2).sum()


def window_graph(dtype):
    g = torch.Generator().manual_seed(0)
    w = torch.tensor([1.0, -2.0, 0.5], dtype=dtype)

    def batch(n):
        x = torch.randn(n, 3, generator=g, dtype=dtype)
        return x, torch.sin(x @ w)

    torch.manual_seed(0)
    lo = WindowLower("lo", module=Net().to(dtype), data=[batch(8) for _ in range(4)], optimizer=torch.optim.Adam,
                     optimizer_kwargs={"lr": 0.05, "weight_decay": 1e-2},
                     config=mlo.ProblemConfig(method="unrolled", unroll_steps=2))
    up = WindowUpper("up", params={"lam": torch.tensor([-1.0, -0.5], dtype=dtype)}, data=[batch(8)],
                     optimizer=torch.optim.SGD, optimizer_kwargs={"lr": 0.5, "momentum": 0.9})
    lo.up, up.lo = up, lo
    return mlo.Engine([lo, up], {"u2l": {up: [lo]}, "l2u": {lo: [up]}}), [lo, up]


@pytest.mark.parametrize("dtype", DTYPES)
def test_unrolled_window_adam(measured, taken, dtype):
    fast, plain = both_ways(measured, taken, f"(b) unrolled window, Adam lower, {dtype}",
                            lambda: window_graph(dtype), 6)
    assert fast[0].counts() == {"lo": 6, "up": 3}
    assert_paths(fast[3], plain[3], 9, sgd=3, swap=True)    # the upper; the lower steps in its window
    assert "step" in fast[1][0].optimizer.state[fast[1][0].variables[0]]    # Adam's state came back


# ===================================================================== (c) tied / shared parameters
class SharedSub(nn.Module):
    """One ``Linear`` under two names (``enc`` and ``enc2``), applied twice."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(3, 3)
        self.enc2 = self.enc
        self.head = nn.Linear(3, 1)

    def forward(self, x):
        return self.head(torch.tanh(self.enc2(torch.tanh(self.enc(x))))).squeeze(-1)


class TiedOut(Tied):
    def forward(self, x):
        return super().forward(x).sum(-1)


class TiedLower(mlo.Problem):
    def training_step(self, batch):
        x, y = batch
        return F.mse_loss(self(x), y) + self.up.params["lam"].exp() * sum((p ** 2).sum() for p in self.params.values())


class TiedUpper(mlo.Problem):
    def training_step(self, batch):
        x, y = batch
        return F.mse_loss(self.lo(x), y)


def tied_graph(dtype, kind, method):
    g = torch.Generator().manual_seed(0)

    def batch(n):
        x = torch.randn(n, 3, generator=g, dtype=dtype)
        return x, torch.cos(x.sum(-1))

    torch.manual_seed(0)
    module = {"tied": TiedOut, "shared": SharedSub}[kind]().to(dtype)
    lo = TiedLower("lo", module=module, data=[batch(8) for _ in range(4)], optimizer=torch.optim.SGD,
                   optimizer_kwargs={"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3},
                   config=mlo.ProblemConfig(method=method, unroll_steps=2,
                                            method_options={"max_iter": 3} if method == "cg" else {}))
    up = TiedUpper("up", params={"lam": torch.tensor(-2.0, dtype=dtype)}, data=[batch(8)],
                   optimizer=torch.optim.SGD, optimizer_kwargs={"lr": 0.5})
    lo.up, up.lo = up, lo
    assert lo._tied and lo._slots._slots is None      # Slots' tied fallback
    return mlo.Engine([lo, up], {"u2l": {up: [lo]}, "l2u": {lo: [up]}}), [lo, up]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind,method", [("tied", "unrolled"), ("shared", "cg")])
def test_tied_and_shared_parameters(measured, taken, kind, method, dtype):
    fast, plain = both_ways(measured, taken, f"(c) {kind} parameters, {method}, {dtype}",
                            lambda: tied_graph(dtype, kind, method), 6)
    counts = fast[0].counts()
    assert_paths(fast[3], plain[3], sum(counts.values()), swap=False,      # (a windowed lower: its twin steps)
                 sgd=counts["up"] + (counts["lo"] if method == "cg" else 0))
    assert fast[3]["functional_call"] == plain[3]["functional_call"] > 0   # the fallback, both ways
    lo = fast[1][0]
    m = lo.module
    shared = (m.a.weight, m.b.weight) if kind == "tied" else (m.enc.weight, m.enc2.weight)
    assert shared[0] is shared[1]                     # the tie survived the run


# ===================================================================== (d) None gradients + hypergradient
class PartLower(mlo.Problem):
    def training_step(self, batch):
        x, use_c = batch
        out = self(x, use_c)
        return out.pow(2).sum() + (out * self.up.params["lam"]).sum() + self.up.params["dead"].pow(2).sum()


class PartUpper(mlo.Problem):
    def __init__(self, *args, own, **kw):
        super().__init__(*args, **kw)
        self.own = own

    def training_step(self, batch):
        loss = self.lo(batch).pow(2).mean()
        return loss + (self.params["lam"] ** 2).sum() * 0.1 if self.own else loss


def partial_graph(dtype, own, method):
    g = torch.Generator().manual_seed(1)
    data = [(torch.rand(10, 4, generator=g, dtype=dtype), i % 2 == 1) for i in range(12)]
    xv = torch.rand(8, 4, generator=torch.Generator().manual_seed(5), dtype=dtype)
    lo = PartLower("lo", module=PartiallyUsed(dtype=dtype), data=data, optimizer=torch.optim.SGD,
                   optimizer_kwargs={"lr": 0.01, "momentum": 0.9, "weight_decay": 0.1},
                   config=mlo.ProblemConfig(method=method, unroll_steps=2,
                                            method_options={"max_iter": 4} if method == "cg" else {}))
    up = PartUpper("up", params={"lam": torch.full((3,), 0.1, dtype=dtype), "idle": torch.ones(3, dtype=dtype),
                                 "dead": torch.ones(2, dtype=dtype)}, data=[xv], optimizer=torch.optim.Adam,
                   optimizer_kwargs={"lr": 0.05, "weight_decay": 0.1}, own=own)
    lo.up, up.lo = up, lo
    return mlo.Engine([lo, up], {"u2l": {up: [lo]}, "l2u": {lo: [up]}}), [lo, up]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["cg", "unrolled"])
@pytest.mark.parametrize("own", [False, True], ids=["top-no-own-gradient", "own-gradient"])
def test_none_gradients_and_hypergradient(measured, taken, own, method, dtype):
    label = f"(d) None gradients, {'own + ' if own else ''}hypergradient, {method}, {dtype}"
    fast, plain = both_ways(measured, taken, label, lambda: partial_graph(dtype, own, method), 8)
    eng, (lo, up) = fast[0], fast[1]
    assert eng.counts() == {"lo": 8, "up": 4}
    assert_paths(fast[3], plain[3], 12, sgd=8 if method == "cg" else 0, swap=True)   # (the Adam upper: step())
    init_lo, init_up = partial_graph(dtype, own, method)[1]
    assert torch.equal(lo.module.b, init_lo.module.b) and lo.module.b not in lo.optimizer.state  # no gradient, ever
    assert torch.equal(up.params["idle"], init_up.params["idle"])
    ups = [r for n, r in fast[2] if n == "up"]
    assert all(r["hypergrad_norm"] > 0 for r in ups)
    assert all((r["own_grad_norm"] > 0) == own for r in ups)


# ===================================================================== the switch
def test_switch_and_context_manager():
    assert fastpath.enabled() is True
    assert fastpath.set_enabled(False) is True and fastpath.enabled() is False
    try:
        with fastpath.disabled():
            assert not fastpath.enabled()
        assert not fastpath.enabled()                 # restores the previous setting (off)
    finally:
        assert fastpath.set_enabled(True) is False
    with pytest.raises(RuntimeError, match="inside"):
        with fastpath.disabled():
            raise RuntimeError("inside")
    assert fastpath.enabled()
    with pytest.raises(TypeError, match="True or False"):
        fastpath.set_enabled(0)


@pytest.mark.parametrize("value,expected", [("0", "False"), ("off", "False"), ("1", "True"), ("", "True"),
                                            (None, "True")])
def test_environment_variable_read_at_import(value, expected):
    env = {k: v for k, v in os.environ.items() if k != "MLO_FAST_PATHS"}
    if value is not None:
        env["MLO_FAST_PATHS"] = value
    out = subprocess.run([sys.executable, "-c", "import mlo.fastpath as f; print(f.enabled())"], env=env,
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected


def test_environment_variable_bad_value_is_named():
    env = {**os.environ, "MLO_FAST_PATHS": "maybe"}
    out = subprocess.run([sys.executable, "-c", "import mlo.fastpath"], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "MLO_FAST_PATHS='maybe'" in out.stderr


def test_sgd_step_declines_when_off():
    params = make_params(torch.float64)
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    before = [p.detach().clone() for p in params]
    with fastpath.disabled():
        assert fastpath.sgd_step(opt, params, grads_for(params, 0)) is False
    assert all(torch.equal(a, b) for a, b in zip(params, before)) and not opt.state
    assert fastpath.sgd_step(opt, params, grads_for(params, 0)) is True


def test_slots_take_functional_call_when_off(measured, monkeypatch):
    calls = []
    real = fastpath.functional_call
    monkeypatch.setattr(fastpath, "functional_call", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    torch.manual_seed(0)
    m = Net().double()
    names = [n for n, _ in m.named_parameters()]
    s = fastpath.Slots(m, names, list(m.parameters()), tied=False)
    state = {n: torch.randn_like(p) for n, p in m.named_parameters()}
    x = torch.randn(5, 3, dtype=torch.float64)
    fast = s.run(m, state, (x,), {}), s.run(m.features, state, (x,), {}, method="features")
    assert calls == []
    with fastpath.disabled():
        plain = s.run(m, state, (x,), {}), s.run(m.features, state, (x,), {}, method="features")
    assert len(calls) == 2
    same(measured, "Slots.run fast vs switched off (forward and method)", list(fast), list(plain))


# ===================================================================== torch internals missing
@pytest.mark.parametrize("name", ["_global_optimizer_pre_hooks", "_global_optimizer_post_hooks"])
def test_missing_global_hook_table_takes_step(monkeypatch, name):
    params = make_params(torch.float64)
    opt = torch.optim.SGD(params, lr=0.1)
    monkeypatch.delattr(torch_optimizer, name)
    assert fastpath.sgd_step(opt, params, grads_for(params, 1)) is False


@pytest.mark.parametrize("name", ["_optimizer_step_pre_hooks", "_optimizer_step_post_hooks"])
def test_unexpected_hook_table_takes_step(measured, name):
    params = make_params(torch.float64)
    twin_params = copy.deepcopy(params)
    opt, twin = torch.optim.SGD(params, lr=0.1), torch.optim.SGD(twin_params, lr=0.1)
    setattr(opt, name, None)                          # (what a torch without the table would look like)
    assert fastpath.sgd_step(opt, params, grads_for(params, 2)) is False
    setattr(opt, name, {})
    assert fastpath.sgd_step(opt, params, grads_for(params, 2)) is True
    torch_step(twin, twin_params, grads_for(twin_params, 2))
    same(measured, "sgd_step after the hook table is back vs SGD.step()", params, twin_params)


def test_missing_parameter_table_takes_functional_call(measured, monkeypatch):
    real = fastpath._torch_private
    monkeypatch.setattr(fastpath, "_torch_private",
                        lambda obj, name: None if name == "_parameters" else real(obj, name))
    torch.manual_seed(0)
    m = Net().double()
    s = fastpath.Slots(m, [n for n, _ in m.named_parameters()], list(m.parameters()), tied=False)
    assert s._slots is None
    state = {n: torch.randn_like(p) for n, p in m.named_parameters()}
    x = torch.randn(5, 3, dtype=torch.float64)
    same(measured, "Slots without a parameter table vs functional_call",
         [s.run(m, state, (x,), {})], [torch.func.functional_call(m, state, (x,))])


def test_private_reads_are_listed():
    assert fastpath._torch_private(object(), "_parameters") is None
    assert fastpath._torch_private(nn.Linear(2, 2), "_parameters") is not None
    with pytest.raises(KeyError):
        fastpath._torch_private(nn.Linear(2, 2), "_buffers")      # not a listed attribute


# ===================================================================== the norms on hand-made groups
def _groups(dtype, kind):
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    a, b, h1, h2 = r(3, 4), r(5), r(3, 4), r(5)
    if kind == "own":
        return r(()), [[a, None, b]]
    if kind == "top":                                 # total = hyper; zeros where the total is None
        return r(()), [[h1, None], [None, None], [h1, torch.zeros(5, dtype=dtype)]]
    if kind == "mixed":                               # own + hyper, a shared tensor, a None
        return r(()), [[a + h1, h2, None], [a, None, None], [h1, h2, torch.zeros(2, dtype=dtype)]]
    if kind == "nonfinite":
        bad = a.clone()
        bad[0, 0] = float("inf")
        nan = b.clone()
        nan[1] = float("nan")
        return r(()), [[bad + h1, nan], [bad, None], [h1, nan]]
    if kind == "huge":                                # large values (squares overflow float32)
        return r(()) * 1e30, [[a * 1e30, None], [None, None], [a * 1e30, torch.zeros(2, dtype=dtype)]]
    raise KeyError(kind)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["own", "top", "mixed", "nonfinite", "huge"])
def test_norms_fast_equal_plain(kind, dtype):
    loss, groups = _groups(dtype, kind)
    grads = groups[0]
    extra = {} if len(groups) == 1 else {"own": dict(enumerate(groups[1])), "hyper": dict(enumerate(groups[2]))}
    fast = mlo.guard.update_norms(loss, grads, extra)
    with fastpath.disabled():
        assert fastpath.norms(loss, groups) is None
        plain = mlo.guard.update_norms(loss, grads, extra)
    assert [x.hex() for x in fast] == [x.hex() for x in plain], (fast, plain)
    stacked = fastpath._distinct(loss, groups, cpu=False)    # the variant used off the CPU
    assert [x.hex() for x in stacked] == [x.hex() for x in plain], (stacked, plain)
    assert len(fast) == len(groups) + 1


def test_norms_stacked_with_mixed_dtypes():
    g = torch.Generator().manual_seed(4)
    loss = torch.randn((), generator=g, dtype=torch.float32)
    groups = [[torch.randn(4, generator=g, dtype=torch.float32), torch.randn(3, generator=g, dtype=torch.float64)]]
    with fastpath.disabled():
        plain = mlo.guard.update_norms(loss, groups[0], {})
    assert [x.hex() for x in fastpath._distinct(loss, groups, cpu=False)] == [x.hex() for x in plain]
