"""Live hypergradient-quality monitor (``EngineConfig(monitor={...})``).

Every ``every`` updates of a problem ``U`` with hypergradient paths, right before
the update, its hypergradient is recomputed at the same state — the same batches,
the lower problems at their current iterates — with a *reference* method (default
CG to ``tol=1e-10``) on every problem of ``U``'s paths; after the update it is
compared with the hypergradient the update applied (``engine.last_hypergradient``)::

    cosine = <h, h_ref> / (‖h‖ ‖h_ref‖),    rel_error = ‖h − h_ref‖ / ‖h_ref‖

(over all of ``U``'s variables, in float64). With an unrolled method the reference is
taken at the window's last iterate: what a K-step window costs against the implicit
hypergradient at the same point. The recomputation goes through
:meth:`mlo.Engine.gradient`, which restores buffers and the RNG state and consumes no
batch, so the run is the same with or without the monitor.

A reference that is exactly zero (the upper's variables do not reach its lowers'
losses at this point, e.g. through an inactive ReLU) leaves both numbers undefined:
the problem's records hold ``nan``, nothing is printed or logged for that check, and
one ``RuntimeWarning`` per problem says so. A problem whose paths run through a
:class:`mlo.WindowProblem` is refused when the engine is built: a per-window problem
has no iterate outside its window, so its reference would be zero at every check.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["reference_hypergradient", "compare", "is_zero", "warn_zero_reference"]


def reference_hypergradient(gradient: Callable[..., Dict[str, Any]], name: str, method: str,
                            options: dict, batch=None) -> Dict[str, Tensor]:
    """``name``'s hypergradient (sum over paths) at the current state, with ``method``
    on every problem of its paths (open windows at their current iterate).

    ``gradient`` is :meth:`mlo.Engine.gradient` (or anything with its signature)."""
    out = gradient(name, batch=batch, method=(method, dict(options)))
    return out.get("hyper", {})


def _flat(h: Dict[str, Tensor], names: Sequence[str]) -> Tensor:
    """``h``'s tensors over ``names`` as one float64 vector on the CPU."""
    return torch.cat([h[k].detach().double().reshape(-1).cpu() for k in names])


def is_zero(ref: Dict[str, Tensor], names: Sequence[str]) -> bool:
    """Whether the reference ``ref`` is exactly zero over ``names`` (or has none)."""
    return not names or not bool(_flat(ref, names).any())


def warn_zero_reference(name: str, method: str, options: dict, iteration: int) -> None:
    """The one warning for ``name``'s first check against an exactly zero reference."""
    warnings.warn(
        f"mlo monitor: the reference hypergradient of problem {name!r} ({method} {options}) "
        f"is exactly zero at iteration {iteration}, so cosine and relative error are "
        f"undefined; checks against a zero reference are not printed or logged (records "
        f"hold nan) and this is said once. Do {name!r}'s variables reach its lowers' "
        f"losses at the current point?", RuntimeWarning, stacklevel=2)


def compare(h: Dict[str, Tensor], ref: Dict[str, Tensor], names: Sequence[str]) -> Tuple[float, float]:
    """``(cosine, relative error)`` of ``h`` against ``ref`` over ``names``."""
    a, b = _flat(h, names), _flat(ref, names)
    na, nb = float(a.norm()), float(b.norm())
    cos = float(a @ b) / (na * nb) if na > 0 and nb > 0 else float("nan")
    rel = float((a - b).norm()) / nb if nb > 0 else float("nan")
    return cos, rel
