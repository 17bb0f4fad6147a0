#!/usr/bin/env python
"""One command to check the paper presets on a GPU: both jobs, fp32 and bf16.

Runs the MLO-MAE ``paper`` preset (``examples/configs/mlo_mae_paper.yaml``, built by
:func:`problems.mlo_mae.build`: ViT-B/2 on 32×32×3, finite differences) and the MetaMAE
image ``paper`` preset (``examples/configs/meta_mae_image.yaml``, built as
``examples/meta_mae.py`` builds it — :mod:`problems.jobs.meta_mae_setup`: the latents as
a lower ``WindowProblem``) for
``--iterations`` engine iterations (default 300) in ``EngineConfig(precision="fp32")``
and ``"bf16"`` on the GPU, and reports per job and precision:

* **iterations/s**: engine iterations after a short warm-up (CUDA synchronised);
* **peak memory**: ``torch.cuda.max_memory_allocated`` over building and running (on
  a CPU: the peak resident set of the process since the job started);
* **hypergradient agreement bf16 vs fp32**, at the fp32 run's final state: MLO-MAE's
  mask hypergradient by :meth:`mlo.Engine.gradient` on one batch, once in each
  precision; MetaMAE's meta-gradient of the next upper update (checkpoint, one update
  in fp32, restore, the same update — same batch, RNG and Nearby-S draws — in bf16;
  ``engine.last_hypergradient``) — cosine and relative error;
* **the final probe**: :func:`problems.evaluation.linear_probe` of the trained encoder
  (MLO-MAE: CLS feature on ``--probe-images`` training and a quarter as many test
  images; MetaMAE: mean-pooled, on the preset's digits);
* the finite-difference precision warnings the runs gave (mlo warns when ε is below
  what bf16 resolves).

It exits with status 1 when anything fails (an exception, out of memory, a non-finite
loss or hypergradient), after running and reporting everything else.

Data: CIFAR-10 from ``--data-dir`` when given (``problems.datasets.cifar``), else random
images in the preset's shape (then the probe measures nothing but the plumbing);
MetaMAE's image preset reads scikit-learn's digits (bundled).

Without a GPU (or with ``--toy``) the same code runs at toy sizes — tiny models through
settings overrides, random data in the presets' shapes, 20 iterations — and the first
line says so: CI exercises the path (``tests/test_gpu_smoke.py``)::

    python benchmarks/gpu_smoke.py                  # on a CPU: the toy path, under a minute
    python benchmarks/gpu_smoke.py --data-dir ~/data --iterations 500 --out runs/gpu_smoke.json
    python benchmarks/gpu_smoke.py --mlo-mae-batch-size 48        # a 24 GB GPU

MLO-MAE at the preset's batch 128 needs an estimated 43–46 GB (docs/benchmarks.md,
"MLO-MAE paper preset: peak memory"): an 80 GB GPU, a 48 GB one borderline;
``--mlo-mae-batch-size`` 96 on 40 GB, 48 on 24 GB. An out-of-memory run is reported as a
failure with that advice.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "benchmarks"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import engines.finite_difference as fdm  # noqa: E402
import mlo  # noqa: E402
import rss  # noqa: E402
from mlo.config import load_yaml  # noqa: E402
from mlo.monitor import compare  # noqa: E402
from problems.evaluation import Features, linear_probe  # noqa: E402

PRECISIONS = ("fp32", "bf16")
TOY_ITERATIONS = 20
# Settings overrides that make each preset a toy (the data keep the presets' shapes).
TOY_MLO_MAE = dict(embed_dim=16, depth=1, num_heads=2, decoder_dim=16, decoder_depth=1,
                   decoder_heads=2, mask_hidden=16, batch_size=8)
TOY_META_MAE = dict(width=16, depth=1, heads=2, decoder_dim=16, decoder_depth=1, decoder_heads=2,
                    projector_hidden=16, projector_out=8, batch_size=8, probe_max_iter=50)


class Failure(Exception):
    """A check of the smoke run failed (the message says which)."""


# ------------------------------------------------------------------ measuring
class Meter:
    """Peak memory of a job: CUDA's allocator statistics, or the process's RSS on a CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        if self.cuda:
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            self.how = "torch.cuda.max_memory_allocated"
        else:
            _, self.rss = rss.reset_peak()
            self.how = f"peak RSS of the process, {self.rss}"

    def peak_gb(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device) / 1e9
        return rss.peak_mb(self.rss) * 2 ** 20 / 1e9


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_run(engine: mlo.Engine, iterations: int, warmup: int, device: torch.device) -> float:
    """Engine iterations per second over ``iterations`` after ``warmup`` untimed ones."""
    engine.run(warmup)
    sync(device)
    t0 = time.perf_counter()
    engine.run(iterations)
    sync(device)
    return iterations / (time.perf_counter() - t0)


def check_finite(engine: mlo.Engine) -> None:
    for name, rec in engine.records.items():
        loss = rec.get("loss")
        if loss is not None and not math.isfinite(loss):
            raise Failure(f"problem {name!r}: non-finite loss {loss}")


def agreement(h: Dict[str, torch.Tensor], ref: Dict[str, torch.Tensor]) -> Dict[str, float]:
    names = sorted(ref)
    if not names or set(h) != set(ref):
        raise Failure(f"no hypergradient to compare (variables {sorted(h)} vs {sorted(ref)})")
    cos, rel = compare(h, ref, names)
    if not (math.isfinite(cos) and math.isfinite(rel)):
        raise Failure(f"hypergradient agreement is not finite (cosine {cos}, rel. error {rel})")
    return {"cosine": cos, "rel_error": rel}


class Stream:
    """An endless batch stream that can be pinned to one batch (for a fork's replay)."""

    def __init__(self, inner):
        self.inner = iter(inner)
        self.pinned = None

    def __iter__(self):
        return self

    def __next__(self):
        return self.pinned if self.pinned is not None else next(self.inner)


# --------------------------------------------------------------------- MLO-MAE
def mlo_mae_job(args, device: torch.device, toy: bool) -> Dict[str, Any]:
    """``(build(precision) -> (engine, probe fn), agreement(engine) -> dict)`` for MLO-MAE."""
    from problems.mlo_mae import MLOMAESettings, build

    cfg = load_yaml(ROOT / "examples/configs/mlo_mae_paper.yaml")
    s = dict(cfg["settings"])
    s["method_options"] = dict(cfg["method_options"].get(s.get("method", "finite_difference"), {}))
    if toy:
        s.update(TOY_MLO_MAE)
    if args.mlo_mae_batch_size is not None:
        s["batch_size"] = args.mlo_mae_batch_size
    settings = MLOMAESettings.from_dict(s)
    shape = (settings.in_chans, settings.image_size, settings.image_size)
    if args.data_dir and not toy:
        from problems.datasets.cifar import load_cifar

        cifar = load_cifar(str(Path(args.data_dir).expanduser()), "cifar10")
        (x, y), (xt, yt) = cifar.tensors("train"), cifar.tensors("test")
        data = "CIFAR-10"
    else:
        n = 256 if toy else 10_000
        g = torch.Generator().manual_seed(0)
        k = settings.num_classes
        x, y = torch.rand(n, *shape, generator=g), torch.randint(0, k, (n,), generator=g)
        xt, yt = torch.rand(n // 4, *shape, generator=g), torch.randint(0, k, (n // 4,), generator=g)
        data = f"random images {list(shape)} (no CIFAR-10: --data-dir)"
    x, y = x.to(device), y.to(device)
    n_probe = 200 if toy else args.probe_images

    def make(precision: str):
        graph = build("mlo-mae", settings, (x, y), seed=0,
                      engine_config=mlo.EngineConfig(device=str(device), precision=precision))

        def probe():
            return linear_probe(Features(graph.mae, "cls"), (x[:n_probe], y[:n_probe]),
                                (xt[:n_probe // 4], yt[:n_probe // 4]), num_classes=settings.num_classes,
                                max_iter=50 if toy else 500).accuracy

        return graph.engine, probe

    def agree(engine: mlo.Engine) -> Dict[str, float]:
        batch = engine.problems["mask"].next_batch()
        h = {}
        for precision in PRECISIONS:       # the same state, the same batch, each precision
            engine.config = dataclasses.replace(engine.config, precision=precision)
            h[precision] = engine.gradient("mask", batch=batch)["grad"]
        return agreement(h["bf16"], h["fp32"])

    desc = (f"ViT {settings.embed_dim}x{settings.depth}/{settings.patch_size}, decoder "
            f"{settings.decoder_dim}x{settings.decoder_depth}, batch {settings.batch_size}, "
            f"{settings.method} {settings.method_options}; {data}")
    return {"make": make, "agree": agree, "warmup": 2 * settings.unroll_steps, "desc": desc,
            "what": "mask hypergradient (engine.gradient)"}


# --------------------------------------------------------------------- MetaMAE
def meta_mae_job(args, device: torch.device, toy: bool) -> Dict[str, Any]:
    from problems.jobs import meta_mae_setup as ex     # MetaMAE's job (examples/meta_mae.py): presets, building
    from problems.jobs.meta_mae_job import parse_args

    ns = parse_args(["--modality", "image", "--preset", "paper"])
    cfg = ex.read_config(ex.CONFIGS / "meta_mae_image.yaml")
    s = ex.make_settings(cfg, ns)
    if toy:
        s.update(TOY_META_MAE)
    if args.meta_mae_batch_size is not None:
        s["batch_size"] = args.meta_mae_batch_size
    train, test, _, _, _ = ex.load("image", cfg, s, ns.seed)
    if toy:                               # random data in the preset's shapes
        g = torch.Generator().manual_seed(0)
        train = (torch.rand(256, *train[0].shape[1:], generator=g), torch.randint(0, 10, (256,), generator=g))
        test = (torch.rand(64, *train[0].shape[1:], generator=g), torch.randint(0, 10, (64,), generator=g))
        data = f"random images {list(train[0].shape[1:])}"
    else:
        data = f"digits {list(train[0].shape[1:])} (the preset's)"
    opts = ex.options(s)
    forks: Dict[int, Any] = {}       # per engine: (its batch stream, the upper's name, iterations an update)

    def make(precision: str):
        from problems.datasets import infinite_loader

        torch.manual_seed(ns.seed)                  # as the example: seed, load, build
        _, _, tok, _, _ = ex.load("image", cfg, s, ns.seed)
        stream = Stream(infinite_loader((train[0],), s["batch_size"], seed=ns.seed))
        mae = ex.build_mae(tok, s, "image")
        sched = {}
        if s["cosine"]:
            sched = {"scheduler": torch.optim.lr_scheduler.CosineAnnealingLR,
                     "scheduler_kwargs": {"T_max": s["steps"], "eta_min": 0.05 * s["lr"]}}
        engine, upper, per_step = ex.build("graph", mae, stream, opts, s, ns,
                                           mlo.EngineConfig(device=str(device), precision=precision), sched)
        forks[id(engine)] = (stream, upper.name, per_step)

        def probe():
            return linear_probe(lambda t: mae.features(t, pool="mean"), train, test,
                                max_iter=s["probe_max_iter"]).accuracy

        return engine, probe

    def agree(engine: mlo.Engine) -> Dict[str, float]:
        stream, upper, per_step = forks.pop(id(engine))
        gens = [P.generator for P in engine.problems.values()
                if isinstance(getattr(P, "generator", None), torch.Generator)]     # Nearby-S draws
        states = [g.get_state() for g in gens]
        stream.pinned = next(stream.inner)
        h = {}
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "fork.pt"
            mlo.checkpoint.save(engine, path)
            for precision in PRECISIONS:      # the same next update from the same state
                mlo.checkpoint.load(engine, path)
                for g, st in zip(gens, states):
                    g.set_state(st)
                engine.config = dataclasses.replace(engine.config, precision=precision)
                engine.run(per_step)
                h[precision] = {k: v.detach().clone() for k, v in engine.last_hypergradient[upper].items()}
        return agreement(h["bf16"], h["fp32"])

    desc = (f"encoder {s['width']}x{s['depth']}, decoder {s['decoder_dim']}x{s['decoder_depth']}, "
            f"batch {s['batch_size']}, alpha {s['alpha']}, {s['inner_steps']} inner step(s); {data}")
    return {"make": make, "agree": agree, "warmup": 2 * opts.steps, "desc": desc,
            "what": "meta-gradient of the next upper update (checkpoint fork)"}


# ------------------------------------------------------------------------ run
JOBS: Dict[str, Callable[..., Dict[str, Any]]] = {"mlo_mae": mlo_mae_job, "meta_mae": meta_mae_job}


def run_job(name: str, job: Dict[str, Any], iterations: int, device: torch.device) -> Dict[str, Any]:
    out: Dict[str, Any] = {"job": name, "desc": job["desc"], "runs": {}}
    for precision in PRECISIONS:
        rec: Dict[str, Any] = {}
        out["runs"][precision] = rec
        try:
            fdm._WARNED_PRECISION.clear()     # each run reports its own (mlo warns once a process)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                meter = Meter(device)
                engine, probe = job["make"](precision)
                rec["iterations_per_s"] = timed_run(engine, iterations, job["warmup"], device)
                check_finite(engine)
                rec["peak_memory_gb"], rec["memory_measure"] = meter.peak_gb(), meter.how
                rec["probe_accuracy"] = probe()
                if not math.isfinite(rec["probe_accuracy"]):
                    raise Failure(f"probe accuracy {rec['probe_accuracy']}")
            rec["warnings"] = sorted({" ".join(str(w.message).split())[:300] for w in caught
                                      if issubclass(w.category, RuntimeWarning)})
            if precision == "fp32":          # at the fp32 run's final state
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")   # the bf16 run reports its warnings
                        out["agreement"] = dict(job["agree"](engine), of=job["what"])
                except Exception as e:
                    out["agreement"] = {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:500]}",
                                        "traceback": traceback.format_exc(limit=6)}
        except Exception as e:     # reported, the other runs go on
            if device.type == "cuda" and isinstance(e, torch.cuda.OutOfMemoryError):
                rec["error"] = (f"out of memory ({torch.cuda.max_memory_allocated(device) / 1e9:.1f} GB "
                                f"allocated at the peak): lower the batch (--{name.replace('_', '-')}-batch-size)")
            else:
                rec["error"] = f"{type(e).__name__}: {' '.join(str(e).split())[:500]}"
                rec["traceback"] = traceback.format_exc(limit=6)
        finally:
            engine = probe = None   # noqa: F841 - free the models before the next run
            if device.type == "cuda":
                torch.cuda.empty_cache()
        line = (f"[gpu_smoke] {name} {precision}: "
                + (f"FAILED: {rec['error']}" if "error" in rec else
                   f"{rec['iterations_per_s']:.2f} it/s, peak {rec['peak_memory_gb']:.2f} GB "
                   f"({rec['memory_measure']}), probe {100 * rec['probe_accuracy']:.2f}%"
                   + (f", {len(rec['warnings'])} warning(s)" if rec["warnings"] else "")))
        print(line, flush=True)
        for w in rec.get("warnings", []):
            print(f"    warning: {w}", flush=True)
    a = out.get("agreement")
    if a is not None and "error" in a:
        print(f"[gpu_smoke] {name}: bf16 vs fp32 hypergradient agreement FAILED: {a['error']}", flush=True)
    elif a is not None:
        print(f"[gpu_smoke] {name}: bf16 vs fp32 {a['of']}: cosine {a['cosine']:.4f}, rel. error "
              f"{a['rel_error']:.3g}", flush=True)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iterations", type=int, help="timed engine iterations per run (default 300 on a "
                                                  f"GPU, {TOY_ITERATIONS} at toy sizes)")
    p.add_argument("--device", help="default: cuda if available")
    p.add_argument("--toy", action="store_true", help="toy sizes even on a GPU")
    p.add_argument("--jobs", nargs="+", choices=sorted(JOBS), default=list(JOBS))
    p.add_argument("--data-dir", help="a folder with CIFAR-10's python release (else random images)")
    p.add_argument("--probe-images", type=int, default=4000, help="MLO-MAE probe training images "
                                                                   "(test: a quarter as many)")
    p.add_argument("--mlo-mae-batch-size", type=int, help="override the MLO-MAE preset's 128")
    p.add_argument("--meta-mae-batch-size", type=int, help="override the MetaMAE preset's 64")
    p.add_argument("--out", type=Path, help="write the results as JSON")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    toy = args.toy or device.type != "cuda"
    iterations = args.iterations or (TOY_ITERATIONS if toy else 300)
    if iterations < 1:
        p.error("--iterations must be >= 1")
    if toy:
        why = "--toy" if args.toy else f"no GPU ({device}, torch {torch.__version__})"
        print(f"[gpu_smoke] {why}: running the same code path at toy sizes (tiny models, random data in "
              f"the presets' shapes, {iterations} iterations) — a check of the path, not a measurement",
              flush=True)
        torch.set_num_threads(1)
    else:
        print(f"[gpu_smoke] {torch.cuda.get_device_name(device)} ({device}), torch {torch.__version__}: "
              f"MLO-MAE and MetaMAE image paper presets, {iterations} iterations each in fp32 and bf16",
              flush=True)
    results = {"device": str(device), "toy": toy, "iterations": iterations, "torch": torch.__version__,
               "jobs": {}}
    failed = []
    for name in args.jobs:
        try:
            job = JOBS[name](args, device, toy)
        except Exception as e:
            print(f"[gpu_smoke] {name}: FAILED to set up: {type(e).__name__}: {e}", flush=True)
            results["jobs"][name] = {"error": f"{type(e).__name__}: {e}"}
            failed.append(name)
            continue
        print(f"[gpu_smoke] {name}: {job['desc']}", flush=True)
        res = results["jobs"][name] = run_job(name, job, iterations, device)
        failed += [f"{name} {prec}" for prec, r in res["runs"].items() if "error" in r]
        if "error" in res.get("agreement", {}) or ("agreement" not in res and "error" not in res["runs"]["fp32"]):
            failed.append(f"{name} agreement")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"[gpu_smoke] {'FAILED: ' + ', '.join(failed) if failed else 'all runs passed'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
