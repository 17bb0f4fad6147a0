"""MAML on sinusoid regression with mlo, optionally beside torchopt and higher.

Tasks ``y = A sin(x − φ)``, ``A ~ U[0.1, 5]``, ``φ ~ U[0, π]``, ``x ~ U[−5, 5]``, K support
and K query points; a 1-40-40-1 ReLU MLP; inner SGD, meta Adam. All tasks are drawn up
front from ``--seed``, so every implementation sees the same ones. The graph and the peer
runs are in :mod:`problems.maml`.

    python examples/maml_sinusoid.py                       # 5-shot, 300 outer steps
    python examples/maml_sinusoid.py --shots 10 --inner-steps 2 --compare-peers
    python examples/maml_sinusoid.py --quick               # a few outer steps

``--compare-peers`` runs the same tasks with torchopt and with higher when they are
installed (optional: ``pip install torchopt==0.7.3 higher==0.2.1``) and prints, for each,
the meta-loss after the last outer step, the held-out loss after adaptation, the largest
difference of the meta-parameters from mlo's, and the seconds per outer step.
"""
from __future__ import annotations

import argparse
import importlib

import torch

from problems.maml import PEERS, adapted_loss, meta_batches, mlp, run_mlo, sample_tasks


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shots", type=int, choices=(5, 10), default=5, help="K support (and query) points")
    ap.add_argument("--inner-steps", type=int, default=1)
    ap.add_argument("--inner-lr", type=float, default=0.01)
    ap.add_argument("--meta-lr", type=float, default=1e-3)
    ap.add_argument("--meta-batch", type=int, default=25, help="tasks per outer step")
    ap.add_argument("--outer-steps", type=int, default=300)
    ap.add_argument("--eval-tasks", type=int, default=100, help="held-out tasks for the adapted loss")
    ap.add_argument("--first-order", action="store_true", help="first-order MAML (mlo only)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="5 outer steps, meta-batch 4, 10 eval tasks")
    ap.add_argument("--compare-peers", action="store_true", help="also run torchopt and higher")
    args = ap.parse_args(argv)
    if args.quick:
        args.outer_steps, args.meta_batch, args.eval_tasks = 5, 4, 10
    for k in ("inner_steps", "meta_batch", "outer_steps", "eval_tasks"):
        if getattr(args, k) < 1:
            ap.error(f"--{k.replace('_', '-')} must be >= 1")
    return args


def main(argv=None):
    args = parse(argv)
    torch.set_num_threads(args.threads)
    tasks = sample_tasks(args.outer_steps * args.meta_batch, args.shots, seed=args.seed)
    held_out = sample_tasks(args.eval_tasks, args.shots, seed=args.seed + 10_000)
    batches, model = meta_batches(tasks, args.meta_batch), mlp(seed=args.seed)
    common = (batches, args.inner_lr, args.inner_steps, args.meta_lr)
    print(f"{args.shots}-shot sinusoid MAML: {args.outer_steps} outer steps x {args.meta_batch} tasks, "
          f"{args.inner_steps} inner SGD step(s) of {args.inner_lr}, meta Adam {args.meta_lr}, "
          f"{'first' if args.first_order else 'second'} order, float64")
    print(f"held-out loss after adaptation before meta-training: "
          f"{adapted_loss(model, held_out, args.inner_lr, args.inner_steps):.6f}")
    runs = {"mlo": run_mlo(model, *common, first_order=args.first_order)}
    if args.compare_peers:
        for name, run in PEERS.items():
            if args.first_order:
                print(f"note: {name} skipped (the comparison is second-order MAML; drop --first-order)")
            elif not importable(name):
                print(f"note: {name} is not installed, skipped (pip install torchopt==0.7.3 higher==0.2.1)")
            else:
                runs[name] = run(model, *common)
    print(table(runs, model, held_out, args))
    return runs


def importable(name: str) -> bool:
    """Whether the optional peer ``name`` imports here."""
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


def table(runs, model, held_out, args) -> str:
    """One markdown row per implementation."""
    ref = runs["mlo"]["params"]
    lines = [f"| implementation | meta-loss at step {args.outer_steps} | held-out adapted loss | "
             f"max abs diff of θ vs mlo | ms per outer step |", "|---|---|---|---|---|"]
    for name, r in runs.items():
        diff = max(float((r["params"][k] - ref[k]).abs().max()) for k in ref)
        net = mlp(seed=args.seed)
        net.load_state_dict(r["params"])
        held = adapted_loss(net, held_out, args.inner_lr, args.inner_steps)
        lines.append(f"| {name} | {r['meta_loss'][-1]:.6f} | {held:.6f} | {diff:.1e} | "
                     f"{1e3 * r['seconds_per_step']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
