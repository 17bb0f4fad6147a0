"""Small helpers shared by the engine tests (imported as ``from _helpers import ...``)."""
from __future__ import annotations

import torch

import mlo

__all__ = ["rel", "RecSGD", "Vars"]


def rel(a, b) -> float:
    """Relative L2 error ``‖a − b‖ / ‖b‖``."""
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


class RecSGD(torch.optim.SGD):
    """``torch.optim.SGD`` recording the gradient it applies (= the engine's total gradient)."""

    def __init__(self, params, **kw):
        super().__init__(params, **kw)
        self.record = []

    def step(self, closure=None):
        self.record.append(self.param_groups[0]["params"][0].grad.detach().clone())
        return super().step(closure)


class Vars(mlo.Problem):
    """Explicit tensors with loss ``loss(self)``; other problems wired as attributes."""

    def __init__(self, name, params, loss, **kw):
        super().__init__(name, params=params, **kw)
        self._loss = loss

    def training_step(self, batch):
        return self._loss(self)
