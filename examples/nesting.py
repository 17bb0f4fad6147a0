"""Betty's convention vs exact nesting on a three-level problem where they differ.

    B (θ):  f_B = ½‖θ − Aμ − λ‖²            reads T and M      θ*(μ, λ) = Aμ + λ
    M (μ):  f_M = ½‖θ − c‖² + ½ρ‖μ‖²         reads B            μ*(λ) = (AᵀA + ρI)⁻¹Aᵀ(c − λ)
    T (λ):  F_T = ½‖μ − m‖²                  reads M (the top)

M reaches T only through B's best response. With the default
``EngineConfig(nesting="betty")`` every level's best response is differentiated with its
lowers held fixed, so T's hypergradient is exactly 0; ``nesting="exact"`` differentiates
through the nested unrolled windows and converges to the closed form
``dF_T/dλ = −A(AᵀA + ρI)⁻¹(μ* − m)`` as K grows (at M's contraction rate).

    python examples/nesting.py            # prints both for K = 4, 8, 16, 32
"""
from __future__ import annotations

import argparse

import torch

import mlo

DT = torch.float64


class Quadratic(mlo.Problem):
    """One explicit variable with a loss given as a function of the problem."""

    def __init__(self, name, variable, value, loss, **kw):
        super().__init__(name, params={variable: value}, **kw)
        self.loss = loss

    def training_step(self, batch):
        return self.loss(self)


def build(P, K, nesting, rho=0.3, eta_b=0.7, eta_m=0.4, lr_top=0.0):
    """The three-level graph (also ``benchmarks/exact_nesting.py``'s); one top update is
    ``K·K`` engine iterations."""
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--d", type=int, default=4)
    ap.add_argument("--ks", default="4,8,16,32")
    args = ap.parse_args(argv)
    g = torch.Generator().manual_seed(3)
    d = args.d
    P = dict(A=torch.eye(d, dtype=DT) + 0.3 * torch.randn(d, d, generator=g, dtype=DT),
             **{k: torch.randn(d, generator=g, dtype=DT) for k in ("c", "m", "lam", "mu", "th")})
    A, rho = P["A"], 0.3
    H = A.T @ A + rho * torch.eye(d, dtype=DT)
    mu_star = torch.linalg.solve(H, A.T @ (P["c"] - P["lam"]))
    exact = -A @ torch.linalg.solve(H, mu_star - P["m"])
    print(f"closed form dF_T/dλ = {[round(x, 6) for x in exact.tolist()]}")
    for K in (int(k) for k in args.ks.split(",")):
        out = {}
        for nesting in ("betty", "exact"):
            eng = build(P, K, nesting)
            eng.run(K * K)                      # one top update: K·K bottom and K middle steps
            out[nesting] = eng.last_hypergradient["T"]["lam"]
        err = float((out["exact"] - exact).norm() / exact.norm())
        print(f"K={K:3d}  betty: ‖h‖ = {float(out['betty'].norm()):.3g}   exact: rel. error vs closed "
              f"form {err:.2e}")


if __name__ == "__main__":
    main()
