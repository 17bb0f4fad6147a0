"""Sanity check: does MAE pretraining on digits beat a random encoder under a linear probe?

For each seed: build a small MAE on scikit-learn's 8×8 digits (patch 2 → 16 tokens),
keep a copy of its random initialisation, pretrain it for ``--steps`` steps as a
single :class:`problems.pretrain.MAEPretrain` problem run by :class:`mlo.Engine`,
then fit the same logistic-regression probe (:func:`problems.evaluation.linear_probe`)
on frozen features of the pretrained and of the randomly initialised encoder, and
report test accuracy (mean ± std over seeds). The split is fixed (seed 0); the
model seed varies. Raw pixels give a reference point.

    python examples/mae_digits_probe.py                 # 3 seeds, full run (~1-2 min/seed on 2 CPU cores)
    python examples/mae_digits_probe.py --quick         # smoke run
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import mlo
from problems.datasets import infinite_loader, load_digits
from problems.evaluation import linear_probe
from problems.mae import MaskedAutoencoder
from problems.pretrain import MAEPretrain
from problems.tokenizers import ImageTokenizer


def build_mae(args) -> MaskedAutoencoder:
    tok = ImageTokenizer(8, args.patch, 1, args.width)
    return MaskedAutoencoder(tok, depth=args.depth, num_heads=4, mlp_ratio=2.0,
                             decoder_dim=args.decoder_width, decoder_depth=args.decoder_depth,
                             decoder_heads=4, mask_ratio=args.mask_ratio, norm_pix=args.norm_pix)


def probe(mae, pool, train, test) -> float:
    return linear_probe(lambda x: mae.features(x, pool=pool), train, test).accuracy


def run_seed(seed: int, args, data) -> dict:
    torch.manual_seed(seed)
    mae = build_mae(args)
    random_init = copy.deepcopy(mae)
    x_train = data.train.tensors[0]
    pre = MAEPretrain(mae, infinite_loader((x_train,), args.batch_size, seed=seed),
                      optimizer_kwargs={"lr": args.lr, "betas": (0.9, 0.95), "weight_decay": 0.05},
                      scheduler=torch.optim.lr_scheduler.CosineAnnealingLR,
                      scheduler_kwargs={"T_max": args.steps, "eta_min": args.lr * 0.05})
    t0 = time.perf_counter()
    with torch.no_grad():
        loss0 = mae(x_train[:512], mask_ratio=args.mask_ratio)[0].item()
    engine, done = mlo.Engine([pre]), 0
    every = args.log_every or args.steps
    while done < args.steps:                 # chunks of the same run: one progress line each
        n = min(every, args.steps - done)
        engine.run(n)
        done += n
        if args.log_every:
            secs = time.perf_counter() - t0
            print(f"  seed {seed}: step {done}/{args.steps}  loss {pre.last_loss.item():.4f}  "
                  f"{secs:.0f}s (~{secs * (args.steps - done) / done:.0f}s left)", flush=True)
    with torch.no_grad():
        loss1 = mae(x_train[:512], mask_ratio=args.mask_ratio)[0].item()
    secs = time.perf_counter() - t0
    out = {"secs": secs, "loss0": loss0, "loss1": loss1}
    for pool in args.pools:
        out[f"pre_{pool}"] = probe(mae, pool, data.train, data.test)
        out[f"rand_{pool}"] = probe(random_init, pool, data.train, data.test)
    return out


def fmt(values) -> str:
    m = statistics.mean(values)
    s = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * m:.2f} ± {100 * s:.2f}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--mask-ratio", type=float, default=0.5)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--decoder-width", type=int, default=64)
    ap.add_argument("--decoder-depth", type=int, default=1)
    ap.add_argument("--patch", type=int, default=2)
    ap.add_argument("--norm-pix", action="store_true")
    ap.add_argument("--pools", nargs="+", default=["mean", "cls"], choices=["mean", "cls"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--log-every", type=int, default=250,
                    help="print the pretraining loss every N steps of each seed (0: only per seed)")
    ap.add_argument("--quick", action="store_true", help="1 seed, 50 steps (smoke test)")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.steps = args.seeds[:1], 50
        args.log_every = min(args.log_every, 25)
    torch.set_num_threads(args.threads)

    data = load_digits(seed=0, fractions=(0.8, 0.0, 0.2))
    print(f"digits: train {len(data.train)}, test {len(data.test)}; tokens {(8 // args.patch) ** 2}, "
          f"width {args.width}, depth {args.depth}, mask {args.mask_ratio}, steps {args.steps}, lr {args.lr}")
    raw = linear_probe(lambda x: x, data.train, data.test).accuracy
    print(f"raw-pixel linear probe: {100 * raw:.2f}")

    results = []
    for i, seed in enumerate(args.seeds):
        print(f"seed {seed} ({i + 1}/{len(args.seeds)}): pretraining {args.steps} steps", flush=True)
        r = run_seed(seed, args, data)
        results.append(r)
        probes = "  ".join(f"{p}: pretrained {100 * r['pre_' + p]:.2f} / random {100 * r['rand_' + p]:.2f}"
                           for p in args.pools)
        print(f"seed {seed}: recon loss {r['loss0']:.4f} -> {r['loss1']:.4f} ({r['secs']:.0f}s)  {probes}",
              flush=True)
    print(f"\nlinear-probe TEST accuracy (%), mean ± std over {len(args.seeds)} seed(s):")
    for p in args.pools:
        print(f"  pool={p:4s}  pretrained {fmt([r['pre_' + p] for r in results])}   "
              f"random init {fmt([r['rand_' + p] for r in results])}")


if __name__ == "__main__":
    main()
