"""1 vs 2 processes (torch.distributed, gloo, CPU): parity error and time per iteration.

For the quickstart graph (examples/quickstart_weight_decay.py: breast cancer, per-feature
weight decay, 80 training / 150 validation rows) and MLO-MAE (the ``cpu`` preset's
3-layer 64-wide ViT on digits, global batch 64), with each hypergradient method:

* parity: float64, ``--parity-iters`` iterations, 2 ranks (each with half of every
  global batch) vs one process on the global batches; relative error of all
  parameters ``‖p₂ − p₁‖ / ‖p₁‖`` (MLO-MAE with head dropout 0, as the tests);
* time: float32 (the quickstart is float64 by design), median seconds per iteration
  after a warm-up, one thread per process: one process alone (1 core), one process
  with 2 threads (both cores), and 2 ranks (both cores).

    python benchmarks/distributed.py                     # everything (≈ 5 min on 2 cores)
    python benchmarks/distributed.py --graphs quickstart --methods cg

It launches itself under ``torchrun --nproc_per_node 2`` for the 2-rank runs.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

import mlo  # noqa: E402
from mlo import distributed as mdist  # noqa: E402

METHODS = ("unrolled", "cg", "neumann", "finite_difference")
MAE_OPTIONS = {"unrolled": {}, "cg": {"max_iter": 5}, "neumann": {"iterations": 5, "alpha": 0.01},
               "finite_difference": {"epsilon": 0.01}}


def quickstart(method, dtype):
    from problems import weight_decay as q    # the quickstart's problems (examples/quickstart_weight_decay.py)

    torch.manual_seed(0)
    train, val, _ = q.load(0, 80)
    D = train[0].shape[1]
    hyper = q.WeightDecay(tuple(mdist.shard(t) for t in val), D, -8.0)
    clf = q.Classifier(hyper, tuple(mdist.shard(t) for t in train), method, q.METHOD_OPTIONS[method], 20)
    hyper.classifier = clf
    return mlo.Engine([clf, hyper], {"u2l": {hyper: [clf]}, "l2u": {clf: [hyper]}})


def mlo_mae(method, dtype):
    import yaml
    from problems.datasets import load_digits
    from problems.mlo_mae import MLOMAESettings, build

    preset = yaml.safe_load(open(ROOT / "examples/configs/mlo_mae_cpu.yaml"))
    s = dict(preset["settings"], method=method, method_options=MAE_OPTIONS[method], steps=1500)
    if dtype == torch.float64:
        s["head_dropout"] = 0.0
    x, y = load_digits(0, (0.8, 0.0, 0.2)).train.tensors
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        g = build("mlo-mae", MLOMAESettings.from_dict(s), (x.to(dtype), y), seed=0)
    finally:
        torch.set_default_dtype(old)
    for P in g.problems.values():
        P.data = mdist.shard_batches(P.data)
    return g.engine


GRAPHS = {"quickstart": quickstart, "mlo_mae": mlo_mae}


def params(engine):
    return {f"{n}.{k}": t.detach().clone() for n, P in engine.problems.items()
            for k, t in zip(P.param_names, P.variables)}


def run(graph, method, dtype, iters, timed):
    """Final parameters and seconds per iteration (median of the last ``iters - 5``)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        engine = GRAPHS[graph](method, dtype)
        times = []
        for _ in range(iters):
            mdist.barrier()
            t0 = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - t0)
        engine.close_windows()
    finally:
        torch.set_default_dtype(old)
    return params(engine), statistics.median(times[5:]) if timed else None


def worker(args):
    """One rank's (or the single process's) runs; rank 0 saves the results."""
    torch.set_num_threads(args.threads)
    mdist.init_from_env("gloo")
    out = {}
    for graph in args.graphs:
        for method in args.methods:
            p, _ = run(graph, method, torch.float64, args.parity_iters, False)
            tdtype = torch.float64 if graph == "quickstart" else torch.float32
            _, sec = run(graph, method, tdtype, args.time_iters, True)
            out[(graph, method)] = (p, sec)
    if mdist.is_main():
        torch.save(out, args.out)
    if mdist.is_distributed():
        torch.distributed.destroy_process_group()


def rel(a, b):
    num = sum(float((a[k] - b[k]).double().pow(2).sum()) for k in b) ** 0.5
    return num / sum(float(b[k].double().pow(2).sum()) for k in b) ** 0.5


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--graphs", nargs="+", default=list(GRAPHS), choices=list(GRAPHS))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--parity-iters", type=int, default=40)
    ap.add_argument("--time-iters", type=int, default=45)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    tmp = Path(tempfile.mkdtemp())
    common = ["--graphs", *args.graphs, "--methods", *args.methods, "--parity-iters",
              str(args.parity_iters), "--time-iters", str(args.time_iters), "--worker"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    me = [sys.executable, __file__]
    subprocess.run(me + common + ["--out", str(tmp / "one.pt")], check=True, env=env)
    subprocess.run(me + common + ["--threads", "2", "--out", str(tmp / "one2.pt")], check=True,
                   env=dict(env, OMP_NUM_THREADS="2"))
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                    "--standalone", __file__] + common + ["--out", str(tmp / "two.pt")],
                   check=True, env=env)
    one, one2, two = (torch.load(tmp / f, weights_only=False) for f in ("one.pt", "one2.pt", "two.pt"))
    print("| graph | method | parity (rel. params, float64, %d it.) | 1 process, 1 thread | "
          "1 process, 2 threads | 2 ranks | speed-up (2 ranks vs 1 thread) |" % args.parity_iters)
    print("|---|---|---|---|---|---|---|")
    rows = []
    for key in one:
        e = rel(two[key][0], one[key][0])
        t1, t12, t2 = one[key][1], one2[key][1], two[key][1]
        rows.append({"graph": key[0], "method": key[1], "parity_rel_error": e,
                     "ms_1proc_1thread": 1e3 * t1, "ms_1proc_2threads": 1e3 * t12, "ms_2ranks": 1e3 * t2})
        print(f"| {key[0]} | {key[1]} | {e:.1e} | {1e3 * t1:.2f} ms | {1e3 * t12:.2f} ms | "
              f"{1e3 * t2:.2f} ms | {t1 / t2:.2f}× |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
