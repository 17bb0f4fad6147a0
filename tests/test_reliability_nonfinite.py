"""Non-finite guard: a NaN/inf loss, own gradient or hypergradient never reaches an
optimizer step. ``EngineConfig(nonfinite="raise")`` (default) raises
``FloatingPointError`` naming the problem, the iteration and the quantity;
``"skip"`` skips the update with a ``RuntimeWarning`` (``"ignore"`` switches the check
off: tested to change nothing else). The updating problem's
parameters and optimizer state (in place, or its open unrolled window) are
unchanged either way — for every method, with and without ``grad_clip``.
"""
import warnings

import pytest
import torch

import mlo
from _helpers import Vars

torch.set_num_threads(1)
D = 3
METHODS = [("unrolled", {}), ("cg", {"max_iter": 5}), ("neumann", {"iterations": 3, "alpha": 0.3}),
           ("finite_difference", {})]


def build(method, opts, clip, mode):
    """``up`` (λ, Adam) above ``lo`` (θ, SGD with momentum, 2 steps per window)."""
    poison = {"lo_loss": False, "lo_grad": False, "up_grad": False, "coupling": False}
    g = torch.Generator().manual_seed(0)
    target = torch.randn(D, generator=g, dtype=torch.float64)

    def lo_loss(s):
        th, lam = s.params["th"], s.up.params["lam"]
        f = 0.5 * ((th - lam) ** 2).sum() + 0.1 * (th ** 2).sum()
        if poison["lo_loss"]:
            f = f + float("nan")                              # loss NaN, gradient finite
        if poison["lo_grad"]:
            f = f + torch.sqrt(th - th.detach()).sum()        # value 0, gradient inf
        if poison["coupling"]:
            f = f + (th * torch.sqrt(lam - lam.detach())).sum()  # ∂θ f finite, ∂²λθ f inf
        return f

    def up_loss(s):
        lam = s.params["lam"]
        F = 0.5 * ((s.lo.params["th"] - target) ** 2).sum() + 0.01 * (lam ** 2).sum()
        if poison["up_grad"]:
            F = F + torch.sqrt(lam - lam.detach()).sum()
        return F

    up = Vars("up", {"lam": torch.zeros(D, dtype=torch.float64)}, up_loss,
              optimizer=torch.optim.Adam, optimizer_kwargs={"lr": 0.05},
              config=mlo.ProblemConfig(grad_clip=clip))
    lo = Vars("lo", {"th": torch.ones(D, dtype=torch.float64)}, lo_loss,
              optimizer=torch.optim.SGD, optimizer_kwargs={"lr": 0.1, "momentum": 0.9},
              config=mlo.ProblemConfig(method=method, method_options=dict(opts), unroll_steps=2,
                                       grad_clip=clip))
    lo.up, up.lo = up, lo
    eng = mlo.Engine([lo, up], {"u2l": {up: [lo]}, "l2u": {lo: [up]}},
                     config=mlo.EngineConfig(nonfinite=mode))
    return eng, poison


def snapshot(eng, name):
    """The problem's logical state: its iterates (those of its open unrolled window, else
    its parameters), its optimizer state (the window's differentiable twin, else
    ``torch.optim``'s) and its update count. (A skip lets the schedule go on: an upper
    may then close the lower's window, which writes these same iterates back.)"""
    P = eng.problems[name]
    win = eng.window(name)
    opt = win.fopt.state if win is not None else [P.optimizer.state.get(p, {}) for p in P.variables]
    return ([t.detach().clone() for t in P.own_state().values()],
            [{k: v.detach().clone() if torch.is_tensor(v) else v for k, v in st.items()} for st in opt],
            P.step_count)


def same(a, b):
    def eq(x, y):
        if torch.is_tensor(x):
            return torch.equal(x, y)
        if isinstance(x, (list, tuple)):
            return len(x) == len(y) and all(eq(u, v) for u, v in zip(x, y))
        if isinstance(x, dict):
            return x.keys() == y.keys() and all(eq(x[k], y[k]) for k in x)
        return x == y
    return eq(a, b)


CASES = [("lo", "lo_loss", r"non-finite loss \(nan\)"),
         ("lo", "lo_grad", r"non-finite own gradient \(in 'th'\)"),
         ("up", "up_grad", r"non-finite own gradient \(in 'lam'\)"),
         ("up", "coupling", r"non-finite hypergradient \(in 'lam'\)")]


@pytest.mark.parametrize("method,opts", METHODS, ids=[m for m, _ in METHODS])
@pytest.mark.parametrize("clip", [None, 1.0], ids=["noclip", "clip"])
@pytest.mark.parametrize("who,kind,what", CASES, ids=[c[1] for c in CASES])
@pytest.mark.parametrize("mode", ["raise", "skip"])
def test_nonfinite_update_is_refused_and_changes_nothing(method, opts, clip, who, kind, what, mode):
    eng, poison = build(method, opts, clip, mode)
    eng.run(3)                         # iteration 3 = the lower's 2nd step in an open window
    if method == "unrolled" and who == "lo":
        assert eng.window("lo").steps == 1
    before = snapshot(eng, who)
    others = snapshot(eng, "up" if who == "lo" else "lo")
    poison[kind] = True
    msg = rf"problem '{who}': {what} at iteration 3 \(its update \d+\)"
    if mode == "raise":
        with pytest.raises(FloatingPointError, match=msg + ".*unchanged"):
            eng.step()
    else:
        with pytest.warns(RuntimeWarning, match=msg + ".*: update skipped"):
            eng.step()
        assert eng.records[who]["skipped"] == 1
    assert same(snapshot(eng, who), before), "the refused update changed the problem"
    if who == "lo" and mode == "raise":   # raised before the upper ran
        assert same(snapshot(eng, "up"), others)
    for P in eng.problems.values():
        assert all(torch.isfinite(t).all() for t in P.own_state().values())
    if mode == "skip":                 # the run goes on, finite, once the fault is gone
        poison[kind] = False
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            eng.run(4)
        assert all(torch.isfinite(t).all() for P in eng.problems.values() for t in P.variables)
        assert eng.problems[who].step_count == eng.records[who]["updates"]


def test_a_fresh_window_refused_is_not_left_open():
    eng, poison = build("unrolled", {}, None, "raise")
    eng.run(2)                         # the upper consumed the window at iteration 1
    assert "lo" not in eng.open_windows()
    poison["lo_loss"] = True
    with pytest.raises(FloatingPointError, match="iteration 2"):
        eng.step()
    assert "lo" not in eng.open_windows() and eng.problems["lo"].own_state() is not None and eng.state["lo"].iterates is None


def test_default_is_raise_and_bad_mode_is_named():
    assert mlo.EngineConfig().nonfinite == "raise"
    with pytest.raises(ValueError, match=r"EngineConfig.nonfinite must be 'raise', 'skip' or 'ignore', got 'warn'"):
        mlo.EngineConfig(nonfinite="warn")


@pytest.mark.parametrize("method,opts", METHODS, ids=[m for m, _ in METHODS])
def test_ignore_trains_bitwise_as_raise_and_records_no_norms(method, opts):
    """``nonfinite="ignore"`` only drops the check: a finite run is the same, bit for bit
    (parameters, optimizer states, losses), and the records hold no gradient norms."""
    runs = {}
    for mode in ("raise", "ignore"):
        eng, _ = build(method, opts, None, mode)
        losses = []
        for _ in range(7):
            eng.step()
            losses.append({n: r.get("loss") for n, r in eng.records.items()})
        eng.close_windows()
        runs[mode] = (eng, losses)
    (a, la), (b, lb) = runs["raise"], runs["ignore"]
    assert la == lb
    for n in ("lo", "up"):
        assert same(snapshot(a, n), snapshot(b, n))
        assert a.records[n]["grad_norm"] is not None and b.records[n]["grad_norm"] is None
    assert b.records["up"]["hypergrad_norm"] is None and b.records["up"]["own_grad_norm"] is None
    assert a.records["up"]["hypergrad_norm"] > 0


def test_ignore_applies_a_nan_silently():
    """What "ignore" means: the check is off — a NaN gradient reaches the optimizer."""
    eng, poison = build("cg", {"max_iter": 5}, None, "ignore")
    eng.run(3)
    poison["up_grad"] = True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        eng.step()
        eng.step()
    assert not torch.isfinite(eng.problems["up"].params["lam"]).all()


def test_finite_runs_record_as_before():
    eng, _ = build("cg", {"max_iter": 5}, None, "raise")
    eng.run(4)
    rec = eng.records["up"]
    assert rec["updates"] == 2 and "skipped" not in rec
    hyper = torch.cat([t.flatten() for t in eng.last_hypergradient["up"].values()])
    assert abs(rec["hypergrad_norm"] - float(torch.linalg.vector_norm(hyper))) <= 1e-15 * rec["hypergrad_norm"]
