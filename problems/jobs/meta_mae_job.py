"""MetaMAE's job: pretrain with ``engine.run`` (losses to ``metrics.csv`` through
:class:`mlo.loggers.CSVLogger`), then linear probes; ``main(argv)`` is
``examples/meta_mae.py`` (its docstring describes the command line and the files).
The parts (configs, data, model, graph) are :mod:`problems.jobs.meta_mae_setup`.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

import mlo
from mlo.loggers import CSVLogger
from problems.jobs.common import CHECKPOINTS, UsageError, claim_out
from problems.jobs.meta_mae_setup import (CONFIGS, MODALITIES, TABULAR_EMBEDDINGS, build, build_mae, load,
                                          make_settings, options, probe, read_config)

__all__ = ["parse_args", "TimedCSV", "run", "main"]

RUN_FILES = ("summary.json",)   # an --out holding it (or periodic checkpoints) holds a run


def parse_args(argv: Optional[List[str]] = None, description: Optional[str] = None) -> argparse.Namespace:
    """The job's options (``description``: the ``--help`` text above them)."""
    p = argparse.ArgumentParser(description=description or __doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modality", choices=MODALITIES, required=True)
    p.add_argument("--preset", choices=("cpu", "paper"), default="cpu",
                   help="cpu (default: a few minutes on one core) or paper (the paper's model)")
    p.add_argument("--config", type=Path, help="a YAML of your own (default: configs/meta_mae_<modality>.yaml)")
    p.add_argument("--form", choices=("graph", "single"), default="graph",
                   help="graph (default): latents as a lower WindowProblem; single: one problem "
                        "whose loss takes the inner step")
    p.add_argument("--variant", choices=("metamae", "mae"), default="metamae",
                   help="mae = no latent adaptation and no task contrast (the MAE loss)")
    p.add_argument("--no-adapt", action="store_true", help="no latent adaptation (Z* = Z)")
    p.add_argument("--no-contrastive", action="store_true", help="no task contrast (λ = 0)")
    p.add_argument("--decoder-depth", type=int, help="decoder blocks; 0 = linear decoder")
    p.add_argument("--support-ratio", type=float, help="Nearby-S ratio r (paper 0.1)")
    p.add_argument("--first-order", action="store_true", help="first-order latent adaptation")
    p.add_argument("--alpha", type=float, help="inner step size α")
    p.add_argument("--lam", type=float, help="task-contrast weight λ")
    p.add_argument("--steps", type=int, help="pretraining iterations")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting of the config (value parsed as YAML, checked against the "
                        "setting's type and range); repeatable; the switches above win over it")
    p.add_argument("--tabular-embedding", choices=TABULAR_EMBEDDINGS,
                   help="tabular feature embedding: shared (one Linear(1, D), the official code's "
                        "1x1 convolution) or per_feature; default: the config's tokenizer.embedding")
    p.add_argument("--seed", type=int, default=0, help="model / batch seed (the data split is fixed)")
    p.add_argument("--quick", action="store_true", help="smoke run: a few steps")
    p.add_argument("--out", type=Path, help="output directory (default runs/meta_mae/<modality>, "
                   "runs/meta_mae_quick/<modality> with --quick); a folder holding a run is refused "
                   "unless --overwrite")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run in --out (its summary.json and checkpoints/)")
    p.add_argument("--checkpoint-every", type=int, metavar="N",
                   help="write --out/checkpoints/ckpt-<iteration>.pt every N engine iterations")
    p.add_argument("--checkpoint-keep", type=int, default=3, metavar="K",
                   help="periodic checkpoints kept (default 3)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-floors", action="store_true", help="skip the random-init and raw-input probes")
    return p.parse_args(argv)


class TimedCSV(CSVLogger):
    """``CSVLogger`` with the wall-clock seconds since the run started."""

    def __init__(self, path: Path):
        super().__init__(path)
        self.t0 = time.perf_counter()

    def log(self, iteration: int, metrics: Dict[str, float]) -> None:
        super().log(iteration, {**metrics, "seconds": round(time.perf_counter() - self.t0, 4)})


def _claim(out: Path, args: argparse.Namespace, delete: bool = True) -> None:
    """Checks ``--threads``, ``--checkpoint-every`` / ``--checkpoint-keep``, then refuses an
    ``out`` that cannot be written or holds a run unless ``--overwrite``
    (:func:`problems.jobs.common.claim_out`; ``delete=False``: the old run is only
    checked, not deleted yet)."""
    if args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    for flag, value in (("--checkpoint-every", args.checkpoint_every), ("--checkpoint-keep", args.checkpoint_keep)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be >= 1, got {value}")
    claim_out(out, RUN_FILES, args.overwrite, delete=delete)


def _print_setup(args: argparse.Namespace, s: Dict[str, Any], train, test, tok, opts) -> None:
    name = ("MAE" if not opts.adapt and not opts.contrastive_weight else "MetaMAE")
    decoder = "linear" if s["decoder_depth"] == 0 else f"{s['decoder_dim']}x{s['decoder_depth']}"
    print(f"[meta_mae] {args.modality} ({args.form} form): train {len(train[0])}, test {len(test[0])}, "
          f"{tok.num_tokens} tokens; encoder {s['width']}x{s['depth']}, decoder "
          f"{decoder}; "
          f"{name}: adapt={opts.adapt} (alpha {opts.alpha}, r {opts.support_ratio}, "
          f"{'first' if opts.first_order else 'second'} order), lambda {opts.contrastive_weight}, "
          f"mask {s['mask_ratio']}; {s['steps']} steps, batch {s['batch_size']}, seed {args.seed}"
          + (f"; {tok.embedding} feature embedding" if args.modality == "tabular" else ""),
          flush=True)


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """The whole job for parsed options; returns what ``summary.json`` holds."""
    cfg = read_config(args.config or CONFIGS / f"meta_mae_{args.modality}.yaml")
    if cfg.get("modality", args.modality) != args.modality:
        raise UsageError(f"config is for modality {cfg['modality']!r}, not {args.modality!r}")
    s = make_settings(cfg, args)
    if args.tabular_embedding is not None:
        cfg["tokenizer"]["embedding"] = args.tabular_embedding
    out = args.out or Path("runs/meta_mae_quick" if args.quick else "runs/meta_mae") / args.modality
    _claim(out, args, delete=False)   # refused before any work; an old run is deleted only below
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    train, test, tok, batches, raw = load(args.modality, cfg, s, args.seed, args.quick)
    mae = build_mae(tok, s, args.modality)
    random_init = copy.deepcopy(mae)
    opts = options(s)
    _claim(out, args)                 # all input read: now --overwrite replaces the old run
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {out}: cannot create the folder ({e.strerror or e})") from None
    _print_setup(args, s, train, test, tok, opts)

    sched = {}
    if s["cosine"]:
        sched = {"scheduler": torch.optim.lr_scheduler.CosineAnnealingLR,
                 "scheduler_kwargs": {"T_max": s["steps"], "eta_min": 0.05 * s["lr"]}}
    logger = TimedCSV(out / "metrics.csv")
    periodic = {} if args.checkpoint_every is None else dict(
        checkpoint_every=args.checkpoint_every, checkpoint_path=out / CHECKPOINTS,
        checkpoint_keep=args.checkpoint_keep)
    engine, problem, per_step = build(args.form, mae, batches, opts, s, args, mlo.EngineConfig(
        progress=not args.no_progress, loggers=[logger], **periodic), sched)
    t0 = time.perf_counter()
    try:
        engine.run(s["steps"] * per_step)
    finally:
        logger.close()
    seconds = time.perf_counter() - t0
    step_seconds = sum(r["seconds"] for r in engine.records.values()) / max(problem.step_count, 1)

    result: Dict[str, Any] = {
        "modality": args.modality, "form": args.form, "variant": args.variant, "seed": args.seed,
        "settings": s, "tokenizer": dict(cfg["tokenizer"]), "steps": s["steps"], "seconds": seconds,
        "seconds_per_iteration": step_seconds, "final_loss": float(problem.last_loss),
    }
    result["accuracy"] = probe(lambda x: mae.features(x, pool="mean"), train, test, s["probe_max_iter"])
    if not args.no_floors:
        result["random_init_accuracy"] = probe(lambda x: random_init.features(x, pool="mean"), train, test,
                                               s["probe_max_iter"])
        result["raw_accuracy"] = probe(raw, train, test, s["probe_max_iter"])
        print(f"[meta_mae] floors: random-init encoder {100 * result['random_init_accuracy']:.2f}%, "
              f"raw input {100 * result['raw_accuracy']:.2f}%")
    print(f"[meta_mae] {s['steps']} steps in {seconds:.1f}s ({1000 * step_seconds:.1f} ms/step), "
          f"final loss {result['final_loss']:.4f}; wrote {out / 'metrics.csv'}")
    with open(out / "summary.json", "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    print(f"linear-probe test accuracy: {100 * result['accuracy']:.2f}%", flush=True)
    return result


def main(argv: Optional[List[str]] = None, description: Optional[str] = None) -> Dict[str, Any]:
    """Parses ``argv`` and runs the job; bad input is one ``error: ...`` line on stderr and
    exit code 2."""
    args = parse_args(argv, description)
    try:
        return run(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
