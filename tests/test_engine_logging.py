"""Progress bar, dict extras and loggers (issue 13 item 3)."""
from __future__ import annotations

import csv
import sys

import pytest
import torch
import torch.nn.functional as F

import mlo
from mlo.loggers import CSVLogger, TensorBoardLogger, read_csv_log

torch.set_num_threads(1)


class Lower(mlo.Problem):
    def __init__(self, upper, batch):
        super().__init__("lower", params={"w": torch.zeros(3)}, data=[batch],
                         optimizer_kwargs={"lr": 0.1},
                         config=mlo.ProblemConfig(unroll_steps=2, method="cg"))
        self.upper = upper

    def training_step(self, batch):
        x, y = batch
        w = self.params["w"]
        return F.mse_loss(x @ w, y) + self.upper.params["wd"].exp() * (w * w).sum()


class Upper(mlo.Problem):
    def __init__(self, batch):
        super().__init__("upper", params={"wd": torch.tensor(-1.0)}, data=[batch],
                         optimizer=torch.optim.Adam, optimizer_kwargs={"lr": 0.05})
        self.lower = None

    def training_step(self, batch):
        x, y = batch
        pred = x @ self.lower.params["w"]
        return {"loss": F.mse_loss(pred, y), "mae": (pred - y).abs().mean(), "shape": pred.shape}


def build(config=None):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 3, generator=g)
    y = x @ torch.tensor([1.0, -1.0, 0.5])
    up = Upper((x[10:], y[10:]))
    lo = Lower(up, (x[:10], y[:10]))
    up.lower = lo
    return mlo.Engine([lo, up], {"u2l": {up: [lo]}, "l2u": {lo: [up]}}, config)


def test_dict_extras_are_kept_and_printed(capsys):
    engine = build(mlo.EngineConfig(log_every=4))
    engine.run(4)
    assert set(engine.last_extras["upper"]) == {"mae"}                  # non-scalars dropped
    assert engine.last_extras["upper"]["mae"] > 0 and "lower" not in engine.last_extras
    line = capsys.readouterr().out.strip()
    assert line.startswith("[mlo] iter 4: lower=") and ", upper.mae=" in line


def test_csv_logger_training_validation_and_new_columns(tmp_path):
    path = tmp_path / "logs" / "metrics.csv"
    logger = CSVLogger(path)
    engine = build(mlo.EngineConfig(loggers=[logger], validate_every=3, validation=lambda e: {"v": 1.5}))
    engine.run(6)
    logger.close()
    # append-only: each new column starts the next part; read_csv_log merges them
    assert [p.name for p in sorted(path.parent.iterdir())] == ["metrics.2.csv", "metrics.3.csv", "metrics.csv"]
    first = list(csv.reader(open(path)))
    assert first[0] == ["iteration", "lower/loss"] and [r[0] for r in first[1:]] == ["1"]
    rows = read_csv_log(path)
    assert list(rows[0]) == ["iteration", "lower/loss", "upper/loss", "upper/mae", "val/v"]
    # every iteration: the problems that updated; then one row per validation
    assert [r["iteration"] for r in rows] == ["1", "2", "3", "3", "4", "5", "6", "6"]
    assert rows[0]["upper/loss"] == "" and rows[1]["upper/mae"] != "" and rows[3]["val/v"] == "1.5"
    assert float(rows[-2]["upper/loss"]) == pytest.approx(engine.records["upper"]["loss"]) \
        and rows[2]["upper/loss"] == ""


def test_log_every_sets_the_logging_period(tmp_path):
    logged = []

    class Mem:
        def log(self, iteration, metrics):
            logged.append((iteration, sorted(metrics)))

    build(mlo.EngineConfig(loggers=[Mem()], log_every=4)).run(8)
    assert logged == [(4, ["lower/loss", "upper/loss", "upper/mae"])] * 1 + \
        [(8, ["lower/loss", "upper/loss", "upper/mae"])]


def test_tensorboard_logger(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match=r"TensorBoardLogger needs the tensorboard package \(pip install"):
        TensorBoardLogger(tmp_path)
    monkeypatch.undo()

    class Writer:
        scalars = []

        def add_scalar(self, k, v, step):
            self.scalars.append((k, v, step))

        def close(self):
            pass

    build(mlo.EngineConfig(loggers=[TensorBoardLogger(tmp_path, writer=Writer())])).run(2)
    assert [(k, s) for k, _, s in Writer.scalars] == [
        ("lower/loss", 1), ("lower/loss", 2), ("upper/loss", 2), ("upper/mae", 2)]
    pytest.importorskip("tensorboard")
    tb = TensorBoardLogger(tmp_path / "tb")
    build(mlo.EngineConfig(loggers=[tb])).run(2)
    tb.close()
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_progress_bar_only_when_asked_or_on_a_terminal(capsys):
    pytest.importorskip("tqdm")
    build(mlo.EngineConfig(validate_every=2, validation=lambda e: {"v": 2.0})).run(4)
    cap = capsys.readouterr()
    assert cap.err == "" and "validation: v=2" in cap.out          # not a TTY: no bar
    build(mlo.EngineConfig(progress=True, validate_every=2, validation=lambda e: {"v": 2.0})).run(4)
    cap = capsys.readouterr()
    assert "4/4" in cap.err and "upper " in cap.err and " mae " in cap.err
    assert "validation: v=2" in cap.out + cap.err
    with pytest.raises(ValueError, match="progress must be True, False or None"):
        mlo.EngineConfig(progress="yes")
    with pytest.raises(ValueError, match=r"log\(iteration, metrics\)"):
        mlo.EngineConfig(loggers=[object()])
