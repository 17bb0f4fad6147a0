#!/usr/bin/env python
"""Benchmark: memory of unrolled windows over a long run (leak check, not a test).

A small-MLP bilevel graph through ``mlo.Engine``::

    lower  f(θ, λ) = MSE(mlp_θ(x_tr), y_tr) + ½ Σ_i exp(λ_i) ‖θ_i‖²   (AdamW, unroll K=5)
    upper  F(θ)    = MSE(mlp_θ(x_val), y_val)                          (Adam on λ)

with ``mlp`` = Linear(16, 64) → Tanh → Linear(64, 1) and one ``λ`` per parameter
tensor. Every 20 outer steps (= 20·K engine iterations) it records the resident
set size (psutil if installed, else ``/proc/self/statm``, else ``resource``'s peak),
the number of live tensors seen by ``gc`` and the number of autograd nodes
reachable from the live tensors' ``grad_fn`` — right after the upper update (all
windows closed) and again K−1 lower steps into the next window. Windows are freed when the upper
becomes ready, so from step 20 to 200 the tensor and node counts must stay flat
and RSS must not grow by more than ``--rss-mb`` MB; the script exits 1 otherwise.

Usage: ``python benchmarks/memory_unrolled.py [--steps 200] [--every 20] [--rss-mb 16]``
"""
from __future__ import annotations

import argparse
import gc
import os
import resource
import sys
import time
import warnings

import torch
from torch import nn

import mlo

__all__ = ["rss_mb", "live_tensors", "build", "main"]


def rss_mb() -> float:
    """Current resident set size in MB (peak RSS if no current measure exists)."""
    try:
        import psutil  # type: ignore
        return psutil.Process().memory_info().rss / 2 ** 20
    except ImportError:
        pass
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except (OSError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 10


def live_tensors():
    """``(number of live tensors, autograd nodes reachable from their grad_fn)``."""
    gc.collect()
    with warnings.catch_warnings():   # isinstance() touches deprecated torch module attributes
        warnings.simplefilter("ignore")
        tensors = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    seen, todo = set(), [t.grad_fn for t in tensors if t.grad_fn is not None]
    while todo:
        fn = todo.pop()
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        todo.extend(f for f, _ in fn.next_functions)
    return len(tensors), len(seen)


class Lower(mlo.Problem):
    def __init__(self, upper, data, K):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 1)).double()
        super().__init__("lower", module=net, optimizer=torch.optim.AdamW,
                         optimizer_kwargs={"lr": 3e-3, "betas": (0.85, 0.98), "weight_decay": 1e-3},
                         data=data, config=mlo.ProblemConfig(unroll_steps=K))
        self.upper = upper

    def training_step(self, batch):
        x, y = batch
        lam = self.upper.params["lam"]
        reg = sum(0.5 * lam[i].exp() * p.pow(2).sum() for i, p in enumerate(self.params.values()))
        return nn.functional.mse_loss(self(x).squeeze(-1), y) + reg


class Upper(mlo.Problem):
    def __init__(self, n_tensors, data):
        super().__init__("upper", params={"lam": torch.full((n_tensors,), -4.0, dtype=torch.float64)},
                         optimizer=torch.optim.Adam, optimizer_kwargs={"lr": 1e-2, "betas": (0.8, 0.99)},
                         data=data)
        self.lower = None

    def training_step(self, batch):
        x, y = batch
        return nn.functional.mse_loss(self.lower(x).squeeze(-1), y) + 0 * self.params["lam"].sum()


def build(K: int = 5):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, generator=g, dtype=torch.float64)

    def batches(n):
        out = []
        for _ in range(n):
            x = torch.randn(32, 16, generator=g, dtype=torch.float64)
            out.append((x, torch.sin(x @ w) + 0.1 * torch.randn(32, generator=g, dtype=torch.float64)))
        return out

    up = Upper(4, batches(3))
    lo = Lower(up, batches(7), K)
    up.lower = lo
    return mlo.Engine([lo, up], {"u2l": {up: [lo]}, "l2u": {lo: [up]}})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=200, help="outer (upper) steps")
    ap.add_argument("--every", type=int, default=20, help="record every N outer steps")
    ap.add_argument("--K", type=int, default=5, help="unroll steps of the lower")
    ap.add_argument("--rss-mb", type=float, default=16.0, help="allowed RSS growth, MB")
    ap.add_argument("--tensors", type=int, default=0, help="allowed growth of live tensors / nodes")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    eng = build(args.K)
    rows = []
    t0 = time.perf_counter()
    up = eng.problems["upper"]
    pending = None                    # a row waiting for its mid-window measurement
    while up.step_count < args.steps or pending:
        eng.step()
        s = up.step_count
        if pending and eng.iteration == pending[1] + args.K - 1:
            # K−1 lower steps into the next window: its graph is alive now
            rows.append(pending + live_tensors())
            pending = None
        elif s and s % args.every == 0 and (not rows or rows[-1][0] != s) and not pending:
            pending = (s, eng.iteration, rss_mb(), *live_tensors(), time.perf_counter() - t0,
                       float(up.last_loss))
            if args.K == 1:
                rows.append(pending + live_tensors())
                pending = None
    print(f"unrolled K={args.K}, small MLP (16-64-1, float64), {args.steps} outer steps "
          f"(counts right after the upper update, and K−1 steps into the next window)")
    print("| outer step | iteration | RSS MB | live tensors | autograd nodes | time s | upper loss "
          "| tensors in window | nodes in window |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for s, it, r, n_t, n_g, t, loss, w_t, w_g in rows:
        print(f"| {s} | {it} | {r:.1f} | {n_t} | {n_g} | {t:.2f} | {loss:.4f} | {w_t} | {w_g} |")
    first, last = rows[0], rows[-1]
    d_rss = last[2] - first[2]
    d = [last[i] - first[i] for i in (3, 4, 7, 8)]
    print(f"growth from outer step {first[0]} to {last[0]}: RSS {d_rss:+.1f} MB, "
          f"live tensors {d[0]:+d}, autograd nodes {d[1]:+d}; "
          f"inside a window: tensors {d[2]:+d}, nodes {d[3]:+d}")
    ok = d_rss <= args.rss_mb and max(d) <= args.tensors
    print("OK" if ok else "FAIL: memory grows over the run")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
