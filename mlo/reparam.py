"""Running a module with other tensors in place of its parameters, cheaply.

``torch.func.functional_call`` looks every name up, checks and swaps through its
accessor on each call (~6–11 µs on a ``Linear``, a third of the call at the sizes the
engine's overhead benchmark uses, and it runs on every loss evaluation). A problem's
set of variables never changes, so :class:`Slots` resolves each name to its
``(owner._parameters, leaf)`` slot once and swaps by dictionary assignment — the
same substitution ``functional_call`` makes, restored in ``finally``.

It is used only where it is exactly ``functional_call``: every name a plain
parameter slot (no tied weights, no ``torch.nn.utils.parametrize``), and every slot
still holding the parameter it held when resolved (checked on each call; a module
edited since, or already swapped by an enclosing call, takes ``functional_call``).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.utils import parametrize

__all__ = ["Slots"]


class _Method(nn.Module):
    """Runs ``module.<method>`` as ``forward``, so ``functional_call`` can run any method."""

    def __init__(self, module: nn.Module, method: str):
        super().__init__()
        self.m = module
        self.method = method

    def forward(self, *args, **kwargs):
        return getattr(self.m, self.method)(*args, **kwargs)


class Slots:
    """The parameter slots of ``module`` under ``names`` (which hold ``tensors``)."""

    def __init__(self, module: nn.Module, names: Sequence[str], tensors: Sequence[Tensor], tied: bool):
        self.module, self.names, self.tied = module, list(names), tied
        self._slots: Optional[List[Tuple[Dict[str, Any], str, Tensor]]] = None
        if tied or any(parametrize.is_parametrized(m) for m in module.modules()):
            return
        slots = []
        for name, t in zip(names, tensors):
            owner = module
            *path, leaf = name.split(".")
            for part in path:
                owner = getattr(owner, part, None)
                if not isinstance(owner, nn.Module):
                    return
            if owner._parameters.get(leaf) is not t:
                return
            slots.append((owner._parameters, leaf, t))
        self._slots = slots

    def run(self, fn: Callable, state: Mapping[str, Tensor], args: tuple, kwargs: dict,
            method: Optional[str] = None):
        """``fn(*args, **kwargs)`` with ``state[name]`` in each parameter slot; ``fn`` is
        the module or, with ``method``, its bound method of that name."""
        slots = self._slots
        if slots is not None and all(d.get(leaf) is t for d, leaf, t in slots):
            try:
                for (d, leaf, _), name in zip(slots, self.names):
                    d[leaf] = state[name]
                return fn(*args, **kwargs)
            finally:
                for d, leaf, t in slots:
                    d[leaf] = t
        if method is None:
            return functional_call(self.module, dict(state), args, kwargs, tie_weights=self.tied)
        # functional_call runs forward only: a wrapper whose forward is the method
        return functional_call(_Method(self.module, method), {"m." + k: v for k, v in state.items()},
                               args, kwargs, strict=False, tie_weights=self.tied)
