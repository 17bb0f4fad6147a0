"""Where a non-finite hypergradient came from.

An implicit or finite-difference best response re-evaluates a lower problem's loss
(at its current iterate for CG and Neumann, at ``θ ± εv`` for finite differences) and
differentiates it. When that loss is NaN or infinite at one of those points, or its
derivatives overflow, the hypergradient of the problem above goes non-finite, and
the guard (:func:`mlo.guard.describe_nonfinite`) would name only that upper. This
module remembers, between :func:`mlo.hypergrad.best_response_vjp` and the guard,
which lower's evaluation was to blame.

The good path pays nothing: each best response leaves a trace (a closure over what it
computed) that the guard runs only when the update it fed is non-finite, in the order
the best responses ran and before anything steps. A trace checks the vectors its method
returned (:func:`all_finite`: one host read); only when those are not finite is the
method run once more with a loss that records every evaluation
(:func:`replay_description`), to say which evaluation returned what.

What is remembered (:func:`found`) is keyed by the *source* problem the vector was
for: ``origins[source][lower]``. A best response whose input vector was already
non-finite is not the origin: it hands on what was noted for its own problem (the
levels below it) to its sources, so a NaN three levels down reaches the top. Each
best response that returned finite vectors forgets what was noted for it, the guard
takes (:func:`take`) what was noted for the problem it checks, and the rest is
cleared (:func:`clear`).

Not covered: an unrolled window's best response re-evaluates no loss (a NaN there
comes from the window's own steps, which the lower's guard checks at each step), and
it hands nothing on.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["Origin", "all_finite", "forget", "found", "take", "clear", "replay_description", "describe"]


@dataclass(frozen=True)
class Origin:
    """One lower whose evaluation inside a best response went non-finite.

    Attributes:
        lower: the problem whose loss was re-evaluated; method: by which method.
        what: what happened (``"returned nan at its current iterate θ (evaluation 1 of 1)"``).
        graph: the engine's graph (for the paths of the problem above).
    """

    lower: str
    method: str
    what: str
    graph: Any


# {source problem: {lower name: [Origin, ...]}}; weak keys: nothing outlives an engine.
_ORIGINS: "weakref.WeakKeyDictionary[Any, Dict[str, List[Origin]]]" = weakref.WeakKeyDictionary()


def all_finite(tensors: Sequence[Optional[Tensor]]) -> bool:
    """Whether every tensor (``None`` skipped) is finite: one host read.

    The sum of all elements, accumulated in float64, is finite exactly when every
    element is (a float64 sum of finite float32/bf16 values cannot overflow; float64
    values would need magnitudes near 1e308): a reduction per tensor and one read,
    the fewest operations that answer (a third of ``isfinite(t).all()``'s cost on a
    small upper)."""
    total = None
    for t in tensors:
        if t is not None:
            s = t.detach().sum(dtype=torch.float64)
            total = s if total is None else total + s
    return total is None or math.isfinite(total.item())


def forget(problems: Dict[str, Any], lower: str, sources: Sequence[str]) -> None:
    """``lower``'s best response returned finite vectors for every source (the good
    path: a dictionary look-up only when something was ever noted)."""
    if _ORIGINS:
        for s in sources:
            _forget(problems[s], lower)


def found(problems: Dict[str, Any], graph: Any, lower: str, method: str, v: Sequence[Tensor],
          out: Dict[str, Dict[str, Tensor]], describe_run: Callable[[], str]) -> None:
    """``lower``'s best response returned non-finite vectors (``out``: per source).

    When its input ``v`` was finite it is the origin: ``describe_run()`` (a replay of
    the method) says what happened. Otherwise what was noted for ``lower`` (the levels
    below it) is handed on, or, when nothing was, that ``v`` came in non-finite."""
    bad = [s for s, vec in out.items() if vec and not all_finite(list(vec.values()))]
    for s in out:
        if s not in bad:
            _forget(problems[s], lower)
    if not bad:
        return
    if all_finite(v):
        try:
            what = describe_run()
        except Exception as e:     # the replay is a report: it never replaces the guard's error
            what = f"went non-finite (replaying {method} to say where raised {type(e).__name__}: {e})"
        origins = [Origin(lower, method, what, graph)]
    else:
        origins = [o for lst in _ORIGINS.pop(problems[lower], {}).values() for o in lst] or [
            Origin(lower, method, "was not to blame: the vector v its best response was applied "
                                  "to was already non-finite", graph)]
    for s in bad:
        _ORIGINS.setdefault(problems[s], {})[lower] = origins


def _forget(problem: Any, lower: str) -> None:
    entry = _ORIGINS.get(problem)
    if entry is not None:
        entry.pop(lower, None)
        if not entry:
            _ORIGINS.pop(problem, None)


def take(problem: Any) -> List[Origin]:
    """The origins noted for ``problem``'s hypergradient (forgotten once taken)."""
    out: List[Origin] = []
    for lst in _ORIGINS.pop(problem, {}).values():
        out.extend(o for o in lst if o not in out)
    return out


def clear(problems) -> None:
    """Forgets everything noted for ``problems`` (after the guard took what it needed:
    nothing noted in one update outlives it)."""
    if _ORIGINS:
        for P in problems:
            _ORIGINS.pop(P, None)


def describe(origin: Origin, upper: str) -> str:
    """``origin`` in words, for the hypergradient of ``upper``."""
    paths = [p for p in origin.graph.paths(upper) if origin.lower in p[1:-1]]
    via = "; ".join(" -> ".join(p) for p in paths)
    return (f"problem {origin.lower!r}'s loss evaluated by {origin.method} for the hypergradient of "
            f"{upper!r}{f' (path {via})' if via else ''} {origin.what}")


# ------------------------------------------------------------- the replay
class _Recorder:
    """A loss function that records its evaluations: the first non-finite one (its
    value, the point) and how many there were."""

    def __init__(self, loss_fn: Callable):
        self.loss_fn, self.count, self.first = loss_fn, 0, None

    def __call__(self, ps, xs):
        loss = self.loss_fn(ps, xs)
        self.count += 1
        if self.first is None:
            value = float(loss.detach())
            if not math.isfinite(value):
                self.first = (self.count, value, tuple(p.detach() for p in ps))
        return loss


def replay_description(loss_fn: Callable, params: Sequence[Tensor], v: Sequence[Tensor],
                       rerun: Callable[[Callable], Sequence[Optional[Tensor]]],
                       second_order: bool, method: str) -> str:
    """Runs the method again (``rerun(recording_loss_fn)`` returns its vectors) and says
    which evaluation of the loss went non-finite, or that every one was finite and the
    derivatives were not."""
    rec = _Recorder(loss_fn)
    again = rerun(rec)
    if rec.first is None:
        takes = ("Hessian-vector products and mixed second derivatives" if second_order
                 else "gradients at those points")
        what = (f"returned a finite loss ({rec.count} evaluation{'s' if rec.count != 1 else ''}), "
                f"but the {takes} {method} takes of it were not finite")
    else:
        k, value, point = rec.first
        what = f"returned {value} {_where(point, params, v)} (evaluation {k} of {rec.count})"
    if all_finite(again):
        what += " (not reproduced when evaluated once more)"
    return what


def _where(point: Sequence[Tensor], params: Sequence[Tensor], v: Sequence[Tensor]) -> str:
    """``"at its current iterate θ"`` or ``"at the perturbed iterate θ + δ (...)"``."""
    with torch.no_grad():
        d = [a.double() - b.double() for a, b in zip(point, params)]
        if not any(bool(t.any()) for t in d):
            return "at its current iterate θ"
        norm = math.sqrt(sum(float((t * t).sum()) for t in d))
        along = sum(float((t * w.detach().double()).sum()) for t, w in zip(d, v))
    sign = "+" if along > 0 else "−" if along < 0 else "±"
    return f"at the perturbed iterate θ {sign} δ (‖δ‖ = {norm:.3g}, δ along the vector v)"
