"""Time per MetaMAE pretraining iteration: mlo's graph and one-problem forms vs plain PyTorch.

For each preset (``examples/configs/meta_mae_<modality>.yaml``: ``cpu``, and ``paper`` =
the paper's 256-d × 12 encoder and 128-d decoder) and each variant (MetaMAE, and MAE =
no adaptation, no contrast) three steps of the same model on the same batch stream::

    graph   mlo.Engine of problems.meta_mae.build_graph (latent WindowProblem + upper), one
            upper update (= options.steps engine iterations)
    single  mlo.Engine of one problems.meta_mae.MetaMAEPretrain
    plain   hand-written: zero_grad; metamae_loss(...).backward(); AdamW.step()

are timed interleaved: every round runs each of the six (step, variant) pairs for
``--iters`` iterations, in a rotated order, and the reported time is the median over
``--rounds`` rounds of the per-iteration mean (one torch thread). Ratios: mlo/plain
(target ≤ 1.10) and MetaMAE/MAE (target ≤ 1.6)::

    OMP_NUM_THREADS=1 python benchmarks/meta_mae_timing.py                     # image, cpu + paper
    OMP_NUM_THREADS=1 python benchmarks/meta_mae_timing.py --presets cpu --modalities image tabular
    OMP_NUM_THREADS=1 python benchmarks/meta_mae_timing.py --profile graph     # cProfile of one form
    OMP_NUM_THREADS=1 python benchmarks/meta_mae_timing.py --ops --presets paper  # aten ops: graph vs plain

The machine's load average is recorded before and after (other processes on a shared
machine make the ratios noisy; op counts from ``--ops`` are not).

Writes ``benchmarks/results/meta_mae/timing_graph.json``.
"""
from __future__ import annotations

import argparse
import copy
import cProfile
import gc
import json
import os
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mlo  # noqa: E402
from problems.jobs import meta_mae_setup  # noqa: E402
from problems.jobs.meta_mae_job import parse_args  # noqa: E402
from problems.latent_adaptation import metamae_loss  # noqa: E402
from problems.meta_mae import MetaMAEModel, MetaMAEPretrain, build_graph  # noqa: E402
from problems.transformer import math_attention  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "meta_mae"
FORMS = ("graph", "single", "plain")
VARIANTS = ("mae", "metamae")


def steppers(ex, modality: str, preset: str, variant: str, batch: int) -> Dict[str, Callable[[], None]]:
    """``{form: one pretraining iteration}`` for one model, all forms from the same init
    (``ex``: :mod:`problems.jobs.meta_mae_setup`, MetaMAE's job as examples/meta_mae.py runs it)."""
    cfg = ex.read_config(ex.CONFIGS / f"meta_mae_{modality}.yaml")
    s = ex.make_settings(cfg, parse_args(["--modality", modality, "--preset", preset,
                                             "--variant", variant]))
    if batch:
        s["batch_size"] = batch
    torch.manual_seed(0)
    _, _, tok, _, _ = ex.load(modality, cfg, s, 0)
    mae = ex.build_mae(tok, s, modality)
    opts = ex.options(s)
    proj = MetaMAEModel(mae, None, s["projector_hidden"], s["projector_out"]).projector
    adamw = {"lr": 1e-4, "weight_decay": 1e-4}

    def stream():
        return ex.load(modality, cfg, s, 0)[3]        # the same batches for every form

    out: Dict[str, Callable[[], None]] = {}
    engine, _ = build_graph(copy.deepcopy(mae), stream(), opts, projector=copy.deepcopy(proj),
                            generator=torch.Generator().manual_seed(1), optimizer_kwargs=adamw,
                            engine_config=mlo.EngineConfig(progress=False))
    per = opts.steps if opts.adapt else 1
    out["graph"] = lambda: engine.run(per)
    single = MetaMAEPretrain(copy.deepcopy(mae), stream(), options=opts, projector=copy.deepcopy(proj),
                             generator=torch.Generator().manual_seed(1), optimizer_kwargs=adamw)
    engine1 = mlo.Engine([single], config=mlo.EngineConfig(progress=False))
    out["single"] = lambda: engine1.run(1)

    model = MetaMAEModel(copy.deepcopy(mae), copy.deepcopy(proj))
    if not opts.contrastive_weight:
        model.projector.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], **adamw)
    gen, batches = torch.Generator().manual_seed(1), stream()

    def plain():
        x = next(batches)[0]
        opt.zero_grad(set_to_none=True)
        with math_attention(opts.adapt and not opts.first_order):
            loss = metamae_loss(model.mae, x, opts, model.projector if opts.contrastive_weight else None,
                                gen)["loss"]
        loss.backward()
        opt.step()

    out["plain"] = plain
    out["_desc"] = (f"enc {s['width']}x{s['depth']}, dec {s['decoder_dim']}x{s['decoder_depth']}, "
                    f"mask {s['mask_ratio']}, {tok.num_tokens} tokens, batch {s['batch_size']}, "
                    f"K={opts.steps}")
    return out


def measure(ex, modality: str, preset: str, args) -> Dict[str, Any]:
    batch = args.paper_batch if preset == "paper" else 0
    runs = {v: steppers(ex, modality, preset, v, batch) for v in VARIANTS}
    desc = runs["metamae"].pop("_desc")
    runs["mae"].pop("_desc")
    keys = [(f, v) for v in VARIANTS for f in FORMS]
    iters = args.paper_iters if preset == "paper" else args.iters
    for f, v in keys:                                   # warm-up
        for _ in range(2):
            runs[v][f]()
    per_round: Dict[str, List[float]] = {f"{f}/{v}": [] for f, v in keys}
    for r in range(args.rounds):
        order = keys[r % len(keys):] + keys[:r % len(keys)]    # rotated: no fixed position
        for f, v in order:
            gc.collect()
            t = time.perf_counter()
            for _ in range(iters):
                runs[v][f]()
            per_round[f"{f}/{v}"].append(1000 * (time.perf_counter() - t) / iters)
    ms = {k: statistics.median(v) for k, v in per_round.items()}
    res: Dict[str, Any] = {"model": desc, "rounds": args.rounds, "iterations_per_round": iters,
                           "ms": {k: round(v, 2) for k, v in ms.items()},
                           "ms_per_round": {k: [round(x, 2) for x in v] for k, v in per_round.items()}}
    res["ratios"] = {
        "graph/plain MetaMAE": ms["graph/metamae"] / ms["plain/metamae"],
        "single/plain MetaMAE": ms["single/metamae"] / ms["plain/metamae"],
        "graph/plain MAE": ms["graph/mae"] / ms["plain/mae"],
        "MetaMAE/MAE graph": ms["graph/metamae"] / ms["graph/mae"],
        "MetaMAE/MAE plain": ms["plain/metamae"] / ms["plain/mae"],
    }
    res["ratios"] = {k: round(v, 3) for k, v in res["ratios"].items()}
    print(f"  {preset:5s} {modality:10s} {desc}")
    print("        ms/iter  " + "  ".join(f"{k} {v:.1f}" for k, v in ms.items()))
    print("        ratios   " + "  ".join(f"{k} {v:.3f}" for k, v in res["ratios"].items()), flush=True)
    return res


def profile(ex, form: str, args) -> None:
    """cProfile of ``--iters`` iterations of one form (MetaMAE, first preset and modality)."""
    preset, modality = args.presets[0], args.modalities[0]
    run = steppers(ex, modality, preset, "metamae", args.paper_batch if preset == "paper" else 0)[form]
    for _ in range(3):
        run()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(args.iters):
        run()
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    pstats.Stats(prof).sort_stats("cumulative").print_stats(40)


def ops(ex, args) -> None:
    """torch.profiler per iteration: the aten ops whose self time differs most, graph vs plain."""
    from torch.profiler import ProfilerActivity, profile as tprofile
    preset, modality = args.presets[0], args.modalities[0]
    runs = steppers(ex, modality, preset, "metamae", args.paper_batch if preset == "paper" else 0)
    n, res = args.paper_iters if preset == "paper" else args.iters, {}
    for form in ("graph", "plain"):
        for _ in range(3):
            runs[form]()
        with tprofile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(n):
                runs[form]()
        res[form] = {e.key: (e.count / n, e.self_cpu_time_total / n / 1000) for e in prof.key_averages()}
        print(f"{form}: {sum(c for c, _ in res[form].values()):.0f} ops/iteration, "
              f"{sum(t for _, t in res[form].values()):.1f} ms self time/iteration")
    keys = sorted(set(res["graph"]) | set(res["plain"]),
                  key=lambda k: res["plain"].get(k, (0, 0))[1] - res["graph"].get(k, (0, 0))[1])
    print(f"{'op':40s} {'graph n':>8s} {'ms':>7s} {'plain n':>8s} {'ms':>7s}")
    for k in keys[:15]:
        (gc_, gt), (pc, pt) = res["graph"].get(k, (0, 0)), res["plain"].get(k, (0, 0))
        print(f"{k[:40]:40s} {gc_:8.0f} {gt:7.2f} {pc:8.0f} {pt:7.2f}")


def main(argv=None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modalities", nargs="+", default=["image"],
                    choices=["image", "tabular", "timeseries", "tokens"])
    ap.add_argument("--presets", nargs="+", default=["cpu", "paper"], choices=["cpu", "paper"])
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median reported)")
    ap.add_argument("--iters", type=int, default=20, help="iterations per round, cpu preset")
    ap.add_argument("--paper-iters", type=int, default=3, help="iterations per round, paper preset")
    ap.add_argument("--paper-batch", type=int, default=64, help="batch of the paper preset")
    ap.add_argument("--profile", choices=FORMS, help="cProfile one form instead of timing")
    ap.add_argument("--ops", action="store_true", help="aten op counts and self times, graph vs plain")
    ap.add_argument("--out", type=Path, default=RESULTS / "timing_graph.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    ex = meta_mae_setup
    if args.profile or args.ops:
        profile(ex, args.profile, args) if args.profile else ops(ex, args)
        return {}
    print("ms per pretraining iteration (median of interleaved rounds, 1 thread):")
    out: Dict[str, Any] = {"command": " ".join(["python", "benchmarks/meta_mae_timing.py"] + sys.argv[1:]),
                           "torch": torch.__version__, "threads": torch.get_num_threads(),
                           "load_average_before": os.getloadavg(), "results": {}}
    for preset in args.presets:
        for m in args.modalities:
            out["results"][f"{preset}/{m}"] = measure(ex, m, preset, args)
    out["load_average_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")
    return out


if __name__ == "__main__":
    main()
