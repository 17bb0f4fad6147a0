"""MLO-MAE on CIFAR-10 — or, offline or without a GPU, on scikit-learn's digits.

Trains one graph of :func:`problems.mlo_mae.build` (masking network above MAE
pretraining above a classifier head; DESIGN.md, "MLO-MAE") step by step, then
evaluates the encoder with a linear probe. From the repository root, after
``pip install -e ".[examples]"``::

    python examples/mlo_mae_cifar.py                     # default: cpu preset (~3 min on 2 cores)
    python examples/mlo_mae_cifar.py --quick             # smoke run (< 1 min), into runs/mlo_mae_quick
    python examples/mlo_mae_cifar.py --preset paper --data-dir ~/data    # the paper's ViT-B/2, GPU
    python examples/mlo_mae_cifar.py --variant mae       # baselines: mae, blo-mae, frozen-mask
    python examples/mlo_mae_cifar.py --method cg         # best-response method of the lower levels
    python examples/mlo_mae_cifar.py --set embed_dim=128 --set depth=4   # any MLOMAESettings field
    python examples/mlo_mae_cifar.py --resume runs/mlo_mae/checkpoint.pt --steps 4000
    python examples/mlo_mae_cifar.py --checkpoint-every 500 --out runs/long   # + runs/long/checkpoints/
    torchrun --nproc_per_node 2 examples/mlo_mae_cifar.py --quick    # data parallel, 2 processes

Under ``torchrun`` every rank builds the same graph and keeps rows ``r, r+W, ...`` of
each global batch of the three data streams (``mlo.distributed.shard_batches``: the
batch size stays the global one and must be divisible by the number of ranks); the
engine averages gradients and hypergradient products over ranks. Rank 0 alone
prints, writes ``metrics.csv``, ``masks.png``, ``summary.json`` and the checkpoint,
and runs the linear probe.

Presets are YAML files in ``examples/configs/`` (``mlo_mae_paper.yaml``,
``mlo_mae_cpu.yaml``; your own with ``--preset-file``). The default preset is
``paper`` when CUDA is available and CIFAR-10 is in the data directory, else
``cpu``. When CIFAR-10 is wanted but absent it is downloaded if the machine is
online (``--download`` to allow it into an explicit ``--data-dir``); otherwise the
run falls back to the ``cpu`` preset, with one line saying so.

Writes to ``--out`` (default ``runs/mlo_mae``; ``runs/mlo_mae_quick`` with ``--quick``, so
that the smoke run never touches the main job's folder): ``metrics.csv`` (a row every 10
iterations: losses, mask hypergradient norm, seconds per problem), ``tb/``
(TensorBoard), ``checkpoint.pt`` (:mod:`mlo.checkpoint`), ``masks.png`` (the
learned masks) and ``summary.json``. A folder that already holds a run (a
``summary.json``, ``checkpoint.pt`` or ``checkpoints/ckpt-*.pt``) is never overwritten
silently: the script stops with ``error: --out DIR already holds a run ...`` (exit 2)
unless ``--overwrite`` is given (which first deletes that run's ``summary.json``,
``checkpoint.pt`` and periodic checkpoints) or ``--resume`` names a checkpoint in that
folder (which continues the run there).

``--checkpoint-every N`` also writes ``checkpoints/ckpt-<iteration>.pt`` under ``--out``
every N iterations (``EngineConfig(checkpoint_every=N)``: atomic; with ``--method
unrolled`` at the first iteration after it with no window open; the newest
``--checkpoint-keep`` (3) kept). Resume from the newest — the highest iteration, also
``mlo.checkpoint.latest("DIR/checkpoints")`` — with ``--resume
DIR/checkpoints/ckpt-<iteration>.pt --out DIR``. The last two lines printed are the trained
classifier head's test accuracy (``stage-II head test accuracy: NN.NN%`` — the paper's
CIFAR "linear probing" numbers, the official code's metric; ``none`` for variants
without a head) and the L-BFGS linear probe's on the frozen encoder,
``linear-probe test accuracy: NN.NN%`` (``summary.json``: ``stage2_head_test_accuracy``,
``linear_probe_test_accuracy``).

``--resume PATH`` rebuilds the same graph (same preset/variant/method/--set), loads
the checkpoint and continues to ``--steps`` iterations in total. Data iterators
restart from their beginning, and the learning-rate schedules are the saved ones
(their length is the original run's ``steps``).

Invalid input (a missing or corrupt checkpoint, a preset with unknown keys, an
explicit ``--data-dir`` without CIFAR-10 for the paper preset, ...) prints one line
``error: ...`` on stderr and exits with code 2.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import pickle
import socket
import sys
import time
import urllib.parse
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import yaml
from torch import Tensor
from torch.utils.data import TensorDataset
from tqdm import tqdm

import mlo.checkpoint
from mlo.config import load_yaml
from mlo import distributed as mdist
from problems.datasets import (CIFAR_RESOURCES, IDX_RESOURCES, IDXFormatError, find_mnist_like, load_cifar,
                               load_digits, load_mnist_like, search_places, take)
from problems.evaluation import Features, linear_probe
from problems.mae import num_masked
from problems.mask_statistics import mask_probabilities
from problems.mask_statistics import mask_statistics as masking_summary
from problems.mlo_mae import VARIANTS, MLOMAEGraph, MLOMAESettings, build, head_accuracy

CONFIGS = Path(__file__).resolve().parent / "configs"
PRESETS = {"paper": CONFIGS / "mlo_mae_paper.yaml", "cpu": CONFIGS / "mlo_mae_cpu.yaml",
           "fmnist": CONFIGS / "mlo_mae_fmnist.yaml"}
METHODS = ("finite_difference", "cg", "neumann", "unrolled")
DEFAULT_DATA_DIRS = ("~/data", "./data")
DATA = ("cifar10", "digits", "fashion-mnist", "mnist")
IDX_DATA = ("fashion-mnist", "mnist")   # problems.datasets.load_mnist_like
IDX_PRESET = CONFIGS / "mlo_mae_fmnist.yaml"   # 1×28×28 settings: the default preset for IDX_DATA
PRESET_KEYS = {"data": str, "settings": dict, "method_options": dict, "probe": dict, "quick": dict}
PROBE_KEYS = {"max_train", "max_test", "batch_size"}
QUICK_KEYS = {"steps", "probe_train", "probe_test"}
CG_MAX_ITER = 5      # CG's own default is one iteration per unknown: never leave it unset
LOG_EVERY = 10       # iterations between rows of metrics.csv
CHECKPOINTS = "checkpoints"   # --checkpoint-every's folder under --out
RUN_FILES = ("summary.json", "checkpoint.pt")   # an --out holding one of these (or checkpoints/) holds a run
Data = Tuple[Tensor, Tensor]


class UsageError(Exception):
    """Bad input: reported as one ``error: ...`` line, exit code 2."""


def one_line(e: BaseException, limit: int = 400) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit] + " ..."


# ------------------------------------------------------------------- options
def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="paper (ViT-B/2, CIFAR-10, GPU) or cpu (digits); default: paper when CUDA "
                        "is available and CIFAR-10 is in --data-dir, else cpu")
    p.add_argument("--preset-file", type=Path, help="a preset YAML of your own (instead of --preset)")
    p.add_argument("--variant", choices=VARIANTS, default="mlo-mae")
    p.add_argument("--method", choices=METHODS,
                   help="best-response method of the lower levels (default: the preset's)")
    p.add_argument("--steps", type=int, help="pretraining iterations in total (default: the preset's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="output directory (default runs/mlo_mae; runs/mlo_mae_quick "
                   "with --quick); a folder holding a run is refused unless --overwrite or --resume from it")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run in --out (its summary.json, checkpoint.pt and checkpoints/)")
    p.add_argument("--checkpoint-every", type=int, metavar="N",
                   help="also write --out/checkpoints/ckpt-<iteration>.pt every N iterations")
    p.add_argument("--checkpoint-keep", type=int, default=3, metavar="K",
                   help="periodic checkpoints kept (default 3; the older ones are deleted)")
    p.add_argument("--resume", type=Path, metavar="PATH", help="checkpoint to continue from")
    p.add_argument("--quick", action="store_true", help="smoke run: few steps, probe on a subset")
    p.add_argument("--data", choices=DATA, help="dataset (default: the preset's); fashion-mnist/mnist "
                   "need settings for 1×28×28 images (e.g. --set image_size=28 --set patch_size=7 --set in_chans=1)")
    p.add_argument("--data-dir", help="where cifar-10-batches-py/ is, or the IDX files of fashion-mnist/mnist "
                   "(directly or in torchvision's FashionMNIST/raw, MNIST/raw); searched before "
                   f"/usr/share/datasets/<name> (default: {' or '.join(DEFAULT_DATA_DIRS)})")
    p.add_argument("--download", action="store_true", help="download the dataset into --data-dir if absent")
    p.add_argument("--mask-every", type=int, metavar="N", help="update the masking network once per N iterations")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override an MLOMAESettings field (value parsed as YAML); repeatable")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--monitor", type=int, default=0, metavar="N",
                   help="every N mask updates, recompute the mask's hypergradient with CG to tol 1e-10 "
                        "on both lower levels and print its cosine and relative error (run unchanged)")
    args = p.parse_args(argv)
    if args.out is None:    # the smoke run never writes into the main job's folder
        args.out = Path("runs/mlo_mae_quick" if args.quick else "runs/mlo_mae")
    return args


# ------------------------------------------------------------------- presets
def read_preset(path: Path) -> Dict[str, Any]:
    """A preset YAML: ``data``, ``settings``, ``method_options``, ``probe``, ``quick``."""
    try:
        d = load_yaml(path)      # strict: duplicate keys named, 1e-3 a float
    except OSError as e:
        raise UsageError(f"cannot read preset {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise UsageError(f"preset {one_line(e)}") from None
    except yaml.YAMLError as e:
        raise UsageError(f"preset {path} is not valid YAML: {one_line(e)}") from None
    if not isinstance(d, dict):
        raise UsageError(f"preset {path}: expected a mapping with keys {sorted(PRESET_KEYS)}")
    unknown = sorted(set(d) - set(PRESET_KEYS))
    if unknown:
        raise UsageError(f"preset {path}: unknown key(s) {unknown}; known: {sorted(PRESET_KEYS)}")
    for key, kind in PRESET_KEYS.items():
        d[key] = d.get(key) if d.get(key) is not None else kind()
        if not isinstance(d[key], kind):
            raise UsageError(f"preset {path}: {key!r} must be a {kind.__name__}, got {d[key]!r}")
    if d["data"] not in DATA:
        raise UsageError(f"preset {path}: data must be one of {', '.join(DATA)}; got {d['data']!r}")
    for key, known in (("probe", PROBE_KEYS), ("quick", QUICK_KEYS)):
        bad = sorted(set(d[key]) - known)
        if bad:
            raise UsageError(f"preset {path}: unknown {key} key(s) {bad}; known: {sorted(known)}")
    settings_known = {f.name for f in fields(MLOMAESettings)}
    bad = sorted(set(d["settings"]) - settings_known)
    if bad:
        raise UsageError(f"preset {path}: unknown MLO-MAE setting(s) {bad}; "
                         f"known: {sorted(settings_known)}")
    d["name"] = str(path)
    return d


def parse_overrides(items: List[str]) -> Dict[str, Any]:
    """``["key=value", ...]`` → ``{key: yaml value}``."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise UsageError(f"--set {item!r}: the value is not valid YAML ({one_line(e)})") from None
    return out


def make_settings(preset: Dict[str, Any], args: argparse.Namespace) -> MLOMAESettings:
    """Preset settings, then ``--quick``, ``--steps``, ``--mask-every``, ``--method``,
    ``--set``; the method's options come from the preset's ``method_options`` table."""
    s = dict(preset["settings"])
    if args.quick:
        s["steps"] = preset["quick"].get("steps", 30)
    for key, value in (("steps", args.steps), ("mask_every", args.mask_every), ("method", args.method)):
        if value is not None:
            s[key] = value
    s.update(parse_overrides(args.overrides))
    method = s.setdefault("method", "finite_difference")
    s["method_options"] = {**preset["method_options"].get(method, {}), **(s.get("method_options") or {})}
    if method == "cg":
        s["method_options"].setdefault("max_iter", CG_MAX_ITER)
    try:
        return MLOMAESettings.from_dict(s)
    except (TypeError, ValueError) as e:
        raise UsageError(f"settings ({preset['name']} with your options): {one_line(e)}") from None


# ---------------------------------------------------------------------- data
def cifar_root(args: argparse.Namespace) -> Path:
    """``--data-dir``, else the first default directory holding CIFAR-10 (else ``~/data``)."""
    if args.data_dir is not None:
        return Path(args.data_dir).expanduser()
    roots = [Path(d).expanduser() for d in DEFAULT_DATA_DIRS]
    return next((r for r in roots if has_cifar(r)), roots[0])


def has_cifar(root: Path) -> bool:
    res = CIFAR_RESOURCES["cifar10"]
    return all((root / res["dir"] / f).is_file() for f in res["train"] + res["test"] + [res["meta"]])


def online(host: str = "www.cs.toronto.edu", timeout: float = 3.0, port: int = 443) -> bool:
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def choose_preset(args: argparse.Namespace) -> Dict[str, Any]:
    if args.preset_file is not None:
        return read_preset(args.preset_file)
    name = args.preset
    if name is None and args.data in IDX_DATA and IDX_PRESET.is_file():
        return read_preset(IDX_PRESET)
    if name is None and args.data not in (None, "cifar10"):
        name = "cpu"
    if name is None:
        gpu, cifar = torch.cuda.is_available(), has_cifar(cifar_root(args))
        name = "paper" if gpu and cifar else "cpu"
        if name == "cpu":
            why = ", ".join(w for w, missing in (("no GPU", not gpu),
                                                 (f"no CIFAR-10 in {cifar_root(args)}", not cifar)) if missing)
            print(f"[mlo_mae] {why}: running the cpu preset (scikit-learn digits, small ViT); "
                  f"--preset paper runs the paper's ViT-B/2 on CIFAR-10", flush=True)
    return read_preset(PRESETS[name])


def load_idx(name: str, args: argparse.Namespace) -> Tuple[Data, Data]:
    """Fashion-MNIST or MNIST: the IDX files in ``--data-dir`` (else the first default
    directory holding them), then in /usr/share/datasets/<name>; else downloaded with
    ``--download``, or when online and no ``--data-dir`` was given."""
    dirs = [args.data_dir] if args.data_dir is not None else list(DEFAULT_DATA_DIRS)
    roots = [str(Path(d).expanduser()) for d in dirs]
    root = next((r for r in roots if find_mnist_like(name, r, system_dirs=())), roots[0])
    mirror = IDX_RESOURCES[name]["mirror"]
    url = urllib.parse.urlsplit(mirror)
    port = url.port or (443 if url.scheme == "https" else 80)
    download = find_mnist_like(name, root) is None and (
        args.download or (args.data_dir is None and online(url.hostname, port=port)))
    if download:
        print(f"[mlo_mae] downloading {name} from {mirror} into {search_places(name, root)[1]}", flush=True)
    try:
        d = load_mnist_like(name, root, download=download)
    except FileNotFoundError as e:
        places = search_places(name, root)
        failed = f"; the download from {mirror} failed ({one_line(e.__cause__ or e, 120)})" if download else ""
        hint = ["install it with `apt-get install dataset-fashion-mnist`"] if name == "fashion-mnist" else []
        if not download:
            hint.append(f"pass --download to fetch it from {mirror} into {places[1]}")
        raise UsageError(f"no {name} IDX files in {', '.join(places)}{failed}"
                         + (f"; {', or '.join(hint)}" if hint else "")) from None
    except (IDXFormatError, ValueError, OSError) as e:   # corrupt files, MD5 mismatch, unreadable
        raise UsageError(f"cannot read {name}: {one_line(e)}") from None
    print(f"[mlo_mae] {name} read from {d.root}", flush=True)
    return d.train, d.test


def load_data(preset: Dict[str, Any], args: argparse.Namespace) -> Tuple[Dict[str, Any], Data, Data]:
    """``(preset, train, test)``, ``--data`` replacing the preset's data; the preset becomes
    ``cpu`` when CIFAR-10 is unavailable and neither ``--data-dir`` nor ``--data cifar10`` was
    given (then it is an error, as missing Fashion-MNIST/MNIST always is)."""
    if args.data is not None and args.data != preset["data"]:
        preset = {**preset, "data": args.data}
    if preset["data"] == "digits":
        d = load_digits(seed=0, fractions=(0.8, 0.0, 0.2))
        return preset, d.train.tensors, d.test.tensors
    if preset["data"] in IDX_DATA:
        return (preset, *load_idx(preset["data"], args))
    root = cifar_root(args)
    download = not has_cifar(root) and (args.download or (args.data_dir is None and online()))
    try:
        cifar = load_cifar(str(root), "cifar10", download=download)
    except FileNotFoundError as e:
        if args.data_dir is not None or args.data is not None:
            raise UsageError(f"no CIFAR-10 in {'--data-dir ' if args.data_dir else ''}{root} ({one_line(e, 200)}); "
                             f"pass --download to fetch it, or use --preset cpu") from None
        why = "download failed" if download else "offline"
        print(f"[mlo_mae] CIFAR-10 not found in {root} ({why}): running the cpu preset on "
              f"scikit-learn digits instead", flush=True)
        return load_data(read_preset(PRESETS["cpu"]), args)
    except Exception as e:  # corrupt or foreign files, MD5 mismatch
        raise UsageError(f"cannot read CIFAR-10 in {root}: {one_line(e)}") from None
    return preset, cifar.tensors("train"), cifar.tensors("test")


# ------------------------------------------------------------------ run folder
def existing_run(out: Path) -> List[str]:
    """What makes ``out`` a run folder: its ``summary.json``, ``checkpoint.pt`` and newest
    periodic checkpoint (``[]``: none, or no folder)."""
    found = [f for f in RUN_FILES if (out / f).is_file()]
    periodic = mlo.checkpoint.list_checkpoints(out / CHECKPOINTS) if (out / CHECKPOINTS).is_dir() else []
    return found + [f"{CHECKPOINTS}/{Path(p).name}" for _, p in periodic[-1:]]


def claim_out(args: argparse.Namespace) -> None:
    """Refuses an ``--out`` that holds a run, unless ``--overwrite`` (then its
    ``summary.json``, ``checkpoint.pt`` and periodic checkpoints are deleted, on rank 0)
    or ``--resume`` from a checkpoint in it (which continues that run)."""
    out = args.out
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    found = existing_run(out)
    if not found:
        return
    folders = {out.resolve(), (out / CHECKPOINTS).resolve()}
    resuming_here = args.resume is not None and args.resume.resolve().parent in folders
    if not args.overwrite:
        if resuming_here:
            return
        raise UsageError(f"--out {out} already holds a run ({', '.join(found)}); pass --out DIR for a new "
                         f"folder, --overwrite to replace it, or --resume {out / 'checkpoint.pt'} to continue it")
    if not mdist.is_main():
        return
    keep = args.resume.resolve() if args.resume is not None else None
    old = [out / f for f in RUN_FILES] + [Path(p) for _, p in mlo.checkpoint.list_checkpoints(out / CHECKPOINTS)]
    for f in old:
        if f.is_file() and f.resolve() != keep:
            f.unlink()


# --------------------------------------------------------------------- graph
def pick_device(args: argparse.Namespace) -> torch.device:
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        raise UsageError(f"--device: {one_line(e)}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available")
    return device


def build_graph(args, settings: MLOMAESettings, train: Data, device: torch.device) -> MLOMAEGraph:
    """The variant's graph on ``device`` (data and models)."""
    try:
        kw: Dict[str, Any] = {"monitor": {"every": args.monitor}} if getattr(args, "monitor", 0) else {}
        if getattr(args, "checkpoint_every", None):
            kw.update(checkpoint_every=args.checkpoint_every, checkpoint_path=args.out / CHECKPOINTS,
                      checkpoint_keep=args.checkpoint_keep)
        config = mlo.EngineConfig(**kw) if kw else None
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
    try:
        mlo.checkpoint.load(graph.engine, path)
    except (EOFError, pickle.UnpicklingError) as e:  # empty, truncated, not from torch.save
        raise UsageError(f"cannot resume from {path}: not a readable checkpoint file "
                         f"({type(e).__name__}); expected a checkpoint.pt written by this script") from None
    except Exception as e:  # not an mlo checkpoint, other problems, other shapes, corrupt zip
        msg = one_line(e).removeprefix(f"{path}: ")
        raise UsageError(f"cannot resume from {path}: {msg} (expected a checkpoint.pt written by this "
                         f"script with the same preset, variant and --set)") from None
    print(f"[mlo_mae] resumed from {path} at iteration {graph.engine.iteration}", flush=True)


# ------------------------------------------------------------------ training
class MetricsLog:
    """``metrics.csv`` rows (and TensorBoard scalars under ``tb/`` when it imports)."""

    def __init__(self, out: Path, graph: MLOMAEGraph, append: bool):
        self.names = list(graph.problems)
        self.hyper = "mask" in graph.problems
        self.columns = (["iteration", "seconds"] + [f"loss_{n}" for n in self.names]
                        + (["mask_hypergrad_norm"] if self.hyper else [])
                        + [f"seconds_{n}" for n in self.names])
        path = out / "metrics.csv"
        append = append and path.is_file() and path.read_text().split("\n", 1)[0] == ",".join(self.columns)
        self.file = open(path, "a" if append else "w", newline="")
        self.csv = csv.writer(self.file)
        if not append:
            self.csv.writerow(self.columns)
        self.tb = tensorboard(out / "tb")

    def write(self, engine: mlo.Engine, seconds: float) -> Dict[str, Any]:
        rec = engine.records
        row: Dict[str, Any] = {"iteration": engine.iteration, "seconds": round(seconds, 3)}
        for n in self.names:
            row[f"loss_{n}"] = rec[n].get("loss", "")
            row[f"seconds_{n}"] = round(rec[n]["seconds"], 3)
        if self.hyper:
            row["mask_hypergrad_norm"] = rec["mask"].get("hypergrad_norm", "")
        self.csv.writerow([row[c] for c in self.columns])
        self.file.flush()
        if self.tb is not None:
            for c, v in row.items():
                if c != "iteration" and v != "":
                    self.tb.add_scalar(c.replace("_", "/", 1), v, engine.iteration)
        return row

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


class NoLog:
    """``MetricsLog`` of ranks other than 0: writes nothing."""

    def write(self, engine, seconds):
        return {}

    def close(self):
        pass


def tensorboard(logdir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(logdir))


def train(graph: MLOMAEGraph, steps: int, out: Path, args: argparse.Namespace) -> float:
    """Steps the engine to ``steps`` iterations; returns the seconds taken."""
    engine = graph.engine
    log = MetricsLog(out, graph, append=args.resume is not None)
    if not mdist.is_main():
        log = NoLog()   # rank 0 alone writes metrics.csv and shows the bar
    bar = tqdm(total=steps, initial=min(engine.iteration, steps), desc=graph.variant, unit="it",
               disable=True if args.no_progress or not mdist.is_main() else None, dynamic_ncols=True)
    t0 = time.perf_counter()
    try:
        while engine.iteration < steps:
            engine.step()
            bar.update(1)
            if engine.iteration % LOG_EVERY == 0 or engine.iteration == steps:
                log.write(engine, time.perf_counter() - t0)
                bar.set_postfix({n: f"{r['loss']:.3f}" for n, r in engine.records.items() if "loss" in r},
                                refresh=False)
    finally:
        bar.close()
        log.close()
    return time.perf_counter() - t0


# ---------------------------------------------------------------- evaluation
def top_k_masks(scores: Tensor, ratio: float) -> Tensor:
    """``[N, L]`` bool, True at the ``num_masked(L, ratio)`` highest scores (as the MAE masks)."""
    k = num_masked(scores.shape[1], ratio)
    idx = scores.argsort(dim=1, descending=True, stable=True)[:, :k]
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, idx, True)


def mask_statistics(graph: MLOMAEGraph, x_test: Tensor, y_test: Optional[Tensor] = None) -> Dict[str, Any]:
    """Probabilities and masks of the test images; random masks for ``mae``. With a masking
    network, also :func:`problems.mask_statistics.mask_statistics` under ``"learned"``."""
    s = graph.settings
    probs = mask_probabilities(graph, x_test)
    probs = None if probs is None else probs.cpu()
    learned = None if probs is None else masking_summary(
        probs, s.mask_ratio, None if y_test is None else y_test.cpu(), s.num_classes)
    if probs is None:
        gen = torch.Generator().manual_seed(0)
        scores = torch.rand(len(x_test), graph.mae.num_tokens, generator=gen)
    else:
        scores = probs
    masks = top_k_masks(scores, s.mask_ratio)
    return {"probs": probs, "masks": masks, "learned": learned,
            "mean_probability": None if probs is None else probs.mean(0).tolist(),
            "mask_frequency": masks.float().mean(0).tolist()}


def plot_masks(graph: MLOMAEGraph, x_test: Tensor, stats: Dict[str, Any], path: Path, n_show: int = 6) -> None:
    """``masks.png``: images, their masked patches, the probability maps, and per-position means."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = graph.settings
    g = s.image_size // s.patch_size
    n = min(n_show, len(x_test))
    x = x_test[:n].cpu()
    probs, masks = stats["probs"], stats["masks"]
    fig, axes = plt.subplots(3, n + 1, figsize=(1.8 * (n + 1), 5.6), squeeze=False)
    for i in range(n):
        pix = masks[i].view(g, g).repeat_interleave(s.patch_size, 0).repeat_interleave(s.patch_size, 1)
        shown = torch.where(pix, torch.full_like(x[i], 0.5), x[i])
        imshow(axes[0, i], x[i], "image" if i == 0 else "")
        imshow(axes[1, i], shown, "masked (grey)" if i == 0 else "")
        heat = probs[i] if probs is not None else torch.full((g * g,), s.mask_ratio)
        heatmap(axes[2, i], heat.view(g, g), "p(mask)" if i == 0 else "")
    mean = torch.tensor(stats["mean_probability"] or [s.mask_ratio] * g * g)
    heatmap(axes[0, n], mean.view(g, g), f"mean p, test (max {mean.max():.2g})")
    heatmap(axes[1, n], torch.tensor(stats["mask_frequency"]).view(g, g), "masked freq., test")
    axes[2, n].axis("off")
    k = num_masked(g * g, s.mask_ratio)
    if graph.variant == "mae":
        title = f"mae: RANDOM masks (uniform noise, {k}/{g * g} patches), no masking network"
    else:
        kind = "untrained frozen" if graph.variant == "frozen-mask" else "learned"
        title = f"{graph.variant}: top-{k} of {g * g} patches by the {kind} masking network's probability"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_class_masks(graph: MLOMAEGraph, x_test: Tensor, y_test: Tensor, stats: Dict[str, Any],
                     path: Path) -> None:
    """``masks_by_class.png``: per class, the mean image and the mean ``p(mask)`` of its test
    images — whether the learned masks follow the object (nothing for ``mae``)."""
    learned = stats.get("learned")
    if not learned or "mean_p_per_class" not in learned:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = graph.settings
    g = s.image_size // s.patch_size
    maps = learned["mean_p_per_class"]
    c = len(maps)
    fig, axes = plt.subplots(2, c, figsize=(1.5 * c, 3.4), squeeze=False)
    x, y = x_test.cpu(), y_test.cpu()
    for i, m in enumerate(maps):
        if m is None:
            axes[0, i].axis("off"), axes[1, i].axis("off")
            continue
        imshow(axes[0, i], x[y == i].mean(0), f"class {i}")
        heatmap(axes[1, i], torch.tensor(m).view(g, g), "")
    axes[1, 0].set_title("mean p(mask)", fontsize=8)
    fig.suptitle(f"{graph.variant}: mean test image and mean p(mask) per class "
                 f"(p varies across images by {learned['std_across_images']:.3f}, "
                 f"across positions by {learned['std_across_positions']:.3f})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def imshow(ax, img: Tensor, title: str) -> None:
    img = img.clamp(0, 1)
    if img.shape[0] == 1:
        ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(img.permute(1, 2, 0).numpy())
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def heatmap(ax, values: Tensor, title: str) -> None:
    ax.imshow(values.numpy(), cmap="viridis", vmin=0, vmax=1)
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def probe_accuracy(graph: MLOMAEGraph, train: Data, test: Data, preset: Dict[str, Any], quick: bool) -> float:
    """Linear probe (logistic regression) on the frozen encoder's CLS feature."""
    cfg, q = preset["probe"], preset["quick"]
    n_train = q.get("probe_train") if quick else cfg.get("max_train")
    n_test = q.get("probe_test") if quick else cfg.get("max_test")
    result = linear_probe(Features(graph.mae, "cls"), take(TensorDataset(*train), n_train),
                          take(TensorDataset(*test), n_test), num_classes=graph.settings.num_classes,
                          batch_size=cfg.get("batch_size", 512))
    return result.accuracy


def head_test_accuracy(graph: MLOMAEGraph, test: Data, preset: Dict[str, Any], quick: bool) -> Optional[float]:
    """The trained head's test accuracy (:func:`problems.mlo_mae.head_accuracy`; None without
    a head); ``--quick``: on the probe's test subset."""
    n = preset["quick"].get("probe_test") if quick else None
    return head_accuracy(graph, test[0][:n], test[1][:n], batch_size=preset["probe"].get("batch_size", 512))


def write_summary(path: Path, graph: MLOMAEGraph, preset, args, seconds: float, accuracy: float,
                  stats: Dict[str, Any], head: Optional[float] = None) -> None:
    rec = graph.engine.records
    summary = {
        "variant": graph.variant, "method": graph.settings.method, "preset": preset["name"],
        "data": preset["data"], "seed": args.seed, "steps": graph.engine.iteration,
        "resumed_from": str(args.resume) if args.resume else None,
        "seconds": round(seconds, 3), "accuracy": accuracy,
        "linear_probe_test_accuracy": accuracy,   # L-BFGS probe on the frozen encoder (= accuracy)
        "stage2_head_test_accuracy": head,        # the trained head (the paper's "linear probing"); null: no head
        "problem_seconds": {n: round(r["seconds"], 3) for n, r in rec.items()},
        "problem_updates": {n: r["updates"] for n, r in rec.items()},
        "final_losses": {n: r.get("loss") for n, r in rec.items()},
        "mean_mask_probability": stats["mean_probability"],
        # the learned masks on the test images (problems.mask_statistics); null for mae
        **{k: (stats["learned"] or {}).get(k) for k in (
            "masked_p_mean", "masked_p_below_0.1", "std_across_images", "std_across_positions",
            "mean_p_per_class")},
        "mask_frequency": stats["mask_frequency"],
        "settings": asdict(graph.settings),
    }
    path.write_text(json.dumps(summary, indent=2) + "\n")


# ---------------------------------------------------------------------- main
def run(args: argparse.Namespace) -> float:
    if args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    if mdist.init_from_env() and not mdist.is_main():   # under torchrun: rank 0 alone prints
        sys.stdout = open(os.devnull, "w")
    if args.resume is not None and not args.resume.is_file():
        raise UsageError(f"resume file {args.resume} does not exist")
    for flag, value in (("--checkpoint-every", args.checkpoint_every), ("--checkpoint-keep", args.checkpoint_keep)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be >= 1, got {value}")
    claim_out(args)
    device = pick_device(args)
    if device.type == "cuda" and mdist.is_distributed():   # one GPU per rank
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    preset, train_data, test_data = load_data(choose_preset(args), args)
    settings = make_settings(preset, args)
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
    args.out.mkdir(parents=True, exist_ok=True)
    seconds = train(graph, settings.steps, args.out, args)
    graph.engine.close_windows()   # iterates back into the modules; the checkpoint has no open window
    mlo.checkpoint.save(graph.engine, args.out / "checkpoint.pt")   # every rank calls; rank 0 writes
    if mdist.is_distributed():
        main_rank = mdist.is_main()
        torch.distributed.destroy_process_group()
        if not main_rank:
            return float("nan")
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


def main(argv: Optional[List[str]] = None) -> float:
    args = parse_args(argv)
    try:
        return run(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
