"""Learn per-feature weight decay for logistic regression on breast cancer.

A bilevel problem::

    upper:  min_λ   L_val(w*(λ))                      (variables: log λ, one per feature)
    lower:  w*(λ) = argmin_w  L_train(w) + ½ Σ_j λ_j w_j²

on scikit-learn's breast-cancer data (569 samples, 30 features) with a small
training split so that regularisation matters. The hypergradient method is chosen
with ``--method`` (unrolled, neumann, cg, finite_difference).

    python examples/quickstart_weight_decay.py --method cg
    python examples/quickstart_weight_decay.py --method unrolled --monitor 10   # vs CG to tol
    torchrun --nproc_per_node 2 examples/quickstart_weight_decay.py --method cg   # data parallel

Under ``torchrun`` each rank keeps every other row of the training and validation
sets (``mlo.distributed.shard``); the engine averages every gradient and every
Hessian-vector product over ranks, so the run is the one-process run on the whole
data (up to summation order). Only rank 0 prints.

The problems (data, classifier, weight decay, evaluation) are :mod:`problems.weight_decay`;
this script wires them into an engine and runs it.
"""
from __future__ import annotations

import argparse
import time

import torch

import mlo
from mlo import distributed as mdist
from problems.weight_decay import METHOD_OPTIONS, Classifier, WeightDecay, evaluate, fit_lower, load


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="cg", choices=sorted(METHOD_OPTIONS))
    ap.add_argument("--outer-steps", type=int, default=60)
    ap.add_argument("--inner-steps", type=int, default=20, help="lower steps per upper step")
    ap.add_argument("--init-log-wd", type=float, default=-8.0)
    ap.add_argument("--n-train", type=int, default=80)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--monitor", type=int, default=0, metavar="N",
                    help="every N upper updates, recompute the hypergradient with CG to tol 1e-10 "
                         "and print its cosine and relative error (the run is unchanged)")
    args = ap.parse_args(argv)
    mdist.init_from_env("gloo")          # under torchrun: one process per rank
    main_rank = mdist.is_main()          # only rank 0 prints and evaluates
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    train, val, test = load(args.seed, args.n_train)
    D = train[0].shape[1]

    if main_rank:
        before = fit_lower(torch.full((D,), args.init_log_wd, dtype=torch.float64), train)
        print(f"method: {args.method} {METHOD_OPTIONS[args.method]}"
              + (f"; {mdist.world_size()} ranks" if mdist.is_distributed() else ""))
        print("before: val loss %.4f acc %.4f | test loss %.4f acc %.4f" % (*evaluate(before, val), *evaluate(before, test)))

    # This rank's rows (all of them without torchrun): rank r takes rows r, r+W, ...
    hyper = WeightDecay(tuple(mdist.shard(t) for t in val), D, args.init_log_wd)
    clf = Classifier(hyper, tuple(mdist.shard(t) for t in train), args.method,
                     METHOD_OPTIONS[args.method], args.inner_steps)
    hyper.classifier = clf
    config = mlo.EngineConfig(monitor={"every": args.monitor} if args.monitor else None)
    engine = mlo.Engine([clf, hyper], {"u2l": {hyper: [clf]}, "l2u": {clf: [hyper]}}, config)
    engine.run(args.outer_steps * args.inner_steps)
    engine.close_windows()

    log_wd = hyper.params["log_wd"].detach()
    if mdist.is_distributed():
        torch.distributed.destroy_process_group()
    if not main_rank:
        return
    after = fit_lower(log_wd, train)
    print("after:  val loss %.4f acc %.4f | test loss %.4f acc %.4f" % (*evaluate(after, val), *evaluate(after, test)))
    print(f"learned weight decay: min {log_wd.exp().min():.3g} median {log_wd.exp().median():.3g} "
          f"max {log_wd.exp().max():.3g}; updates: {engine.counts()}; {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
