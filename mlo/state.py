"""Functional parameter state: who is reading whose variables, and unrolled windows.

While the engine evaluates a problem's loss, a :class:`ReadContext` is active. When
that loss calls *another* problem (``self.lower(x)``), the other problem's current
state is handed over as an *alias*: fresh tensors that share values but start a new
autograd graph. Each alias is recorded as a :class:`Read` so the engine can later
map the gradient that arrives at the alias back to the source problem's state at
the time of the read — that is how vectors travel along hypergradient paths.

A :class:`Window` holds one unrolled problem's differentiable iterates since the
last time a problem above it consumed them.

The run state. Everything that changes while an engine runs lives in one
engine-owned :class:`RunState` (``engine.state``): the iteration, and per problem a
:class:`ProblemRun` — its open window and differentiable iterates, schedule counters,
last batch and loss, and the current window of per-window variables — and the
engine's records, last hypergradients and extras, validation history, lint state
and stop request. A
:class:`mlo.Problem` stays declarative: it holds a reference to its
:class:`ProblemRun` (given by :meth:`mlo.Problem.bind`) and offers read-only views
(``step_count``, ``last_batch``, ``params`` …). Checkpoints read and restore the
counters through :meth:`RunState.counters` / :meth:`RunState.load_counters`.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Set

from torch import Tensor

__all__ = ["Read", "Window", "ProblemRun", "RunState", "ReadContext", "reading", "current_context"]

State = Dict[str, Tensor]


@dataclass(eq=False)
class Read:
    """One read of ``source``'s variables by another problem's loss.

    Attributes:
        source: name of the problem whose variables were read.
        alias: the tensors the reader's loss actually used (a new graph starts here).
        src_state: the source's state tensors at the time of the read (its
            differentiable iterates when the source is inside an unrolled window);
            ``None`` once that window has closed (the path is truncated there).
        live: ``EngineConfig(nesting="exact")`` inside the top's nest: no new graph
            starts — the reader used the source's iterates themselves.
    """

    source: str
    alias: State
    src_state: Optional[State]
    live: bool = False     # exact nesting: the alias *is* the source's live iterate


@dataclass(eq=False)
class Window:
    """Differentiable iterates of one unrolled problem (see ``mlo.engine``)."""

    fopt: object                                       # mlo.optim.FunctionalOptimizer
    reads: List[Read] = field(default_factory=list)    # this problem's reads of others
    referrers: List[Read] = field(default_factory=list)  # others' reads of this problem
    steps: int = 0
    # Reads of problems that did not step since: one alias set serves every step of
    # the window (source name -> (its step count at the read, the read)).
    shared: Dict[str, tuple] = field(default_factory=dict)

    def add_reads(self, reads: List[Read]) -> None:
        """Records the reads of one step (a shared read only once)."""
        have = {id(r) for r in self.reads}
        self.reads.extend(r for r in reads if id(r) not in have)


@dataclass(eq=False)
class ProblemRun:
    """The run state of one problem (owned by the engine; the problem reads it).

    Attributes:
        iterates: the differentiable iterates while a window is open (``None``: the
            module's parameters are the state).
        window: the open :class:`Window`, or ``None``.
        last_batch: the batch of the last loss evaluation (implicit methods re-evaluate it).
        last_loss: the loss of the last update (detached).
        step_count: updates taken. ready_count: times it became ready. edits: in-place
            edits of the parameters by ``set_params`` (readers' shared aliases key on it).
        since: per lower problem, its steps since this problem was last ready.
        last_block: the ``update_every_iterations`` block of the last update.
        loop_start: whether the next update starts an inner loop (``on_window_start``).
        initial, outputs, batch: a per-window problem's window (``init_window``'s
            variables and other outputs, and the window's batch).
        window_batches: with ``ProblemConfig(implicit_batch="window")``, the batches of
            its applied updates in its current window (:meth:`RunState.note_window_batch`),
            which implicit methods average its loss over; empty otherwise.
        window_recover: after a checkpoint is loaded, how many of the batches its data
            is realigned past are the current window's (:meth:`RunState.load_counters`,
            :meth:`mlo.Problem.skip_batches`).
    """

    iterates: Optional[State] = None
    window: Optional[Window] = None
    last_batch: Any = None
    last_loss: Any = None
    step_count: int = 0
    ready_count: int = 0
    edits: int = 0          # in-place edits of the parameters outside updates (set_params)
    batches_taken: int = 0  # batches consumed from its data (checkpoints realign with it)
    since: Dict[str, int] = field(default_factory=dict)
    last_block: Optional[int] = None
    loop_start: bool = True
    initial: State = field(default_factory=dict)
    outputs: Dict[str, Any] = field(default_factory=dict)
    batch: Any = None
    window_batches: List[Any] = field(default_factory=list)
    window_recover: int = 0


class RunState:
    """Everything that changes while an engine runs (``engine.state``).

    Attributes:
        iteration: iterations completed.
        problems: ``{name: ProblemRun}``.
        records: per problem, ``updates``, ``seconds`` (own gradient + hypergradient +
            step), ``skipped`` (non-finite updates skipped), and the last update's
            ``loss``, ``grad_norm`` and, with paths, ``own_grad_norm``/``hypergrad_norm``
            (and the monitor's ``monitor_cosine``/``monitor_rel_error``; a lower solved
            by CG or Neumann: ``cg_iterations``/``cg_residual``/``neumann_last_term``
            of its last solve).
        last_hypergradient: per problem with paths, the hypergradient (sum over paths,
            without ``∂F/∂λ``) applied at its last update, ``{variable: tensor}``.
        last_extras: per problem, the scalar extras of its last update's
            ``training_step`` dict (every key but ``"loss"``), as floats.
        history: the validation results, ``[{"iteration": i, **metrics}, ...]``.
        linted: problems whose declared reads :mod:`mlo.lint` has checked (once each).
        last_grad: per problem whose method needs the optimizer (SAMA), the last
            gradient applied (``None`` entries for variables without one).
        learned_hp: per problem, the optimizer hyperparameters it learns
            (``optimizer_hyperparameters()``'s keys; a scheduler leaves them alone).
        logged: per problem, its ``updates`` count when loggers last saw it.
        stop_requested: ``engine.request_stop()`` or early stopping asked the current
            ``run`` to end after this iteration.
        resume: updates of the current iteration already applied when an exception
            interrupted it (0 between iterations): the next ``step`` finishes that
            iteration without repeating them (:meth:`mlo.Engine.step`).
    """

    def __init__(self, lowers: Mapping[str, List[str]]):
        self.iteration = 0
        self.problems: Dict[str, ProblemRun] = {
            n: ProblemRun(since={lo: 0 for lo in lo_list}) for n, lo_list in lowers.items()}
        self.records: Dict[str, Dict[str, Any]] = {n: {"updates": 0, "seconds": 0.0} for n in lowers}
        self.last_hypergradient: Dict[str, Dict[str, Tensor]] = {}
        self.last_extras: Dict[str, Dict[str, float]] = {}
        self.history: List[Dict[str, Any]] = []
        self.linted: Set[str] = set()
        self.last_grad: Dict[str, List[Optional[Tensor]]] = {}
        self.learned_hp: Dict[str, Set[str]] = {}
        self.logged: Dict[str, int] = {}
        self.stop_requested = False
        self.resume = 0

    def __getitem__(self, name: str) -> ProblemRun:
        return self.problems[name]

    def open_windows(self) -> Dict[str, int]:
        """``{problem: steps taken}`` of every open window."""
        return {n: r.window.steps for n, r in self.problems.items() if r.window is not None}

    def counters(self) -> Dict[str, Any]:
        """The schedule counters (what a checkpoint must restore to resume the schedule)."""
        return {"iteration": self.iteration, "resume": self.resume,
                "problems": {n: {"step_count": r.step_count, "ready_count": r.ready_count,
                                 "since": dict(r.since), "last_block": r.last_block,
                                 "batches_taken": r.batches_taken}
                             for n, r in self.problems.items()}}

    def load_counters(self, counters: Mapping[str, Any]) -> None:
        """Restores :meth:`counters` (problems absent from ``counters`` are left alone)."""
        self.iteration = int(counters["iteration"])
        self.resume = int(counters.get("resume", 0))
        for n, c in counters["problems"].items():
            r = self.problems[n]
            r.step_count, r.ready_count = int(c["step_count"]), int(c["ready_count"])
            r.since.update(c.get("since") or {})
            r.last_block = c.get("last_block")
            r.batches_taken = int(c.get("batches_taken", r.batches_taken))
            r.loop_start = True
        for n, r in self.problems.items():
            # The window batches of the run before the load are not this run's. A checkpoint
            # holds no batches: the current window's are the last ``since`` ones its data is
            # realigned past (Problem.skip_batches keeps them, realign_data=True).
            r.window_batches = []
            r.window_recover = self._window_steps(n) or 0

    def _window_steps(self, name: str) -> Optional[int]:
        """Steps of ``name`` since its window last restarted — the fewest any problem
        directly above it has counted since its own last readiness (``None``: nothing
        above it)."""
        counts = [r.since[name] for r in self.problems.values() if name in r.since]
        return min(counts) if counts else None

    def note_window_batch(self, name: str, batch: Any) -> None:
        """Records ``batch``, that of an applied update of ``name``
        (``ProblemConfig(implicit_batch="window")``), in its current window. The window
        restarts — its earlier batches are dropped — at its first update after a problem
        directly above it became ready (that problem's count of its steps is back at 0),
        so only the current window's batches are kept. A problem with nothing above it
        keeps none."""
        steps = self._window_steps(name)
        if steps is None:
            return
        run = self.problems[name]
        if steps == 0:
            run.window_batches = []
        run.window_batches.append(batch)


class ReadContext:
    """Active while a problem's loss is evaluated.

    Args:
        reader: the problem whose loss is running.
        resolve: ``resolve(problem) -> state`` for any *other* problem the loss calls.
        own: the state the reader itself runs with (``None``: its current state).
    """

    def __init__(self, reader, resolve: Callable[[object], State], own: Optional[State] = None):
        self.reader = reader
        self.resolve = resolve
        self.own = own


class _Stack(threading.local):
    """The active read contexts, one stack per thread: a loss evaluated in one thread
    never sees another thread's context (two engines may run in two threads; one
    engine is not meant to be stepped from two threads at once)."""

    def __init__(self):
        self.items: List[ReadContext] = []


_STACK = _Stack()


def current_context() -> Optional[ReadContext]:
    items = _STACK.items
    return items[-1] if items else None


class reading:
    """``with reading(ctx):`` — ``ctx`` is the active read context inside (a plain
    context manager class, not a generator: it is entered on every loss evaluation)."""

    __slots__ = ("ctx", "items")

    def __init__(self, ctx: ReadContext):
        self.ctx = ctx

    def __enter__(self) -> ReadContext:
        self.items = items = _STACK.items
        items.append(self.ctx)
        return self.ctx

    def __exit__(self, *exc) -> bool:
        self.items.pop()
        return False
