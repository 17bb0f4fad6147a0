"""Unrolled (reverse-mode through K inner steps) hypergradients.

The lower iterate after a window of K differentiable optimizer steps,
``θ_K = U(θ_{K−1}, ∇θ f(θ_{K−1}, x), state_{K−1})`` with ``θ_0`` independent
of ``x``, is a differentiable function of the upper variables. Its exact
vector-Jacobian product is one backward pass through that graph::

    (dθ_K/dx)ᵀ v = Σ_{k<K} (∂θ_{k+1}/∂x)ᵀ (∂θ_K/∂θ_{k+1})ᵀ v

``lower.outputs`` holds ``θ_K`` (built by the caller, e.g. ``mlo``'s
differentiable optimizers); this module only runs the backward. The
first-order variant (first-order MAML) drops the best-response Jacobian and
returns zeros, so only the direct term ``∂F/∂x`` remains.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
from torch import Tensor

from .base import Lower, check_bool, detach_all, fill_unreached, no_inputs_reached, register

__all__ = ["unrolled"]

Tensors = Tuple[Tensor, ...]


def _check(*, first_order: bool = False, create_graph: bool = False) -> None:
    check_bool("unrolled", "first_order", first_order)
    check_bool("unrolled", "create_graph", create_graph)


def _plain_backward(*, first_order: bool = False, create_graph: bool = False) -> bool:
    return not first_order and not create_graph


@register("unrolled", check=_check, window=True, plain_backward=_plain_backward)
def unrolled(lower: Lower, v: Sequence[Tensor], *, first_order: bool = False,
             create_graph: bool = False) -> Tensors:
    """``(dθ_K/dx)ᵀ v`` by backpropagation through the unrolled inner steps.

    The graph of ``lower.outputs`` is retained so several cotangents (or
    several paths of a multilevel graph) can share one unroll.

    Args:
        lower: the lower problem; ``outputs`` must hold ``θ_K`` still attached
            to ``inputs`` by the autograd graph of the K steps.
        v: cotangent on the lower parameters, one tensor per output.
        first_order: return zeros (first-order MAML: ``dθ_K/dx ≈ 0``; ``None``
            under ``lower.unused_as_none``: no input is reached).
        create_graph: keep the graph of the result for higher-order use.

    Returns:
        One tensor per ``lower.inputs`` (zeros — ``None`` under
        ``lower.unused_as_none`` — for inputs the unroll does not depend on);
        detached unless ``create_graph``.

    Raises:
        ValueError: ``lower.outputs`` is missing or does not match ``v``.
    """
    if first_order:
        return no_inputs_reached(lower)
    if lower.outputs is None:
        raise ValueError(
            "the 'unrolled' method needs lower.outputs = θ_K, the lower iterate still "
            "attached to lower.inputs by the graph of differentiable optimizer steps; "
            "got outputs=None (use an implicit or finite-difference method instead, "
            "or unroll with a differentiable optimizer)"
        )
    outputs, v = tuple(lower.outputs), tuple(v)
    if len(outputs) != len(v):
        raise ValueError(f"v has {len(v)} tensors, lower.outputs has {len(outputs)}")
    pairs = [(o, t) for o, t in zip(outputs, v) if o.requires_grad]
    if not pairs:  # nothing connects θ_K to the inputs
        return no_inputs_reached(lower)
    outs, vs = zip(*pairs)
    if not create_graph:
        vs = detach_all(vs)
    grads = torch.autograd.grad(outs, lower.inputs, vs, retain_graph=True,
                                create_graph=create_graph, allow_unused=True)
    out = fill_unreached(lower, grads)
    return out if create_graph else detach_all(out)
