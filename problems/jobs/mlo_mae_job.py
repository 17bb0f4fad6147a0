"""The MLO-MAE main job: build the graph, train it with ``engine.run``, evaluate, report.

``main(argv)`` is ``examples/mlo_mae_cifar.py`` (its docstring describes the command
line and the files written). Training is one ``engine.run(steps - iteration,
callbacks=[MetricsRows(...)])``: the callback sends one row every :data:`LOG_EVERY`
iterations (and at the last) to :mod:`mlo.loggers` — ``metrics.csv``
(``CSVLogger(columns=...)``) and TensorBoard under ``tb/`` when it is installed; the
progress bar is the engine's (``EngineConfig(progress=...)``).
"""
from __future__ import annotations

import argparse
import os
import pickle
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

import mlo
import mlo.checkpoint
import mlo.interrupt
from mlo import distributed as mdist
from mlo.loggers import CSVLogger, TensorBoardLogger, csv_header
from problems.mlo_mae import MLOMAEGraph, MLOMAESettings, build
from problems.jobs.common import CHECKPOINTS, UsageError, claim_out, one_line
from problems.jobs.mlo_mae_data import Data, check_data, choose_preset, load_data
from problems.jobs.mlo_mae_figures import plot_class_masks, plot_masks
from problems.jobs.mlo_mae_options import make_settings, parse_args, parse_overrides
from problems.jobs.mlo_mae_report import head_test_accuracy, mask_statistics, probe_accuracy, write_summary

__all__ = ["LOG_EVERY", "RUN_FILES", "pick_device", "build_graph", "resume", "MetricsRows",
           "metrics_loggers", "train", "run", "main"]

LOG_EVERY = 10       # iterations between rows of metrics.csv
RUN_FILES = ("summary.json", "checkpoint.pt")   # an --out holding one of these (or checkpoints/) holds a run


# --------------------------------------------------------------------- graph
def pick_device(args: argparse.Namespace) -> torch.device:
    """``--device``, else cuda when available, else cpu."""
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        raise UsageError(f"--device: {one_line(e)}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available")
    return device


def build_graph(args: argparse.Namespace, settings: MLOMAESettings, train: Data, device: torch.device) -> MLOMAEGraph:
    """The variant's graph on ``device`` (data and models); ``--monitor``,
    ``--checkpoint-every`` and the progress bar go into its ``EngineConfig``."""
    try:
        kw: Dict[str, Any] = {"monitor": {"every": args.monitor}} if getattr(args, "monitor", 0) else {}
        if getattr(args, "checkpoint_every", None):
            kw.update(checkpoint_every=args.checkpoint_every, checkpoint_path=args.out / CHECKPOINTS,
                      checkpoint_keep=args.checkpoint_keep)
        config = mlo.EngineConfig(progress=False if getattr(args, "no_progress", False) else None, **kw)
        graph = build(args.variant, settings, train, seed=args.seed, engine_config=config)
    except (TypeError, ValueError, KeyError) as e:
        raise UsageError(f"cannot build the {args.variant} graph: {one_line(e)}") from None
    params = [p for P in graph.engine.problems.values() for p in P.module.parameters()]
    for module in [P.module for P in graph.engine.problems.values()] + [graph.masker]:
        if module is not None:
            module.to(device)
    moved = [p for P in graph.engine.problems.values() for p in P.module.parameters()]
    if any(a is not b for a, b in zip(params, moved)):  # problems and optimizers hold these
        raise RuntimeError(f"moving the models to {device} replaced their parameters")
    return graph


def resume(graph: MLOMAEGraph, path: Path) -> None:
    """Loads the checkpoint ``path`` into ``graph`` (a :class:`UsageError` when it cannot)."""
    try:
        # The job's data are seeded streams: consuming the batches taken before the save
        # puts them where they were, and the resumed run is the uninterrupted one.
        mlo.checkpoint.load(graph.engine, path, realign_data=True)
    except (EOFError, pickle.UnpicklingError) as e:  # empty, truncated, not from torch.save
        raise UsageError(f"cannot resume from {path}: not a readable checkpoint file "
                         f"({type(e).__name__}); expected a checkpoint.pt written by this script") from None
    except Exception as e:  # not an mlo checkpoint, other problems, other shapes, corrupt zip
        msg = one_line(e).removeprefix(f"{path}: ")
        raise UsageError(f"cannot resume from {path}: {msg} (expected a checkpoint.pt written by this "
                         f"script with the same preset, variant and --set)") from None
    print(f"[mlo_mae] resumed from {path} at iteration {graph.engine.iteration}", flush=True)


# ------------------------------------------------------------------ training
class MetricsRows(mlo.Callback):
    """An ``engine.run`` callback: every ``every`` iterations and at iteration ``last``,
    one row — ``seconds`` (wall clock since this callback was made), ``loss_<problem>``,
    ``mask_hypergrad_norm`` (graphs with a masking level), ``seconds_<problem>`` (each
    problem's own time, ``engine.records``) — sent to each of ``loggers``
    (``log(iteration, row)``). A value not recorded yet is left out of the row."""

    def __init__(self, graph: MLOMAEGraph, loggers: Sequence[Any], last: int, every: int = LOG_EVERY):
        self.names = list(graph.problems)
        self.hyper = "mask" in graph.problems
        self.loggers, self.last, self.every = list(loggers), last, every
        self.t0 = time.perf_counter()

    @staticmethod
    def columns(graph: MLOMAEGraph) -> List[str]:
        """The row's keys in order (``metrics.csv``'s header after ``iteration``)."""
        names = list(graph.problems)
        return (["seconds"] + [f"loss_{n}" for n in names]
                + (["mask_hypergrad_norm"] if "mask" in graph.problems else [])
                + [f"seconds_{n}" for n in names])

    def row(self, engine: mlo.Engine) -> Dict[str, float]:
        """The current row (see the class docstring)."""
        rec = engine.records
        row = {"seconds": round(time.perf_counter() - self.t0, 3)}
        for n in self.names:
            row[f"loss_{n}"] = rec[n].get("loss")
            row[f"seconds_{n}"] = round(rec[n]["seconds"], 3)
        if self.hyper:
            row["mask_hypergrad_norm"] = rec["mask"].get("hypergrad_norm")
        return {k: v for k, v in row.items() if v is not None}

    def after_iteration(self, engine: mlo.Engine) -> None:
        it = engine.iteration
        if it % self.every == 0 or it == self.last:
            row = self.row(engine)
            for logger in self.loggers:
                logger.log(it, row)


def metrics_loggers(out: Path, graph: MLOMAEGraph, append: bool) -> List[Any]:
    """``out/metrics.csv`` (appended to when ``append`` and its header is this graph's
    columns, else started afresh) and TensorBoard under ``out/tb`` when installed
    (tags: the first ``_`` of a column becomes ``/``, e.g. ``loss/pretrain``)."""
    columns = MetricsRows.columns(graph)
    path = out / "metrics.csv"
    append = append and csv_header(path) == ["iteration"] + columns
    loggers: List[Any] = [CSVLogger(path, append=append, columns=columns)]
    tb = TensorBoardLogger.if_installed(out / "tb", tag=lambda c: c.replace("_", "/", 1))
    return loggers + ([tb] if tb is not None else [])


def train(graph: MLOMAEGraph, steps: int, out: Path, args: argparse.Namespace) -> float:
    """Runs the engine to ``steps`` iterations in total; returns the seconds taken. Rank 0
    alone writes the metrics (and shows the progress bar)."""
    engine = graph.engine
    loggers = metrics_loggers(out, graph, append=args.resume is not None) if mdist.is_main() else []
    rows = MetricsRows(graph, loggers, last=steps)
    t0 = time.perf_counter()
    try:
        engine.run(max(steps - engine.iteration, 0), callbacks=[rows])
    finally:
        for logger in loggers:
            logger.close()
    return time.perf_counter() - t0


# ---------------------------------------------------------------------- main
def _check_flags(args: argparse.Namespace) -> None:
    """The flags' own checks, before anything is read or built (``--set`` values
    included: :func:`problems.jobs.mlo_mae_options.parse_overrides`)."""
    parse_overrides(args.overrides)
    if args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    if args.resume is not None and args.resume.is_dir():     # a run folder: its checkpoint
        if not (args.resume / "checkpoint.pt").is_file():
            raise UsageError(f"--resume {args.resume} is a folder with no checkpoint.pt; give a "
                             f"checkpoint file (its checkpoint.pt or checkpoints/ckpt-<iteration>.pt)")
        args.resume = args.resume / "checkpoint.pt"
    if args.resume is not None and not args.resume.is_file():
        raise UsageError(f"resume file {args.resume} does not exist")
    for flag, value in (("--checkpoint-every", args.checkpoint_every), ("--checkpoint-keep", args.checkpoint_keep)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be >= 1, got {value}")


def _report(graph: MLOMAEGraph, preset: Dict[str, Any], args: argparse.Namespace, train_data: Data,
            test_data: Data, seconds: float) -> float:
    """Figures, accuracies, ``summary.json`` and the last printed lines; the probe's accuracy."""
    stats = mask_statistics(graph, test_data[0], test_data[1])
    plot_masks(graph, test_data[0], stats, args.out / "masks.png")
    plot_class_masks(graph, test_data[0], test_data[1], stats, args.out / "masks_by_class.png")
    if stats["learned"]:
        m = stats["learned"]
        print(f"[mlo_mae] learned masks (test): masked patches' mean p {m['masked_p_mean']:.3f}, "
              f"share with p < 0.1 {m['masked_p_below_0.1']:.2f}; p varies across images by "
              f"{m['std_across_images']:.3f}, across positions by {m['std_across_positions']:.3f}",
              flush=True)
    accuracy = probe_accuracy(graph, train_data, test_data, preset, args.quick)
    head = head_test_accuracy(graph, test_data, preset, args.quick)
    write_summary(args.out / "summary.json", graph, preset, args, seconds, accuracy, stats, head)
    losses = ", ".join(f"{n} {r['loss']:.4f}" for n, r in graph.engine.records.items() if "loss" in r)
    print(f"[mlo_mae] {graph.engine.iteration} iterations in {seconds:.1f}s ({losses}); "
          f"wrote {args.out}/{{metrics.csv,checkpoint.pt,masks.png,masks_by_class.png,summary.json}}", flush=True)
    print(f"stage-II head test accuracy: {100 * head:.2f}%" if head is not None else
          f"stage-II head test accuracy: none (the {graph.variant} variant has no classifier head)", flush=True)
    print(f"linear-probe test accuracy: {100 * accuracy:.2f}%", flush=True)
    return accuracy


def resume_command(args: argparse.Namespace, checkpoint: Path) -> str:
    """The command line that continues this run from ``checkpoint``: the same options
    (``args.argv``), ``--resume`` replaced, ``--overwrite`` dropped."""
    argv, out, skip = list(getattr(args, "argv", None) or []), [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--resume", "--overwrite") or a.startswith("--resume="):
            skip = a == "--resume"
        else:
            out.append(a)
    return " ".join(shlex.quote(a) for a in ["python", "examples/mlo_mae_cifar.py", *out,
                                              "--resume", str(checkpoint)])


def save_interrupted(graph: MLOMAEGraph, args: argparse.Namespace, stop: Exception, steps: int) -> None:
    """Ctrl-C or SIGTERM stopped training at an iteration boundary (no update cut short,
    no window open): the checkpoint is written atomically and one line says how to resume."""
    graph.engine.close_windows()
    path = args.out / "checkpoint.pt"
    mlo.checkpoint.save(graph.engine, path)   # every rank calls; rank 0 writes
    print(f"[mlo_mae] {stop}; saved {path} (iteration {graph.engine.iteration} of {steps}). "
          f"Resume with: {resume_command(args, path)}", flush=True)


def run(args: argparse.Namespace) -> float:
    """The whole job for parsed options (:func:`problems.jobs.mlo_mae_options.parse_args`);
    returns the linear probe's test accuracy (``nan`` on ranks other than 0)."""
    _check_flags(args)
    if mdist.init_from_env() and not mdist.is_main():   # under torchrun: rank 0 alone prints
        sys.stdout = open(os.devnull, "w")
    claim = dict(run_files=RUN_FILES, overwrite=args.overwrite, resume=args.resume, resume_file="checkpoint.pt")
    claim_out(args.out, **claim, delete=False)   # refused before any work; deleted only below
    device = pick_device(args)
    if device.type == "cuda" and mdist.is_distributed():   # one GPU per rank
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    preset, train_data, test_data = load_data(choose_preset(args), args)
    settings = make_settings(preset, args)
    check_data(settings, preset["data"], train_data, test_data)
    train_data = tuple(t.to(device) for t in train_data)
    test_data = tuple(t.to(device) for t in test_data)
    print(f"[mlo_mae] {args.variant}, method {settings.method}, preset {Path(preset['name']).name} "
          f"({preset['data']}: train {len(train_data[0])}, test {len(test_data[0])}), "
          f"{settings.steps} steps, device {device}", flush=True)
    graph = build_graph(args, settings, train_data, device)
    if mdist.is_distributed():
        for P in graph.problems.values():    # this rank's rows of every global batch
            P.data = mdist.shard_batches(P.data)
        torch.manual_seed(args.seed + mdist.rank())   # independent dropout / noise per rank
    if args.resume is not None:
        resume(graph, args.resume)
    claim_out(args.out, **claim, delete=mdist.is_main())   # all input read: --overwrite replaces the old run
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {args.out}: cannot create the folder ({e.strerror or e})") from None
    try:
        seconds = train(graph, settings.steps, args.out, args)
    except mlo.interrupt.Interrupted as stop:
        save_interrupted(graph, args, stop, settings.steps)
        raise SystemExit(stop.exit_code) from None
    graph.engine.close_windows()   # iterates back into the modules; the checkpoint has no open window
    mlo.checkpoint.save(graph.engine, args.out / "checkpoint.pt")   # every rank calls; rank 0 writes
    if mdist.is_distributed():
        main_rank = mdist.is_main()
        torch.distributed.destroy_process_group()
        if not main_rank:
            return float("nan")
    return _report(graph, preset, args, train_data, test_data, seconds)


def main(argv: Optional[List[str]] = None, description: Optional[str] = None) -> float:
    """Parses ``argv`` and runs the job; bad input is one ``error: ...`` line on stderr and
    exit code 2. ``description``: the ``--help`` text (the example's docstring)."""
    args = parse_args(argv, description)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return run(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
