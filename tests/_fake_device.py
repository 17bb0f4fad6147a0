"""A simulated accelerator for CPU-only machines: catches tensors created on the host
while a function's inputs live on another device (the bug that crashes a CUDA run).

``OnDevice`` wraps a CPU tensor and reports the ``meta`` device: every operation on it
runs on the wrapped CPU data and returns ``OnDevice`` tensors, so code that follows its
inputs' device (``torch.zeros(..., device=x.device)``, ``torch.zeros_like(x)``,
``x.new_zeros(...)``, ``t.to(x.device)``) computes real numbers, while an operation that
mixes an ``OnDevice`` tensor with a plain (host) tensor of one or more dimensions raises
``RuntimeError("... host tensor ... mixed with device tensors")`` — what CUDA does for
a CPU tensor next to a CUDA one (0-dim host tensors are allowed there too). Host reads
(``.item()``, ``float(t)``, ``.tolist()``) work, as they do on a GPU, and so do host
index tensors in advanced indexing (``x[idx]``, ``x[idx] = v``), which CUDA accepts.
A CPU ``torch.Generator`` for a random draw on the device raises, as CUDA does;
``device_tensor.copy_(host_tensor)`` is a transfer and allowed. A ``torch.distributed``
collective on an ``OnDevice`` tensor raises: no backend takes this device, as NCCL
takes no CPU tensor (collectives must copy through ``collective_device``).

Inside ``with fake_device():`` a factory call or ``.to()`` that names the ``meta``
device (``FAKE``) makes an ``OnDevice`` tensor instead of a data-less meta tensor;
``nn.Module.to(FAKE)`` moves a module (it gets new ``Parameter`` objects: build
optimizers afterwards). ``t.cpu()`` / ``t.to("cpu")`` returns a plain tensor (not
differentiable through that transfer).
"""
from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

__all__ = ["FAKE", "OnDevice", "fake_device", "to_fake", "host"]

FAKE = torch.device("meta")


def _is_fake(d) -> bool:
    return isinstance(d, (str, torch.device)) and torch.device(d).type == "meta"


def _check_generator(x, func) -> None:
    """A host generator for device output: CUDA refuses it, so do we."""
    if isinstance(x, torch.Generator) and x.device.type == "cpu":
        raise RuntimeError(f"{func}: Expected a device generator for device output but found "
                           f"a 'cpu' generator")


_INDEXING = (torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default, torch.ops.aten.index_put_.default,
             torch.ops.aten._index_put_impl_.default)
_COPIES = (torch.ops.aten.copy_.default, torch.ops.aten.copy.default)   # cross-device copies


class OnDevice(torch.Tensor):
    """A CPU tensor posing as a tensor on the ``meta`` device (module docstring)."""

    @staticmethod
    def __new__(cls, data: torch.Tensor):
        assert type(data) is torch.Tensor and data.device.type == "cpu", type(data)
        r = torch.Tensor._make_wrapper_subclass(
            cls, data.shape, strides=data.stride(), storage_offset=data.storage_offset(),
            dtype=data.dtype, device=FAKE, requires_grad=data.requires_grad, layout=data.layout)
        r._data = data
        return r

    def __repr__(self, **kwargs):   # noqa: D105
        return f"OnDevice({self._data!r})"

    def tolist(self):   # noqa: D102
        return self._data.tolist()

    def numpy(self, **kwargs):   # noqa: D102
        raise TypeError("can't convert a (fake) device tensor to numpy: use .cpu() first")

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "c10d":
            raise RuntimeError(f"{func}: a collective on a tensor of the simulated device, which "
                               f"no process group backend takes (as NCCL takes no CPU tensor)")

        def unwrap(x, index=False):
            _check_generator(x, func)
            if isinstance(x, OnDevice):
                return x._data
            if isinstance(x, torch.Tensor) and x.dim() > 0 and not index:
                raise RuntimeError(f"{func}: a host tensor of shape {tuple(x.shape)} mixed with "
                                   f"device tensors (Expected all tensors to be on the same device)")
            if _is_fake(x):
                return torch.device("cpu")
            return x

        if func in _INDEXING:      # CUDA accepts host index tensors in advanced indexing
            args = (unwrap(args[0]), tree_map(lambda x: unwrap(x, True), args[1])) + \
                tuple(tree_map(unwrap, args[2:]))
            out = func(*args, **tree_map(unwrap, kwargs))
        elif func in _COPIES:      # device.copy_(host) is a transfer, allowed
            out = func(*tree_map(lambda x: unwrap(x, True), args), **tree_map(unwrap, kwargs))
        else:
            out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))
        if func is torch.ops.aten._to_copy.default and kwargs.get("device") is not None \
                and torch.device(kwargs["device"]).type == "cpu":
            return out          # to the host: a plain tensor
        schema = func._schema.arguments
        if schema and schema[0].alias_info is not None and schema[0].alias_info.is_write:
            return args[0]      # in place (add_, copy_, ...): the tensor it was called on
        return tree_map(lambda x: OnDevice(x) if type(x) is torch.Tensor else x, out)


def to_fake(t: torch.Tensor) -> OnDevice:
    """``t`` (a plain CPU tensor) on the fake device, as a leaf with ``t``'s ``requires_grad``."""
    return OnDevice(t.detach()).requires_grad_(t.requires_grad)


def host(t: torch.Tensor) -> torch.Tensor:
    """The plain CPU tensor behind ``t`` (``t`` itself when it is plain)."""
    return t._data if isinstance(t, OnDevice) else t


class _Mode(TorchDispatchMode):
    """Below autograd: an operation naming the fake device with no :class:`OnDevice`
    input (a factory, ``scalar_tensor``, a host tensor's ``.to(FAKE)``) runs on the CPU
    and its result is wrapped (differentiable, as the real transfer)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_fake(kwargs.get("device")):
            _check_generator(kwargs.get("generator"), func)
        if _is_fake(kwargs.get("device")) and not any(
                isinstance(x, OnDevice) for x in tree_leaves((args, kwargs))):
            out = func(*args, **dict(kwargs, device=torch.device("cpu")))
            return tree_map(lambda x: OnDevice(x) if type(x) is torch.Tensor else x, out)
        return func(*args, **kwargs)


class _FromData(TorchFunctionMode):
    """``torch.tensor(data, device=FAKE)`` / ``torch.as_tensor``: built from Python data
    below the dispatcher (no aten factory to intercept), so caught here."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.tensor, torch.as_tensor) and _is_fake(kwargs.get("device")):
            grad = bool(kwargs.get("requires_grad", False))
            out = func(*args, **dict(kwargs, device="cpu", requires_grad=False))
            return to_fake(out).requires_grad_(grad)
        return func(*args, **kwargs)


@contextlib.contextmanager
def fake_device():
    """Factory calls and ``.to()`` naming ``FAKE`` make :class:`OnDevice` tensors inside."""
    with _FromData(), _Mode():
        yield FAKE
