"""MLO-MAE vs its baselines and controls on Fashion-MNIST (docs/mlo_mae.md#fashion-mnist-study).

Every (variant, seed) trains the ``fmnist`` preset (examples/configs/mlo_mae_fmnist.yaml)
for the same number of pretraining iterations on 50 000 training images; 10 000 more
are a validation split (settings are chosen on it) and the 10 000 official test images
are reported. Each finished run is written at once to ``OUT/<variant>__seed<k>.json``;
a run whose file exists is skipped, so the study resumes where it stopped, and two
processes started with the same arguments share the work (a run is claimed by
creating ``OUT/<variant>__seed<k>.claim``; a claim of a dead process is taken over).

Columns, per run (encoder frozen, CLS feature):

* ``probe_1k``   logistic-regression probe trained on 1 000 labelled training images;
* ``probe_all``  the same on all 50 000 (``problems.evaluation.linear_probe``);
* ``head``       the stage-II head's accuracy (the MLO-MAE paper's "linear probing"
  metric: the finetune level's classifier, trained inside the run on the 80 % split);
* the masking network's probabilities on the test images: mean ``p`` of the masked
  patches, the share of masked patches with ``p < 0.1``, the spread of ``p`` across
  images (std over images, mean over positions) and across positions (std of the
  per-position means); per-class mean masks for the figure.

Floors, once per seed: the untrained encoder (same architecture and seed) and raw pixels.

    OMP_NUM_THREADS=1 python benchmarks/mlo_mae_fmnist.py run --seeds 0 1 2 &   # two workers
    OMP_NUM_THREADS=1 python benchmarks/mlo_mae_fmnist.py run --seeds 0 1 2 &
    python benchmarks/mlo_mae_fmnist.py table            # markdown table + figure from OUT
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mlo.config import load_yaml  # noqa: E402
from problems.datasets import load_mnist_like, split  # noqa: E402
from problems.evaluation import linear_probe  # noqa: E402
from problems.mask_statistics import mask_probabilities, mask_statistics  # noqa: E402
from problems.mlo_mae import MLOMAESettings, build, head_accuracy  # noqa: E402

PRESET = ROOT / "examples" / "configs" / "mlo_mae_fmnist.yaml"
OUT = ROOT / "benchmarks" / "results" / "mlo_mae_fmnist"
N_VAL, N_SCARCE = 10_000, 1_000

# name -> (graph variant, settings overrides)
VARIANTS = {
    "mae": ("mae", {}),
    "mlo-mae/paper": ("mlo-mae", {"hypergrad_weighting": "paper"}),
    "mlo-mae/official": ("mlo-mae", {"hypergrad_weighting": "official"}),
    "mlo-mae/paper/no-pos": ("mlo-mae", {"mask_input_position": False}),
    "mlo-mae/paper/ln": ("mlo-mae", {"mask_input_norm": True}),
    "blo-mae": ("blo-mae", {}),
    "frozen-mask": ("frozen-mask", {}),
    "mlo-mae/paper/unroll1": ("mlo-mae", {"unroll_steps": 1}),
    "mlo-mae/paper/unroll5": ("mlo-mae", {"unroll_steps": 5}),
    # sampled masks (Gumbel top-k ∝ p) and/or weights p / mean(masked p): problems/mlo_mae.py
    "mlo-mae/paper/gumbel": ("mlo-mae", {"mask_sampling": "gumbel"}),
    "mlo-mae/paper/norm": ("mlo-mae", {"normalize_weights": True}),
    "mlo-mae/paper/gumbel-norm": ("mlo-mae", {"mask_sampling": "gumbel", "normalize_weights": True}),
    # the masking budget: each image's p summing to the k patches it masks (mask_budget)
    "mlo-mae/paper/budget": ("mlo-mae", {"mask_budget": 1.0}),
    "mlo-mae/paper/gumbel-budget": ("mlo-mae", {"mask_sampling": "gumbel", "mask_budget": 1.0}),
    # the paper's Table-8 question (unroll steps 1 / 2 / 5) on the best row
    "mlo-mae/paper/gumbel-budget/unroll1": ("mlo-mae", {"mask_sampling": "gumbel", "mask_budget": 1.0,
                                                        "unroll_steps": 1}),
    "mlo-mae/paper/gumbel-budget/unroll5": ("mlo-mae", {"mask_sampling": "gumbel", "mask_budget": 1.0,
                                                        "unroll_steps": 5}),
}
DEFAULT_ORDER = ["mlo-mae/paper", "mlo-mae/official", "mae", "mlo-mae/paper/no-pos", "mlo-mae/paper/ln",
                 "blo-mae", "frozen-mask"]


def data():
    """``(train, val, test)`` as ``(x [N,1,28,28], y [N])``; val: 10 000 training images (fixed)."""
    d = load_mnist_like("fashion-mnist")
    x, y = d.train
    val_idx, tr_idx = split(len(x), (N_VAL / len(x), 1 - N_VAL / len(x)), seed=0)
    return (x[tr_idx], y[tr_idx]), (x[val_idx], y[val_idx]), d.test


def preset_settings(overrides: dict) -> MLOMAESettings:
    """The preset with ``overrides``. Every row runs without the masking budget and with
    top-k masks unless it sets them: the rows were measured before the preset took
    ``mask_budget: 1.0``, ``mask_sampling: gumbel`` and ``unroll_steps: 5``, which are rows
    of their own (``mlo-mae/paper/gumbel-budget/unroll5`` is the preset's default now;
    every other row unrolls 2)."""
    p = load_yaml(PRESET)
    s = dict(p["settings"])
    s["method_options"] = dict(p["method_options"].get(s.get("method", "finite_difference"), {}))
    s.update(mask_budget=0.0, mask_sampling="topk", unroll_steps=2)
    s.update(overrides)
    return MLOMAESettings.from_dict(s)


def scarce_indices(n: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(0))[:N_SCARCE]


def probes(feature, train, val, test, pools=("cls", "mean")) -> dict:
    """Probes trained on 1 000 and on all training labels (each once), scored on val and test."""
    out = {}
    sub = scarce_indices(len(train[0]))
    for pool in pools:
        f = feature if pool is None else (lambda t, pool=pool: feature.features(t, pool=pool))
        suffix = "" if pool in ("cls", None) else f"_{pool}"
        for tag, tr in (("1k", (train[0][sub], train[1][sub])), ("all", train)):
            r = linear_probe(f, tr, test, num_classes=10, also={"val": val})
            out[f"probe_{tag}_test{suffix}"], out[f"probe_{tag}_val{suffix}"] = r.accuracy, r.others["val"]
    return out


def mask_stats(g, x: torch.Tensor, y: torch.Tensor) -> dict:
    """:func:`problems.mask_statistics.mask_statistics` of the test images, plus 8 examples' ``p``."""
    p = mask_probabilities(g, x)                                                 # [N, L]
    return {**mask_statistics(p, g.settings.mask_ratio, y, 10), "examples_p": p[:8].tolist()}


def run_one(name: str, seed: int, steps: int, splits) -> dict:
    train, val, test = splits
    variant, overrides = VARIANTS[name]
    s = preset_settings({**overrides, **({"steps": steps} if steps else {})})
    g = build(variant, s, train, seed=seed, split_seed=0)
    t0 = time.perf_counter()
    g.engine.run(s.steps)
    secs = time.perf_counter() - t0
    g.mae.eval()
    row = {"variant": name, "graph": variant, "seed": seed, "steps": s.steps, "seconds": secs,
           "overrides": overrides, "settings": {k: v for k, v in vars(s).items() if k != "configs"},
           "records": {n: dict(r) for n, r in g.engine.records.items()}}
    row.update(probes(g.mae, train, val, test))
    if variant in ("mlo-mae", "blo-mae"):
        row["head_val"], row["head_test"] = head_accuracy(g, *val), head_accuracy(g, *test)
    if g.masker is not None:
        row["mask"] = mask_stats(g, *test)
    return row


def floors(seed: int, splits) -> dict:
    """Untrained encoder (this seed's initialisation) and raw pixels."""
    train, val, test = splits
    g = build("mae", preset_settings({}), train, seed=seed, split_seed=0)
    init = copy.deepcopy(g.mae).eval()
    row = {"variant": "untrained", "seed": seed}
    row.update(probes(init, train, val, test))
    out = {"untrained": row}
    if seed == 0:     # raw pixels do not depend on the seed
        out["raw"] = {"variant": "raw", "seed": seed, **probes(lambda t: t.flatten(1), train, val, test, (None,))}
    return out


# ---------------------------------------------------------------- work queue
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def claim(path: Path) -> bool:
    """Atomically claims ``path`` (``.claim`` file holding our pid); a dead owner's claim is taken."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            pid = int(path.read_text().strip() or 0)
        except (OSError, ValueError):
            return False
        if pid and _alive(pid):
            return False
        path.unlink(missing_ok=True)
        return claim(path)
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    return True


def write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def cmd_run(args) -> None:
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    splits = data()
    jobs = [(v, s) for s in args.seeds for v in args.variants] + [("floors", s) for s in args.seeds]
    for name, seed in jobs:
        stem = f"{name.replace('/', '+')}__seed{seed}"
        done, lock = out / f"{stem}.json", out / f"{stem}.claim"
        if done.exists() or not claim(lock):
            continue
        try:
            t0 = time.perf_counter()
            result = floors(seed, splits) if name == "floors" else run_one(name, seed, args.steps, splits)
            write_json(done, result)
            brief = {k: round(100 * v, 2) for k, v in result.items()
                     if k.startswith(("probe_all", "probe_1k", "head")) and not k.endswith("_mean")}
            if "mask" in result:
                brief.update({k: round(result["mask"][k], 4) for k in
                              ("masked_p_mean", "masked_p_below_0.1", "std_across_images")})
            print(f"{stem}: {time.perf_counter() - t0:.0f}s {brief}", flush=True)
        finally:
            lock.unlink(missing_ok=True)


# --------------------------------------------------------------------- table
def load_rows(out: Path):
    rows, fl = [], []
    for f in sorted(out.glob("*.json")):
        d = json.loads(f.read_text())
        if "untrained" in d:
            fl += [d["untrained"]] + ([d["raw"]] if "raw" in d else [])
        else:
            rows.append(d)
    return rows, fl


def fmt(vals, scale=100.0, digits=2):
    vals = [v for v in vals if v is not None]
    if not vals:
        return "—"
    m = statistics.mean(vals) * scale
    if len(vals) == 1:      # one run: no spread to report
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {statistics.stdev(vals) * scale:.{digits}f}"


def cmd_table(args) -> None:
    out = Path(args.out)
    rows, fl = load_rows(out)
    names = [v for v in list(VARIANTS) if any(r["variant"] == v for r in rows)] + ["untrained", "raw"]
    split_name = args.split
    lines = [f"| variant | seeds | probe 1k labels ({split_name}) | probe all labels ({split_name}) | "
             f"stage-II head ({split_name}) | masked p̄ | share p<0.1 | p std across images | "
             f"p std across positions |", "|---|---|---|---|---|---|---|---|---|"]
    for name in names:
        rs = [r for r in rows + fl if r["variant"] == name]
        m = [r["mask"] for r in rs if "mask" in r]
        lines.append("| " + " | ".join([
            name, str(len(rs)),
            fmt([r.get(f"probe_1k_{split_name}") for r in rs]),
            fmt([r.get(f"probe_all_{split_name}") for r in rs]),
            fmt([r.get(f"head_{split_name}") for r in rs]),
            fmt([x["masked_p_mean"] for x in m], 1, 3),
            fmt([x["masked_p_below_0.1"] for x in m], 1, 2),
            fmt([x["std_across_images"] for x in m], 1, 3),
            fmt([x["std_across_positions"] for x in m], 1, 3)]) + " |")
    text = "\n".join(lines)
    print(text)
    (out / f"table_{split_name}.md").write_text(text + "\n")
    if args.figure:
        figure(rows, out / "masks_by_class.png")


def figure(rows, path: Path) -> None:
    """Per-class mean masks (rows: learned-mask variants, seed 0) and example images with their p."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if "mask" in r and r["seed"] == 0]
    if not shown:
        return
    test_x = load_mnist_like("fashion-mnist").test[0]
    classes = ["T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Boot"]
    n_ex = 4
    fig, axes = plt.subplots(len(shown), 10 + 2 * n_ex, figsize=(1.1 * (10 + 2 * n_ex), 1.3 * len(shown)),
                             squeeze=False)
    for i, r in enumerate(shown):
        g = int(len(r["mask"]["mean_p_per_position"]) ** 0.5)
        for c in range(10):
            ax = axes[i, c]
            ax.imshow(torch.tensor(r["mask"]["mean_p_per_class"][c]).view(g, g).numpy(),
                      cmap="viridis", vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
            if i == 0:
                ax.set_title(classes[c], fontsize=7)
        axes[i, 0].set_ylabel(r["variant"].replace("mlo-mae/", ""), fontsize=7)
        for j in range(n_ex):
            axes[i, 10 + 2 * j].imshow(test_x[j, 0].numpy(), cmap="gray")
            axes[i, 11 + 2 * j].imshow(torch.tensor(r["mask"]["examples_p"][j]).view(g, g).numpy(),
                                       cmap="viridis", vmin=0, vmax=1)
            for ax in axes[i, 10 + 2 * j:12 + 2 * j]:
                ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle("Fashion-MNIST, seed 0: per-class mean p(mask) (10 columns), then test images and their p",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train and evaluate (variant, seed) pairs not yet done")
    r.add_argument("--variants", nargs="+", default=DEFAULT_ORDER, choices=list(VARIANTS))
    r.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    r.add_argument("--steps", type=int, default=None, help="default: the preset's")
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--out", default=str(OUT))
    t = sub.add_parser("table", help="markdown table (and figure) from the results in OUT")
    t.add_argument("--out", default=str(OUT))
    t.add_argument("--split", choices=("val", "test"), default="test")
    t.add_argument("--figure", action="store_true")
    args = p.parse_args(argv)
    {"run": cmd_run, "table": cmd_table}[args.cmd](args)


if __name__ == "__main__":
    main()
