"""Devices and mixed precision for the engine (``EngineConfig(device=..., precision=...)``).

* ``device``: every problem's module is moved there when the engine is built (the
  ``Parameter`` objects stay the same, so optimizers keep working), and every batch
  (tensors inside tuples, lists and dicts) is moved there before its loss runs.
* ``precision="bf16"``: every loss the engine evaluates — training steps, the lower
  losses that CG / Neumann / finite differences re-evaluate, the steps of unrolled
  windows — runs under ``torch.autocast(device_type, dtype=torch.bfloat16)``. The
  variables stay in their own dtype (float32), so gradients, hypergradients, CG and
  Neumann vectors and finite-difference perturbations are float32 too: autocast only
  lowers the precision of the operations inside the loss (matmuls, linear layers;
  CPU autocast leaves float64 alone). A bf16 loss is returned as float32.
* ``"fp16"`` needs a gradient scaler against underflow, which mlo does not have yet:
  it is rejected. ``"fp32"`` (default): no autocast.
"""
from __future__ import annotations

import contextlib
from typing import Any, Optional

import torch
from torch import Tensor

__all__ = ["PRECISIONS", "check", "autocast", "to_device"]

PRECISIONS = ("fp32", "bf16")


def check(precision: str, device: Any) -> None:
    """Raises ``ValueError`` for an unknown precision or device."""
    if precision == "fp16":
        raise ValueError("EngineConfig.precision='fp16' needs a gradient scaler, which mlo does not "
                         "have yet; use 'bf16' (CPU and recent GPUs) or 'fp32'")
    if precision not in PRECISIONS:
        raise ValueError(f"EngineConfig.precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if device is not None:
        try:
            torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"EngineConfig.device: {e}") from None


def autocast(precision: str, device: Optional[torch.device]):
    """The context every loss runs in (``nullcontext`` for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    kind = device.type if device is not None else "cpu"
    return torch.autocast(kind, dtype=torch.bfloat16)


def to_device(batch: Any, device: Optional[torch.device]) -> Any:
    """``batch`` with every tensor (in tuples, lists, dicts) on ``device``."""
    if device is None:
        return batch
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):   # namedtuple
        return type(batch)(*(to_device(b, device) for b in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch
