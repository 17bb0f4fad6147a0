"""Engine-level events: callbacks, validation in eval mode, early stopping, progress bar.

``engine.run(n, callbacks=[cb, ...])`` calls, on each callback that defines them:

* ``after_update(engine, problem)`` — after each applied update of any problem (after
  that problem's own :meth:`mlo.Problem.after_step` hook);
* ``after_iteration(engine)`` — at the end of each iteration, after logging and
  validation; windows consumed in this iteration are closed by then;
* ``after_validation(engine, metrics)`` — after each validation.

A callback may call ``engine.request_stop()``: ``run`` returns after the current
iteration. :class:`Callback` is an optional base class with no-op methods.
"""
from __future__ import annotations

import contextlib
import copy
import math
import numbers
import sys
import time
from typing import Any, Dict, Iterable, Iterator, Optional

import torch
from torch import nn

#: Callbacks receive the running :class:`mlo.Engine` (this module does not import it:
#: the engine depends on its callbacks, not the other way round).
Engine = Any

__all__ = ["Callback", "EarlyStopping", "eval_mode", "scalars"]


class Callback:
    """Optional base class for ``engine.run(..., callbacks=[...])`` (all no-ops)."""

    def after_update(self, engine: "Engine", problem) -> None:
        pass

    def after_iteration(self, engine: "Engine") -> None:
        pass

    def after_validation(self, engine: "Engine", metrics: Dict[str, Any]) -> None:
        pass


def emit(callbacks: Iterable[Any], event: str, *args) -> None:
    for cb in callbacks:
        fn = getattr(cb, event, None)
        if fn is not None:
            fn(*args)


@contextlib.contextmanager
def eval_mode(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Every module (and submodule) in ``eval()``; each one's own previous mode restored."""
    saved = [(m, m.training) for mod in modules for m in mod.modules()]
    try:
        for m, _ in saved:
            m.training = False
        yield
    finally:
        for m, mode in saved:
            m.training = mode


def scalars(d: Dict[str, Any]) -> Dict[str, float]:
    """The entries of ``d`` that are numbers or one-element tensors, as floats."""
    out = {}
    for k, v in d.items():
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            out[k] = float(v.detach())
        elif isinstance(v, numbers.Real) and not isinstance(v, bool):
            out[k] = float(v)
    return out


class EarlyStopping:
    """Tracks a validation metric; keeps the best state in memory.

    ``update`` returns ``True`` once the metric has not improved by more than
    ``min_delta`` for ``patience`` validations in a row.
    """

    def __init__(self, metric: str, mode: str = "min", patience: int = 5, min_delta: float = 0.0):
        self.metric, self.mode, self.patience, self.min_delta = metric, mode, patience, min_delta
        self.best: Optional[float] = None
        self.best_iteration: Optional[int] = None
        self.bad = 0
        self.state: Optional[Dict[str, Dict[str, Any]]] = None

    def update(self, engine: "Engine", metrics: Dict[str, Any]) -> bool:
        if self.metric not in metrics:
            raise KeyError(f"EngineConfig.early_stopping: metric {self.metric!r} is not among the "
                           f"validation metrics {sorted(metrics)}")
        v = float(metrics[self.metric])
        sign = 1.0 if self.mode == "min" else -1.0
        if self.best is None or (math.isfinite(v) and sign * (self.best - v) > self.min_delta):
            self.best, self.best_iteration, self.bad = v, engine.iteration, 0
            self.state = snapshot(engine)
            return False
        self.bad += 1
        return self.bad >= self.patience


def snapshot(engine: "Engine") -> Dict[str, Dict[str, Any]]:
    """Copies of every problem's module, optimizer and scheduler state (a module's
    parameters are its current iterates when an unrolled window is open)."""
    out = {}
    for name, P in engine.problems.items():
        win = engine.window(name)
        if win is not None and not P.per_window:   # the twin holds the optimizer state
            win.fopt.state_to_torch(P.optimizer, P.variables)
        module = {k: v.detach().clone() for k, v in P.module.state_dict().items()}
        for k, t in ({} if P.per_window else P.own_state()).items():
            module[k] = t.detach().clone()
        out[name] = {"module": module, "optimizer": copy.deepcopy(P.optimizer.state_dict()),
                     "scheduler": copy.deepcopy(P.scheduler.state_dict()) if P.scheduler else None}
    return out


def restore(engine: "Engine", state: Dict[str, Dict[str, Any]]) -> None:
    """Loads a :func:`snapshot` (open windows are closed first)."""
    engine.close_windows()
    for name, P in engine.problems.items():
        st = state[name]
        P.module.load_state_dict(st["module"])
        P.optimizer.load_state_dict(copy.deepcopy(st["optimizer"]))
        if P.scheduler is not None and st["scheduler"] is not None:
            P.scheduler.load_state_dict(st["scheduler"])


class Progress:
    """A tqdm bar over ``engine.run``'s iterations: each problem's last loss and extras."""

    def __init__(self, engine: "Engine", total: int):
        self.engine, self.bar, self._t = engine, None, 0.0
        on = engine.config.progress
        if on is None:
            on = bool(getattr(sys.stderr, "isatty", lambda: False)())
        if not on or total == 0:
            return
        try:
            from tqdm.auto import tqdm
        except ImportError:
            if engine.config.progress:
                raise ImportError("EngineConfig(progress=True) needs tqdm: pip install tqdm") from None
            return
        self.bar = tqdm(total=total, unit="it", dynamic_ncols=True, leave=True)

    def summary(self) -> str:
        parts = []
        for n, rec in self.engine.records.items():
            if "loss" in rec:
                parts.append(f"{n} {rec['loss']:.4g}" + "".join(
                    f" {k} {v:.4g}" for k, v in self.engine.last_extras.get(n, {}).items()))
        return " | ".join(parts)

    def update(self) -> None:
        if self.bar is None:
            return
        now = time.perf_counter()
        if now - self._t > 0.2:
            self._t = now
            self.bar.set_postfix_str(self.summary(), refresh=False)
        self.bar.update(1)

    def write(self, msg: str) -> None:
        if self.bar is None:
            print(msg, flush=True)
        else:
            self.bar.write(msg)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(self.summary(), refresh=False)
            self.bar.close()
            self.bar = None
