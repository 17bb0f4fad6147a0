"""mlo.loggers.CSVLogger is append-only with bounded memory (issue 20): a new column
starts the next part (``metrics.2.csv``) instead of rewriting the file; rows already
written keep their bytes; nothing per row is kept in memory; ``read_csv_log`` reads
every part back as one table."""
from __future__ import annotations

import csv
import gc
import os
import tracemalloc

import pytest

from mlo.loggers import CSVLogger, csv_log_parts, read_csv_log

N, SWITCH = 3000, 1500


def row(i):
    m = {"train/loss": 1.0 / (i + 1), "train/acc": i % 7 / 7}
    if i >= SWITCH:
        m["val/acc"] = i / N                 # appears at row 1 500
    return m


def held(logger):
    """Items in the logger's containers (lists, dicts, sets, tuples), recursively."""
    seen, total, todo = set(), 0, [vars(logger)]
    while todo:
        x = todo.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, (list, tuple, set, dict)):
            total += len(x)
            todo.extend(x.values() if isinstance(x, dict) else x)
    return total


def test_new_column_never_rewrites_and_memory_is_bounded(tmp_path):
    path = tmp_path / "logs" / "metrics.csv"
    logger = CSVLogger(path)
    held_at = {}
    gc.collect()
    tracemalloc.start()
    try:
        for i in range(N):
            logger.log(i + 1, row(i))
            if i == SWITCH - 1:
                first = path.read_bytes()                 # the first part, complete
                mem_before = tracemalloc.get_traced_memory()[0]
            if i in (10, SWITCH - 1, SWITCH + 10, N - 1):
                held_at[i] = held(logger)
        gc.collect()
        mem_after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    logger.close()
    # rows already written are never rewritten
    assert path.read_bytes() == first
    assert csv_log_parts(path) == [str(path), str(tmp_path / "logs" / "metrics.2.csv")]
    with open(tmp_path / "logs" / "metrics.2.csv", newline="") as f:
        second = list(csv.reader(f))
    assert second[0] == ["iteration", "train/loss", "train/acc", "val/acc"] and len(second) == 1 + N - SWITCH
    # O(1) rows held: the same few items after 10 rows and after 3 000; memory flat
    assert held_at[10] == held_at[SWITCH - 1] and held_at[SWITCH + 10] == held_at[N - 1] <= 20, held_at
    assert mem_after - mem_before < 20_000, (mem_before, mem_after)   # the old logger: ~420 B a row
    # everything reads back, in order, as one table
    rows = read_csv_log(path)
    assert len(rows) == N and list(rows[0]) == ["iteration", "train/loss", "train/acc", "val/acc"]
    for i, r in enumerate(rows):
        m = row(i)
        assert int(r["iteration"]) == i + 1
        assert float(r["train/loss"]) == m["train/loss"] and float(r["train/acc"]) == m["train/acc"]
        assert (r["val/acc"] == "") if i < SWITCH else float(r["val/acc"]) == m["val/acc"]


def test_failed_write_in_a_new_part_keeps_the_earlier_rows(tmp_path, monkeypatch):
    """A full disk when the new part is opened: the first part is untouched."""
    path = tmp_path / "metrics.csv"
    logger = CSVLogger(path)
    for i in range(5):
        logger.log(i, {"a": i})
    before = path.read_bytes()
    real_open = open

    def full(file, mode="r", *a, **k):
        if os.fspath(file).endswith("metrics.2.csv") and "w" in mode:
            raise OSError(28, "No space left on device")
        return real_open(file, mode, *a, **k)
    monkeypatch.setattr("builtins.open", full)
    with pytest.raises(OSError, match="No space left"):
        logger.log(5, {"a": 5, "b": 1})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [r["a"] for r in read_csv_log(path)] == ["0", "1", "2", "3", "4"]
    logger.log(6, {"a": 6, "b": 2})                      # the disk has room again: logging goes on
    logger.close()
    assert path.read_bytes() == before
    assert read_csv_log(path)[-1] == {"iteration": "6", "a": "6", "b": "2"}


def test_keys_in_later_parts_and_empty_cells(tmp_path):
    path = tmp_path / "log"                               # no suffix: log, log.2, log.3
    logger = CSVLogger(path)
    logger.log(1, {})
    logger.log(2, {"x": 1.5})
    logger.log(3, {"y": 2})
    logger.log(4, {"x": 3})
    logger.close()
    assert csv_log_parts(path) == [str(path), str(tmp_path / "log.2"), str(tmp_path / "log.3")]
    assert read_csv_log(path) == [{"iteration": "1", "x": "", "y": ""}, {"iteration": "2", "x": "1.5", "y": ""},
                                  {"iteration": "3", "x": "", "y": "2"}, {"iteration": "4", "x": "3", "y": ""}]


def test_a_new_log_removes_an_older_runs_parts_and_append_continues(tmp_path):
    path = tmp_path / "metrics.csv"
    old = CSVLogger(path)
    old.log(1, {"a": 1})
    old.log(2, {"a": 2, "b": 3})
    old.close()
    assert len(csv_log_parts(path)) == 2
    resumed = CSVLogger(path, append=True)              # continues the last part
    resumed.log(3, {"a": 4, "b": 5})
    resumed.log(4, {"a": 6, "c": 7})                     # new column: part 3
    resumed.close()
    assert [r["iteration"] for r in read_csv_log(path)] == ["1", "2", "3", "4"]
    assert read_csv_log(path)[-1] == {"iteration": "4", "a": "6", "b": "", "c": "7"}
    assert len(csv_log_parts(path)) == 3
    fresh = CSVLogger(path)                             # a new log: no stale parts
    fresh.log(1, {"z": 0})
    fresh.close()
    assert csv_log_parts(path) == [str(path)] and read_csv_log(path) == [{"iteration": "1", "z": "0"}]
    with pytest.raises(FileNotFoundError, match="no CSV log at"):
        read_csv_log(tmp_path / "absent.csv")
