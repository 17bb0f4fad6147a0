"""mlo.loggers fed by hand (the MLO-MAE main job's metrics.csv and tb/): a CSVLogger with a
fixed header, appending only to a file with that header; TensorBoard tags renamed; a
TensorBoard logger that is None when tensorboard is not installed."""
from __future__ import annotations

import sys

import pytest

from mlo.loggers import CSVLogger, TensorBoardLogger, csv_header

COLUMNS = ["seconds", "loss_a", "loss_b"]


def test_fixed_columns_header_rows_and_unknown_metric(tmp_path):
    path = tmp_path / "m.csv"
    logger = CSVLogger(path, columns=COLUMNS)
    assert path.read_text() == "iteration,seconds,loss_a,loss_b\n"     # header at creation
    logger.log(10, {"seconds": 1.5, "loss_a": 0.25})
    with pytest.raises(ValueError, match=r"metric\(s\) \['loss_c'\] have no column"):
        logger.log(11, {"loss_c": 1.0})
    logger.close()
    assert path.read_text() == "iteration,seconds,loss_a,loss_b\n10,1.5,0.25,\n"
    assert not (tmp_path / "m.2.csv").exists()


def test_fixed_columns_append(tmp_path):
    path = tmp_path / "m.csv"
    first = CSVLogger(path, columns=COLUMNS)
    first.log(1, {"loss_b": 2.0})
    first.close()
    assert csv_header(path) == ["iteration"] + COLUMNS
    again = CSVLogger(path, append=True, columns=COLUMNS)
    again.log(2, {"loss_a": 3.0})
    again.close()
    assert path.read_text().splitlines() == ["iteration,seconds,loss_a,loss_b", "1,,,2.0", "2,,3.0,"]
    with pytest.raises(ValueError, match="cannot append to .* its header"):
        CSVLogger(path, append=True, columns=["seconds"])
    fresh = CSVLogger(path, columns=["seconds"])            # append=False: a new table
    fresh.close()
    assert path.read_text() == "iteration,seconds\n"
    path.write_text("")                                      # empty: started afresh
    CSVLogger(path, append=True, columns=COLUMNS).close()
    assert csv_header(path) == ["iteration"] + COLUMNS
    assert csv_header(tmp_path / "none.csv") is None


@pytest.mark.parametrize("columns", [["iteration", "x"], ["x", "x"]])
def test_fixed_columns_must_be_distinct_without_iteration(tmp_path, columns):
    with pytest.raises(ValueError, match="must be distinct and must not include 'iteration'"):
        CSVLogger(tmp_path / "m.csv", columns=columns)


class Writer:
    def __init__(self):
        self.scalars, self.closed = [], False

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def close(self):
        self.closed = True


def test_tensorboard_tag(tmp_path):
    w = Writer()
    tb = TensorBoardLogger(tmp_path, writer=w, tag=lambda k: k.replace("_", "/", 1))
    tb.log(3, {"loss_pretrain": 0.5, "mask_hypergrad_norm": 1e-3, "seconds": 2.0})
    tb.close()
    assert w.scalars == [("loss/pretrain", 0.5, 3), ("mask/hypergrad_norm", 1e-3, 3), ("seconds", 2.0, 3)]
    assert w.closed


def test_tensorboard_if_installed_is_none_without_tensorboard(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)    # import fails
    assert TensorBoardLogger.if_installed(tmp_path / "tb") is None
    assert not (tmp_path / "tb").exists()
