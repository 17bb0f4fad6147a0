"""The live hypergradient-quality monitor (issue 13 item 6): ``EngineConfig(monitor=...)``."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mlo
from _helpers import load_example

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


def test_quickstart_monitor_flag(capsys):
    pytest.importorskip("sklearn")
    qs = load_example("quickstart_weight_decay")
    qs.main(["--method", "cg", "--outer-steps", "2", "--inner-steps", "5", "--monitor", "1"])
    out = capsys.readouterr().out
    assert out.count("monitor weight_decay: cosine 0.99") == 2 and "classifier=cg vs cg" in out
