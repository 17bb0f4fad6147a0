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

The graph and the closed form are :mod:`problems.nesting` (also ``benchmarks/exact_nesting.py``'s).
"""
from __future__ import annotations

import argparse

from problems.nesting import build, closed_form_hypergradient, example_data


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--d", type=int, default=4)
    ap.add_argument("--ks", default="4,8,16,32")
    args = ap.parse_args(argv)
    P = example_data(args.d)
    exact = closed_form_hypergradient(P)
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
