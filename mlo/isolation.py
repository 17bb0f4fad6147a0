"""Evaluations that leave no trace: module buffers and the RNG state put back.

Implicit and finite-difference hypergradients, :meth:`mlo.Engine.gradient` and the
monitor re-evaluate losses that are not training steps. A forward in training mode
updates buffers in place (BatchNorm running statistics) and draws random numbers
(dropout, random masks); :func:`no_side_effects` restores both, so buffers and random
streams after N iterations are those of the N training steps whatever the method.
"""
from __future__ import annotations

from typing import Iterable

import torch

__all__ = ["rng_state", "set_rng_state", "no_side_effects"]


def rng_state():
    """The global CPU (and initialised CUDA) RNG state."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def set_rng_state(state) -> None:
    # (torch.manual_seed would also seed lazily-initialised accelerators: a costly call.)
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


class no_side_effects:
    """Restores the module buffers of ``problems`` (and the RNG state ``rng``) on exit.

    A re-evaluated loss may run any problem's module in training mode, whose
    forward updates buffers in place (BatchNorm running statistics); buffers
    reassigned instead of updated are put back as well. The values are written
    through ``.data``, like the BatchNorm kernel's own update, which does not bump
    the version counter either: a graph still pending that saved a buffer
    (BatchNorm in eval mode inside an unrolled window) stays valid and sees the
    values it saved.

    (A plain context-manager class: it is entered on every implicit and
    finite-difference VJP.)
    """

    __slots__ = ("problems", "saved", "rng")

    def __init__(self, problems: Iterable, rng=None):
        self.problems, self.rng, self.saved = problems, rng, []

    def __enter__(self):
        saved, seen = self.saved, set()
        for P in self.problems:
            for mod in P.module.modules():
                for k, b in mod.named_buffers(recurse=False):
                    if (id(mod), k) not in seen:
                        seen.add((id(mod), k))
                        saved.append((mod, k, b, b.detach().clone()))
        return None

    def __exit__(self, *exc) -> bool:
        if self.saved:
            with torch.no_grad():
                for mod, k, b, copy in self.saved:
                    b.data.copy_(copy)
                    if getattr(mod, k, None) is not b:
                        setattr(mod, k, b)      # (a registered buffer's name: stays a buffer)
        if self.rng is not None:
            set_rng_state(self.rng)
        return False
