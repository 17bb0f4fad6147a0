"""Running hypergradient methods side by side against an exact reference.

Protocol (for every method setting, the same lower state):

1. ``engine, upper = factory(method, options)`` builds a fresh engine in the
   factory's initial state. ``engine.step()`` must train only the problems below
   ``upper`` (the upper never becomes ready — e.g. ``unroll_steps`` of the problems
   directly below it set very large) and batches must come in the same order in
   every engine, so that ``warmup`` steps reach the same *evaluated state* θ_T.
2. Implicit / finite-difference settings: ``warmup`` steps, then
   ``engine.gradient(upper)`` (evaluated at the current iterate, on each lower's last
   batch).
3. Unrolled with ``K`` steps: ``warmup − K`` steps with the unrolled windows closed
   after every step (:meth:`mlo.Engine.close_windows`: each step is a truncation
   point, nothing accumulates) — the checkpoint K steps before θ_T — then ``K``
   differentiable steps in one window, then ``engine.gradient(upper)`` through it.
   The differentiable optimizer reproduces ``torch.optim``, so the window ends at θ_T
   up to rounding.
4. The reference is evaluated at exactly the state the method was evaluated at: a
   callable reference reads that engine (after ``close_windows``); a reference
   :class:`Setting` runs in its own engine into which the measured engine's
   variables, module buffers (BatchNorm statistics) and last batches are copied,
   and its upper is evaluated on the batch the measured upper last used.

Measurements: cosine similarity and relative error ``‖g − g*‖/‖g*‖`` of the upper's
total gradient (own term + all paths, flattened over its variables); time = median
over repeats of the wall time to obtain one hypergradient (``engine.gradient``; for
unrolled-K also the K differentiable lower steps, without which it does not exist);
peak memory = peak bytes held by torch's CPU allocator during that same work,
relative to its start, from the autograd profiler's allocation events
(``profile_memory=True``; ``tracemalloc`` does not see torch tensors), measured in a
separate untimed run. For graphs with several paths, each path's term is compared
with the reference's term.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

import engines.base as eb

from ..engine import Engine

__all__ = ["Setting", "Row", "PathRow", "Report", "compare", "peak_memory"]


@dataclass(frozen=True)
class Setting:
    """One method with its settings.

    Attributes:
        method: an ``engines`` method name (``ProblemConfig.method``).
        options: its ``method_options``.
        steps: unrolled only: ``K``, the differentiable lower steps before the
            hypergradient (must be ≥ 1 for ``"unrolled"``).
        curve: the plot curve it belongs to (default: the method name).
    """

    method: str
    options: Mapping[str, Any] = field(default_factory=dict)
    steps: int = 0
    curve: Optional[str] = None

    _SHORT = {"iterations": "K", "alpha": "α", "max_iter": "iters", "epsilon": "ε",
              "scale_by_lr": "×lr", "tol": "tol", "damping": "δ", "first_order": "first-order"}

    @property
    def settings(self) -> str:
        parts = [f"K={self.steps}"] if self.steps else []
        for k, v in self.options.items():
            name = self._SHORT.get(k, k)
            if isinstance(v, bool):
                if v:
                    parts.append(name)
            else:
                parts.append(f"{name}={v:g}" if isinstance(v, float) else f"{name}={v}")
        return " ".join(parts)

    @property
    def label(self) -> str:
        return f"{self.method} {self.settings}".strip()

    @property
    def curve_name(self) -> str:
        return self.curve or self.method


Reference = Union[Setting, Callable[[Engine, str], Dict[str, Any]]]
Factory = Callable[[str, dict], Tuple[Engine, str]]


@dataclass
class PathRow:
    path: Tuple[str, ...]
    share: float          # ‖term‖ / ‖total hypergradient‖ (this method's)
    cosine: float         # with the reference's term
    rel_error: float      # ‖term − term*‖ / ‖term*‖


@dataclass
class Row:
    setting: Setting
    cosine: float
    rel_error: float
    time_s: float
    peak_bytes: float
    grad: Tensor          # the method's gradient (flattened), as the engine computed it
    ref: Tensor           # the reference at the same state (flattened)
    paths: List[PathRow] = field(default_factory=list)


@dataclass
class Report:
    name: str
    rows: List[Row]
    paths: List[Tuple[str, ...]]
    warmup: int
    repeats: int
    reference: str
    description: str = ""
    seconds: float = 0.0


def _flat(vec: Mapping[str, Tensor], names: Sequence[str], like: Mapping[str, Tensor]) -> Tensor:
    return torch.cat([(vec[k] if k in vec else torch.zeros_like(like[k])).detach().reshape(-1)
                      for k in names])


def _cos(a: Tensor, b: Tensor) -> float:
    na, nb = float(a.norm()), float(b.norm())
    if na == 0.0 or nb == 0.0:
        return 1.0 if na == nb else 0.0
    return float(a @ b) / (na * nb)


def _rel(a: Tensor, b: Tensor) -> float:
    nb = float(b.norm())
    return float((a - b).norm()) / nb if nb else float((a - b).norm())


@contextlib.contextmanager
def _quiet_stderr():
    """Silences the profiler's C++ start/stop messages (file descriptor 2)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # pragma: no cover - no real fd 2
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def peak_memory(fn: Callable[[], Any]) -> float:
    """Peak bytes allocated by torch (CPU) while ``fn`` runs, relative to its start.

    From the autograd profiler's allocation events (``profile_memory=True``); NaN if
    this torch build does not expose them."""
    try:
        with _quiet_stderr(), torch.autograd.profiler.profile(profile_memory=True) as prof:
            fn()
        events = prof.kineto_results.events()
        mem = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    except Exception:  # pragma: no cover - profiler not available
        return float("nan")
    cur = peak = 0
    for _, nbytes in mem:
        cur += nbytes
        peak = max(peak, cur)
    return float(peak)


def _advance(engine: Engine, upper: str, steps: int, truncate: bool) -> None:
    for _ in range(steps):
        engine.step()
        if truncate:
            engine.close_windows()
    U = engine.problems[upper]
    if U.ready_count or U.step_count:
        raise RuntimeError(
            f"problem {upper!r} became ready during the lower steps; the factory must keep "
            f"the upper from updating (e.g. unroll_steps=mlo.compare.HOLD for the problems "
            f"directly below it)")


def _copy_state(src: Engine, dst: Engine) -> None:
    with torch.no_grad():
        for name, P in src.problems.items():
            Q = dst.problems[name]
            for k, t in P.own_state().items():
                Q.own_state()[k].copy_(t)
            for b, c in zip(Q.module.buffers(), P.module.buffers()):   # e.g. BatchNorm statistics
                b.copy_(c)
            Q.last_batch = P.last_batch


class _Prepared:
    """A fresh engine advanced to the point where the timed work starts."""

    def __init__(self, factory: Factory, s: Setting, warmup: int):
        self.engine, self.upper = factory(s.method, dict(s.options))
        _advance(self.engine, self.upper, warmup - s.steps, truncate=True)
        self.steps = s.steps

    def work(self, by_path: bool = False) -> Dict[str, Any]:
        if self.steps:
            _advance(self.engine, self.upper, self.steps, truncate=False)
        return self.engine.gradient(self.upper, by_path=by_path)


def compare(factory: Factory, methods: Sequence[Setting], reference: Reference, *,
            warmup: int = 0, repeats: int = 5, memory: bool = True, name: str = "graph",
            description: str = "", reference_name: str = "") -> Report:
    """Computes the upper's hypergradient with each setting and compares it to ``reference``.

    Args:
        factory: ``factory(method, options) -> (engine, upper_name)`` (module docstring).
        methods: the settings to compare.
        reference: a :class:`Setting` (e.g. CG to 1e-12) or a callable
            ``reference(engine, upper) -> {"grad": {var: tensor}, "paths": {path: {...}}}``
            evaluated at the measured engine's state (``"paths"`` optional).
        warmup: lower steps from the factory's initial state to the evaluated state
            (≥ the largest unrolled ``K``).
        repeats: timing repeats (median reported).
        memory: also measure peak memory (one more untimed run per setting).
        name, description, reference_name: for the report.

    Returns:
        A :class:`Report` (see :mod:`mlo.compare.report` to print / save it).
    """
    t_start = time.perf_counter()
    for s in methods:
        if s.method in eb.available() and eb.info(s.method).window and s.steps < 1:
            raise ValueError(f"{s.label}: {s.method} settings need steps=K >= 1 (the window's length)")
        if s.steps > warmup:
            raise ValueError(f"{s.label}: K={s.steps} > warmup={warmup}; the window must start "
                             f"at or after the factory's initial state")
    ref_engine = None
    if isinstance(reference, Setting):
        ref_engine, _ = factory(reference.method, dict(reference.options))
        reference_name = reference_name or f"{reference.label} at the evaluated state"
    rows: List[Row] = []
    paths: List[Tuple[str, ...]] = []
    for s in methods:
        times: List[float] = []
        if s.steps:                      # a window is consumed by each measurement
            for _ in range(repeats):
                prep = _Prepared(factory, s, warmup)
                t0 = time.perf_counter()
                prep.work()
                times.append(time.perf_counter() - t0)
            prep = _Prepared(factory, s, warmup)
            peak = peak_memory(prep.work) if memory else float("nan")
            if not memory:
                prep.work()
        else:
            prep = _Prepared(factory, s, warmup)
            for _ in range(repeats):
                t0 = time.perf_counter()
                prep.work()
                times.append(time.perf_counter() - t0)
            peak = peak_memory(prep.work) if memory else float("nan")
        eng, upper = prep.engine, prep.upper
        paths = eng.graph.paths(upper)
        multi = len(paths) > 1
        out = eng.gradient(upper, by_path=multi)   # through the same window if unrolled
        eng.close_windows()
        U = eng.problems[upper]
        if ref_engine is not None:
            _copy_state(eng, ref_engine)
            ref = ref_engine.gradient(upper, batch=U.last_batch, by_path=multi)   # the same batch
        else:
            ref = reference(eng, upper)
        names, like = U.param_names, U.own_state()
        g, r = _flat(out["grad"], names, like), _flat(ref["grad"], names, like)
        row = Row(s, _cos(g, r), _rel(g, r), statistics.median(times), peak, g, r)
        if multi:
            hyper = sum(_flat(out["paths"][p], names, like) for p in paths)
            for p in paths:
                term = _flat(out["paths"][p], names, like)
                if "paths" in ref and p in ref["paths"]:
                    rt = _flat(ref["paths"][p], names, like)
                    c, e = _cos(term, rt), _rel(term, rt)
                else:
                    c = e = float("nan")
                share = float(term.norm() / hyper.norm()) if float(hyper.norm()) else float("nan")
                row.paths.append(PathRow(p, share, c, e))
        rows.append(row)
    return Report(name, rows, paths, warmup, repeats,
                  reference_name or getattr(reference, "__name__", "reference"),
                  description, time.perf_counter() - t_start)
