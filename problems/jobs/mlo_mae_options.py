"""The MLO-MAE main job's command line, presets and settings.

A preset is a YAML file (``examples/configs/mlo_mae_{paper,cpu,fmnist}.yaml``, or your own
with ``--preset-file``) with the keys ``data``, ``settings`` (fields of
:class:`problems.mlo_mae.MLOMAESettings`), ``method_options`` (per method), ``probe`` and
``quick``. :func:`make_settings` applies the command line on top of it.

Settings are checked against their types before anything is built, with no coercion:
an integer field takes an integer (``depth: 2.7`` and ``depth: "4"`` are refused), a flag
``true``/``false`` (``cosine: "false"`` is refused, not read as true), a number field a
finite number, ``method`` a registered method's name, ``method_options`` a mapping
(:func:`check_setting`).
"""
from __future__ import annotations

import argparse
import math
from dataclasses import fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import engines.base
from problems.mlo_mae import VARIANTS, MLOMAESettings
from problems.jobs.common import UsageError, one_line, parse_yaml_value, read_yaml

__all__ = ["CONFIGS", "PRESETS", "METHODS", "DATA", "IDX_DATA", "IDX_PRESET", "DEFAULT_DATA_DIRS",
           "parse_args", "read_preset", "parse_overrides", "check_setting", "make_settings"]

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


def _kind(value: Any) -> str:
    """``value``'s YAML kind, for messages: ``a float``, ``a string``, ..."""
    if value is None:
        return "null"
    for t, name in ((bool, "a bool"), (int, "an integer"), (float, "a float"), (str, "a string"),
                    (dict, "a mapping"), ((list, tuple), "a list")):
        if isinstance(value, t):
            return name
    return f"a {type(value).__name__}"


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# a field's annotation (a string: the settings module uses postponed annotations) ->
# (test, what is expected); a field named in _FIELD_EXPECTS is checked by that instead
_TYPE_EXPECTS = {
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "float": (_number, "a finite number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "Optional[float]": (lambda v: v is None or _number(v), "null or a finite number"),
}
_FIELD_EXPECTS = {
    "method_options": (lambda v: isinstance(v, dict), "a mapping of the method's options (e.g. {max_iter: 5})"),
    "cosine_final": (lambda v: isinstance(v, dict), "a mapping level -> fraction (e.g. {pretrain: 0.01})"),
    "configs": (lambda v: isinstance(v, dict) and all(isinstance(c, dict) for c in v.values()),
                "a mapping problem -> settings (e.g. {mask: {update_every: 2}})"),
    "betas": (lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and all(_number(b) for b in v),
              "a list of two finite numbers (e.g. [0.9, 0.95])"),
    "augment": (lambda v: isinstance(v, (list, tuple)) and all(isinstance(a, str) for a in v),
                "a list of level names (e.g. [pretrain, finetune])"),
    "normalize": (lambda v: v is None or (isinstance(v, (list, tuple)) and len(v) == 2
                                          and all(isinstance(m, (list, tuple)) for m in v)),
                  "null or [mean, std], two lists of per-channel numbers"),
}
_FIELD_TYPES = {f.name: f.type for f in fields(MLOMAESettings)}


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def check_setting(key: str, value: Any, where: str) -> None:
    """Raises :class:`UsageError` (starting with ``where``, e.g. ``--set depth=2.7``) when
    ``value`` is not of the MLO-MAE setting ``key``'s type, or ``method`` names no
    registered hypergradient method. Nothing is coerced: a string is never a number or a
    flag, a float never an integer."""
    if key not in _FIELD_TYPES:
        raise UsageError(f"{where}: unknown MLO-MAE setting(s) {[key]}; known: {sorted(_FIELD_TYPES)}")
    if key == "method":
        known = engines.base.available()
        if not isinstance(value, str) or value not in known:
            raise UsageError(f"{where}: method must be the name of a hypergradient method, one of "
                             f"{', '.join(known)}; got {_short(value)} ({_kind(value)})")
        return
    test, expected = _FIELD_EXPECTS.get(key) or _TYPE_EXPECTS.get(_FIELD_TYPES[key], (None, None))
    if test is not None and not test(value):
        raise UsageError(f"{where}: {key} must be {expected}, got {_short(value)} ({_kind(value)})")


def read_preset(path: Path) -> Dict[str, Any]:
    """A preset YAML: ``data``, ``settings``, ``method_options``, ``probe``, ``quick``
    (absent ones empty), and ``name`` = ``str(path)``.

    Raises:
        UsageError: unreadable, not YAML (or with anchors/aliases), unknown keys or
            settings, wrong types (:func:`check_setting`; ``method_options`` must map
            method names to mappings).
    """
    d = read_yaml(path, "preset")
    if not isinstance(d, dict):
        raise UsageError(f"preset {path}: expected a mapping with keys {sorted(PRESET_KEYS)}")
    unknown = sorted(set(d) - set(PRESET_KEYS), key=str)
    if unknown:
        raise UsageError(f"preset {path}: unknown key(s) {unknown}; known: {sorted(PRESET_KEYS)}")
    for key, kind in PRESET_KEYS.items():
        d[key] = d.get(key) if d.get(key) is not None else kind()
        if not isinstance(d[key], kind):
            raise UsageError(f"preset {path}: {key!r} must be a {kind.__name__}, got {_short(d[key])}")
    if d["data"] not in DATA:
        raise UsageError(f"preset {path}: data must be one of {', '.join(DATA)}; got {d['data']!r}")
    for key, known in (("probe", PROBE_KEYS), ("quick", QUICK_KEYS)):
        bad = sorted(set(d[key]) - known, key=str)
        if bad:
            raise UsageError(f"preset {path}: unknown {key} key(s) {bad}; known: {sorted(known)}")
    settings_known = {f.name for f in fields(MLOMAESettings)}
    bad = sorted(set(d["settings"]) - settings_known, key=str)
    if bad:
        raise UsageError(f"preset {path}: unknown MLO-MAE setting(s) {bad}; "
                         f"known: {sorted(settings_known)}")
    for key, value in d["settings"].items():
        check_setting(key, value, f"preset {path}: settings")
    for method, options in d["method_options"].items():
        if not isinstance(options, dict):
            raise UsageError(f"preset {path}: method_options.{method} must be a mapping of that method's "
                             f"options, got {_short(options)} ({_kind(options)})")
    d["name"] = str(path)
    return d


def parse_overrides(items: List[str]) -> Dict[str, Any]:
    """``["key=value", ...]`` → ``{key: value}``, each value read as YAML like a preset
    (``1e-3`` a float, no anchors/aliases) and checked by :func:`check_setting`."""
    return {key: value for key, value, _ in _overrides(items)}


def _overrides(items: List[str]) -> List[Tuple[str, Any, str]]:
    """``(key, value, the item as given)`` of each ``--set`` item, checked."""
    out = []
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"--set expects KEY=VALUE, got {item!r}")
        where = f"--set {item if len(item) <= 80 else item[:80] + '...'}"
        value = parse_yaml_value(text, where)
        check_setting(key, value, where)
        out.append((key, value, item))
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
    check_setting("method", method, f"settings ({preset['name']} with your options)")
    s["method_options"] = {**preset["method_options"].get(method, {}), **(s.get("method_options") or {})}
    if method == "cg":
        s["method_options"].setdefault("max_iter", CG_MAX_ITER)
    try:
        return MLOMAESettings.from_dict(s)
    except (TypeError, ValueError) as e:
        raise UsageError(f"settings ({preset['name']} with your options): {one_line(e)}") from None
