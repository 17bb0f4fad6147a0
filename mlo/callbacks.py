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
    ``min_delta`` for ``patience`` validations in a row. A value that is not finite
    (NaN, ±inf) never counts as the best: it is a validation without improvement.

    Under data parallelism (``engine.parallel.enabled``) rank 0's value decides on every
    rank (:meth:`mlo.parallel.DataParallel.main_value`), so ``best``,
    ``best_iteration``, the kept state and the stop are the same everywhere.

    Raises:
        ValueError: ``mode`` not ``'min'``/``'max'``, ``patience`` not an integer
            >= 1, ``min_delta`` not a finite number >= 0 (each named).
        TypeError: ``metric`` not a string.
    """

    def __init__(self, metric: str, mode: str = "min", patience: int = 5, min_delta: float = 0.0):
        _check_settings(metric, mode, patience, min_delta)
        self.metric, self.mode, self.patience, self.min_delta = metric, mode, patience, float(min_delta)
        self.best: Optional[float] = None
        self.best_iteration: Optional[int] = None
        self.bad = 0
        self.state: Optional[Dict[str, Dict[str, Any]]] = None

    def value(self, metrics: Dict[str, Any]) -> float:
        """The tracked metric of ``metrics`` as a float (NaN and ±inf included).

        Raises:
            KeyError: the metric is missing.
            TypeError: its value is not a real number or a one-element real tensor.
        """
        if self.metric not in metrics:
            raise KeyError(f"EngineConfig.early_stopping: metric {self.metric!r} is not among the "
                           f"validation metrics {sorted(metrics)}")
        return _real(self.metric, metrics[self.metric])

    def update(self, engine: "Engine", metrics: Dict[str, Any]) -> bool:
        """Records one validation; ``True`` when the run should stop."""
        parallel = getattr(engine, "parallel", None)
        if parallel is None or not parallel.enabled:
            return self.observe(engine, self.value(metrics))
        try:
            local, error = self.value(metrics), None
        except (KeyError, TypeError) as e:
            local, error = None, e
        v, everywhere = parallel.main_value(local)      # a collective on every rank
        if error is not None:
            raise error
        if not everywhere:
            raise RuntimeError(f"EngineConfig.early_stopping: metric {self.metric!r} could not be read "
                               f"on another rank (see that rank's error); every rank stops")
        return self.observe(engine, v)

    def observe(self, engine: "Engine", v: float) -> bool:
        """Counts value ``v`` at ``engine.iteration``: a finite improvement becomes the best
        (and its state is kept); anything else is one more validation without one."""
        sign = 1.0 if self.mode == "min" else -1.0
        if math.isfinite(v) and (self.best is None or sign * (self.best - v) > self.min_delta):
            self.best, self.best_iteration, self.bad = v, engine.iteration, 0
            self.state = snapshot(engine)
            return False
        self.bad += 1
        return self.bad >= self.patience


def _check_settings(metric: Any, mode: Any, patience: Any, min_delta: Any) -> None:
    """Named errors for :class:`EarlyStopping`'s settings."""
    where = "EngineConfig.early_stopping"
    if not isinstance(metric, str):
        raise TypeError(f"{where}: metric must be the name (a string) of a validation metric, got "
                        f"{metric!r} ({type(metric).__name__})")
    if not isinstance(mode, str) or mode not in ("min", "max"):
        raise ValueError(f"{where}: mode must be 'min' or 'max', got {mode!r}")
    if not isinstance(patience, int) or isinstance(patience, bool) or patience < 1:
        raise ValueError(f"{where}: patience must be an integer >= 1, got {patience!r}")
    if not isinstance(min_delta, numbers.Real) or isinstance(min_delta, bool) \
            or not math.isfinite(min_delta) or not min_delta >= 0:
        raise ValueError(f"{where}: min_delta must be a finite number >= 0, got {min_delta!r}")


def _real(name: str, v: Any) -> float:
    """``v`` (a real number, or a one-element real tensor or NumPy array) as a float;
    else a ``TypeError`` naming metric ``name`` and early stopping."""
    if isinstance(v, numbers.Real) and not isinstance(v, bool):
        return float(v)
    if isinstance(v, torch.Tensor):
        if v.numel() == 1 and (v.is_floating_point() or v.dtype in _INTEGER_DTYPES):
            return float(v.detach().reshape(()).cpu())
        got = f"a {v.dtype} tensor of shape {tuple(v.shape)}"
    elif hasattr(v, "dtype") and hasattr(v, "shape") and hasattr(v, "reshape"):    # NumPy
        if getattr(v, "size", None) == 1 and getattr(v.dtype, "kind", None) in ("f", "i", "u"):
            return float(v.reshape(()))
        got = f"an array of dtype {v.dtype} and shape {tuple(v.shape)}"
    else:
        got = f"{v!r} ({type(v).__name__})"
    raise TypeError(f"EngineConfig.early_stopping: metric {name!r} must be a real number (or a "
                    f"one-element real tensor), got {got}")


_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


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
