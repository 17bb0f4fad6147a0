"""Shared pytest plumbing: a report of the errors the correctness tests measured.

Tests that compare against a closed form, finite differences or a naive reference
call the ``measured`` fixture::

    def test_cg(measured):
        err = rel(ours, exact)
        measured("P1 implicit CG (d iterations) vs closed form", err, 1e-8)

``measured`` asserts ``err <= tol`` (so the record doubles as the check) and keeps
the value; at the end of the run pytest prints one table of every measured error
— the numbers closing notes and docs quote. ``MLO_ERRORS_CSV=path`` also writes
them to a CSV file.
"""
from __future__ import annotations

import csv
import math
import os

import pytest
import torch

_RECORDS = []


@pytest.fixture
def measured(request):
    """``measured(check, error, tol)``: records ``error`` and asserts ``error <= tol``."""

    def record(check: str, error, tol: float) -> float:
        err = float(error)
        _RECORDS.append((request.node.nodeid, check, err, float(tol)))
        assert math.isfinite(err), f"{check}: error is {err}"
        assert err <= tol, f"{check}: measured error {err:.3e} exceeds tolerance {tol:.1e}"
        return err

    return record


def pytest_terminal_summary(terminalreporter):
    if not _RECORDS:
        return
    tr = terminalreporter
    tr.section("measured errors (error / tolerance)")
    width = min(90, max(len(c) for _, c, _, _ in _RECORDS))
    # One line per check name: the worst error over its parametrisations.
    def ratio(err, tol):
        return err / tol if tol > 0 else (0.0 if err == 0 else math.inf)

    worst = {}
    for nodeid, check, err, tol in _RECORDS:
        if check not in worst:
            worst[check] = (err, tol, 1)
        else:
            e, t, n = worst[check]
            worst[check] = (err, tol, n + 1) if ratio(err, tol) > ratio(e, t) else (e, t, n + 1)
    for check, (err, tol, n) in worst.items():
        tr.write_line(f"{check[:width]:<{width}}  {err:9.2e} / {tol:7.1e}  (worst of {n})")
    path = os.environ.get("MLO_ERRORS_CSV")
    if path:
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["test", "check", "error", "tolerance"])
            w.writerows(_RECORDS)


@pytest.fixture
def restore_threads():
    """Restores torch's intra-op thread count after a test (example scripts set it)."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)
