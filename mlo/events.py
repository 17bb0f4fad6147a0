"""The engine's events: progress, logging, validation, early stopping, the monitor.

:class:`EventsMixin` is part of :class:`mlo.Engine`; it holds what happens *around*
the updates — after each update (hooks, callbacks, the hypergradient monitor's
comparison) and at the end of each iteration (printing, loggers, validation, early
stopping). The scheduling and the updates themselves are in :mod:`mlo.engine`.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import engines.base as eb

from . import callbacks as cb
from . import checkpoint as _ckpt
from . import distributed as _dist
from . import monitor as mon
from .problem import Problem

__all__ = ["EventsMixin"]


class EventsMixin:
    """Progress, loggers, validation, early stopping and the monitor of an engine."""

    def _init_events(self) -> None:
        """Hooks, loggers, validation, early stopping and monitor state (mlo.callbacks)."""
        c = self.config
        self._callbacks: List[Any] = []
        self._progress: Optional[cb.Progress] = None
        self._updating: Optional[Problem] = None
        self._linted: set = set()   # problems whose reads mlo.lint has checked (it checks once)
        self._extras: Optional[dict] = None
        self._logged: Dict[str, int] = {}
        #: Per problem: the scalar extras of its last update's ``training_step`` dict
        #: (every key but ``"loss"``, e.g. ``{"acc": 0.93}``), as floats.
        self.last_extras: Dict[str, Dict[str, float]] = {}
        self.stop_requested = False
        es = c.early_stopping
        #: The early-stopping tracker (``best``, ``best_iteration``), or ``None``.
        self.early_stopping = cb.EarlyStopping(**es) if es else None
        self._monitored: set = set()
        #: EngineConfig(checkpoint_every=...)'s writer (mlo.checkpoint.PeriodicCheckpoints), or None.
        self.periodic_checkpoints = None if c.checkpoint_every is None else _ckpt.PeriodicCheckpoints(
            c.checkpoint_path, c.checkpoint_every, c.checkpoint_keep)
        if c.monitor:
            method, opts = c.monitor["reference"]
            if method in eb.available() and eb.info(method).window:
                raise ValueError("EngineConfig.monitor: the reference must be an implicit or "
                                 "finite-difference method (e.g. ('cg', {'max_iter': 50, 'tol': 1e-10}))")
            try:
                eb.check_options(method, opts)
            except KeyError as e:
                raise ValueError(f"EngineConfig.monitor['reference']: {e.args[0]}") from None
            except (TypeError, ValueError) as e:
                raise type(e)(f"EngineConfig.monitor['reference']: {e}") from None
            with_paths = [n for n in self.problems if self.graph.paths(n)]
            names = c.monitor.get("problems") or with_paths
            bad = [n for n in names if n not in with_paths]
            if bad:
                raise ValueError(f"EngineConfig.monitor['problems']: {bad} have no hypergradient "
                                 f"paths; problems with paths: {with_paths}")
            self._monitored = set(names)

    def request_stop(self) -> None:
        """Ends the current ``run`` after this iteration (for callbacks)."""
        self.stop_requested = True

    def restore_best(self) -> None:
        """Loads the state (modules, optimizers, schedulers of every problem) saved at the
        best validation of ``EngineConfig(early_stopping=...)``; open windows are closed
        first. Counters (iteration, step counts) are not rewound."""
        if self.early_stopping is None or self.early_stopping.state is None:
            raise RuntimeError("restore_best: no best state kept — set EngineConfig(early_stopping="
                               "{'metric': ..., 'mode': ..., 'patience': ...}) and run a validation first")
        cb.restore(self, self.early_stopping.state)

    def _write(self, msg: str) -> None:
        if self._dist and not _dist.is_main():
            return
        if self._progress is not None:
            self._progress.write(msg)
        else:
            print(msg, flush=True)

    def _log(self, metrics: Dict[str, float], iteration: Optional[int] = None) -> None:
        for lg in self.config.loggers:
            lg.log(self.iteration if iteration is None else iteration, metrics)

    def _after_update(self, P: Problem, ref) -> None:
        rec = self.records[P.name]
        if self._extras is not None:
            self.last_extras[P.name] = cb.scalars({k: v for k, v in self._extras.items() if k != "loss"})
            self._extras = None
        P.after_step()
        if ref and P.name in self.last_hypergradient:
            cos, rel = mon.compare(self.last_hypergradient[P.name], ref, P.param_names)
            rec["monitor_cosine"], rec["monitor_rel_error"] = cos, rel
            method, opts = self.config.monitor["reference"]
            it = self.iteration + 1     # the iteration in progress (1-based, as the other logs)
            self._write(f"[mlo] iter {it} monitor {P.name}: cosine {cos:.6f}, relative "
                        f"error {rel:.3g} ({P.name}'s paths by {self._path_methods(P.name)} vs "
                        f"{method} {opts})")
            self._log({f"{P.name}/monitor_cosine": cos, f"{P.name}/monitor_rel_error": rel}, it)
        cb.emit(self._callbacks, "after_update", self, P)

    def _path_methods(self, name: str) -> str:
        return ", ".join(f"{n}={self.problems[n].config.method}" for n in sorted(self.graph.path_nodes(name)))

    def _monitor_reference(self, P: Problem):
        """The reference hypergradient at the state this update will use (or ``None``)."""
        if P.name not in self._monitored or (P.step_count + 1) % self.config.monitor["every"]:
            return None
        method, opts = self.config.monitor["reference"]
        return mon.reference_hypergradient(self, P.name, method, opts, batch=P.peek_batch())

    def _end_of_iteration(self) -> None:
        c = self.config
        printing = c.log_every is not None and self.iteration % c.log_every == 0
        if printing or (c.loggers and c.log_every is None):
            self._log_training(printing)
        if c.validate_every and c.validation and self.iteration % c.validate_every == 0:
            self._validate()
        cb.emit(self._callbacks, "after_iteration", self)

    def _log_training(self, printing: bool) -> None:
        if printing:
            self._write(f"[mlo] iter {self.iteration}: " + ", ".join(
                f"{n}={p.last_loss.item():.4g}" + "".join(
                    f", {n}.{k}={v:.4g}" for k, v in self.last_extras.get(n, {}).items())
                for n, p in self.problems.items() if p.last_loss is not None))
        if self.config.loggers:
            metrics: Dict[str, float] = {}
            for n, rec in self.records.items():
                if "loss" in rec and rec["updates"] != self._logged.get(n):
                    self._logged[n] = rec["updates"]
                    metrics[f"{n}/loss"] = rec["loss"]
                    metrics.update({f"{n}/{k}": v for k, v in self.last_extras.get(n, {}).items()})
            if metrics:
                self._log(metrics)

    def _validate(self) -> None:
        """Runs ``config.validation`` with every module in eval mode (modes restored)."""
        c = self.config
        with cb.eval_mode(P.module for P in self.problems.values()):
            out = c.validation(self)
        try:
            metrics = dict(out)
        except (TypeError, ValueError):
            raise TypeError(f"EngineConfig.validation must return a dict of metrics, got "
                            f"{type(out).__name__} ({out!r}) at iteration {self.iteration}") from None
        self.history.append({"iteration": self.iteration, **metrics})
        nums = cb.scalars(metrics)
        self._write(f"[mlo] iter {self.iteration} validation: " + ", ".join(
            f"{k}={v:.4g}" for k, v in nums.items()))
        if nums:
            self._log({f"val/{k}": v for k, v in nums.items()})
        es = self.early_stopping
        if es is not None and es.update(self, metrics):
            self.stop_requested = True
            self._write(f"[mlo] early stopping at iteration {self.iteration}: {es.metric} has not "
                        f"improved for {es.patience} validations (best {es.best:.4g} at iteration "
                        f"{es.best_iteration}; engine.restore_best() loads that state)")
        cb.emit(self._callbacks, "after_validation", self, metrics)
