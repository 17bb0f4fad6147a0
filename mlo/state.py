"""Functional parameter state: who is reading whose variables, and unrolled windows.

While the engine evaluates a problem's loss, a :class:`ReadContext` is active. When
that loss calls *another* problem (``self.lower(x)``), the other problem's current
state is handed over as an *alias*: fresh tensors that share values but start a new
autograd graph. Each alias is recorded as a :class:`Read` so the engine can later
map the gradient that arrives at the alias back to the source problem's state at
the time of the read — that is how vectors travel along hypergradient paths.

A :class:`Window` holds one unrolled problem's differentiable iterates since the
last time a problem above it consumed them.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional

from torch import Tensor

__all__ = ["Read", "Window", "ReadContext", "reading", "current_context"]

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
    """

    source: str
    alias: State
    src_state: Optional[State]


@dataclass(eq=False)
class Window:
    """Differentiable iterates of one unrolled problem (see ``mlo.engine``)."""

    fopt: object                                       # mlo.optim.FunctionalOptimizer
    reads: List[Read] = field(default_factory=list)    # this problem's reads of others
    referrers: List[Read] = field(default_factory=list)  # others' reads of this problem
    steps: int = 0


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


@contextlib.contextmanager
def reading(ctx: ReadContext) -> Iterator[ReadContext]:
    items = _STACK.items
    items.append(ctx)
    try:
        yield ctx
    finally:
        items.pop()
