"""``engine.gradient(name, by_path=True)`` right after ``name``'s update with unrolled
lowers (issue 21): the windows on its paths were consumed, every path is exactly 0 at
the current state — a named error (:class:`mlo.consumed.WindowsConsumedError`) that
says so and points to ``engine.last_hypergradient``, instead of silent zeros.

- bilevel, unrolled lower, right after the upper's update: raises, naming the problem,
  the path and the window's problem; ``last_hypergradient`` holds the applied value;
- mid-window (the lower stepped since): no error, and the path equals the total minus
  the own part, and equals the hypergradient the next update applies (float64);
- before the first step (a window never opened), ``by_path=False``, and a ``method=``
  override at the current iterate: no error;
- some paths survive (one lower unrolled, one CG, right after the top's update): no
  error, the unrolled path is zeros, the CG path is not;
- two tops sharing an unrolled lower, the lower's window consumed by the other top: raises.

The check is :func:`mlo.consumed.check_paths_live`, called by ``Updater.report``; the
tests call it on each engine's updater, and through ``engine.gradient``.
"""
from __future__ import annotations


import pytest
import torch

import mlo
from mlo.consumed import WindowsConsumedError, check_paths_live, cut_paths

DT = torch.float64


def batches(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, 3, generator=g, dtype=DT), torch.randn(6, generator=g, dtype=DT)) for _ in range(n)]


class Lo(mlo.Problem):
    """Ridge regression with per-feature penalties ``exp(u.lam)`` read from each upper."""

    def __init__(self, name, method, unroll, ups, seed):
        opts = {"max_iter": 20, "damping": 0.1} if method == "cg" else {}
        super().__init__(name, params={"w": torch.tensor([0.5, -0.3, 0.2], dtype=DT)}, data=batches(4, seed),
                         optimizer_kwargs={"lr": 0.1, "momentum": 0.5},
                         config=mlo.ProblemConfig(method=method, method_options=opts, unroll_steps=unroll))
        self.ups = ups

    def training_step(self, batch):
        X, y = batch
        w = self.params["w"]
        reg = sum((u.params["lam"].exp() * w ** 2).sum() for u in self.ups)
        return 0.5 * ((X @ w - y) ** 2).mean() + 0.5 * reg


class Up(mlo.Problem):
    def __init__(self, name, seed):
        super().__init__(name, params={"lam": torch.tensor([-1.0, 0.0, 0.5], dtype=DT)}, data=batches(1, seed),
                         optimizer_kwargs={"lr": 0.2})
        self.los = []

    def training_step(self, batch):
        X, y = batch
        return sum(0.5 * ((X @ lo.params["w"] - y) ** 2).mean() for lo in self.los)


def bilevel(unroll=2):
    up = Up("up", 1)
    lo = Lo("lo", "unrolled", unroll, [up], 2)
    up.los = [lo]
    return mlo.Engine([lo, up], {"u2l": {up: [lo]}, "l2u": {lo: [up]}}), lo, up


def raises_consumed(eng, name, *match):
    with pytest.raises(WindowsConsumedError) as err:
        check_paths_live(eng.updater, name, True)
    msg = str(err.value)
    for part in match:
        assert part in msg, f"{part!r} not in: {msg}"
    with pytest.raises(WindowsConsumedError):
        eng.gradient(name, by_path=True)
    return msg


def test_right_after_the_update_raises_a_named_error():
    eng, lo, up = bilevel()
    eng.run(2)                                  # the lower's 2 steps, then the upper's update
    assert eng.counts() == {"lo": 2, "up": 1} and not eng.open_windows()
    raises_consumed(eng, "up", "engine.gradient('up', by_path=True)", "up -> lo -> up", "'lo'",
                    "engine.last_hypergradient['up']", "exactly 0")
    assert cut_paths(eng.updater, "up") == {("up", "lo", "up"): ["lo"]}
    assert float(eng.last_hypergradient["up"]["lam"].abs().sum()) > 1e-6   # what it points to
    # without by_path, or with a reference method at the current iterate: no error
    check_paths_live(eng.updater, "up", False)
    check_paths_live(eng.updater, "up", True, ("cg", {"max_iter": 10}))
    out = eng.gradient("up", by_path=False)
    assert set(out) >= {"loss", "grad"}
    ref = eng.gradient("up", by_path=True, method=("cg", {"max_iter": 10, "damping": 0.1}))
    assert float(ref["paths"][("up", "lo", "up")]["lam"].abs().sum()) > 1e-6


def test_mid_window_paths_are_given(measured):
    eng, lo, up = bilevel(unroll=2)
    eng.run(3)                                  # the lower stepped once in its new window
    assert eng.open_windows() == {"lo": 1}
    check_paths_live(eng.updater, "up", True)   # no error
    assert cut_paths(eng.updater, "up") == {}
    out = eng.gradient("up", by_path=True, batch=up.data[0])
    path = out["paths"][("up", "lo", "up")]["lam"]
    assert float(path.abs().sum()) > 1e-6
    measured("by_path mid-window: path vs grad - own", float((path - (out["grad"]["lam"] - out["own"]["lam"])).abs().max()), 1e-15)
    # the next update (after one more lower step) applies a path of the same window: the
    # report of the state one step later equals it
    class Before:
        def after_update(self, engine, problem):
            if problem.name == "lo" and lo.step_count == 4:
                self.rep = engine.gradient("up", by_path=True, batch=up.data[0])
    b = Before()
    eng.run(1, callbacks=[b])
    assert eng.counts() == {"lo": 4, "up": 2}
    applied = eng.last_hypergradient["up"]["lam"]
    measured("by_path just before the update vs the hypergradient it applies",
             float((b.rep["paths"][("up", "lo", "up")]["lam"] - applied).abs().max()), 1e-14)


def test_before_the_first_step_no_error():
    eng, lo, up = bilevel()
    check_paths_live(eng.updater, "up", True)
    out = eng.gradient("up", by_path=True)      # a window never opened: zeros, not an error
    assert torch.equal(out["paths"][("up", "lo", "up")]["lam"], torch.zeros(3, dtype=DT))


def test_surviving_paths_keep_their_zero_entries():
    up = Up("up", 1)
    a, b = Lo("a", "unrolled", 2, [up], 2), Lo("b", "cg", 2, [up], 3)
    up.los = [a, b]
    eng = mlo.Engine([a, b, up], {"u2l": {up: [a, b]}, "l2u": {a: [up], b: [up]}})
    eng.run(2)
    assert eng.counts() == {"a": 2, "b": 2, "up": 1}
    check_paths_live(eng.updater, "up", True)   # one path survives: no error
    assert cut_paths(eng.updater, "up") == {("up", "a", "up"): ["a"]}
    out = eng.gradient("up", by_path=True)
    assert torch.equal(out["paths"][("up", "a", "up")]["lam"], torch.zeros(3, dtype=DT))
    assert float(out["paths"][("up", "b", "up")]["lam"].abs().sum()) > 1e-6


def test_window_consumed_by_another_top_raises():
    u1, u2 = Up("u1", 1), Up("u2", 4)
    lo = Lo("lo", "unrolled", 2, [u1, u2], 2)
    u1.los = u2.los = [lo]
    eng = mlo.Engine([lo, u1, u2], {"u2l": {u1: [lo], u2: [lo]}, "l2u": {lo: [u1, u2]}})
    eng.run(2)
    assert eng.counts() == {"lo": 2, "u1": 1, "u2": 1} and not eng.open_windows()
    for name in ("u1", "u2"):
        raises_consumed(eng, name, f"{name} -> lo -> {name}", f"engine.last_hypergradient[{name!r}]")


def test_engine_gradient_raises_through_report():
    eng, lo, up = bilevel()
    eng.run(2)
    with pytest.raises(WindowsConsumedError, match="engine.last_hypergradient"):
        eng.gradient("up", by_path=True)
    eng.run(1)
    assert float(eng.gradient("up", by_path=True)["paths"][("up", "lo", "up")]["lam"].abs().sum()) > 0
