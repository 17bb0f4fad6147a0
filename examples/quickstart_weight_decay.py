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
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

import mlo
from mlo import distributed as mdist


def load(seed: int, n_train: int):
    from sklearn.datasets import load_breast_cancer

    X, y = load_breast_cancer(return_X_y=True)
    X = torch.tensor(X, dtype=torch.float64)
    y = torch.tensor(y, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(X), generator=g)
    tr, va, te = idx[:n_train], idx[n_train:n_train + 150], idx[n_train + 150:]
    mu, sd = X[tr].mean(0), X[tr].std(0) + 1e-8          # train statistics only
    X = (X - mu) / sd
    return (X[tr], y[tr]), (X[va], y[va]), (X[te], y[te])


class Classifier(mlo.Problem):
    """Lower: logistic regression with per-feature weight decay read from ``hyper``."""

    def __init__(self, hyper, data, method, options, unroll):
        super().__init__("classifier", module=nn.Linear(data[0].shape[1], 1).double(),
                         optimizer=torch.optim.SGD, optimizer_kwargs={"lr": 0.5, "momentum": 0.5},
                         data=[data],
                         config=mlo.ProblemConfig(unroll_steps=unroll, method=method,
                                                  method_options=options))
        self.hyper = hyper

    def training_step(self, batch):
        x, y = batch
        logits = self(x).squeeze(-1)                       # [N]
        wd = self.hyper.params["log_wd"].exp()              # [D]
        w = self.params["weight"].squeeze(0)                # [D]
        return F.binary_cross_entropy_with_logits(logits, y) + 0.5 * (wd * w * w).sum()


class WeightDecay(mlo.Problem):
    """Upper: validation loss of the classifier; variables: log weight decay per feature."""

    def __init__(self, data, dim, init):
        super().__init__("weight_decay", params={"log_wd": torch.full((dim,), init, dtype=torch.float64)},
                         optimizer=torch.optim.Adam, optimizer_kwargs={"lr": 0.1}, data=[data])
        self.classifier = None  # wired after construction (the two read each other)

    def training_step(self, batch):
        x, y = batch
        return F.binary_cross_entropy_with_logits(self.classifier(x).squeeze(-1), y)


@torch.no_grad()
def evaluate(model: nn.Module, data):
    x, y = data
    logits = model(x).squeeze(-1)
    return F.binary_cross_entropy_with_logits(logits, y).item(), ((logits > 0).double() == y).double().mean().item()


def fit_lower(log_wd: torch.Tensor, train, steps: int = 500) -> nn.Module:
    """Trains the classifier from scratch at fixed weight decay (for before/after)."""
    torch.manual_seed(0)
    model = nn.Linear(train[0].shape[1], 1).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.5)
    for _ in range(steps):
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(model(train[0]).squeeze(-1), train[1]) \
            + 0.5 * (log_wd.exp() * model.weight.squeeze(0) ** 2).sum()
        loss.backward()
        opt.step()
    return model


METHOD_OPTIONS = {
    "unrolled": {},
    "neumann": {"iterations": 20, "alpha": 0.5},
    "cg": {"max_iter": 20, "tol": 1e-10},
    "finite_difference": {"epsilon": 0.01},
}


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
