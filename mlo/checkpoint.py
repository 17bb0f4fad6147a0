"""Checkpoints of a whole engine: every problem's variables, optimizer, scheduler, counters.

Written atomically (a temporary file in the same directory, fsync, then
``os.replace``), so an interrupted save never leaves a truncated checkpoint; loaded
with ``torch.load(weights_only=True)`` — no arbitrary code runs on load.
Open unrolled windows are written back first (:meth:`mlo.Engine.close_windows`).
"""
from __future__ import annotations

import os
import tempfile
from typing import Any, Dict, Union

import torch

__all__ = ["save", "load"]

_FORMAT = 1
PathLike = Union[str, "os.PathLike[str]"]


def save(engine, path: PathLike) -> None:
    """Saves ``engine`` to ``path`` atomically."""
    engine.close_windows()
    blob: Dict[str, Any] = {"format": _FORMAT, "iteration": engine.iteration,
                            "since": engine._since, "problems": {}}
    for name, P in engine.problems.items():
        blob["problems"][name] = {
            "module": P.module.state_dict(),
            "optimizer": P.optimizer.state_dict(),
            "scheduler": P.scheduler.state_dict() if P.scheduler is not None else None,
            "step_count": P.step_count,
            "ready_count": P.ready_count,
        }
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".mlo-ckpt-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(blob, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load(engine, path: PathLike) -> None:
    """Restores ``engine`` (built with the same problems) from ``path``.

    Raises:
        ValueError: the checkpoint's problems differ from the engine's (names listed).
    """
    blob = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != _FORMAT:
        raise ValueError(f"{path}: not an mlo checkpoint (format {_FORMAT})")
    saved, have = set(blob["problems"]), set(engine.problems)
    if saved != have:
        raise ValueError(f"{path}: checkpoint has problems {sorted(saved)}, engine has "
                         f"{sorted(have)} (missing: {sorted(have - saved)}, extra: {sorted(saved - have)})")
    engine.close_windows()
    for name, P in engine.problems.items():
        st = blob["problems"][name]
        P.module.load_state_dict(st["module"])
        P.optimizer.load_state_dict(st["optimizer"])
        if P.scheduler is not None and st["scheduler"] is not None:
            P.scheduler.load_state_dict(st["scheduler"])
        P.step_count, P.ready_count = st["step_count"], st["ready_count"]
    engine.iteration = blob["iteration"]
    for name, counts in blob["since"].items():
        engine._since[name].update(counts)
