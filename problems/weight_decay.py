"""Per-feature weight decay for logistic regression on breast cancer: the quickstart's problems.

A bilevel problem (``examples/quickstart_weight_decay.py`` runs it)::

    upper:  min_λ   L_val(w*(λ))                      (variables: log λ, one per feature)
    lower:  w*(λ) = argmin_w  L_train(w) + ½ Σ_j λ_j w_j²

:func:`load` splits and standardises the data, :class:`Classifier` (lower) and
:class:`WeightDecay` (upper) are the two problems (wired to each other after
construction), :func:`fit_lower` and :func:`evaluate` measure a weight decay before and
after, :data:`METHOD_OPTIONS` bounds each hypergradient method. Also used by
``benchmarks/distributed.py``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import mlo

__all__ = ["load", "Classifier", "WeightDecay", "evaluate", "fit_lower", "METHOD_OPTIONS"]


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
