"""Double-differentiable kernels, and errors that name the problem when a loss has none.

Methods that differentiate a gradient of a lower loss (unrolled windows,
Hessian-vector products) evaluate that loss inside :func:`second_order_kernels`;
:class:`naming_second_order_errors` turns torch's "derivative for ... is not
implemented" into an error naming the problem and the way out.
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch

__all__ = ["second_order_kernels", "naming_second_order_errors"]

_B = torch.backends.cuda   # the global SDPA backend switches (they govern CPU kernels too)
_SWITCHES = tuple((getattr(_B, f"{k}_enabled"), getattr(_B, f"enable_{k}"))
                  for k in ("flash_sdp", "mem_efficient_sdp", "cudnn_sdp", "math_sdp")
                  if hasattr(_B, f"{k}_enabled") and hasattr(_B, f"enable_{k}"))


class _MathAttention:
    """Only torch's math SDPA kernel enabled inside; the switches restored on exit.

    Same effect as ``torch.nn.attention.sdpa_kernel([SDPBackend.MATH])`` for the flash,
    memory-efficient, cuDNN and math kernels, and cheaper to enter (a hot path: every
    differentiable step of an unrolled window).
    """

    __slots__ = ("saved",)

    def __enter__(self):
        self.saved = [get() for get, _ in _SWITCHES]
        for i, (_, put) in enumerate(_SWITCHES):
            put(i == len(_SWITCHES) - 1)          # math (the last switch) on, the fused kernels off
        return self

    def __exit__(self, *exc):
        for (_, put), was in zip(_SWITCHES, self.saved):
            put(was)
        return False


def second_order_kernels(enabled: bool = True):
    """Context in which losses are evaluated with double-differentiable kernels.

    Fused scaled-dot-product attention kernels have no double backward (on CPU with
    torch 2.13: "derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward
    is not implemented"); methods that differentiate a gradient of the lower loss
    (unrolled windows, Hessian-vector products) evaluate it with torch's math
    attention backend instead — same values, any order of derivatives.
    """
    if not enabled or len(_SWITCHES) < 4:
        return contextlib.nullcontext()
    return _MathAttention()


class naming_second_order_errors:
    """Turns torch's "derivative for ... is not implemented" into an error that names
    the problem(s) whose loss was differentiated twice and the way out (a plain
    context-manager class: entered on every VJP and fused top update)."""

    __slots__ = ("names", "methods")

    def __init__(self, names: Sequence[str], methods: Sequence[str]):
        self.names, self.methods = names, methods

    def __enter__(self):
        return None

    def __exit__(self, typ, e, tb):
        if typ is None or not issubclass(typ, RuntimeError):
            return False
        msg = str(e)
        if "derivative for" in msg and "not implemented" in msg:
            who = ", ".join(f"problem {n!r}: method {m!r}" for n, m in zip(self.names, self.methods))
            raise RuntimeError(
                f"{who} differentiates through the gradient of its loss, but an operation in that "
                f"loss has no second derivative ({msg}). Evaluate that operation with a "
                f"double-differentiable implementation (for attention: attn_impl='math' / "
                f"problems.transformer.math_attention(); mlo already forces torch's math SDPA "
                f"backend), or use method='finite_difference'") from e
        return False
