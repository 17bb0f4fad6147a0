"""Graph lint: a declared dependency that carries no gradient.

A problem that reads another one's variables must read them through the engine —
``upper.params[...]``, ``upper(x)`` or ``upper.call(...)`` — so that the engine can
hand over the current state and route the hypergradient back. A loss that uses the
other problem's raw tensors (``upper.module.weight``, ``upper.own_state()``), never
reads the declared problem, or reads it but does not depend on the values
(``.item()``, ``.detach()``) runs fine — and the hypergradient along that edge is
silently exactly zero.

At each problem's first loss evaluation by the engine, :func:`check_reads` looks at
the loss's autograd graph once for every problem it declares to read (its
``u2l`` uppers and ``l2u`` lowers) and warns (``RuntimeWarning``) once per such edge
that has no autograd connection, naming both problems, the likely cause and the
fix. For that first evaluation every read of another problem is made differentiable
(the engine's reads do so while the reader is not yet in ``RunState.linted``), so the
check sees the connection whatever the method.
"""
from __future__ import annotations

import warnings
from typing import List, Mapping, Set

from torch import Tensor

from .problem import Problem

__all__ = ["check_reads"]


def _leaves(loss: Tensor) -> Set[int]:
    """``id`` of every leaf tensor ``loss`` depends on (a walk of its autograd graph)."""
    out: Set[int] = set()
    seen, todo = set(), [loss.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        v = getattr(fn, "variable", None)     # AccumulateGrad: a leaf
        if v is not None:
            out.add(id(v))
        todo.extend(f for f, _ in fn.next_functions)
    return out


def check_reads(graph, problems: Mapping[str, Problem], P: Problem, loss: Tensor, reads: List) -> None:
    """Warns once per declared edge into ``P`` whose read left no autograd connection
    (the caller checks each problem once: ``RunState.linted``)."""
    g = graph
    if not g.reads[P.name] or loss.grad_fn is None:
        return
    leaves = _leaves(loss)
    mine = {id(p) for p in P.variables}
    # a read made in optimizer_hyperparameters() (e.g. a learnable lr) is not in the loss
    hp = type(P).optimizer_hyperparameters is not Problem.optimizer_hyperparameters
    for s in sorted(g.reads[P.name], key=g.names.index):
        S = problems[s]
        up, lo = (s, P.name) if P.name in g.u2l[s] else (P.name, s)
        edge = f"u2l {{{s!r}: [{P.name!r}]}}" if P.name in g.u2l[s] else f"l2u {{{s!r}: [{P.name!r}]}}"
        read = next((r for r in reads if r.source == s), None)
        if read is not None and read.live:
            continue    # exact nesting: the live iterates (maybe the real parameters) on purpose
        raw = any(id(p) in leaves and id(p) not in mine for p in S.variables)
        if raw:
            cause = f"it uses the real parameters of {s!r} directly (e.g. {s}.module.<name>)"
        elif read is None:
            if hp:     # the read may be in optimizer_hyperparameters()
                continue
            cause = f"it never reads {s!r}"
        elif not any(a.requires_grad and id(a) in leaves for a in read.alias.values()):
            if not any(a.requires_grad for a in read.alias.values()):
                continue   # not differentiable here: nothing to check
            cause = f"it reads {s!r} but drops the graph (.item(), .detach(), torch.no_grad()?)"
        else:
            continue
        warnings.warn(
            f"graph lint: problem {P.name!r} declares that it reads {s!r} ({edge}) but its loss "
            f"has no autograd connection to {s!r}'s variables: {cause}, so the hypergradient of "
            f"{up!r} through {lo!r} is silently zero. Read it through the problem: {s}.params[...] "
            f"/ {s}(x) / {s}.call(...)", RuntimeWarning, stacklevel=5)
