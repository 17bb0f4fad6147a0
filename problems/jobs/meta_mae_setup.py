"""MetaMAE's job, its parts: configs and settings, data, the model and the engine.

A config is a YAML file ``examples/configs/meta_mae_<modality>.yaml`` with the keys
``modality``, ``tokenizer``, ``paper`` (the paper's settings), ``cpu`` (CPU-sized
overrides) and ``quick``; :func:`make_settings` merges them with the command line of
:mod:`problems.jobs.meta_mae_job` (``--set KEY=VALUE``, then the dedicated flags) into one
flat dict of typed settings (:data:`SETTINGS`). Every value is checked where it comes
from, with no coercion — an integer setting takes an integer (``depth: 2.7`` is refused),
a flag ``true``/``false`` (``cosine: "false"`` is refused), a number a finite number in its
range (:data:`RANGES`: ``--alpha nan``, ``mask_ratio: 1.5``, ``heads: 0`` are refused) —
and a bad one is a :class:`~problems.jobs.common.UsageError` naming the source, the
setting, the value and what is expected.
Used by that job and by the MetaMAE benchmarks (ablation, timing, GPU smoke).
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

import mlo
from problems.datasets import (IDXFormatError, infinite_loader, load_basic_motions, load_breast_cancer,
                               load_cmudict_syllables, load_digits, load_mnist_like)
from problems.evaluation import linear_probe
from problems.jobs.common import UsageError, parse_yaml_value, read_yaml
from problems.latent_adaptation import MetaMAEOptions
from problems.mae import MaskedAutoencoder
from problems.meta_mae import MetaMAEPretrain, build_graph
from problems.tokenizers import DiscreteTokenizer, ImageTokenizer, SequenceTokenizer, TabularTokenizer

__all__ = ["CONFIGS", "MODALITIES", "SETTINGS", "RANGES", "read_config", "check_setting", "parse_sets",
           "make_settings", "options", "length_buckets",
           "load", "image_data", "tabular_embedding", "build_mae", "probe", "build"]

CONFIGS = Path(__file__).resolve().parents[2] / "examples" / "configs"
MODALITIES = ("image", "tabular", "timeseries", "tokens")
SETTINGS = {"width": int, "depth": int, "heads": int, "mlp_ratio": float, "decoder_dim": int,
            "decoder_depth": int, "decoder_heads": int, "dropout": float, "mask_ratio": float,
            "alpha": float, "lam": float, "tau": float, "support_ratio": float, "inner_steps": int,
            "projector_hidden": int, "projector_out": int, "batch_size": int, "lr": float,
            "weight_decay": float, "cosine": bool, "steps": int, "probe_max_iter": int,
            "decoder_dropout": float, "input_dropout": float, "qkv_bias": bool}
_AT_LEAST_1 = (lambda v: v >= 1, ">= 1")
_RATE = (lambda v: 0.0 <= v < 1.0, "in [0, 1)")
# setting -> (test, what the test wants) on top of its type in SETTINGS
RANGES: Dict[str, Tuple[Callable[[Any], bool], str]] = {
    **{k: _AT_LEAST_1 for k in ("width", "depth", "heads", "decoder_dim", "decoder_heads", "inner_steps",
                                "projector_hidden", "projector_out", "steps", "probe_max_iter")},
    "decoder_depth": (lambda v: v >= 0, ">= 0 (0: a linear decoder)"),
    "batch_size": (lambda v: v >= 2, ">= 2 (the task contrast needs two samples)"),
    "mlp_ratio": (lambda v: v > 0, "> 0"),
    "dropout": _RATE, "decoder_dropout": _RATE, "input_dropout": _RATE,
    "mask_ratio": (lambda v: 0.0 < v < 1.0, "in (0, 1) (some tokens masked, some visible)"),
    "alpha": (lambda v: v >= 0, ">= 0 (the inner step size)"),
    "lam": (lambda v: v >= 0, ">= 0 (the task-contrast weight)"),
    "tau": (lambda v: v > 0, "> 0 (the contrast's temperature)"),
    "support_ratio": (lambda v: 0.0 <= v <= 1.0, "in [0, 1]"),
    "lr": (lambda v: v > 0, "> 0"),
    "weight_decay": (lambda v: v >= 0, ">= 0"),
}
# the tokenizer table's counts (words / quick_words may also be null: all words)
TOKENIZER_COUNTS = ("patch_size", "patch_length", "max_len", "words", "quick_words")
# the command line's switches that set a setting
FLAGS = {"decoder_depth": "--decoder-depth", "support_ratio": "--support-ratio", "alpha": "--alpha",
         "lam": "--lam", "steps": "--steps"}
# settings a config may leave out (older configs): MaskedAutoencoder's defaults
DEFAULTS = {"probe_max_iter": 500, "decoder_dropout": 0.0, "input_dropout": 0.0, "qkv_bias": True}
TABULAR_EMBEDDINGS = ("shared", "per_feature")
TOP_KEYS = {"modality", "data", "tokenizer", "paper", "cpu", "quick"}
IMAGE_DATA = ("digits", "fashion-mnist", "mnist")     # the image modality's datasets (config `data.name`)
DATA_KEYS = ("name", "root", "train", "test", "quick_train", "quick_test")
Data = Tuple[Tensor, Tensor]


# ------------------------------------------------------------------- settings
def read_config(path: Path) -> Dict[str, Any]:
    """A config YAML with its ``paper``, ``cpu``, ``quick`` and ``tokenizer`` tables
    (absent ones empty) and ``path``; a :class:`UsageError` for unknown keys or settings,
    or a setting of the wrong type or out of range (:func:`check_setting`)."""
    d = read_yaml(path, "config", limit=None)
    if not isinstance(d, dict):
        raise UsageError(f"config {path}: expected a mapping with keys {sorted(TOP_KEYS)}")
    bad = sorted(set(d) - TOP_KEYS, key=str)
    if bad:
        raise UsageError(f"config {path}: unknown key(s) {bad}; known: {sorted(TOP_KEYS)}")
    for key in ("paper", "cpu", "quick"):
        d[key] = d.get(key) or {}
        if not isinstance(d[key], dict):
            raise UsageError(f"config {path}: {key} must be a mapping of settings, got {d[key]!r}"[:300])
        unknown = sorted(set(d[key]) - set(SETTINGS), key=str)
        if unknown:
            raise UsageError(f"config {path}: unknown {key} setting(s) {unknown}; known: {sorted(SETTINGS)}")
        for name, value in d[key].items():
            d[key][name] = check_setting(name, value, f"config {path} ({key})")
    d["tokenizer"] = d.get("tokenizer") or {}
    if not isinstance(d["tokenizer"], dict):
        raise UsageError(f"config {path}: tokenizer must be a mapping, got {d['tokenizer']!r}"[:300])
    for key, value in d["tokenizer"].items():
        if key in TOKENIZER_COUNTS and not (value is None and key in ("words", "quick_words")) and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise UsageError(f"config {path}: tokenizer.{key} must be an integer >= 1, got "
                             f"{value!r} ({_kind(value)})"[:300])
    d["path"] = str(path)
    return d


def _kind(value: Any) -> str:
    for t, name in ((bool, "a bool"), (int, "an integer"), (float, "a float"), (str, "a string"),
                    (dict, "a mapping"), ((list, tuple), "a list")):
        if isinstance(value, t):
            return name
    return "null" if value is None else f"a {type(value).__name__}"


def check_setting(key: str, value: Any, where: Optional[str] = None) -> Any:
    """``value`` as setting ``key`` (an int given for a float setting becomes a float;
    nothing else is converted), else a :class:`UsageError`: ``"<where>: <key> must be
    ..."``, or ``"<flag> must be ..."`` when ``where`` is ``None`` (a switch of
    :data:`FLAGS`)."""
    kind = SETTINGS[key]
    if kind is bool:
        ok, expected = isinstance(value, bool), "true or false"
    elif kind is int:
        ok, expected = isinstance(value, int) and not isinstance(value, bool), "an integer"
    else:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        expected = "a finite number"
    test, wanted = RANGES.get(key, (None, ""))
    if ok and test is not None and not test(value):
        ok = False
    if not ok:
        expected += f" {wanted}" if wanted else ""
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:60] + "..."
        name = f"{where}: {key}" if where is not None else FLAGS.get(key, key)
        raise UsageError(f"{name} must be {expected}, got {shown} ({_kind(value)})")
    return float(value) if kind is float else value


def parse_sets(items) -> Dict[str, Any]:
    """``--set KEY=VALUE`` items → ``{key: checked value}`` (values read as YAML like a config)."""
    out: Dict[str, Any] = {}
    for item in items or ():
        key, sep, text = item.partition("=")
        key = key.strip()
        where = f"--set {item if len(item) <= 80 else item[:80] + '...'}"
        if not sep or not key:
            raise UsageError(f"--set expects KEY=VALUE, got {item!r}")
        if key not in SETTINGS:
            raise UsageError(f"{where}: unknown setting {key!r}; known: {sorted(SETTINGS)}")
        out[key] = check_setting(key, parse_yaml_value(text, where), where)
    return out


def make_settings(cfg: Dict[str, Any], args: argparse.Namespace) -> Dict[str, Any]:
    """``paper`` ∪ preset ∪ quick ∪ ``--set`` ∪ command-line switches, each value checked
    (:func:`check_setting`), then the settings' joint constraints (heads divide widths)."""
    s = dict(cfg["paper"])
    if args.preset == "cpu":
        s.update(cfg["cpu"])
    if args.quick:
        s.update(cfg["quick"])
    for key, value in DEFAULTS.items():
        s.setdefault(key, value)
    missing = sorted(set(SETTINGS) - set(s))
    if missing:
        raise UsageError(f"config {cfg.get('path', '')}: missing setting(s) {missing}")
    where = f"config {cfg.get('path', '')}"
    for key in SETTINGS:                     # configs built in code skip read_config
        s[key] = check_setting(key, s[key], where)
    s.update(parse_sets(getattr(args, "overrides", None)))
    for key in FLAGS:
        value = getattr(args, key)
        if value is not None:
            s[key] = check_setting(key, value)
    s["adapt"] = not (args.no_adapt or args.variant == "mae")
    if args.no_contrastive or args.variant == "mae":
        s["lam"] = 0.0
    s["first_order"] = bool(args.first_order)
    if s["width"] % s["heads"]:
        raise UsageError(f"settings: width {s['width']} is not divisible by heads {s['heads']}")
    if s["decoder_depth"] > 0 and s["decoder_dim"] % s["decoder_heads"]:
        raise UsageError(f"settings: decoder_dim {s['decoder_dim']} is not divisible by decoder_heads "
                         f"{s['decoder_heads']}")
    return s


def options(s: Dict[str, Any]) -> MetaMAEOptions:
    """The latent adaptation's options from the settings."""
    return MetaMAEOptions(alpha=s["alpha"], steps=s["inner_steps"], first_order=s["first_order"],
                          adapt=s["adapt"], contrastive_weight=s["lam"], tau=s["tau"],
                          support_ratio=s["support_ratio"])


# ---------------------------------------------------------------------- data
def length_buckets(x: Tensor, batch_size: int, seed: int) -> Iterator[Tuple[Tensor]]:
    """Endless batches of token sequences of one real length (non-pad count), a length
    drawn in proportion to its number of words; rows drawn without replacement within
    the bucket when it is large enough."""
    g = torch.Generator().manual_seed(int(seed))
    lengths = (x != 0).sum(1)
    buckets = [torch.nonzero(lengths == n).flatten() for n in lengths.unique().tolist()]
    buckets = [b for b in buckets if len(b) >= 2]
    sizes = torch.tensor([len(b) for b in buckets], dtype=torch.float64)
    while True:
        b = buckets[int(torch.multinomial(sizes, 1, generator=g))]
        if len(b) >= batch_size:
            idx = b[torch.randperm(len(b), generator=g)[:batch_size]]
        else:
            idx = b[torch.randint(len(b), (batch_size,), generator=g)]
        yield (x[idx],)


def load(modality: str, cfg: Dict[str, Any], s: Dict[str, Any], seed: int, quick: bool = False):
    """``(train, test, tokenizer, loader, raw_features)`` for the modality (the image
    modality's dataset is the config's ``data`` table, :func:`image_data`)."""
    tk, width = cfg["tokenizer"], s["width"]
    if modality == "image":
        train, test = image_data(cfg, quick)
        tok = ImageTokenizer(train[0].shape[-1], int(tk.get("patch_size", 2)), 1, width)
        raw = lambda x: x.flatten(1)  # noqa: E731
    elif modality == "tabular":
        d = load_breast_cancer(seed=0, fractions=(0.8, 0.0, 0.2))
        tok = TabularTokenizer(30, width, embedding=tabular_embedding(cfg))
        raw = lambda x: x  # noqa: E731
    elif modality == "timeseries":
        d = load_basic_motions()
        tok = SequenceTokenizer(100, int(tk.get("patch_length", 5)), 6, width)
        raw = lambda x: x.flatten(1)  # noqa: E731
    else:
        max_len = int(tk.get("max_len", 16))
        d = load_cmudict_syllables(seed=0, fractions=(0.8, 0.0, 0.2), max_len=max_len,
                                   limit=tk.get("quick_words" if quick else "words"))
        vocab = len(d.info["vocab"])
        tok = DiscreteTokenizer(vocab, max_len, width, pad_id=0)
        raw = lambda x: F.one_hot(x, vocab).flatten(1).float()  # noqa: E731
    if modality != "image":
        train, test = d.train.tensors, d.test.tensors
    if modality == "tokens":
        batches = length_buckets(train[0], s["batch_size"], seed)
    else:
        batches = infinite_loader((train[0],), s["batch_size"], seed=seed)
    return train, test, tok, batches, raw


def image_data(cfg: Dict[str, Any], quick: bool = False) -> Tuple[Data, Data]:
    """The image modality's ``(train, test)``, each ``(x [N, 1, H, W] in [0, 1], y [N])``.

    The config's ``data`` table (absent: ``{name: digits}``): ``name`` one of
    :data:`IMAGE_DATA` -- ``digits`` is scikit-learn's 8×8 digits (a fixed 80/20 split),
    ``fashion-mnist`` / ``mnist`` the 28×28 IDX files read by
    :func:`problems.datasets.load_mnist_like` (``root``, relative to the working
    directory, is searched before the system location); ``train`` / ``test`` (with
    ``--quick``: ``quick_train`` / ``quick_test``) keep that many images of the official
    training / test set, a fixed random subset (seed 0, whatever the run's seed); absent:
    all. The pretraining data and the probe's training set are the same ``train`` images.
    """
    data = cfg.get("data") or {}
    if not isinstance(data, dict):
        raise UsageError(f"config: data must be a mapping with keys {list(DATA_KEYS)}, got {data!r}")
    unknown = sorted(set(data) - set(DATA_KEYS))
    if unknown:
        raise UsageError(f"config: unknown data key(s) {unknown}; known: {list(DATA_KEYS)}")
    name = data.get("name", "digits")
    if name not in IMAGE_DATA:
        raise UsageError(f"config: data.name must be one of {list(IMAGE_DATA)}, got {name!r}")
    if name == "digits":
        extra = sorted(set(data) - {"name"})
        if extra:
            raise UsageError(f"config: data key(s) {extra} apply to fashion-mnist / mnist, not digits")
        d = load_digits(seed=0, fractions=(0.8, 0.0, 0.2))
        return d.train.tensors, d.test.tensors
    try:
        d = load_mnist_like(name, root=data.get("root"))
    except (FileNotFoundError, IDXFormatError) as e:
        raise UsageError(f"config data: {e}") from None
    prefix = "quick_" if quick else ""
    return (_subset(d.train, data.get(prefix + "train", data.get("train")), f"data.{prefix}train", name),
            _subset(d.test, data.get(prefix + "test", data.get("test")), f"data.{prefix}test", name))


def _subset(xy: Data, n: Any, key: str, name: str) -> Data:
    """The first ``n`` of a seed-0 permutation of ``xy`` (all of it when ``n`` is None)."""
    if n is None:
        return xy
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(xy[0]):
        raise UsageError(f"config: {key} must be an integer in 1..{len(xy[0])} (the images {name} "
                         f"has there), got {n!r}")
    idx = torch.randperm(len(xy[0]), generator=torch.Generator().manual_seed(0))[:n]
    return xy[0][idx], xy[1][idx]


def tabular_embedding(cfg: Dict[str, Any]) -> str:
    """The config's ``tokenizer.embedding`` (``TabularTokenizer``'s default if absent)."""
    value = cfg["tokenizer"].get("embedding", "per_feature")
    if value not in TABULAR_EMBEDDINGS:
        raise UsageError(f"config: tokenizer.embedding must be one of {list(TABULAR_EMBEDDINGS)}, "
                         f"got {value!r}")
    return value


# ------------------------------------------------------------------ model, engine
def build_mae(tok, s: Dict[str, Any], modality: str) -> MaskedAutoencoder:
    """The MAE of the settings on the tokenizer ``tok`` (tied embeddings for tokens)."""
    return MaskedAutoencoder(tok, depth=s["depth"], num_heads=s["heads"], mlp_ratio=s["mlp_ratio"],
                             decoder_dim=s["decoder_dim"], decoder_depth=s["decoder_depth"],
                             decoder_heads=s["decoder_heads"], mask_ratio=s["mask_ratio"],
                             dropout=s["dropout"], decoder_dropout=s["decoder_dropout"],
                             input_dropout=s["input_dropout"], qkv_bias=s["qkv_bias"],
                             attn_impl="math", tie_embeddings=modality == "tokens")


def probe(fn, train: Data, test: Data, max_iter: int = 500) -> float:
    """Test accuracy of a logistic-regression probe on the features ``fn(x)``."""
    return linear_probe(fn, train, test, max_iter=max_iter).accuracy


def build(form: str, mae: MaskedAutoencoder, batches, opts: MetaMAEOptions, s: Dict[str, Any],
          args: argparse.Namespace, config: mlo.EngineConfig, sched: Dict[str, Any]):
    """``(engine, the MAE's problem, engine iterations per pretraining step)``: the graph of
    :func:`problems.meta_mae.build_graph` (``form="graph"``) or one
    :class:`problems.meta_mae.MetaMAEPretrain` (``"single"``); ``args.seed`` seeds the
    Nearby-S draws."""
    common = dict(projector_hidden=s["projector_hidden"], projector_out=s["projector_out"],
                  generator=torch.Generator().manual_seed(args.seed + 1000),
                  optimizer_kwargs={"lr": s["lr"], "weight_decay": s["weight_decay"]}, **sched)
    if form == "single":
        problem = MetaMAEPretrain(mae, batches, options=opts, **common)
        return mlo.Engine([problem], config=config), problem, 1
    engine, problems = build_graph(mae, batches, opts, engine_config=config, **common)
    return engine, problems["upper"], opts.steps if opts.adapt else 1
