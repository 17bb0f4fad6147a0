"""What happens around the updates: progress, loggers, validation, early stopping,
callbacks and the hypergradient monitor.

:class:`Events` is the engine's collaborator for everything that observes a run
without changing its arithmetic: after each applied update (the problem's
``after_step`` hook, its extras, the monitor's comparison, ``after_update``
callbacks) and at the end of each iteration (printing, loggers, validation, early
stopping, ``after_iteration`` callbacks). The scheduling and the updates are the
engine's and the updater's; the values it reports live in :class:`mlo.state.RunState`.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional

import engines.base as methods

from . import callbacks as _callbacks
from . import checkpoint as _ckpt
from . import monitor
from .config import EngineConfig
from .graph import Graph
from .problem import Problem
from .state import RunState

__all__ = ["Events"]


class Events:
    """Progress, loggers, validation, early stopping, callbacks and the monitor.

    Args:
        engine: the engine, as callbacks, ``EngineConfig.validation``, early stopping
            and periodic checkpoints receive it (used only to hand it over).
        problems, graph, config, state: the engine's.
        gradient: ``gradient(name, batch=..., method=...)``, the engine's report of a
            gradient (the monitor's reference).
        is_main: whether this process prints and logs.
    """

    def __init__(self, engine: Any, problems: Mapping[str, Problem], graph: Graph,
                 config: EngineConfig, state: RunState, gradient: Callable[..., Dict[str, Any]],
                 is_main: bool):
        self.engine, self.problems, self.graph, self.state = engine, problems, graph, state
        self.config, self.gradient, self.is_main = config, gradient, is_main
        self.callbacks: List[Any] = []
        self.progress: Optional[_callbacks.Progress] = None
        #: Whether ``run`` shows a progress bar (:meth:`after_iteration_of_run` has work).
        self.shows_progress = False
        es = config.early_stopping
        #: The early-stopping tracker (``best``, ``best_iteration``), or ``None``.
        self.early_stopping = _callbacks.EarlyStopping(**es) if es else None
        #: EngineConfig(checkpoint_every=...)'s writer, or ``None``.
        self.periodic_checkpoints = None if config.checkpoint_every is None else _ckpt.PeriodicCheckpoints(
            config.checkpoint_path, config.checkpoint_every, config.checkpoint_keep)
        self.monitored = self._check_monitor(config.monitor) if config.monitor else set()
        #: Whether the end of an iteration has work besides callbacks (printing, loggers,
        #: validation, periodic checkpoints).
        self.busy = bool(config.log_every is not None or config.loggers
                         or (config.validate_every and config.validation)
                         or self.periodic_checkpoints is not None)
        self._zero_reference_warned: set = set()    # monitored problems warned about once

    def _check_monitor(self, spec: Mapping[str, Any]) -> set:
        method, opts = spec["reference"]
        if method in methods.available() and methods.info(method).window:
            raise ValueError("EngineConfig.monitor: the reference must be an implicit or "
                             "finite-difference method (e.g. ('cg', {'max_iter': 50, 'tol': 1e-10}))")
        try:
            methods.check_options(method, opts)
        except KeyError as e:
            raise ValueError(f"EngineConfig.monitor['reference']: {e.args[0]}") from None
        except (TypeError, ValueError) as e:
            raise type(e)(f"EngineConfig.monitor['reference']: {e}") from None
        with_paths = [n for n in self.problems if self.graph.paths(n)]
        names = spec.get("problems") or with_paths
        bad = [n for n in names if n not in with_paths]
        if bad:
            raise ValueError(f"EngineConfig.monitor['problems']: {bad} have no hypergradient "
                             f"paths; problems with paths: {with_paths}")
        self._refuse_per_window_paths(names, with_paths, method)
        return set(names)

    def _refuse_per_window_paths(self, names, with_paths, method: str) -> None:
        """A monitored problem whose paths run through a ``WindowProblem`` has no
        reference: the reference method re-solves each lower at its iterate, and a
        per-window problem's variables exist only inside its unrolled window (the
        reference would be exactly zero at every check)."""
        def through(n):
            return sorted(m for m in self.graph.path_nodes(n) if self.problems[m].per_window)
        hit = {n: w for n in names if (w := through(n))}
        if not hit:
            return
        ok = [n for n in with_paths if not through(n)]
        what = "; ".join(f"{n!r}'s paths run through {w}" for n, w in hit.items())
        todo = (f"set EngineConfig.monitor['problems'] to problems whose paths avoid them "
                f"({ok})" if ok else "no problem of this graph qualifies: remove EngineConfig.monitor")
        raise ValueError(
            f"EngineConfig.monitor: {what}, which have per-window variables (WindowProblem). "
            f"The reference ({method!r}) re-solves every problem of the paths at its current "
            f"iterate, and a per-window problem has no iterate outside its unrolled window: the "
            f"reference would be exactly zero at every check. {todo[0].upper() + todo[1:]}")

    # ------------------------------------------------------------ a run
    def start_run(self, callbacks, iterations: int) -> None:
        self.callbacks, self.progress = list(callbacks or ()), _callbacks.Progress(self.engine, iterations)
        self.shows_progress = self.progress.bar is not None
        self.state.stop_requested = False

    def after_iteration_of_run(self) -> None:
        self.progress.update()

    def end_run(self) -> None:
        if self.progress is not None:
            self.progress.close()
        self.callbacks, self.progress, self.shows_progress = [], None, False

    def write(self, msg: str) -> None:
        """Prints ``msg`` (through the progress bar when one is shown; main rank only)."""
        if not self.is_main:
            return
        if self.progress is not None:
            self.progress.write(msg)
        else:
            print(msg, flush=True)

    def log(self, metrics: Dict[str, float], iteration: Optional[int] = None) -> None:
        for lg in self.config.loggers:
            lg.log(self.state.iteration if iteration is None else iteration, metrics)

    # ------------------------------------------------------------ updates
    def monitor_reference(self, P: Problem):
        """The reference hypergradient at the state this update will use (or ``None``)."""
        if P.name not in self.monitored or (P.step_count + 1) % self.config.monitor["every"]:
            return None
        method, opts = self.config.monitor["reference"]
        return monitor.reference_hypergradient(self.gradient, P.name, method, opts, batch=P.peek_batch())

    def after_update(self, P: Problem, extras: Mapping[str, Any], ref) -> None:
        """After an applied update: extras, ``P.after_step()``, the monitor, callbacks."""
        if extras:
            self.state.last_extras[P.name] = _callbacks.scalars(dict(extras))
        P.after_step()
        if ref and P.name in self.state.last_hypergradient:
            self._compare(P, ref)
        if self.callbacks:
            _callbacks.emit(self.callbacks, "after_update", self.engine, P)

    def _compare(self, P: Problem, ref) -> None:
        rec = self.state.records[P.name]
        method, opts = self.config.monitor["reference"]
        it = self.state.iteration + 1     # the iteration in progress (1-based, as the other logs)
        if monitor.is_zero(ref, P.param_names):
            # cosine and relative error are undefined: one warning, not a nan line per check
            rec["monitor_cosine"] = rec["monitor_rel_error"] = float("nan")
            if self.is_main and P.name not in self._zero_reference_warned:
                self._zero_reference_warned.add(P.name)
                monitor.warn_zero_reference(P.name, method, opts, it)
            return
        cos, rel = monitor.compare(self.state.last_hypergradient[P.name], ref, P.param_names)
        rec["monitor_cosine"], rec["monitor_rel_error"] = cos, rel
        paths = ", ".join(f"{n}={self.problems[n].config.method}"
                          for n in sorted(self.graph.path_nodes(P.name)))
        self.write(f"[mlo] iter {it} monitor {P.name}: cosine {cos:.6f}, relative "
                   f"error {rel:.3g} ({P.name}'s paths by {paths} vs {method} {opts})")
        self.log({f"{P.name}/monitor_cosine": cos, f"{P.name}/monitor_rel_error": rel}, it)

    # ------------------------------------------------------------ iterations
    def end_of_iteration(self) -> None:
        """Printing, loggers, validation, early stopping, ``after_iteration`` callbacks
        and periodic checkpoints, as configured."""
        c = self.config
        it = self.state.iteration
        if c.log_every is not None or c.loggers or (c.validate_every and c.validation) or self.callbacks:
            printing = c.log_every is not None and it % c.log_every == 0
            if printing or (c.loggers and c.log_every is None):
                self._log_training(printing)
            if c.validate_every and c.validation and it % c.validate_every == 0:
                self.validate()
            _callbacks.emit(self.callbacks, "after_iteration", self.engine)
        if self.periodic_checkpoints is not None:   # EngineConfig(checkpoint_every=N)
            self.periodic_checkpoints.after_iteration(self.engine)

    def _log_training(self, printing: bool) -> None:
        st = self.state
        if printing:
            self.write(f"[mlo] iter {st.iteration}: " + ", ".join(
                f"{n}={p.last_loss.item():.4g}" + "".join(
                    f", {n}.{k}={v:.4g}" for k, v in st.last_extras.get(n, {}).items())
                for n, p in self.problems.items() if p.last_loss is not None))
        if self.config.loggers:
            metrics: Dict[str, float] = {}
            for n, rec in st.records.items():
                if "loss" in rec and rec["updates"] != st.logged.get(n):
                    st.logged[n] = rec["updates"]
                    metrics[f"{n}/loss"] = rec["loss"]
                    metrics.update({f"{n}/{k}": v for k, v in st.last_extras.get(n, {}).items()})
            if metrics:
                self.log(metrics)

    def validate(self) -> None:
        """Runs ``config.validation`` with every module in eval mode (modes restored)."""
        c, st = self.config, self.state
        with _callbacks.eval_mode(P.module for P in self.problems.values()):
            out = c.validation(self.engine)
        try:
            metrics = dict(out)
        except (TypeError, ValueError):
            raise TypeError(f"EngineConfig.validation must return a dict of metrics, got "
                            f"{type(out).__name__} ({out!r}) at iteration {st.iteration}") from None
        st.history.append({"iteration": st.iteration, **metrics})
        nums = _callbacks.scalars(metrics)
        self.write(f"[mlo] iter {st.iteration} validation: " + ", ".join(
            f"{k}={v:.4g}" for k, v in nums.items()))
        if nums:
            self.log({f"val/{k}": v for k, v in nums.items()})
        es = self.early_stopping
        if es is not None and es.update(self.engine, metrics):   # (a collective under DataParallel)
            st.stop_requested = True
            best = ("no finite value yet, nothing to restore" if es.best is None else
                    f"best {es.best:.4g} at iteration {es.best_iteration}; engine.restore_best() "
                    f"loads that state")
            self.write(f"[mlo] early stopping at iteration {st.iteration}: {es.metric} has not "
                       f"improved for {es.patience} validations ({best})")
        _callbacks.emit(self.callbacks, "after_validation", self.engine, metrics)

    def restore_best(self) -> None:
        """Loads the state saved at the best validation (see :meth:`mlo.Engine.restore_best`)."""
        es = self.early_stopping
        if es is not None and es.state is None and self.state.history:
            raise RuntimeError(f"restore_best: no finite value of {es.metric!r} yet in "
                               f"{len(self.state.history)} validation(s): nothing to restore")
        if es is None or es.state is None:
            raise RuntimeError("restore_best: no best state kept — set EngineConfig(early_stopping="
                               "{'metric': ..., 'mode': ..., 'patience': ...}) and run a validation first")
        _callbacks.restore(self.engine, self.early_stopping.state)
