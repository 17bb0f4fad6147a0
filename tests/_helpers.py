"""Small helpers shared by the engine tests (imported as ``from _helpers import ...``)."""
from __future__ import annotations

import torch

import mlo

__all__ = ["rel", "recording", "RecSGD", "Vars", "chain_levels"]


def rel(a, b) -> float:
    """Relative L2 error ``‖a − b‖ / ‖b‖``."""
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def recording(base):
    """A ``torch.optim`` subclass recording every gradient it applies (all params, in order)."""

    class Recording(base):
        def __init__(self, params, **kw):
            super().__init__(params, **kw)
            self.record = []

        def step(self, closure=None):
            self.record.append([p.grad.detach().clone() for g in self.param_groups for p in g["params"]])
            return super().step(closure)

    Recording.__name__ = f"Recording{base.__name__}"
    return Recording


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


def chain_levels(d, mid, bot, lr_m, lr_b, unroll_m, unroll_b):
    """The two quadratic lower levels of the chain ``T -u2l-> M -u2l-> B``::

        M: ½ μᵀSμ − μᵀKλ   (reads T),      B: ½ θᵀRθ − θᵀBμ   (reads M)

    ``mid``/``bot`` are ``(method, options)``; wire ``M.T``, ``B.M`` (and ``T.B``) after.
    """
    M = Vars("M", {"mu": d["mu0"]},
             lambda s: 0.5 * s.params["mu"] @ d["S"] @ s.params["mu"] - s.params["mu"] @ (d["K"] @ s.T.params["lam"]),
             optimizer_kwargs={"lr": lr_m},
             config=mlo.ProblemConfig(method=mid[0], method_options=dict(mid[1]), unroll_steps=unroll_m))
    B = Vars("B", {"th": d["th0"]},
             lambda s: 0.5 * s.params["th"] @ d["R"] @ s.params["th"] - s.params["th"] @ (d["B"] @ s.M.params["mu"]),
             optimizer_kwargs={"lr": lr_b},
             config=mlo.ProblemConfig(method=bot[0], method_options=dict(bot[1]), unroll_steps=unroll_b))
    return M, B
