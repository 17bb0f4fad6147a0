"""The MLO-MAE main job's command line, presets and settings.

A preset is a YAML file (``examples/configs/mlo_mae_{paper,cpu,fmnist}.yaml``, or your own
with ``--preset-file``) with the keys ``data``, ``settings`` (fields of
:class:`problems.mlo_mae.MLOMAESettings`), ``method_options`` (per method), ``probe`` and
``quick``. :func:`make_settings` applies the command line on top of it.
"""
from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

from problems.mlo_mae import VARIANTS, MLOMAESettings
from problems.jobs.common import UsageError, one_line, read_yaml

__all__ = ["CONFIGS", "PRESETS", "METHODS", "DATA", "IDX_DATA", "IDX_PRESET", "DEFAULT_DATA_DIRS",
           "parse_args", "read_preset", "parse_overrides", "make_settings"]

CONFIGS = Path(__file__).resolve().parents[2] / "examples" / "configs"
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


def parse_args(argv: Optional[List[str]] = None, description: Optional[str] = None) -> argparse.Namespace:
    """The main job's options (``description``: the ``--help`` text above them)."""
    p = argparse.ArgumentParser(description=description or __doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
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


def read_preset(path: Path) -> Dict[str, Any]:
    """A preset YAML: ``data``, ``settings``, ``method_options``, ``probe``, ``quick``
    (absent ones empty), and ``name`` = ``str(path)``.

    Raises:
        UsageError: unreadable, not YAML, unknown keys or settings, wrong types.
    """
    d = read_yaml(path, "preset")
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
