"""Devices and mixed precision for the engine (``EngineConfig(device=..., precision=...)``).

* ``device``: checked when the config is built (:func:`check`: a device this process
  cannot use is a ``ValueError`` naming it and :func:`available_devices`); every
  problem's module is moved there when the engine is built (the
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
from typing import Any, List, Optional

import torch
from torch import Tensor

__all__ = ["PRECISIONS", "available_devices", "check", "compute_dtype", "autocast", "to_device"]

PRECISIONS = ("fp32", "bf16")


def available_devices() -> List[str]:
    """The devices this process can use: ``"cpu"``, then ``"cuda:i"`` for every visible
    GPU, ``"mps"`` and ``"xpu:i"`` when present."""
    out = ["cpu"]
    if torch.cuda.is_available():
        out += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        out.append("mps")
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        out += [f"xpu:{i}" for i in range(xpu.device_count())]
    return out


def _check_device(device: Any) -> None:
    """``ValueError`` naming ``EngineConfig.device`` when this process cannot use it
    (torch would fail later, when the engine moves the modules: for CUDA with a raw
    ``AssertionError: Torch not compiled with CUDA enabled``)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"EngineConfig.device: {e}") from None
    if dev.type in ("cpu", "meta"):
        return
    have = available_devices()
    where = f"EngineConfig.device={device!r}"
    if dev.type == "cuda":
        if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
            raise ValueError(f"{where}: this torch ({torch.__version__}) is built without CUDA; "
                             f"available devices: {have}. Install a CUDA build of torch or use "
                             f"device='cpu' (or None)")
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ValueError(f"{where}: no CUDA device is visible (torch {torch.__version__}, CUDA "
                             f"{torch.version.cuda}; check the driver and CUDA_VISIBLE_DEVICES); "
                             f"available devices: {have}")
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"{where}: there are {n} CUDA device(s) (cuda:0 … cuda:{n - 1}); "
                             f"available devices: {have}")
        return
    module = getattr(torch.backends, dev.type, None) if dev.type == "mps" else getattr(torch, dev.type, None)
    is_available = getattr(module, "is_available", None)
    if callable(is_available) and not is_available():
        raise ValueError(f"{where}: the {dev.type} device is not available in this process; "
                         f"available devices: {have}")


def check(precision: str, device: Any) -> None:
    """Raises ``ValueError`` for an unknown precision, or a device this process cannot
    use (the message names ``EngineConfig.device`` and lists :func:`available_devices`)."""
    if precision == "fp16":
        raise ValueError("EngineConfig.precision='fp16' needs a gradient scaler, which mlo does not "
                         "have yet; use 'bf16' (CPU and recent GPUs) or 'fp32'")
    if precision not in PRECISIONS:
        raise ValueError(f"EngineConfig.precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if device is not None:
        _check_device(device)


def compute_dtype(precision: str) -> Optional[torch.dtype]:
    """The dtype autocast computes a loss in for ``precision`` (``None`` for fp32)."""
    return torch.bfloat16 if precision == "bf16" else None


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
