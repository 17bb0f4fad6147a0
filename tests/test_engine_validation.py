"""Validation in eval mode and early stopping (issue 13 item 2)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mlo

torch.set_num_threads(1)


class Lower(mlo.Problem):
    def __init__(self, upper, batch, method="unrolled", k=3):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.1), nn.Linear(8, 1))
        super().__init__("lower", module=net, data=[batch], optimizer=torch.optim.SGD,
                         optimizer_kwargs={"lr": 0.1, "momentum": 0.5},
                         config=mlo.ProblemConfig(unroll_steps=k, method=method))
        self.upper = upper

    def training_step(self, batch):
        x, y = batch
        return F.mse_loss(self(x).squeeze(-1), y) + self.upper.params["wd"].exp() * \
            self.params["3.weight"].pow(2).sum()


class Upper(mlo.Problem):
    def __init__(self, batch):
        super().__init__("upper", params={"wd": torch.tensor(-2.0)}, data=[batch],
                         optimizer=torch.optim.Adam, optimizer_kwargs={"lr": 0.05})
        self.lower = None

    def training_step(self, batch):
        x, y = batch
        return F.mse_loss(self.lower(x).squeeze(-1), y)


def build(config, method="unrolled"):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 4, generator=g)
    y = x[:, 0] - x[:, 1]
    up = Upper((x[16:], y[16:]))
    lo = Lower(up, (x[:16], y[:16]), method)
    up.lower = lo
    return mlo.Engine([lo, up], {"u2l": {up: [lo]}, "l2u": {lo: [up]}}, config), lo, up


def test_validation_runs_in_eval_mode_and_restores_each_mode(capsys):
    seen = []

    def validation(engine):
        lo = engine.problems["lower"]
        seen.append([m.training for m in lo.module.modules()])
        stats = lo.module[1].running_mean.clone()
        out = lo(torch.randn(5, 4))                      # BatchNorm in eval: statistics unchanged
        assert torch.equal(stats, lo.module[1].running_mean)
        return {"out": float(out.detach().mean()), "note": "text is kept, not logged"}

    engine, lo, up = build(mlo.EngineConfig(validate_every=2, validation=validation))
    lo.module[2].eval()                                  # a submodule the user froze in eval
    engine.run(6)
    assert seen and all(not any(s) for s in seen)
    assert [m.training for m in lo.module.modules()] == [True, True, True, False, True]
    assert [h["iteration"] for h in engine.history] == [2, 4, 6]
    out = capsys.readouterr().out
    assert "[mlo] iter 2 validation: out=" in out and "note" not in out


def scripted(values, capture):
    it = iter(values)

    def validation(engine):
        v = next(it)
        capture.append((v, {k: t.detach().clone() for k, t in engine.problems["lower"].params.items()},
                        {k: t.detach().clone() for k, t in engine.problems["upper"].params.items()},
                        engine.problems["upper"].optimizer.state_dict()["state"][0]["exp_avg"].clone()
                        if engine.problems["upper"].step_count else None))
        return {"val_loss": v, "acc": -v}
    return validation


def test_early_stopping_min_stops_after_patience_and_restores_the_best_state(capsys):
    capture = []
    cfg = mlo.EngineConfig(validate_every=2, validation=scripted([5, 3, 4, 2, 2.5, 2.6, 9, 9], capture),
                           early_stopping={"metric": "val_loss", "mode": "min", "patience": 2})
    engine, lo, up = build(cfg)
    engine.run(100)
    assert engine.iteration == 12                       # 2 validations without improvement after 2
    es = engine.early_stopping
    assert (es.best, es.best_iteration) == (2, 8)
    assert "early stopping at iteration 12" in capsys.readouterr().out
    _, lo_best, up_best, exp_avg = capture[3]           # iteration 8: inside an open window (k=3)
    assert not torch.equal(lo.params["3.weight"], lo_best["3.weight"])
    engine.restore_best()
    assert not engine.open_windows()
    for k, t in lo_best.items():
        assert torch.equal(dict(lo.module.named_parameters())[k], t), k
    assert torch.equal(up.params["wd"], up_best["wd"])
    assert torch.equal(up.optimizer.state_dict()["state"][0]["exp_avg"], exp_avg)
    engine.run(3)                                        # training can continue from there


def test_early_stopping_max_and_config_errors():
    capture = []
    cfg = mlo.EngineConfig(validate_every=1, validation=scripted([1, 2, 2, 3], capture),
                           early_stopping={"metric": "acc", "mode": "max", "patience": 1})
    engine, _, _ = build(cfg, method="cg")
    engine.run(10)
    assert engine.iteration == 2 and engine.early_stopping.best == -1   # acc = -v falls at once
    with pytest.raises(ValueError, match="needs validation=fn"):
        mlo.EngineConfig(early_stopping={"metric": "x"})
    with pytest.raises(ValueError, match="mode must be 'min' or 'max'"):
        mlo.EngineConfig(validate_every=1, validation=lambda e: {}, early_stopping={"metric": "x", "mode": "up"})
    cfg = mlo.EngineConfig(validate_every=1, validation=lambda e: {"x": 1.0}, early_stopping={"metric": "y"})
    with pytest.raises(KeyError, match=r"metric 'y' is not among the validation metrics \['x'\]"):
        build(cfg)[0].run(1)
    with pytest.raises(RuntimeError, match="no best state"):
        build(mlo.EngineConfig())[0].restore_best()
