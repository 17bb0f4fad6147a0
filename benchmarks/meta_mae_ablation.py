"""MetaMAE's Table-4 ablation on small packaged datasets, and its cost per iteration.

Ablation: for each modality and seed, MetaMAE's job (``examples/meta_mae.py``, i.e.
``problems.jobs.meta_mae_job.main``; cpu preset, one torch thread, in a worker process) is
run for the rows

    MAE, linear decoder             --variant mae --decoder-depth 0
    MAE, Transformer decoder        --variant mae
    + latent adaptation             --no-contrastive
    + task contrast only            --no-adapt            (the two views coincide)
    MetaMAE (adaptation + contrast) (default)

and the linear-probe test accuracy (mean-pooled frozen encoder) is reported as mean ±
std over seeds, with the random-init encoder and the raw input as floors.

Timing (``--timing``): milliseconds per pretraining iteration of MAE (Transformer
decoder) and MetaMAE on the same model, measured interleaved in one process (one
thread), each as an ``mlo.Engine`` run of :class:`problems.meta_mae.MetaMAEPretrain`
and as a hand-written plain-PyTorch loop (``zero_grad; metamae_loss(...).backward();
step``) — for the cpu preset and for the paper's model size (256-d × 12 encoder,
128-d decoder at the preset's depth, batch ``--paper-batch``).

    python benchmarks/meta_mae_ablation.py                                  # 3 modalities, 3 seeds
    python benchmarks/meta_mae_ablation.py --modalities image tabular timeseries tokens --workers 2
    python benchmarks/meta_mae_ablation.py --timing-only

Writes ``benchmarks/results/meta_mae/ablation.json`` (every run) and ``timing.json``.
"""
from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "meta_mae"
ROWS = [
    ("MAE, linear decoder", ["--variant", "mae", "--decoder-depth", "0"]),
    ("MAE, Transformer decoder", ["--variant", "mae"]),
    ("+ latent adaptation", ["--no-contrastive"]),
    ("+ task contrast only", ["--no-adapt"]),
    ("MetaMAE (adapt + contrast)", []),
]


def _on_path() -> None:
    """The repository root on ``sys.path`` (for ``problems`` without an install)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


def one_run(job) -> Dict[str, Any]:
    modality, seed, row, extra, steps, floors = job
    import torch
    _on_path()
    from problems.jobs.meta_mae_job import main
    torch.set_num_threads(1)
    argv = ["--modality", modality, "--seed", str(seed), "--no-progress", "--threads", "1", "--overwrite",
            "--out", f"/tmp/meta_mae_ablation/{modality}_{seed}_{ROWS[row][0].split(',')[0][:6].strip('+ ')}_{row}",
            *extra]
    if steps:
        argv += ["--steps", str(steps)]
    if not floors:
        argv.append("--no-floors")
    buf = io.StringIO()
    with redirect_stdout(buf), redirect_stderr(io.StringIO()):
        r = main(argv)
    r["row"] = row
    return r


def fmt(values: List[float]) -> str:
    m = 100 * statistics.mean(values)
    s = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{m:.2f} ± {s:.2f}"


def ablation(args) -> Dict[str, Any]:
    jobs = [(m, seed, i, extra, args.steps, i == len(ROWS) - 1)
            for m in args.modalities for seed in args.seeds for i, (_, extra) in enumerate(ROWS)]
    t0 = time.perf_counter()
    results = []
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        for k, r in enumerate(pool.map(one_run, jobs)):
            results.append(r)
            print(f"  [{k + 1}/{len(jobs)}] {r['modality']:10s} seed {r['seed']} {ROWS[r['row']][0]:28s} "
                  f"{100 * r['accuracy']:.2f}%  ({r['seconds']:.0f}s, "
                  f"{1000 * r['seconds_per_iteration']:.1f} ms/it)  {time.perf_counter() - t0:.0f}s",
                  flush=True)
    table: Dict[str, Dict[str, str]] = {}
    for m in args.modalities:
        rs = [r for r in results if r["modality"] == m]
        col = {label: fmt([r["accuracy"] for r in rs if r["row"] == i]) for i, (label, _) in enumerate(ROWS)}
        floors = [r for r in rs if "random_init_accuracy" in r]
        col["random-init encoder (floor)"] = fmt([r["random_init_accuracy"] for r in floors])
        col["raw input (floor)"] = fmt([r["raw_accuracy"] for r in floors])
        table[m] = col
    steps = sorted({r["steps"] for r in results})
    out = {"seeds": args.seeds, "steps": steps, "rows": [label for label, _ in ROWS],
           "table": table, "runs": results, "wall_seconds": time.perf_counter() - t0,
           "command": " ".join(["python", "benchmarks/meta_mae_ablation.py"] + sys.argv[1:])}
    labels = list(next(iter(table.values())))
    print(f"\nlinear-probe test accuracy (%), mean ± std over seeds {args.seeds}, {steps} steps, cpu preset:")
    print(f"  {'row':30s}" + "".join(f"{m:>18s}" for m in args.modalities))
    for label in labels:
        print(f"  {label:30s}" + "".join(f"{table[m][label]:>18s}" for m in args.modalities))
    return out


# -------------------------------------------------------------------- timing
def timing(args) -> Dict[str, Any]:
    import torch
    torch.set_num_threads(1)
    _on_path()
    from problems.jobs import meta_mae_setup as ex
    from problems.jobs.meta_mae_job import parse_args
    from problems.latent_adaptation import metamae_loss
    from problems.meta_mae import MetaMAEPretrain
    from problems.transformer import math_attention
    import mlo

    out: Dict[str, Any] = {}
    for preset in ("cpu", "paper"):
        for m in args.modalities:
            cfg = ex.read_config(ex.CONFIGS / f"meta_mae_{m}.yaml")
            times: Dict[str, List[float]] = {}
            setups = {}
            for variant in ("mae", "metamae"):
                a = parse_args(["--modality", m, "--preset", preset, "--variant", variant])
                s = ex.make_settings(cfg, a)
                if preset == "paper":
                    s["batch_size"] = min(s["batch_size"], args.paper_batch)
                torch.manual_seed(0)
                train, test, tok, batches, raw = ex.load(m, cfg, s, 0)
                mae = ex.build_mae(tok, s, m)
                opts = ex.options(s)
                prob = MetaMAEPretrain(mae, batches, options=opts, projector_hidden=s["projector_hidden"],
                                       projector_out=s["projector_out"],
                                       generator=torch.Generator().manual_seed(1),
                                       optimizer_kwargs={"lr": 1e-4, "weight_decay": 1e-4})
                engine = mlo.Engine([prob], config=mlo.EngineConfig(progress=False))
                # the plain-PyTorch twin: same model (a copy), same options, same data stream
                import copy
                twin = copy.deepcopy(prob.module)
                opt = torch.optim.AdamW([p for p in twin.parameters() if p.requires_grad],
                                        lr=1e-4, weight_decay=1e-4)
                gen = torch.Generator().manual_seed(1)

                def plain_step(twin=twin, opt=opt, gen=gen, batches=batches, opts=opts):
                    x = next(batches)[0]
                    opt.zero_grad(set_to_none=True)
                    with math_attention(opts.adapt and not opts.first_order):
                        loss = metamae_loss(twin.mae, x, opts, twin.projector if opts.contrastive_weight else None,
                                            gen)["loss"]
                    loss.backward()
                    opt.step()

                setups[variant] = (engine, plain_step)
                times[f"mlo_{variant}"], times[f"plain_{variant}"] = [], []
            n = args.paper_steps if preset == "paper" else args.timing_steps
            for _ in range(2):                          # warm-up
                for variant, (engine, plain_step) in setups.items():
                    engine.run(1)
                    plain_step()
            for _ in range(n):                          # interleaved: same machine load for all four
                for variant, (engine, plain_step) in setups.items():
                    t = time.perf_counter()
                    engine.run(1)
                    times[f"mlo_{variant}"].append(time.perf_counter() - t)
                    t = time.perf_counter()
                    plain_step()
                    times[f"plain_{variant}"].append(time.perf_counter() - t)
            med = {k: 1000 * statistics.median(v) for k, v in times.items()}
            res = {f"{k}_ms": round(v, 2) for k, v in med.items()}
            res["metamae_over_mae_mlo"] = round(med["mlo_metamae"] / med["mlo_mae"], 3)
            res["metamae_over_mae_plain"] = round(med["plain_metamae"] / med["plain_mae"], 3)
            res["mlo_over_plain_metamae"] = round(med["mlo_metamae"] / med["plain_metamae"], 3)
            res["mlo_over_plain_mae"] = round(med["mlo_mae"] / med["plain_mae"], 3)
            res["iterations"] = n
            res["batch_size"] = s["batch_size"]
            res["model"] = (f"enc {s['width']}x{s['depth']}, dec {s['decoder_dim']}x{s['decoder_depth']}, "
                            f"mask {s['mask_ratio']}, {tok.num_tokens} tokens")
            out[f"{preset}/{m}"] = res
            print(f"  {preset:5s} {m:10s} {res['model']}, batch {s['batch_size']}: MAE {med['mlo_mae']:.1f} ms, "
                  f"MetaMAE {med['mlo_metamae']:.1f} ms -> {res['metamae_over_mae_mlo']:.2f}x "
                  f"(plain loop {res['metamae_over_mae_plain']:.2f}x); mlo/plain MetaMAE "
                  f"{res['mlo_over_plain_metamae']:.3f}x, MAE {res['mlo_over_plain_mae']:.3f}x", flush=True)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modalities", nargs="+", default=["image", "tabular", "timeseries"],
                    choices=["image", "tabular", "timeseries", "tokens"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, help="pretraining steps (default: the cpu preset's)")
    ap.add_argument("--workers", type=int, default=2, help="parallel runs (one thread each)")
    ap.add_argument("--timing-steps", type=int, default=40)
    ap.add_argument("--paper-steps", type=int, default=6)
    ap.add_argument("--paper-batch", type=int, default=32)
    ap.add_argument("--timing-only", action="store_true")
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.timing_only:
        res = ablation(args)
        name = "ablation.json" if set(args.modalities) != {"tokens"} else "ablation_tokens.json"
        (args.out / name).write_text(json.dumps(res, indent=2))
        print(f"wrote {args.out / name}")
    if not args.no_timing:
        print("\nms per pretraining iteration (median, 1 thread, interleaved):")
        res = timing(args)
        (args.out / "timing.json").write_text(json.dumps(res, indent=2))
        print(f"wrote {args.out / 'timing.json'}")


if __name__ == "__main__":
    main()
