"""Per-path reports through consumed windows: a named error instead of silent zeros.

An unrolled problem's window holds its differentiable steps since a problem above it
last became ready; that readiness consumes the window (it is closed at the end of the
iteration, the iterates written into the module). Until the problem steps again no
window is open, and the path term of every hypergradient path through it is exactly 0
*at the current state*: the next window starts from the current iterate, which does not
depend on the variables above (docs/design.md#unrolled).

Right after an upper's update, ``engine.gradient(upper, by_path=True)`` therefore gave
all-zero paths — correct for the current state, but not what a user asking for "the
paths" means (they mean the ones the update just applied). :func:`check_paths_live`
turns that case into a :class:`WindowsConsumedError` that says what happened and where
the applied hypergradient is (``engine.last_hypergradient``).

It is raised only when *every* path of the problem is cut this way (an all-zero
breakdown). A breakdown in which some paths survive — e.g. one lower unrolled and one
implicit, or a window closed by another problem's readiness while other paths stay
open — keeps its zero entries for the cut paths, as ``engine.gradient`` documents. A
window that was never opened (the lower has not stepped yet) is not consumed: its
paths are zeros and no error is raised. With ``method=`` (a reference method evaluated
at the current iterate) nothing is checked.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

__all__ = ["WindowsConsumedError", "cut_paths", "check_paths_live"]


class WindowsConsumedError(RuntimeError):
    """``engine.gradient(name, by_path=True)`` when every path of ``name`` runs through a
    window that was consumed and has taken no step since (see the module)."""


def _consumed(view: Any, node: str) -> bool:
    """Whether ``node`` steps through windows, has none open, and has stepped before
    (so its last window was consumed, not never opened)."""
    return view.windowed(node) and view.window(node) is None and view.problems[node].step_count > 0


def cut_paths(view: Any, name: str) -> Dict[Tuple[str, ...], List[str]]:
    """``{path: [problems on it whose window was consumed]}`` for every path of ``name``
    that runs through a consumed window (``view``: the engine's updater, a
    :class:`mlo.hypergrad.HypergradView` with ``problems``)."""
    out: Dict[Tuple[str, ...], List[str]] = {}
    for path in view.graph.paths(name):
        cut = [n for n in path[1:-1] if _consumed(view, n)]
        if cut:
            out[tuple(path)] = cut
    return out


def _path_text(path) -> str:
    return " -> ".join(path)


def check_paths_live(view: Any, name: str, by_path: bool, method: Optional[tuple] = None) -> None:
    """Raises :class:`WindowsConsumedError` when a per-path report of ``name``
    (``by_path`` without a ``method`` override) would be all zeros because every path
    runs through a consumed window; returns otherwise.

    Called by ``Updater.report`` (``engine.gradient``) before it evaluates anything.
    """
    if not by_path or method is not None:
        return
    paths = view.graph.paths(name)
    if not paths:
        return
    cut = cut_paths(view, name)
    if len(cut) < len(paths):
        return
    closed = sorted({n for ns in cut.values() for n in ns}, key=list(view.problems).index)
    listing = "; ".join(f"{_path_text(p)} (through {', '.join(map(repr, ns))})" for p, ns in cut.items())
    raise WindowsConsumedError(
        f"engine.gradient({name!r}, by_path=True): every hypergradient path of {name!r} runs "
        f"through an unrolled window that the last update consumed — {listing} — and "
        f"{', '.join(map(repr, closed))} took no step since, so at the current state each path "
        f"is exactly 0 (the next window starts from the current iterate). The hypergradient the "
        f"last update of {name!r} applied is engine.last_hypergradient[{name!r}]. For a per-path "
        f"breakdown, call gradient({name!r}, by_path=True) while the windows are open (after the "
        f"lower steps, before {name!r} becomes ready), or pass method=('cg', {{...}}) to evaluate "
        f"every path at the current iterate")
