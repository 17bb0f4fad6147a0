"""Python calls per iteration of the engine: the framework's per-step overhead, counted.

A benchmark, not a test. Timing the engine's Python overhead on a busy machine is
noisy (a few percent of a millisecond); the number of calls per iteration is not: it
is the same on every run, so it shows a regression — or its fix — at once. It is
``cProfile``'s total call count (Python functions and builtins, as ``pstats`` counts
``total_calls``) over ``--iterations`` profiled calls after ``--warmup`` unprofiled ones,
divided by the number of calls; in parentheses the calls of functions written in
Python alone (builtins and C methods left out).

Cases (the ``linear`` problem of ``benchmarks/hypergradients.py``: logistic regression
100 → 10, one learned log weight decay per lower parameter, SGD on both levels):

- ``unrolled K=1 step`` / ``cg K=1 step``: ``engine.step()`` — one outer step, as
  the Betty comparison times it (``--betty``: ours / floor, Betty / ours);
- ``cg K=1 gradient``: ``engine.gradient("upper")`` — the hypergradient alone, as the
  ours / floor table times it;
- ``… ignore``: the same with ``EngineConfig(nonfinite="ignore")`` (ours·ignore);
- ``unrolled K=1 run``: ``engine.run(10)`` (the loop of ``run`` around ``step``: the
  progress bar, the stop agreement), per iteration;
- ``mlo-mae fd`` / ``mlo-mae unrolled``: ``engine.step()`` of the three-level MLO-MAE
  graph (``problems/mlo_mae.py``, ``tests/test_mlo_mae_graph.py``'s tiny settings: 4×4
  images, width 8, one block; ``unroll_steps=2``, so the average of 10 steps — a
  pretrain step every iteration, finetune and mask every second), with its default
  ``finite_difference`` and with ``unrolled``. (``--root``: that checkout's
  ``problems`` too.)

``--root DIR`` counts the ``mlo`` of another checkout (e.g. a base commit in a git
worktree) with this checkout's benchmark problems, so two versions are compared on
the very same graph::

    git worktree add /tmp/base 7384999
    OMP_NUM_THREADS=1 python benchmarks/call_count.py --root /tmp/base
    OMP_NUM_THREADS=1 python benchmarks/call_count.py
    git worktree remove /tmp/base

``--top N`` also lists the N functions called most often per iteration (where the
calls go), ``--mlo-only`` restricts that list to functions defined in ``mlo/``.
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
from typing import Callable, Dict, List, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))


def _import(root: str):
    """``mlo`` from ``root``, then this checkout's benchmark problems on top of it."""
    sys.path.insert(0, os.path.abspath(root))
    import engines.base  # noqa: F401  (from root, before anything else puts another on sys.path)
    import mlo  # noqa: F401
    sys.path.insert(1, HERE)
    import hypergradients as hg
    return hg


RUN = 10   # iterations per call of the run case


def cases(hg) -> Dict[str, Tuple[Callable[[], object], int]]:
    """``{label: (one call, iterations it runs)}`` for every case of the module docstring."""
    spec = hg.make_spec("linear")
    out: Dict[str, Tuple[Callable[[], object], int]] = {}
    for m in (hg.Method("unrolled K=1", "unrolled", 1), hg.Method("cg K=1", "cg", 1)):
        for nonfinite in ("raise", "ignore"):
            lams = spec.lam_init(spec.make_module(), hg.torch.float32)
            eng = hg.build_mlo(spec, m, spec.make_module(), lams, nonfinite=nonfinite)
            tail = "" if nonfinite == "raise" else " ignore"
            out[f"{m.label} step{tail}"] = (lambda eng=eng, k=m.unroll: hg.mlo_outer_step(eng, k)), 1
            if m.kind == "cg":
                eng2 = hg.build_mlo(spec, m, spec.make_module(), lams, nonfinite=nonfinite)
                eng2.step()     # the lower has a last batch / iterate
                out[f"{m.label} gradient{tail}"] = (lambda eng=eng2: eng.gradient("upper")), 1
    lams = spec.lam_init(spec.make_module(), hg.torch.float32)
    eng = hg.build_mlo(spec, hg.METHODS[0], spec.make_module(), lams)
    out["unrolled K=1 run"] = (lambda: eng.run(RUN)), RUN
    for method in ("finite_difference", "unrolled"):
        g = mlo_mae(method)
        out[f"mlo-mae {'fd' if method == 'finite_difference' else method}"] = (
            lambda eng=g.engine: [eng.step() for _ in range(RUN)]), RUN
    return out


def mlo_mae(method: str):
    """The tiny MLO-MAE graph of ``tests/test_mlo_mae_graph.py`` with ``method``."""
    import torch
    from problems.mlo_mae import MLOMAESettings, build
    s = MLOMAESettings(image_size=4, patch_size=2, in_chans=1, embed_dim=8, depth=1, num_heads=2,
                       decoder_dim=8, decoder_depth=1, decoder_heads=2, mask_hidden=8, batch_size=8,
                       steps=10 ** 6, num_classes=3, method=method)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 1, 4, 4, generator=g)
    return build("mlo-mae", s, (x, torch.randint(0, 3, (40,), generator=g)))


def count(fn: Callable[[], object], warmup: int, iterations: int) -> Tuple[float, float, pstats.Stats]:
    """Calls per call of ``fn`` (after ``warmup`` calls): all, and those of functions
    written in Python (builtins and C methods left out); and the profile."""
    for _ in range(warmup):
        fn()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(iterations):
        fn()
    prof.disable()
    st = pstats.Stats(prof)
    python = sum(nc for (path, _, _), (_, nc, *_rest) in st.stats.items() if path != "~")
    return st.total_calls / iterations, python / iterations, st


def top(st: pstats.Stats, n: int, iterations: int, mlo_only: bool) -> List[str]:
    """The ``n`` functions called most often, per iteration."""
    rows = []
    for (path, line, func), (cc, nc, *_rest) in st.stats.items():
        if mlo_only and f"{os.sep}mlo{os.sep}" not in path:
            continue
        where = f"{os.path.basename(path)}:{line}" if path != "~" else "builtin"
        rows.append((nc / iterations, f"{where} {func}"))
    rows.sort(key=lambda r: -r[0])
    return [f"    {c:6.1f}  {name}" for c, name in rows[:n]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default=os.path.dirname(HERE), help="checkout whose mlo is counted")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iterations", type=int, default=50)
    ap.add_argument("--top", type=int, default=0)
    ap.add_argument("--mlo-only", action="store_true")
    ap.add_argument("--only", default=None, help="run only cases whose label contains this")
    args = ap.parse_args()
    hg = _import(args.root)
    hg.torch.set_num_threads(1)
    print(f"mlo from {os.path.dirname(sys.modules['mlo'].__file__)}")
    for label, (fn, each) in cases(hg).items():
        if args.only and args.only not in label:
            continue
        per, python, st = count(fn, args.warmup, max(1, args.iterations // each))
        per, python = per / each, python / each
        print(f"{label:26s} {per:7.1f} calls/iteration ({python:6.1f} of Python functions)")
        if args.top:
            print("\n".join(top(st, args.top, max(1, args.iterations // each) * each, args.mlo_only)))


if __name__ == "__main__":
    main()
