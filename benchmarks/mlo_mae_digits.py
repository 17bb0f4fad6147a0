"""MLO-MAE vs its baselines on scikit-learn digits: accuracy, time, memory, diagnostics.

Modes (all single-threaded unless ``--threads``):

``accuracy``  every variant × seed trains for the same number of pretraining
    iterations; the encoder is then probed (multinomial logistic regression on frozen
    CLS / mean-pooled features, ``problems.evaluation.linear_probe``) on the
    validation split (for choosing settings) and the test split (reported). Floors:
    a random-init encoder (the same architecture, untrained) and raw pixels. Also
    records what the masking network learned: mean probability per patch position,
    its spread across images, and the share of masked patches with ``p < 0.1``.
``timing``    interleaved rounds of MAE / MLO-MAE (mask every iteration) / MLO-MAE
    (mask every 5 iterations) / BLO-MAE; time per iteration after a warm-up, ratio to
    MAE inside each round, median over rounds.
``memory``    one fresh subprocess per variant: peak RSS increase over the run.
``diagnose``  the masking network's input (patch vs position part) and the sign of
    the mask hypergradient summed over its output biases, at iterations 0, 100, 300.
``epsilon``   finite-difference ε sensitivity of the mask hypergradient: at
    iteration 0 (early) and after training (late), the hypergradient with ε ∈
    {1e-1, 1e-2, 1e-3, 1e-4} and with CG (10 iterations), pairwise cosines.

    python benchmarks/mlo_mae_digits.py accuracy --steps 1500 --seeds 0 1 2 --out runs/acc.json
    python benchmarks/mlo_mae_digits.py timing --rounds 5
    python benchmarks/mlo_mae_digits.py memory
    python benchmarks/mlo_mae_digits.py epsilon --steps 600
    python benchmarks/mlo_mae_digits.py diagnose --seeds 0 1
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import yaml

from mlo.monitor import compare
from problems.datasets import load_digits
from problems.evaluation import linear_probe
from problems.mask_statistics import mask_probabilities, mask_statistics
from problems.mlo_mae import MLOMAESettings, build

# The main job's cpu preset (examples/configs/mlo_mae_cpu.yaml) is the single source of the settings.
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples", "configs",
                       "mlo_mae_cpu.yaml"), encoding="utf-8") as _f:
    CPU = {k: v for k, v in yaml.safe_load(_f)["settings"].items() if k != "steps"}


def data():
    d = load_digits(seed=0, fractions=(0.7, 0.1, 0.2))   # train / val / test, fixed split
    return d


def settings(steps: int, overrides: dict) -> MLOMAESettings:
    return MLOMAESettings.from_dict({**CPU, "steps": steps, **overrides})


def probe(mae, d, pool):
    f = lambda x: mae.features(x, pool=pool)  # noqa: E731
    return (linear_probe(f, d.train, d.val).accuracy, linear_probe(f, d.train, d.test).accuracy)


def mask_stats(g, x):
    """The masker's statistics on ``x`` (problems.mask_statistics, as the main job's
    summary.json: the masker reads its input as in training, with or without positions)."""
    st = mask_statistics(mask_probabilities(g, x), g.settings.mask_ratio)
    return {k: st[k] for k in ("mean_p_per_position", "std_across_images", "std_across_positions",
                               "masked_p_below_0.1", "masked_p_mean")}


def run_accuracy(args):
    torch.set_num_threads(args.threads)
    d = data()
    x, y = d.train.tensors
    overrides = yaml.safe_load(args.set) if args.set else {}
    rows = []
    raw = linear_probe(lambda t: t.flatten(1), d.train, d.test).accuracy
    raw_val = linear_probe(lambda t: t.flatten(1), d.train, d.val).accuracy
    print(f"raw pixels: val {100 * raw_val:.2f} test {100 * raw:.2f}", flush=True)
    for seed in args.seeds:
        for variant in args.variants:
            s = settings(args.steps, overrides)
            g = build(variant, s, (x, y), seed=seed, split_seed=0)
            init = copy.deepcopy(g.mae)
            t0 = time.perf_counter()
            g.engine.run(args.steps)
            secs = time.perf_counter() - t0
            g.mae.eval()
            row = {"variant": variant, "seed": seed, "steps": args.steps, "seconds": secs,
                   "overrides": overrides,
                   "records": {n: {k: v for k, v in r.items()} for n, r in g.engine.records.items()}}
            for pool in ("cls", "mean"):
                row[f"val_{pool}"], row[f"test_{pool}"] = probe(g.mae, d, pool)
            if variant == args.variants[0]:   # random init floor, once per seed
                init.eval()
                row["init_val_cls"], row["init_test_cls"] = probe(init, d, "cls")
                row["init_val_mean"], row["init_test_mean"] = probe(init, d, "mean")
            if g.masker is not None:
                row["mask"] = mask_stats(g, d.test.tensors[0])
            rows.append(row)
            extra = (f" mask: p̄(masked) {row['mask']['masked_p_mean']:.3f}, "
                     f"<0.1 {row['mask']['masked_p_below_0.1']:.2f}, "
                     f"std/img {row['mask']['std_across_images']:.4f}") if "mask" in row else ""
            print(f"seed {seed} {variant:12s} {secs:6.1f}s  val cls {100 * row['val_cls']:.2f} "
                  f"mean {100 * row['val_mean']:.2f} | test cls {100 * row['test_cls']:.2f} "
                  f"mean {100 * row['test_mean']:.2f}{extra}", flush=True)
    print("\nmean ± std over seeds (test):")
    for variant in args.variants:
        rs = [r for r in rows if r["variant"] == variant]
        print(f"  {variant:12s} " + "  ".join(
            f"{k} {fmt([r[k] for r in rs])}" for k in ("val_cls", "test_cls", "val_mean", "test_mean")))
    inits = [r for r in rows if "init_test_cls" in r]
    print(f"  {'random init':12s} " + "  ".join(
        f"{k[5:]} {fmt([r[k] for r in inits])}" for k in ("init_val_cls", "init_test_cls",
                                                           "init_val_mean", "init_test_mean")))
    print(f"  {'raw pixels':12s} val {100 * raw_val:.2f}  test {100 * raw:.2f}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"rows": rows, "raw_test": raw, "raw_val": raw_val}, f, indent=1)


def fmt(v):
    m = statistics.mean(v)
    s = statistics.stdev(v) if len(v) > 1 else 0.0
    return f"{100 * m:.2f} ± {100 * s:.2f}"


TIMED = {"mae": ("mae", {}), "mlo-mae": ("mlo-mae", {}), "mlo-mae/5": ("mlo-mae", {"mask_every": 5}),
         "blo-mae": ("blo-mae", {}),
         "mlo-mae cg5": ("mlo-mae", {"method": "cg", "method_options": {"max_iter": 5}}),
         "mlo-mae neumann5": ("mlo-mae", {"method": "neumann",
                                          "method_options": {"iterations": 5, "alpha": 0.01}}),
         "mlo-mae unrolled": ("mlo-mae", {"method": "unrolled"})}


def per_iteration(variant, overrides, x, y, warm, n):
    g = build(variant, settings(1000, overrides), (x, y), seed=0)
    g.engine.run(warm)
    t0 = time.perf_counter()
    g.engine.run(n)
    return (time.perf_counter() - t0) / n


def run_timing(args):
    torch.set_num_threads(args.threads)
    d = data()
    x, y = d.train.tensors
    overrides = yaml.safe_load(args.set) if args.set else {}
    ratios = {k: [] for k in TIMED}
    for r in range(args.rounds):
        ms = {k: per_iteration(v, {**overrides, **o}, x, y, 10, args.iterations) for k, (v, o) in TIMED.items()}
        for k in TIMED:
            ratios[k].append(ms[k] / ms["mae"])
        print(f"round {r}: " + "  ".join(f"{k} {1000 * ms[k]:.1f} ms ({ms[k] / ms['mae']:.2f}×)" for k in TIMED),
              flush=True)
    print("median ratio to MAE over rounds: " + "  ".join(
        f"{k} {statistics.median(v):.2f}× [{min(v):.2f}–{max(v):.2f}]" for k, v in ratios.items()))


def _rss_kb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def run_memory_child(args):
    torch.set_num_threads(args.threads)
    d = data()
    x, y = d.train.tensors
    v, o = TIMED[args.variant]
    g = build(v, settings(1000, o), (x, y), seed=0)
    g.engine.run(2)
    base = _rss_kb()
    g.engine.run(args.iterations)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"variant": args.variant, "peak_increase_mb": (peak - base) / 1024}))


def run_memory(args):
    for k in TIMED:
        out = subprocess.run([sys.executable, __file__, "memory-child", "--variant", k,
                              "--iterations", str(args.iterations)], capture_output=True, text=True, check=True)
        print(out.stdout.strip(), flush=True)


def cos(a, b):
    return compare(a, b, list(a))[0]


def hypergrads(g, batch):
    out = {}
    for name, (method, opts) in {"fd 1e-1": ("finite_difference", {"epsilon": 1e-1}),
                                 "fd 1e-2": ("finite_difference", {"epsilon": 1e-2}),
                                 "fd 1e-3": ("finite_difference", {"epsilon": 1e-3}),
                                 "fd 1e-4": ("finite_difference", {"epsilon": 1e-4}),
                                 "cg 10": ("cg", {"max_iter": 10})}.items():
        for n in ("pretrain", "finetune"):
            g.problems[n].config.method, g.problems[n].config.method_options = method, opts
        r = g.engine.gradient("mask", batch=batch, by_path=True)
        out[name] = r
    return out


def run_epsilon(args):
    torch.set_num_threads(args.threads)
    d = data()
    x, y = d.train.tensors
    g = build("mlo-mae", settings(max(args.steps, 1), {}), (x, y), seed=0)
    batch = (d.val.tensors[0][:64], d.val.tensors[1][:64])
    for when in ("early", "late"):
        if when == "late":
            g.engine.run(args.steps)
        hg = hypergrads(g, batch)
        names = list(hg)
        print(f"{when} (iteration {g.engine.iteration}): cosine of total hypergradients")
        for a in names:
            print(f"  {a:8s} " + " ".join(f"{cos(hg[a]['grad'], hg[b]['grad']):+.3f}" for b in names))
        paths = list(hg["cg 10"]["paths"])
        for p in paths:
            print(f"  path {'→'.join(p)}: cos vs cg " + " ".join(
                f"{a}: {cos(hg[a]['paths'][p], hg['cg 10']['paths'][p]):+.3f}" for a in names[:-1]))
        a, b = (hg["cg 10"]["paths"][p] for p in paths)
        print(f"  cos between the two paths (cg): {cos(a, b):+.3f}", flush=True)


def run_diagnose(args):
    """Why the masking network collapses: what its input is made of, and the sign of the
    mask hypergradient summed over the output biases (> 0: a descent step lowers every p)."""
    torch.set_num_threads(args.threads)
    d = data()
    x, y = d.train.tensors
    batch = (d.val.tensors[0][:128], d.val.tensors[1][:128])
    for seed in args.seeds:
        g = build("mlo-mae", settings(args.steps, {}), (x, y), seed=seed)
        if seed == args.seeds[0]:
            with torch.no_grad():
                e = g.mae.patch_embeddings(x[:512])
                pos = g.mae.tokenizer.add_position(torch.zeros_like(e))
                p = g.masker(e)
            print(f"masker input per token: |patch part| {float((e - pos).norm(dim=-1).mean()):.2f}, "
                  f"|position part| {float(pos.norm(dim=-1).mean()):.2f}; p at init: std across images "
                  f"{float(p.std(0).mean()):.4f}, across positions {float(p.mean(0).std()):.4f}")
        for it in (0, 100, 300):
            g.engine.run(it - g.engine.iteration)
            r = g.engine.gradient("mask", batch=batch, by_path=True)
            paths = "  ".join(f"{'→'.join(k)} {float(v['fc2.bias'].sum()):+.3e}" for k, v in r["paths"].items())
            print(f"seed {seed} iteration {it}: Σ ∂F/∂b_out = {float(r['grad']['fc2.bias'].sum()):+.3e}  "
                  f"({paths})", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["accuracy", "timing", "memory", "memory-child", "epsilon", "diagnose"])
    ap.add_argument("--variants", nargs="+", default=["mae", "mlo-mae", "blo-mae", "frozen-mask"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--set", default="", help="YAML dict of MLOMAESettings overrides, e.g. '{mask_lr: 1e-4}'")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iterations", type=int, default=40)
    ap.add_argument("--variant", default="mae")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    {"accuracy": run_accuracy, "timing": run_timing, "memory": run_memory,
     "memory-child": run_memory_child, "epsilon": run_epsilon, "diagnose": run_diagnose}[args.mode](args)


if __name__ == "__main__":
    main()
