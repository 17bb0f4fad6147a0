"""MetaMAE's Table-4 ablation on small datasets, and its cost per iteration.

Ablation: for each column (a modality; the image modality on scikit-learn's 8×8 digits
or, with ``--image-data fashion-mnist``, on Fashion-MNIST with the preset
``examples/configs/meta_mae_fmnist.yaml``: column ``image-fmnist``) and seed, MetaMAE's job
(``examples/meta_mae.py``, i.e. ``problems.jobs.meta_mae_job.main``; cpu preset, one
torch thread, in a worker process) is run for the rows

    MAE, linear decoder             --variant mae --decoder-depth 0
    MAE, Transformer decoder        --variant mae
    + latent adaptation             --no-contrastive
    + task contrast only            --no-adapt            (the two views coincide)
    MetaMAE (adaptation + contrast) (default)

and the linear-probe test accuracy (mean-pooled frozen encoder) is reported as mean ±
std over seeds, with the random-init encoder and the raw input as floors (probed in
the MetaMAE row's run of each seed).

Resumable: each finished (row, seed) is written at once to
``OUT/runs/<column>/<row>__seed<k>.json``; a run whose file exists is not run again (its
stored job arguments and settings must equal this invocation's, else the benchmark stops
naming the file), so an interrupted study continues where it stopped, and two processes
started with the same arguments share the work (a run is claimed by creating
``<row>__seed<k>.claim`` holding the worker's pid; the claim of a dead process is taken
over). At the end every finished run of the requested columns and seeds is gathered
into one JSON and the table is printed; ``table`` prints it again from the run files.

Timing (``--timing``): milliseconds per pretraining iteration of MAE (Transformer
decoder) and MetaMAE on the same model, measured interleaved in one process (one
thread), each as an ``mlo.Engine`` run of :class:`problems.meta_mae.MetaMAEPretrain`
and as a hand-written plain-PyTorch loop (``zero_grad; metamae_loss(...).backward();
step``) — for the cpu preset and for the paper's model size (256-d × 12 encoder,
128-d decoder at the preset's depth, batch ``--paper-batch``).

    python benchmarks/meta_mae_ablation.py                                  # 3 modalities, 3 seeds
    python benchmarks/meta_mae_ablation.py --modalities image tabular timeseries tokens --workers 2
    OMP_NUM_THREADS=1 python benchmarks/meta_mae_ablation.py --modalities image \
        --image-data fashion-mnist --seeds 0 1 2 --workers 2 --no-timing    # Fashion-MNIST column
    python benchmarks/meta_mae_ablation.py table --modalities image --image-data fashion-mnist
    python benchmarks/meta_mae_ablation.py --timing-only

Writes ``benchmarks/results/meta_mae/ablation.json`` (every run; ``ablation_tokens.json``
for tokens alone, ``ablation_fmnist.json`` with ``--image-data fashion-mnist``), the run
files under ``runs/``, and ``timing.json``.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "meta_mae"
CONFIGS = ROOT / "examples" / "configs"
MODALITIES = ("image", "tabular", "timeseries", "tokens")
# --image-data -> (column name, preset of the image modality; None: the job's default)
IMAGE_DATA = {"digits": ("image", None), "fashion-mnist": ("image-fmnist", CONFIGS / "meta_mae_fmnist.yaml")}
# (label, file-name slug, the job's switches)
ROWS = [
    ("MAE, linear decoder", "mae-linear", ["--variant", "mae", "--decoder-depth", "0"]),
    ("MAE, Transformer decoder", "mae-transformer", ["--variant", "mae"]),
    ("+ latent adaptation", "latent-adaptation", ["--no-contrastive"]),
    ("+ task contrast only", "task-contrast-only", ["--no-adapt"]),
    ("MetaMAE (adapt + contrast)", "metamae", []),
]
FLOORS = [("random-init encoder (floor)", "random_init_accuracy"), ("raw input (floor)", "raw_accuracy")]


def _on_path() -> None:
    """The repository root on ``sys.path`` (for ``problems`` without an install)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


# ------------------------------------------------------------ runs and claims
def column_of(modality: str, image_data: str) -> str:
    """The table column of ``modality`` (``image-fmnist`` for the Fashion-MNIST image data)."""
    return IMAGE_DATA[image_data][0] if modality == "image" else modality


def job_argv(modality: str, image_data: str, seed: int, row: int, steps: Optional[int]) -> List[str]:
    """The job's command line for one (row, seed), without ``--out``."""
    config = IMAGE_DATA[image_data][1] if modality == "image" else None
    argv = ["--modality", modality, "--seed", str(seed), "--no-progress", "--threads", "1", *ROWS[row][2]]
    if config is not None:
        argv += ["--config", str(config.relative_to(ROOT))]
    if steps:
        argv += ["--steps", str(steps)]
    if row != len(ROWS) - 1:      # floors once per seed, in the MetaMAE row's run
        argv.append("--no-floors")
    return argv


def run_paths(runs: Path, row: int, seed: int):
    """``(result file, claim file)`` of one (row, seed) in a column's run folder."""
    stem = f"{ROWS[row][1]}__seed{seed}"
    return runs / f"{stem}.json", runs / f"{stem}.claim"


def _alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (a claim's owner)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim(path: Path) -> bool:
    """Creates the claim file ``path`` holding this process's pid, atomically; ``False``
    when a live process holds it. A dead process's claim is removed and taken."""
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                owner = int(path.read_text().strip() or "0")
            except (OSError, ValueError):
                return False        # being written by its owner right now
            if owner and _alive(owner):
                return False
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False


def write_json(path: Path, obj: Any) -> None:
    """Writes ``obj`` to ``path`` through a temporary file renamed into place."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def expected_settings(argv: Sequence[str]) -> Dict[str, Any]:
    """The settings the job would run with for ``argv`` (to check a stored run)."""
    _on_path()
    from problems.jobs import meta_mae_setup as ex
    from problems.jobs.meta_mae_job import parse_args
    a = parse_args(list(argv))
    cfg = ex.read_config(ROOT / a.config if a.config else ex.CONFIGS / f"meta_mae_{a.modality}.yaml")
    return json.loads(json.dumps(ex.make_settings(cfg, a)))


class StaleRun(ValueError):
    """A stored run made with other arguments or settings than the ones asked for."""


def stored_run(path: Path, argv: Sequence[str]) -> Dict[str, Any]:
    """The run stored in ``path``, checked against this invocation's ``argv``."""
    r = json.loads(path.read_text())
    if r.get("argv") != list(argv) or r.get("settings") != expected_settings(argv):
        what = "arguments" if r.get("argv") != list(argv) else "settings (the preset changed)"
        raise StaleRun(f"{path} holds a run made with other {what}: stored {r.get('argv')}, asked "
                       f"{list(argv)}; delete it (or pass another --out) to run it again")
    return r


def one_run(job) -> Optional[Dict[str, Any]]:
    """Runs one (column, row, seed) unless its file exists (returned, checked) or another
    live process claimed it (``None``); writes the result file at once."""
    column, modality, seed, row, argv, runs = job
    done, lock = run_paths(runs, row, seed)
    if done.exists():
        return {**stored_run(done, argv), "resumed": True}
    if not claim(lock):
        return None
    try:
        if done.exists():                      # finished by another process meanwhile
            return {**stored_run(done, argv), "resumed": True}
        import torch
        _on_path()
        from problems.jobs.meta_mae_job import main
        torch.set_num_threads(1)
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix=f"meta_mae_ablation_{column}_") as tmp, \
                redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
            r = main([str(ROOT / a) if k and argv[k - 1] == "--config" else a for k, a in enumerate(argv)]
                     + ["--out", tmp])                # the preset found from any working directory
        r.update(column=column, row=row, row_label=ROWS[row][0], argv=list(argv),
                 job_seconds=time.perf_counter() - t0)
        write_json(done, r)
        return r
    finally:
        lock.unlink(missing_ok=True)


def gather(out: Path, columns: Sequence[str], seeds: Sequence[int]) -> List[Dict[str, Any]]:
    """Every finished run of ``columns`` × ``seeds`` × rows under ``out/runs``."""
    runs = []
    for c in columns:
        for seed in seeds:
            for row in range(len(ROWS)):
                path = run_paths(out / "runs" / c, row, seed)[0]
                if path.exists():
                    runs.append(json.loads(path.read_text()))
    return runs


# --------------------------------------------------------------------- table
def fmt(values: List[float]) -> str:
    """``mean ± std`` in percent (one value: ``± 0.00``)."""
    m = 100 * statistics.mean(values)
    s = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{m:.2f} ± {s:.2f}"


def make_table(runs: List[Dict[str, Any]], columns: Sequence[str]) -> Dict[str, Dict[str, str]]:
    """``{column: {row label: "mean ± std"}}``, the floors included; a cell with fewer
    seeds than the column's most complete row says ``(n=k)``; no run: ``—``."""
    table: Dict[str, Dict[str, str]] = {}
    for c in columns:
        rs = [r for r in runs if r.get("column", r["modality"]) == c]
        cells: Dict[str, List[float]] = {label: [r["accuracy"] for r in rs if r["row"] == i]
                                         for i, (label, _, _) in enumerate(ROWS)}
        for label, key in FLOORS:
            cells[label] = [r[key] for r in rs if key in r]
        full = max((len(v) for v in cells.values()), default=0)
        col = {}
        for label, values in cells.items():
            if not values:
                col[label] = "—"
            elif label == FLOORS[1][0] and len(set(values)) == 1:
                col[label] = f"{100 * values[0]:.2f}"      # raw input: the same for every seed
            else:
                col[label] = fmt(values) + (f" (n={len(values)})" if len(values) < full else "")
        table[c] = col
    return table


def print_table(table: Dict[str, Dict[str, str]], runs: List[Dict[str, Any]]) -> str:
    """The markdown table (rows × columns) with a caption; returns it."""
    columns = list(table)
    seeds = sorted({r["seed"] for r in runs})
    steps = sorted({r["steps"] for r in runs})
    lines = [f"linear-probe test accuracy (%), mean ± std over seeds {seeds}, {steps} steps, cpu preset:",
             "| row | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    labels = [label for label, _, _ in ROWS] + [label for label, _ in FLOORS]
    lines += [f"| {label} | " + " | ".join(table[c][label] for c in columns) + " |" for label in labels]
    for c in columns:
        minutes = []
        for i, (label, _, _) in enumerate(ROWS):
            secs = [r["job_seconds"] for r in runs if r.get("column") == c and r["row"] == i and "job_seconds" in r]
            if secs:
                minutes.append(f"{label}: {statistics.mean(secs) / 60:.1f}")
        if minutes:
            lines.append(f"{c}, minutes per run (mean; pretraining + probes): " + "; ".join(minutes))
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def result_name(modalities: Sequence[str], image_data: str) -> str:
    """``ablation.json``, ``ablation_tokens.json`` (tokens alone), ``ablation_fmnist.json``
    (the image column on Fashion-MNIST)."""
    name = "ablation_tokens" if set(modalities) == {"tokens"} else "ablation"
    if image_data == "fashion-mnist" and "image" in modalities:
        name = name + "_fmnist" if name != "ablation" else "ablation_fmnist"
    return name + ".json"


def ablation(args) -> Dict[str, Any]:
    """Runs the (column, row, seed) runs not yet done, then gathers and prints the table."""
    columns = [column_of(m, args.image_data) for m in args.modalities]
    jobs = []
    for m, c in zip(args.modalities, columns):
        runs = args.out / "runs" / c
        runs.mkdir(parents=True, exist_ok=True)
        jobs += [(c, m, seed, i, job_argv(m, args.image_data, seed, i, args.steps), runs)
                 for seed in args.seeds for i in range(len(ROWS))]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        for k, (job, r) in enumerate(zip(jobs, pool.map(one_run, jobs))):
            head = f"  [{k + 1}/{len(jobs)}] {job[0]:12s} seed {job[2]} {ROWS[job[3]][0]:28s}"
            if r is None:
                print(f"{head} claimed by another process", flush=True)
                continue
            how = ("stored" if r.get("resumed") else
                   f"{r['seconds']:.0f}s, {1000 * r['seconds_per_iteration']:.1f} ms/it")
            print(f"{head} {100 * r['accuracy']:.2f}%  ({how})  {time.perf_counter() - t0:.0f}s", flush=True)
    runs = gather(args.out, columns, args.seeds)
    missing = len(jobs) - len(runs)
    table = make_table(runs, columns)
    print()
    text = print_table(table, runs)
    if missing:
        print(f"{missing} run(s) not finished yet (claimed by another process)")
    return {"seeds": args.seeds, "steps": sorted({r["steps"] for r in runs}), "image_data": args.image_data,
            "rows": [label for label, _, _ in ROWS], "table": table, "markdown": text, "runs": runs,
            "missing": missing, "wall_seconds": time.perf_counter() - t0,
            "command": " ".join(["python", "benchmarks/meta_mae_ablation.py"] + sys.argv[1:])}


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
            config = IMAGE_DATA[args.image_data][1] if m == "image" else None
            cfg = ex.read_config(config or ex.CONFIGS / f"meta_mae_{m}.yaml")
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
    ap.add_argument("command", nargs="?", choices=("run", "table"), default="run",
                    help="run (default): the runs not yet done, then the table; table: the table "
                         "of the finished runs only")
    ap.add_argument("--modalities", nargs="+", default=["image", "tabular", "timeseries"], choices=MODALITIES)
    ap.add_argument("--image-data", choices=list(IMAGE_DATA), default="digits",
                    help="the image modality's data: digits (8x8, meta_mae_image.yaml) or fashion-mnist "
                         "(meta_mae_fmnist.yaml; column image-fmnist)")
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
    args.out = args.out.resolve()
    if args.command == "table":
        columns = [column_of(m, args.image_data) for m in args.modalities]
        runs = gather(args.out, columns, args.seeds)
        if not runs:
            ap.exit(2, f"error: no finished runs of {columns} for seeds {args.seeds} under {args.out / 'runs'}\n")
        print_table(make_table(runs, columns), runs)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.timing_only:
        try:
            res = ablation(args)
        except StaleRun as e:
            ap.exit(2, f"error: {e}\n")
        name = result_name(args.modalities, args.image_data)
        write_json(args.out / name, res)
        print(f"wrote {args.out / name}")
    if not args.no_timing:
        print("\nms per pretraining iteration (median, 1 thread, interleaved):")
        res = timing(args)
        (args.out / "timing.json").write_text(json.dumps(res, indent=2))
        print(f"wrote {args.out / 'timing.json'}")


if __name__ == "__main__":
    main()
