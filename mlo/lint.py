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

The reads that count are those of the loss itself *and* those already recorded in the
problem's open window: a :class:`mlo.WindowProblem` reads the problem above in
``init_window`` (a MAML task's fast weights start from the meta-parameters) and its loss
then only uses its own iterates, which carry that read's graph. A connection through
either is a real one; a window that starts from a detached copy is still reported.

The same first evaluation runs a second check, :func:`check_hyperparameters`: optimizer
hyperparameters learned from other problems' variables (``optimizer_hyperparameters()``,
e.g. a learnable learning rate) on a problem whose method does not step through a window
(CG, Neumann, finite differences, SAMA). Such a method evaluates the best response's
derivative at the current iterate, where a fixed point does not depend on the step size,
and the engine applies the hyperparameters as plain numbers: their hypergradient is
exactly zero at every update. One ``RuntimeWarning`` names the problem, the
hyperparameters, where they come from and the window methods that do differentiate
through them.
"""
from __future__ import annotations

import warnings
from typing import Any, Dict, Iterator, List, Mapping, Set

import torch
from torch import Tensor

import engines.base as methods

from .problem import Problem

__all__ = ["check_reads", "check_hyperparameters"]


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


def _all_reads(reads: List, window_reads: List) -> List:
    """The reads ``P``'s loss may depend on: this evaluation's (``reads``) and those
    recorded in ``P``'s open window (``window_reads``) — a per-window problem's
    ``init_window`` and the window's earlier steps, whose graphs the current iterates carry."""
    seen = {id(r) for r in reads}
    return list(reads) + [r for r in window_reads if id(r) not in seen]


def check_reads(graph, problems: Mapping[str, Problem], P: Problem, loss: Tensor, reads: List,
                window_reads: List = ()) -> None:
    """Warns once per declared edge into ``P`` whose read left no autograd connection
    (the caller checks each problem once: ``RunState.linted``); also runs
    :func:`check_hyperparameters` on ``P``. ``window_reads``: the reads recorded in ``P``'s
    open window before this evaluation."""
    check_hyperparameters(problems, P)
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
        of_s = [r for r in _all_reads(reads, window_reads) if r.source == s]
        if any(r.live for r in of_s):
            continue    # exact nesting: the live iterates (maybe the real parameters) on purpose
        aliases = [a for r in of_s for a in r.alias.values() if isinstance(a, Tensor)]
        raw = any(id(p) in leaves and id(p) not in mine for p in S.variables)
        if raw:
            cause = f"it uses the real parameters of {s!r} directly (e.g. {s}.module.<name>)"
        elif not of_s:
            if hp:     # the read may be in optimizer_hyperparameters()
                continue
            cause = f"it never reads {s!r}"
        elif not any(a.requires_grad and id(a) in leaves for a in aliases):
            if not any(a.requires_grad for a in aliases):
                continue   # not differentiable here: nothing to check
            where = "" if any(r.source == s for r in reads) else \
                " (in init_window)" if getattr(P, "per_window", False) else " (in an earlier step)"
            cause = (f"it reads {s!r}{where} but drops the graph (.item(), .detach(), "
                     f"torch.no_grad()?)")
        else:
            continue
        warnings.warn(
            f"graph lint: problem {P.name!r} declares that it reads {s!r} ({edge}) but its loss "
            f"has no autograd connection to {s!r}'s variables: {cause}, so the hypergradient of "
            f"{up!r} through {lo!r} is silently zero. Read it through the problem: {s}.params[...] "
            f"/ {s}(x) / {s}.call(...)", RuntimeWarning, stacklevel=5)


# ---------------------------------------------------------------- learned hyperparameters
def _tensors(value: Any) -> Iterator[Tensor]:
    """The tensors in one ``optimizer_hyperparameters()`` value (a tensor, a number, a
    tuple such as ``betas``, or a list with one entry per parameter group)."""
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)


def learned_from(problems: Mapping[str, Problem], P: Problem) -> Dict[str, List[str]]:
    """``{hyperparameter: [problems whose variables it is computed from]}`` for ``P``'s
    ``optimizer_hyperparameters()``, evaluated once outside any loss (each other problem's
    current state, as :attr:`Problem.params` gives it there); ``{}`` when ``P`` does not
    override it, or when it cannot be evaluated here (the update that applies it then
    reports what is wrong)."""
    if type(P).optimizer_hyperparameters is Problem.optimizer_hyperparameters:
        return {}
    try:
        with torch.enable_grad():
            hp = P.optimizer_hyperparameters() or {}
    except Exception:      # (e.g. a per-window upper with no window open now)
        return {}
    if not isinstance(hp, Mapping):
        return {}
    owners = {}
    for name, S in problems.items():
        if S is not P:
            for t in S.variables:
                owners[id(t)] = name
    out: Dict[str, List[str]] = {}
    for key, value in hp.items():
        leaves: Set[int] = set()
        for t in _tensors(value):
            if t.requires_grad:
                leaves |= {id(t)} if t.grad_fn is None else _leaves(t)
        sources = sorted({owners[i] for i in leaves if i in owners}, key=list(problems).index)
        if sources:
            out[str(key)] = sources
    return out


def check_hyperparameters(problems: Mapping[str, Problem], P: Problem) -> None:
    """Warns (``RuntimeWarning``, once: the caller checks each problem once) when ``P``
    learns optimizer hyperparameters from other problems' variables but its method does
    not step through a window, so their hypergradient is exactly zero."""
    method = P.config.method
    try:
        if methods.info(method).window:
            return
    except KeyError:
        return              # (an unknown method is refused where the engine is built)
    learned = learned_from(problems, P)
    if not learned:
        return
    keys = sorted(learned)
    sources = sorted({s for k in keys for s in learned[k]}, key=list(problems).index)
    windowed = [n for n in methods.available() if methods.info(n).window]
    detail = ", ".join(f"{k!r} from {', '.join(map(repr, learned[k]))}" for k in keys)
    warnings.warn(
        f"graph lint: problem {P.name!r} learns optimizer hyperparameter(s) {detail} "
        f"(optimizer_hyperparameters()), but its method {method!r} does not differentiate "
        f"through optimizer steps: the hypergradient of {', '.join(map(repr, sources))} through "
        f"{', '.join(map(repr, keys))} is exactly 0 at every update (implicit and finite-difference "
        f"methods evaluate at the current iterate, and a fixed point does not depend on the step "
        f"size; the steps apply these values as plain numbers). Only {' / '.join(map(repr, windowed))} "
        f"differentiates through optimizer hyperparameters: give {P.name!r} method="
        f"{windowed[0]!r}, or make these hyperparameters constants", RuntimeWarning, stacklevel=6)
