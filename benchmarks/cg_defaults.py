#!/usr/bin/env python
"""Benchmark: how many CG iterations a small digits MLP lower needs (CG's default bound).

A measurement, not a test. The lower is a 64-64-10 ReLU MLP ``θ`` (4810 unknowns) on one
batch of 100 scikit-learn digits, per-example weighted cross-entropy plus weight decay,

    f(θ, s) = mean_i sigmoid(s_i) · CE_i(θ) + wd/2 ‖θ‖²,      s = 0,

trained with 300 steps of SGD (lr 0.1, momentum 0.9); ``v`` is the gradient of the
cross-entropy on the validation split. For each damping ``δ`` the script prints, per
``max_iter``, the seconds per solve, the iterations CG took and its final relative
residual (``Lower.diagnostics``) and, in float64, the relative error of the hypergradient
``−∂²_{sθ}f (H + δI)⁻¹ v`` against a dense solve (H materialised by 4810 Hessian-vector
products). The spectrum of ``H`` is printed too (it has negative eigenvalues: CG without
damping has no positive definite system to solve).

    OMP_NUM_THREADS=1 python benchmarks/cg_defaults.py                   # float64, ~1 min
    OMP_NUM_THREADS=1 python benchmarks/cg_defaults.py --dtype float32   # timings only
"""
from __future__ import annotations

import argparse
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from engines import implicit
from engines.base import Lower
from problems.datasets import load_digits

BATCH, HIDDEN = 100, 64


def setup(dtype: torch.dtype, wd: float, steps: int):
    """The trained lower: ``(θ, s, f, v)``."""
    torch.manual_seed(0)
    s = load_digits(seed=0)
    (xt, yt), (xv, yv) = s.train.tensors, s.val.tensors
    xb, yb, xv = xt[:BATCH].flatten(1).to(dtype), yt[:BATCH], xv.flatten(1).to(dtype)
    net = nn.Sequential(nn.Linear(64, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 10)).to(dtype)
    names = [n for n, _ in net.named_parameters()]

    def f(ps, xs):
        ce = F.cross_entropy(functional_call(net, dict(zip(names, ps)), (xb,)), yb, reduction="none")
        return (torch.sigmoid(xs[0]) * ce).mean() + 0.5 * wd * sum((p * p).sum() for p in ps)

    weights = torch.zeros(BATCH, dtype=dtype)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    for _ in range(steps):
        opt.zero_grad()
        f(tuple(net.parameters()), (weights,)).backward()
        opt.step()
    theta = tuple(p.detach().clone().requires_grad_() for p in net.parameters())
    v = torch.autograd.grad(F.cross_entropy(functional_call(net, dict(zip(names, theta)), (xv,)), yv), theta)
    return theta, weights, f, v


def hessian(theta, weights, f) -> torch.Tensor:
    """``H = ∂²_{θθ} f``, one Hessian-vector product per column."""
    g = torch.autograd.grad(f(theta, (weights,)), theta, create_graph=True)
    sizes = [p.numel() for p in theta]
    eye = torch.eye(sum(sizes), dtype=theta[0].dtype)
    cols = []
    for i in range(len(eye)):
        u = tuple(c.reshape(p.shape) for c, p in zip(torch.split(eye[i], sizes), theta))
        cols.append(torch.cat([h.reshape(-1) for h in torch.autograd.grad(g, theta, u, retain_graph=True)]))
    H = torch.stack(cols)
    return (H + H.T) / 2


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    ap.add_argument("--weight-decay", type=float, default=1e-3)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--damping", type=float, nargs="+", default=[0.0, 1e-3, 1e-2, 1e-1, 1.0])
    ap.add_argument("--max-iter", type=int, nargs="+", default=[5, 10, 20, 30, 50, 100, 200, 500])
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    theta, weights, f, v = setup(dtype, args.weight_decay, args.steps)
    n = sum(p.numel() for p in theta)
    print(f"digits MLP lower: {n} unknowns, {args.dtype}, weight decay {args.weight_decay:g}, "
          f"{args.steps} SGD steps")

    def lower():
        return Lower(params=theta, inputs=(weights.clone().requires_grad_(),), loss_fn=f, diagnostics={})

    H = hessian(theta, weights, f) if dtype == torch.float64 else None
    if H is not None:
        ev = torch.linalg.eigvalsh(H)
        print(f"H: eigenvalues in [{ev[0]:.3g}, {ev[-1]:.3g}], {int((ev < 0).sum())} negative")
    sizes = [p.numel() for p in theta]
    for damping in args.damping:
        ref = None
        if H is not None:
            Hd = H + damping * torch.eye(n, dtype=dtype)

            def dense(_hvp, b, Hd=Hd):
                x = torch.linalg.solve(Hd, torch.cat([t.reshape(-1) for t in b]))
                return tuple(c.reshape(p.shape) for c, p in zip(torch.split(x, sizes), theta))

            ref = implicit.implicit(lower(), v, dense)[0]
        print(f"damping {damping:g}")
        for max_iter in args.max_iter:
            lo = lower()
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                got = implicit.cg(lo, v, max_iter=max_iter, tol=1e-10, damping=damping)[0]
            dt = time.perf_counter() - t0
            err = f"{float((got - ref).norm() / ref.norm()):.3g}" if ref is not None else "-"
            d = lo.diagnostics
            print(f"  max_iter {max_iter:4d}: {dt:6.3f} s, {d['cg_iterations']:4d} iterations, "
                  f"residual {d['cg_residual']:.3g}, error vs dense {err}")


if __name__ == "__main__":
    main()
