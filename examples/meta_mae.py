"""MetaMAE (and its Table-4 ablations) on four modalities, then a linear probe.

Pretrains a small MAE with MetaMAE's objective — latent adaptation on the Nearby-S
support, query reconstruction from the adapted latent, λ · task contrast — run by
:class:`mlo.Engine`, then fits a logistic-regression probe on the frozen encoder's
mean-pooled features (``mae.features(x, pool="mean")``) and reports test accuracy.

Two forms of the same objective (``--form``): ``graph`` (default) is the problem graph
of :func:`problems.meta_mae.build_graph` — the per-sample latents ``Z`` are a lower
``mlo.WindowProblem`` opened from the encoder on each batch and adapted by the
engine's unrolled SGD, the MAE + projector the upper problem; ``single`` is one
:class:`mlo.Problem` (:class:`problems.meta_mae.MetaMAEPretrain`) whose loss writes
the inner step itself (``problems.latent_adaptation.metamae_loss``)::

    python examples/meta_mae.py --modality image          # digits       (cpu preset, ~1 min on one core)
    python examples/meta_mae.py --modality tabular        # breast cancer
    python examples/meta_mae.py --modality timeseries     # aeon BasicMotions
    python examples/meta_mae.py --modality tokens         # CMU-dict spellings -> syllables
    python examples/meta_mae.py --modality image --quick  # smoke run (seconds)
    python examples/meta_mae.py --modality image --variant mae --decoder-depth 0   # MAE, linear decoder
    python examples/meta_mae.py --modality image --no-contrastive                  # + latent adaptation
    python examples/meta_mae.py --modality tabular --support-ratio 0.5 --first-order
    python examples/meta_mae.py --modality image --form single                     # one-problem form

Presets are YAML files ``examples/configs/meta_mae_<modality>.yaml`` with the
paper's hyperparameters (Table 8: α, λ, decoder depth, mask ratio, batch; τ = 0.5,
r = 0.1, one inner step) under ``paper`` (the paper's 256-d × 12 encoder: a GPU
model) and CPU-sized overrides under ``cpu`` (the default). ``--config FILE`` reads
your own. The ``paper`` blocks also follow the official code (alinlab/MetaMAE) where the
paper is silent: no dropout in the decoder (``decoder_dropout: 0``, also Table 7), no
QKV bias (``qkv_bias: false``), dropout on the encoder's input tokens at the encoder's
rate (``input_dropout``); the tabular preset embeds features with one shared
``Linear(1, D)`` (``tokenizer: {embedding: shared}``; ``--tabular-embedding per_feature``
for one embedding per feature). The ``cpu`` blocks keep ``qkv_bias: true`` and
``input_dropout: 0`` (the settings of the measured rows in docs/meta_mae.md).

Ablations (Table 4 / Table 6): ``--variant mae`` (no adaptation, no contrast: the
MAE loss), ``--no-adapt``, ``--no-contrastive``, ``--decoder-depth 0`` (linear
decoder), ``--support-ratio r``, ``--first-order``; ``--alpha``, ``--lam`` override
the preset's α and λ.

Writes ``--out`` (default ``runs/meta_mae/<modality>``, ``runs/meta_mae_quick/<modality>``
with ``--quick``): ``metrics.csv`` (one row per iteration: loss, query and contrastive
terms, seconds; :class:`mlo.loggers.CSVLogger`) and ``summary.json``; with
``--checkpoint-every N`` also ``checkpoints/ckpt-<iteration>.pt`` every N engine
iterations (``EngineConfig(checkpoint_every=N)``: atomic, the newest ``--checkpoint-keep``
kept; load one with ``mlo.checkpoint.load`` into the same graph — this script has no
``--resume``). A folder that already holds a run (a ``summary.json`` or periodic
checkpoints) is never overwritten silently — e.g. two ablations of one modality, which
share the default folder: the script stops with ``error: --out DIR already holds a run
...`` (exit 2) unless ``--overwrite`` is given (which first deletes that run's
``summary.json`` and checkpoints) or another ``--out``. Also
probes the randomly initialised encoder and the raw input (one-hot ids for tokens)
unless ``--no-floors``. The last line printed is ``linear-probe test accuracy: NN.NN%``.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
import yaml
from torch import Tensor

import mlo
from mlo.config import load_yaml
from mlo.loggers import CSVLogger
from problems.datasets import (infinite_loader, load_basic_motions, load_breast_cancer,
                               load_cmudict_syllables, load_digits)
from problems.evaluation import linear_probe
from problems.latent_adaptation import MetaMAEOptions
from problems.mae import MaskedAutoencoder
from problems.meta_mae import MetaMAEPretrain, build_graph
from problems.tokenizers import DiscreteTokenizer, ImageTokenizer, SequenceTokenizer, TabularTokenizer

CONFIGS = Path(__file__).resolve().parent / "configs"
MODALITIES = ("image", "tabular", "timeseries", "tokens")
SETTINGS = {"width": int, "depth": int, "heads": int, "mlp_ratio": float, "decoder_dim": int,
            "decoder_depth": int, "decoder_heads": int, "dropout": float, "mask_ratio": float,
            "alpha": float, "lam": float, "tau": float, "support_ratio": float, "inner_steps": int,
            "projector_hidden": int, "projector_out": int, "batch_size": int, "lr": float,
            "weight_decay": float, "cosine": bool, "steps": int, "probe_max_iter": int,
            "decoder_dropout": float, "input_dropout": float, "qkv_bias": bool}
# settings a config may leave out (older configs): MaskedAutoencoder's defaults
DEFAULTS = {"probe_max_iter": 500, "decoder_dropout": 0.0, "input_dropout": 0.0, "qkv_bias": True}
TABULAR_EMBEDDINGS = ("shared", "per_feature")
TOP_KEYS = {"modality", "tokenizer", "paper", "cpu", "quick"}
CHECKPOINTS = "checkpoints"   # --checkpoint-every's folder under --out
Data = Tuple[Tensor, Tensor]


class UsageError(Exception):
    """Bad input: one ``error: ...`` line on stderr, exit code 2."""


# ------------------------------------------------------------------- options
def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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


def read_config(path: Path) -> Dict[str, Any]:
    try:
        d = load_yaml(path)      # strict: duplicate keys named, 1e-3 a float
    except OSError as e:
        raise UsageError(f"cannot read config {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise UsageError(f"config {' '.join(str(e).split())}") from None
    except yaml.YAMLError as e:
        raise UsageError(f"config {path} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(d, dict):
        raise UsageError(f"config {path}: expected a mapping with keys {sorted(TOP_KEYS)}")
    bad = sorted(set(d) - TOP_KEYS)
    if bad:
        raise UsageError(f"config {path}: unknown key(s) {bad}; known: {sorted(TOP_KEYS)}")
    for key in ("paper", "cpu", "quick"):
        d[key] = d.get(key) or {}
        unknown = sorted(set(d[key]) - set(SETTINGS))
        if unknown:
            raise UsageError(f"config {path}: unknown {key} setting(s) {unknown}; known: {sorted(SETTINGS)}")
    d["tokenizer"] = d.get("tokenizer") or {}
    return d


def make_settings(cfg: Dict[str, Any], args: argparse.Namespace) -> Dict[str, Any]:
    """``paper`` ∪ preset ∪ quick ∪ command-line switches, typed."""
    s = dict(cfg["paper"])
    if args.preset == "cpu":
        s.update(cfg["cpu"])
    if args.quick:
        s.update(cfg["quick"])
    for key, value in DEFAULTS.items():
        s.setdefault(key, value)
    missing = sorted(set(SETTINGS) - set(s))
    if missing:
        raise UsageError(f"config: missing setting(s) {missing}")
    for key, kind in SETTINGS.items():
        try:
            s[key] = kind(s[key]) if kind is not bool else bool(s[key])
        except (TypeError, ValueError):
            raise UsageError(f"config: {key} must be {kind.__name__}, got {s[key]!r}") from None
    for key in ("decoder_depth", "support_ratio", "alpha", "lam", "steps"):
        value = getattr(args, key)
        if value is not None:
            s[key] = value
    s["adapt"] = not (args.no_adapt or args.variant == "mae")
    if args.no_contrastive or args.variant == "mae":
        s["lam"] = 0.0
    s["first_order"] = bool(args.first_order)
    if s["steps"] < 1 or s["batch_size"] < 2:
        raise UsageError("steps must be >= 1 and batch_size >= 2")
    if not 0.0 <= s["support_ratio"] <= 1.0:
        raise UsageError(f"--support-ratio must be in [0, 1], got {s['support_ratio']}")
    if s["decoder_depth"] < 0:
        raise UsageError(f"--decoder-depth must be >= 0, got {s['decoder_depth']}")
    return s


def options(s: Dict[str, Any]) -> MetaMAEOptions:
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
    """``(train, test, tokenizer, loader, raw_features)`` for the modality."""
    tk, width = cfg["tokenizer"], s["width"]
    if modality == "image":
        d = load_digits(seed=0, fractions=(0.8, 0.0, 0.2))
        tok = ImageTokenizer(8, int(tk.get("patch_size", 2)), 1, width)
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
    train, test = d.train.tensors, d.test.tensors
    if modality == "tokens":
        batches = length_buckets(train[0], s["batch_size"], seed)
    else:
        batches = infinite_loader((train[0],), s["batch_size"], seed=seed)
    return train, test, tok, batches, raw


def tabular_embedding(cfg: Dict[str, Any]) -> str:
    """The config's ``tokenizer.embedding`` (``TabularTokenizer``'s default if absent)."""
    value = cfg["tokenizer"].get("embedding", "per_feature")
    if value not in TABULAR_EMBEDDINGS:
        raise UsageError(f"config: tokenizer.embedding must be one of {list(TABULAR_EMBEDDINGS)}, "
                         f"got {value!r}")
    return value


def build_mae(tok, s: Dict[str, Any], modality: str) -> MaskedAutoencoder:
    return MaskedAutoencoder(tok, depth=s["depth"], num_heads=s["heads"], mlp_ratio=s["mlp_ratio"],
                             decoder_dim=s["decoder_dim"], decoder_depth=s["decoder_depth"],
                             decoder_heads=s["decoder_heads"], mask_ratio=s["mask_ratio"],
                             dropout=s["dropout"], decoder_dropout=s["decoder_dropout"],
                             input_dropout=s["input_dropout"], qkv_bias=s["qkv_bias"],
                             attn_impl="math", tie_embeddings=modality == "tokens")


class TimedCSV(CSVLogger):
    """``CSVLogger`` with the wall-clock seconds since the run started."""

    def __init__(self, path: Path):
        super().__init__(path)
        self.t0 = time.perf_counter()

    def log(self, iteration: int, metrics: Dict[str, float]) -> None:
        super().log(iteration, {**metrics, "seconds": round(time.perf_counter() - self.t0, 4)})


def probe(fn, train: Data, test: Data, max_iter: int = 500) -> float:
    return linear_probe(fn, train, test, max_iter=max_iter).accuracy


def build(form: str, mae: MaskedAutoencoder, batches, opts: MetaMAEOptions, s: Dict[str, Any],
          args: argparse.Namespace, config: mlo.EngineConfig, sched: Dict[str, Any]):
    """``(engine, the MAE's problem, engine iterations per pretraining step)``."""
    common = dict(projector_hidden=s["projector_hidden"], projector_out=s["projector_out"],
                  generator=torch.Generator().manual_seed(args.seed + 1000),
                  optimizer_kwargs={"lr": s["lr"], "weight_decay": s["weight_decay"]}, **sched)
    if form == "single":
        problem = MetaMAEPretrain(mae, batches, options=opts, **common)
        return mlo.Engine([problem], config=config), problem, 1
    engine, problems = build_graph(mae, batches, opts, engine_config=config, **common)
    return engine, problems["upper"], opts.steps if opts.adapt else 1


# ------------------------------------------------------------------ run folder
def claim_out(out: Path, args: argparse.Namespace) -> None:
    """Refuses an ``out`` holding a run (``summary.json`` or periodic checkpoints) unless
    ``--overwrite``, which deletes them; checks ``--checkpoint-every`` / ``--checkpoint-keep``."""
    for flag, value in (("--checkpoint-every", args.checkpoint_every), ("--checkpoint-keep", args.checkpoint_keep)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be >= 1, got {value}")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    old = [out / "summary.json"] if (out / "summary.json").is_file() else []
    old += [Path(p) for _, p in mlo.checkpoint.list_checkpoints(out / CHECKPOINTS)]
    if old and not args.overwrite:
        shown = [f for f in old if f.name == "summary.json"] + [f for f in old if f.name != "summary.json"][-1:]
        found = ", ".join(str(f.relative_to(out)) for f in shown)
        raise UsageError(f"--out {out} already holds a run ({found}); pass --out DIR for a new folder "
                         f"or --overwrite to replace it")
    for f in old:
        f.unlink()


# ---------------------------------------------------------------------- main
def run(args: argparse.Namespace) -> Dict[str, Any]:
    cfg = read_config(args.config or CONFIGS / f"meta_mae_{args.modality}.yaml")
    if cfg.get("modality", args.modality) != args.modality:
        raise UsageError(f"config is for modality {cfg['modality']!r}, not {args.modality!r}")
    s = make_settings(cfg, args)
    if args.tabular_embedding is not None:
        cfg["tokenizer"]["embedding"] = args.tabular_embedding
    out = args.out or Path("runs/meta_mae_quick" if args.quick else "runs/meta_mae") / args.modality
    claim_out(out, args)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    train, test, tok, batches, raw = load(args.modality, cfg, s, args.seed, args.quick)
    mae = build_mae(tok, s, args.modality)
    random_init = copy.deepcopy(mae)
    opts = options(s)
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
        result["random_init_accuracy"] = probe(lambda x: random_init.features(x, pool="mean"), train, test, s["probe_max_iter"])
        result["raw_accuracy"] = probe(raw, train, test, s["probe_max_iter"])
        print(f"[meta_mae] floors: random-init encoder {100 * result['random_init_accuracy']:.2f}%, "
              f"raw input {100 * result['raw_accuracy']:.2f}%")
    print(f"[meta_mae] {s['steps']} steps in {seconds:.1f}s ({1000 * step_seconds:.1f} ms/step), "
          f"final loss {result['final_loss']:.4f}; wrote {out / 'metrics.csv'}")
    with open(out / "summary.json", "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    print(f"linear-probe test accuracy: {100 * result['accuracy']:.2f}%", flush=True)
    return result


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    try:
        return run(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
