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
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["reference_hypergradient", "compare"]


def reference_hypergradient(gradient: Callable[..., Dict[str, Any]], name: str, method: str,
                            options: dict, batch=None) -> Dict[str, Tensor]:
    """``name``'s hypergradient (sum over paths) at the current state, with ``method``
    on every problem of its paths (open windows at their current iterate).

    ``gradient`` is :meth:`mlo.Engine.gradient` (or anything with its signature)."""
    out = gradient(name, batch=batch, method=(method, dict(options)))
    return out.get("hyper", {})


def compare(h: Dict[str, Tensor], ref: Dict[str, Tensor], names: Sequence[str]) -> Tuple[float, float]:
    """``(cosine, relative error)`` of ``h`` against ``ref`` over ``names``."""
    a = torch.cat([h[k].detach().double().reshape(-1).cpu() for k in names])
    b = torch.cat([ref[k].detach().double().reshape(-1).cpu() for k in names])
    na, nb = float(a.norm()), float(b.norm())
    cos = float(a @ b) / (na * nb) if na > 0 and nb > 0 else float("nan")
    rel = float((a - b).norm()) / nb if nb > 0 else float("nan")
    return cos, rel
