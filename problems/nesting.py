"""The three-level quadratic where Betty's nesting convention and exact nesting differ.

::

    B (θ):  f_B = ½‖θ − Aμ − λ‖²            reads T and M      θ*(μ, λ) = Aμ + λ
    M (μ):  f_M = ½‖θ − c‖² + ½ρ‖μ‖²         reads B            μ*(λ) = (AᵀA + ρI)⁻¹Aᵀ(c − λ)
    T (λ):  F_T = ½‖μ − m‖²                  reads M (the top)

M reaches T only through B's best response: with ``EngineConfig(nesting="betty")`` T's
hypergradient is exactly 0, with ``nesting="exact"`` it converges to
:func:`closed_form_hypergradient` as the windows grow. Used by ``examples/nesting.py``
and ``benchmarks/exact_nesting.py``.
"""
from __future__ import annotations

from typing import Dict

import torch
from torch import Tensor

import mlo

__all__ = ["DT", "Quadratic", "build", "example_data", "closed_form_hypergradient"]

DT = torch.float64


class Quadratic(mlo.Problem):
    """One explicit variable with a loss given as a function of the problem."""

    def __init__(self, name, variable, value, loss, **kw):
        super().__init__(name, params={variable: value}, **kw)
        self.loss = loss

    def training_step(self, batch):
        return self.loss(self)


def build(P: Dict[str, Tensor], K: int, nesting: str, rho: float = 0.3, eta_b: float = 0.7,
          eta_m: float = 0.4, lr_top: float = 0.0) -> mlo.Engine:
    """The three-level graph on the tensors ``P`` (``A``, ``c``, ``m`` and the starts
    ``lam``, ``mu``, ``th``): B and M unrolled with ``K``-step windows, SGD at ``eta_b``,
    ``eta_m``, ``lr_top``; one top update is ``K·K`` engine iterations."""
    A, c, m = P["A"], P["c"], P["m"]
    T = Quadratic("T", "lam", P["lam"],
                  lambda s: 0.5 * ((s.M.params["mu"] - m) ** 2).sum() + 0 * s.params["lam"].sum(),
                  optimizer_kwargs={"lr": lr_top})
    M = Quadratic("M", "mu", P["mu"],
                  lambda s: 0.5 * ((s.B.params["th"] - c) ** 2).sum() + 0.5 * rho * (s.params["mu"] ** 2).sum(),
                  optimizer_kwargs={"lr": eta_m}, config=mlo.ProblemConfig(unroll_steps=K, method="unrolled"))
    B = Quadratic("B", "th", P["th"],
                  lambda s: 0.5 * ((s.params["th"] - A @ s.M.params["mu"] - s.T.params["lam"]) ** 2).sum(),
                  optimizer_kwargs={"lr": eta_b}, config=mlo.ProblemConfig(unroll_steps=K, method="unrolled"))
    T.M, M.B, B.T, B.M = M, B, T, M
    return mlo.Engine([B, M, T], {"u2l": {T: [B], M: [B]}, "l2u": {B: [M], M: [T]}},
                      mlo.EngineConfig(nesting=nesting, progress=False))


def example_data(d: int, seed: int = 3) -> Dict[str, Tensor]:
    """``A = I + 0.3·N(0, 1)`` and Gaussian ``c``, ``m``, ``lam``, ``mu``, ``th`` (float64, seeded)."""
    g = torch.Generator().manual_seed(seed)
    return dict(A=torch.eye(d, dtype=DT) + 0.3 * torch.randn(d, d, generator=g, dtype=DT),
                **{k: torch.randn(d, generator=g, dtype=DT) for k in ("c", "m", "lam", "mu", "th")})


def closed_form_hypergradient(P: Dict[str, Tensor], rho: float = 0.3) -> Tensor:
    """``dF_T/dλ = −A(AᵀA + ρI)⁻¹(μ*(λ) − m)`` at ``P["lam"]``."""
    A = P["A"]
    H = A.T @ A + rho * torch.eye(A.shape[0], dtype=A.dtype)
    mu_star = torch.linalg.solve(H, A.T @ (P["c"] - P["lam"]))
    return -A @ torch.linalg.solve(H, mu_star - P["m"])
