"""Betty's logistic-regression HPO example, written the mlo way — and run next to Betty.

Betty's ``examples/logistic_regression_hpo`` learns one weight decay per feature of
a logistic regression on synthetic data (after hypertorch's toy example)::

    lower ("inner"):  w*(λ) = argmin_w  BCE(X_tr w, y_tr) + ½ Σ_j λ_j w_j²
                      w starts at 0 at every inner loop, SGD lr 0.1, 100 steps
    upper ("outer"):  min_λ  BCE(X_val w*(λ), y_val)
                      λ starts at 1, SGD lr 1 momentum 0.9, λ clamped to ≥ 1e-8 after each step

Data: ``y = [x·w_gt + 0.1·noise > 0]``, ``x ∈ R^20``, 500 training and 500 validation
points (Betty's 1000 split in half) plus 1000 test points, from a seeded generator.

Betty does two things with hooks: ``on_inner_loop_start`` zeroes the lower before each
inner loop and ``param_callback`` clamps λ after each upper step. mlo's hooks are
``Classifier.on_window_start`` and ``WeightDecay.after_step`` (both edit the variables
with ``set_params``), so training is one ``engine.run(outer_steps * 100)`` — Betty's
schedule: 100 lower steps from ``w = 0``, then one upper update at the 100th lower
iterate. (:func:`outer_step` runs one outer step, to interleave with Betty.)

    python examples/betty_logreg_hpo.py                       # every method, mlo only
    python examples/betty_logreg_hpo.py --methods cg --outer-steps 100
    python examples/betty_logreg_hpo.py --compare-betty       # + Betty 0.1.1 side by side

``--compare-betty`` (``pip install --no-deps betty-ml==0.1.1``) trains the same problem
with Betty, interleaving the two frameworks outer step by outer step, and prints final
losses, test accuracy, the relative difference of the first hypergradient (float64,
both from the same state, with the exact implicit hypergradient at that state for
scale) and the median time per outer step. ``docs/porting_from_betty.md`` explains the
differences.

The port itself (both sides, the runs and the evaluation) is
:mod:`problems.betty_logreg_hpo`; this script is its command line.
"""
from __future__ import annotations

import argparse

import torch

from problems.betty_logreg_hpo import (DIM, METHODS, N_TEST, N_TRAIN, N_VAL, first_hypergradients, import_betty,
                                       make_data, metrics, train)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--outer-steps", type=int, default=50, help="upper updates (Betty: train_iters / 100)")
    ap.add_argument("--inner-steps", type=int, default=100, help="lower steps per upper step (unroll_steps)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--float64", action="store_true", help="train in float64 (default float32, as Betty)")
    ap.add_argument("--compare-betty", action="store_true", help="also run Betty 0.1.1 side by side")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    betty = args.compare_betty
    if betty and import_betty() is None:
        raise SystemExit("--compare-betty needs Betty 0.1.1: pip install --no-deps betty-ml==0.1.1")
    dtype = torch.float64 if args.float64 else torch.float32
    data = make_data(args.seed, dtype)
    print(f"synthetic logistic regression: d={DIM}, train {N_TRAIN}, val {N_VAL}, test {N_TEST}, "
          f"seed {args.seed}, {str(dtype).replace('torch.', '')}; {args.outer_steps} outer steps x "
          f"{args.inner_steps} inner steps, lower reset to 0 before each inner loop")
    init = metrics(torch.zeros(DIM), torch.ones(DIM), data)
    print(f"w = 0: val loss {init['val']:.4f}, test accuracy {100 * init['acc']:.1f}%")
    rows = []
    for m in args.methods:
        res = train(m, data, args.outer_steps, args.inner_steps, betty, dtype)
        hg = first_hypergradients(m, args.seed, args.inner_steps, betty)
        r = res["mlo"]
        print(f"{m:17s} mlo  : train {r['train']:.4f}  val {r['val']:.4f}  test {r['test']:.4f}  "
              f"acc {100 * r['acc']:.1f}%  λ median {r['lam'].median():.3g}  {r['ms']:.1f} ms/outer step  "
              f"first hypergradient vs exact IFT {hg['mlo_vs_exact']:.1e}", flush=True)
        if betty:
            b = res["betty"]
            print(f"{'':17s} Betty: train {b['train']:.4f}  val {b['val']:.4f}  test {b['test']:.4f}  "
                  f"acc {100 * b['acc']:.1f}%  λ median {b['lam'].median():.3g}  {b['ms']:.1f} ms/outer step  "
                  f"first hypergradient vs exact IFT {hg['betty_vs_exact']:.1e}, vs mlo {hg['mlo_vs_betty']:.1e}",
                  flush=True)
        rows.append((m, res, hg))
    if betty:
        print("\n| method | val loss mlo / Betty | test loss mlo / Betty | test acc mlo / Betty "
              "| first hypergradient: mlo vs Betty | mlo vs exact IFT | Betty vs exact IFT "
              "| ms / outer step mlo / Betty | Betty / mlo |")
        print("|---|---|---|---|---|---|---|---|---|")
        for m, res, hg in rows:
            r, b = res["mlo"], res["betty"]
            print(f"| {m} | {r['val']:.4f} / {b['val']:.4f} | {r['test']:.4f} / {b['test']:.4f} "
                  f"| {100 * r['acc']:.1f}% / {100 * b['acc']:.1f}% | {hg['mlo_vs_betty']:.1e} "
                  f"| {hg['mlo_vs_exact']:.1e} | {hg['betty_vs_exact']:.1e} "
                  f"| {r['ms']:.1f} / {b['ms']:.1f} | {b['ms'] / r['ms']:.2f}× |")


if __name__ == "__main__":
    main()
