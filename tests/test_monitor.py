"""The live hypergradient-quality monitor (issue 13 item 6): ``EngineConfig(monitor=...)``.

Also issue 20: a monitored problem whose paths run through a ``WindowProblem`` is refused
when the engine is built (its reference would be exactly zero), and a reference that is
exactly zero at run time is named in one warning instead of a ``nan`` line per check.
"""
from __future__ import annotations

import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mlo

torch.set_num_threads(1)


class Lower(mlo.Problem):
    def __init__(self, upper, batch, method, options, k=4):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Dropout(0.2), nn.Linear(6, 1)).double()
        super().__init__("lower", module=net, data=[batch], optimizer=torch.optim.SGD,
                         optimizer_kwargs={"lr": 0.2, "momentum": 0.5},
                         config=mlo.ProblemConfig(unroll_steps=k, method=method, method_options=options))
        self.upper = upper

    def training_step(self, batch):
        x, y = batch
        wd = self.upper.params["log_wd"].exp()
        return F.mse_loss(self(x).squeeze(-1), y) + (wd * self.params["0.weight"].pow(2)).sum()


class Upper(mlo.Problem):
    def __init__(self, batch):
        super().__init__("upper", params={"log_wd": torch.full((5,), -2.0, dtype=torch.float64)},
                         data=[batch], optimizer=torch.optim.Adam, optimizer_kwargs={"lr": 0.05})
        self.lower = None

    def training_step(self, batch):
        x, y = batch
        return F.mse_loss(self.lower(x).squeeze(-1), y)


def build(method, options, config=None):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(40, 5, generator=g, dtype=torch.float64)
    y = torch.sin(x[:, 0]) + 0.1 * x[:, 1]
    up = Upper((x[20:], y[20:]))
    lo = Lower(up, (x[:20], y[:20]), method, options)
    up.lower = lo
    return mlo.Engine([lo, up], {"u2l": {up: [lo]}, "l2u": {lo: [up]}}, config), lo, up


def state(engine):
    return ([t.detach().clone() for P in engine.problems.values() for t in P.own_state().values()],
            torch.get_rng_state())


@pytest.mark.parametrize("method,options", [("unrolled", {}), ("finite_difference", {"epsilon": 0.01}),
                                            ("neumann", {"iterations": 5, "alpha": 0.5})])
def test_monitor_does_not_change_the_run(method, options, capsys):
    logged = []

    class Mem:
        def log(self, it, metrics):
            logged.append((it, metrics))

    plain, _, _ = build(method, options)
    mon, _, _ = build(method, options, mlo.EngineConfig(monitor={"every": 2}, loggers=[Mem()]))
    torch.manual_seed(5)
    plain.run(24)
    a = state(plain)
    torch.manual_seed(5)
    mon.run(24)
    b = state(mon)
    assert all(torch.equal(x, y) for x, y in zip(a[0], b[0])) and torch.equal(a[1], b[1])
    rec = mon.records["upper"]
    assert -1 <= rec["monitor_cosine"] <= 1 + 1e-12 and 0 < rec["monitor_rel_error"] < float("inf")
    mons = [(it, m) for it, m in logged if "upper/monitor_cosine" in m]
    assert [it for it, _ in mons] == [8, 16, 24]          # upper updates 2, 4, 6
    out = capsys.readouterr().out
    assert "[mlo] iter 8 monitor upper: cosine " in out and f"lower={method}" in out
    assert "vs cg {'max_iter': 100, 'tol': 1e-10}" in out


def test_monitor_of_a_converged_cg_against_cg_is_exact():
    engine, _, _ = build("cg", {"max_iter": 60, "tol": 1e-14},
                         mlo.EngineConfig(monitor={"every": 1, "reference": ("cg", {"max_iter": 60, "tol": 1e-14})}))
    engine.run(8)
    rec = engine.records["upper"]
    assert abs(rec["monitor_cosine"] - 1) < 1e-12 and rec["monitor_rel_error"] < 1e-10


def test_monitor_config_errors():
    with pytest.raises(ValueError, match="reference must be an implicit or finite-difference"):
        build("cg", {}, mlo.EngineConfig(monitor={"reference": "unrolled"}))
    with pytest.raises(ValueError, match=r"\['lower'\] have no hypergradient paths"):
        build("cg", {}, mlo.EngineConfig(monitor={"problems": ["lower"]}))
    with pytest.raises(TypeError, match=r"monitor\[.reference.\]: method .cg. has no option"):
        build("cg", {}, mlo.EngineConfig(monitor={"reference": ("cg", {"iterations": 3})}))
    with pytest.raises(ValueError, match=r"monitor\['every'\] must be an integer >= 1"):
        mlo.EngineConfig(monitor={"every": 0})


def test_quickstart_monitor_flag():
    """``examples/quickstart_weight_decay.py --monitor 1``, run as the script it is."""
    pytest.importorskip("sklearn")
    script = Path(__file__).resolve().parents[1] / "examples" / "quickstart_weight_decay.py"
    proc = subprocess.run([sys.executable, str(script), "--method", "cg", "--outer-steps", "2",
                           "--inner-steps", "5", "--monitor", "1"], capture_output=True, text=True,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.count("monitor weight_decay: cosine 0.99") == 2 and "classifier=cg vs cg" in out


# ------------------------------------------------------------ per-window problems on the paths
class Latent(mlo.WindowProblem):
    """Per-window latents ``z_0 = x · w`` (w: the upper's), one SGD step on ½‖z − x₀‖²."""

    def __init__(self, upper, data):
        super().__init__("latent", optimizer_kwargs={"lr": 0.3}, data=data,
                         config=mlo.ProblemConfig(method="unrolled", unroll_steps=2))
        self.upper = upper

    def init_window(self, x):
        return {"z": x @ self.upper.params["w"]}

    def training_step(self, x):
        return 0.5 * (self.params["z"] - x[:, 0]).pow(2).sum()


class LatentReader(mlo.Problem):
    def __init__(self):
        g = torch.Generator().manual_seed(4)
        super().__init__("reader", params={"w": torch.randn(5, dtype=torch.float64, generator=g)},
                         data=[None], optimizer=torch.optim.SGD, optimizer_kwargs={"lr": 0.01})
        self.latent = None

    def training_step(self, batch):
        return (self.latent.params["z"] - 1.0).pow(2).sum()


def window_graph(config, with_plain=False):
    """``reader`` above a WindowProblem ``latent``; optionally the plain pair of :func:`build`."""
    g = torch.Generator().manual_seed(3)
    reader = LatentReader()
    latent = Latent(reader, [torch.randn(6, 5, dtype=torch.float64, generator=g) for _ in range(8)])
    reader.latent = latent
    problems, u2l, l2u = [latent, reader], {reader: [latent]}, {latent: [reader]}
    if with_plain:
        x = torch.randn(40, 5, generator=g, dtype=torch.float64)
        up = Upper((x[20:], x[20:, 0]))
        lo = Lower(up, (x[:20], x[:20, 0]), "cg", {"max_iter": 100})
        up.lower = lo
        problems += [lo, up]
        u2l[up], l2u[lo] = [lo], [up]
    return mlo.Engine(problems, {"u2l": u2l, "l2u": l2u}, config)


def test_monitor_through_a_window_problem_is_refused():
    # the default monitors every problem with paths: 'reader' is one, and no other qualifies
    msg = (r"EngineConfig.monitor: 'reader''s paths run through \['latent'\], which have per-window "
           r"variables \(WindowProblem\)\. The reference \('cg'\) re-solves every problem of the "
           r"paths at its current iterate, and a per-window problem has no iterate outside its "
           r"unrolled window: the reference would be exactly zero at every check\. No problem of "
           r"this graph qualifies: remove EngineConfig.monitor")
    with pytest.raises(ValueError, match=msg):
        window_graph(mlo.EngineConfig(monitor={"every": 1}))
    with pytest.raises(ValueError, match=r"\('finite_difference'\)"):
        window_graph(mlo.EngineConfig(monitor={"reference": ("finite_difference", {})}))
    # another problem qualifies: the message names it, and monitoring only it is accepted
    with pytest.raises(ValueError, match=re.escape(
            "Set EngineConfig.monitor['problems'] to problems whose paths avoid them (['upper'])")):
        window_graph(mlo.EngineConfig(monitor={"every": 1}), with_plain=True)
    with pytest.raises(ValueError, match="'reader''s paths run through"):
        window_graph(mlo.EngineConfig(monitor={"problems": ["reader", "upper"]}), with_plain=True)
    engine = window_graph(mlo.EngineConfig(monitor={"every": 1, "problems": ["upper"]}), with_plain=True)
    engine.run(8)
    assert 0.99 < engine.records["upper"]["monitor_cosine"] <= 1 + 1e-12
    assert "monitor_cosine" not in engine.records["reader"]


# ------------------------------------------------------------ a reference that is exactly zero
class GatedLower(Lower):
    """The upper enters through ``relu(log_wd)``: with ``log_wd < 0`` every derivative
    with respect to it is exactly zero, at every iterate, for every method."""

    def training_step(self, batch):
        x, y = batch
        wd = torch.relu(self.upper.params["log_wd"])
        return F.mse_loss(self(x).squeeze(-1), y) + (wd * self.params["0.weight"].pow(2)).sum()


def test_an_exactly_zero_reference_is_named_once(capsys):
    logged = []

    class Mem:
        def log(self, it, metrics):
            logged.append(metrics)

    g = torch.Generator().manual_seed(2)
    x = torch.randn(40, 5, generator=g, dtype=torch.float64)
    up = Upper((x[20:], x[20:, 0]))
    lo = GatedLower(up, (x[:20], x[:20, 0]), "neumann", {"iterations": 5, "alpha": 0.5})
    up.lower = lo
    engine = mlo.Engine([lo, up], {"u2l": {up: [lo]}, "l2u": {lo: [up]}},
                        mlo.EngineConfig(monitor={"every": 1}, loggers=[Mem()]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine.run(16)                                  # four upper updates, four checks
    ours = [w for w in caught if "mlo monitor" in str(w.message)]
    assert len(ours) == 1 and ours[0].category is RuntimeWarning
    assert str(ours[0].message).startswith(
        "mlo monitor: the reference hypergradient of problem 'upper' (cg {'max_iter': 100, "
        "'tol': 1e-10}) is exactly zero at iteration 4, so cosine and relative error are undefined")
    assert "monitor upper" not in capsys.readouterr().out
    assert not any("upper/monitor_cosine" in m for m in logged)
    rec = engine.records["upper"]
    assert rec["updates"] == 4 and rec["monitor_cosine"] != rec["monitor_cosine"]   # nan
