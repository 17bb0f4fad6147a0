"""Checkpoints of a whole engine: every problem's variables, buffers, optimizer,
scheduler, counters, and the RNG state.

Written atomically (a temporary file in the same directory, fsync, then
``os.replace``), so an interrupted save never leaves a truncated checkpoint; loaded
with ``torch.load(weights_only=True)`` — no arbitrary code runs on load.

Saving has no effect on the running engine. Inside an open unrolled window the
checkpoint holds the window's current iterates and the differentiable optimizer's
state, but not its autograd graph, which cannot be saved: a run resumed from it
starts a new window at that point, so the next hypergradient of the problems above
differentiates through the remaining steps only — exactly like
:meth:`mlo.Engine.close_windows` at that iteration. Both :func:`save` and
:func:`load` warn when that happens; save when no window is open (e.g. after an
iteration in which the problems above the unrolled ones updated) for a resume that
reproduces the uninterrupted run bit for bit. Data iterators are not saved: a
resumed problem starts its data from the beginning (skip ``P.step_count`` batches
of a re-iterable to realign it).
"""
from __future__ import annotations

import os
import tempfile
import warnings
from typing import Any, Dict, Union

import torch
from torch import Tensor

__all__ = ["save", "load"]

_FORMAT = 1
PathLike = Union[str, "os.PathLike[str]"]


def _detached(st: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v.detach().clone() if isinstance(v, Tensor) else v for k, v in st.items() if v is not None}


def _problem_blob(engine, P) -> Dict[str, Any]:
    """``P``'s module and optimizer state dicts; inside an open window, its iterates
    and the differentiable twin's state instead of the (stale) real ones."""
    module, optim = P.module.state_dict(), P.optimizer.state_dict()
    win = engine._windows.get(P.name)
    if win is not None:
        it = {id(p): P._state[k].detach().clone() for k, p in zip(P.param_names, P._real)}
        for k, p in P.module.named_parameters(remove_duplicate=False):   # tied names too
            if id(p) in it:
                module[k] = it[id(p)]
        index = {id(p): i for i, p in enumerate(p for g in P.optimizer.param_groups for p in g["params"])}
        state = dict(optim["state"])
        for p, st in zip(P._real, win.fopt.state):
            state[index[id(p)]] = _detached(st)
        optim = {**optim, "state": state}
    return {"module": module, "optimizer": optim,
            "scheduler": P.scheduler.state_dict() if P.scheduler is not None else None,
            "step_count": P.step_count, "ready_count": P.ready_count}


def _warn_open(open_windows: Dict[str, int], where: str) -> None:
    if open_windows:
        desc = ", ".join(f"{n!r} ({k} step(s) in)" for n, k in sorted(open_windows.items()))
        warnings.warn(
            f"{where} inside open unrolled window(s) of {desc}: the autograd graph of those "
            f"steps is not saved, so a resumed run truncates there (the next hypergradient "
            f"differentiates only through the steps after the resume). Save when no window "
            f"is open for an exact resume", RuntimeWarning, stacklevel=3)


def save(engine, path: PathLike) -> None:
    """Saves ``engine`` to ``path`` atomically, without changing the running engine.

    Warns (``RuntimeWarning``) when an unrolled window is open (module docstring).
    """
    open_windows = {n: w.steps for n, w in engine._windows.items()}
    _warn_open(open_windows, "checkpoint saved")
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    blob: Dict[str, Any] = {"format": _FORMAT, "iteration": engine.iteration,
                            "since": {n: dict(c) for n, c in engine._since.items()},
                            "last_block": dict(engine._last_block),
                            "records": {n: dict(r) for n, r in engine.records.items()},
                            "open_windows": open_windows,
                            "rng": {"cpu": torch.get_rng_state(), "cuda": cuda},
                            "problems": {n: _problem_blob(engine, P) for n, P in engine.problems.items()}}
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

    Also restores the global RNG state (CPU, and CUDA when saved and available).
    Warns (``RuntimeWarning``) when the checkpoint was saved inside an open window.

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
    engine._last_block = dict(blob.get("last_block") or {})
    for name, rec in (blob.get("records") or {}).items():
        engine.records[name] = dict(rec)
    rng = blob.get("rng")
    if rng is not None:
        torch.set_rng_state(rng["cpu"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    _warn_open(blob.get("open_windows") or {}, f"{os.fspath(path)}: checkpoint was saved")
