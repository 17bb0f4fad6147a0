"""Learning to reweight noisy labels (Meta-Weight-Net) on digits: Betty's pattern the mlo way.

The port behind ``examples/reweight_digits.py`` (its docstring describes the problem,
the command line and why finite differences cannot see ``.detach()``): the data with
flipped labels (:func:`make_data`), the lower :class:`Classifier` weighted by the upper
:class:`WeightNet`, their engine (:func:`build`), one run (:func:`train`) and the
measured table of ``docs/porting_from_betty.md`` (:func:`table`).
"""
from __future__ import annotations

import contextlib
import io
import statistics
import time
from typing import Dict, List, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import mlo
from problems.datasets import load_digits

NOISE, HIDDEN, MWN_HIDDEN, BATCH = 0.4, 64, 32, 100
LR, MOMENTUM, MWN_LR = 0.1, 0.9, 1e-3

#: method -> bounded method_options (CG ≤ 10 iterations, Neumann with a small α)
METHODS: Dict[str, dict] = {
    "unrolled": {},                                   # a 1-step window: Meta-Weight-Net's meta step
    "cg": {"max_iter": 5, "tol": 0.0, "damping": 1.0},
    "neumann": {"iterations": 5, "alpha": 0.1},
    "finite_difference": {"epsilon": 0.01},           # Betty's default (darts, darts_alpha=0.01)
}


class Data(NamedTuple):
    x_train: Tensor
    y_noisy: Tensor
    y_clean: Tensor          # the true training labels (only for the diagnostics)
    x_meta: Tensor
    y_meta: Tensor
    x_test: Tensor
    y_test: Tensor


def make_data(seed: int = 0, noise: float = NOISE) -> Data:
    """Digits (seeded 70/10/20 split), flattened; ``noise`` of the training labels flipped
    to a uniformly drawn other class with a generator seeded by ``seed``."""
    s = load_digits(seed=seed)
    (xt, yt), (xm, ym), (xs, ys) = (d.tensors for d in (s.train, s.val, s.test))
    g = torch.Generator().manual_seed(10_000 + seed)
    flip = torch.rand(len(yt), generator=g) < noise
    shift = torch.randint(1, 10, (len(yt),), generator=g)        # never the true class
    y_noisy = torch.where(flip, (yt + shift) % 10, yt)
    return Data(xt.flatten(1), y_noisy, yt, xm.flatten(1), ym, xs.flatten(1), ys)


class Batches:
    """Endless shuffled minibatches of the noisy training set, from their own generator
    (so every run of a seed sees the same batches, whatever else draws random numbers)."""

    def __init__(self, x: Tensor, y: Tensor, batch: int, seed: int):
        self.x, self.y, self.batch = x, y, batch
        self.g = torch.Generator().manual_seed(20_000 + seed)

    def __iter__(self):
        while True:
            perm = torch.randperm(len(self.x), generator=self.g)
            for i in range(0, len(perm) - self.batch + 1, self.batch):
                j = perm[i:i + self.batch]
                yield self.x[j], self.y[j]


def mlp(sizes: Sequence[int]) -> nn.Sequential:
    layers: List[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


class WeightNet(mlo.Problem):
    """Upper: the weight network φ; its loss is the classifier's CE on the clean meta set."""

    def __init__(self, meta_batches):
        super().__init__("mwn", module=nn.Sequential(mlp([1, MWN_HIDDEN, 1]), nn.Sigmoid()),
                         data=meta_batches, optimizer=torch.optim.Adam,
                         optimizer_kwargs={"lr": MWN_LR, "weight_decay": 1e-4})
        self.classifier: Optional["Classifier"] = None           # wired after construction

    def training_step(self, batch):
        x, y = batch
        logits = self.classifier(x)                               # the best response θ*(φ)
        return {"loss": F.cross_entropy(logits, y),
                "acc": (logits.argmax(1) == y).float().mean().detach()}


class Classifier(mlo.Problem):
    """Lower: the classifier θ on the noisy set, per-example weights ``MWN(ℓ_i)``."""

    def __init__(self, data, weight_net: Optional[WeightNet], method: str, options: dict,
                 detach: bool = True):
        super().__init__("classifier", module=mlp([64, HIDDEN, 10]), data=data,
                         optimizer=torch.optim.SGD,
                         optimizer_kwargs={"lr": LR, "momentum": MOMENTUM},
                         config=mlo.ProblemConfig(unroll_steps=1, method=method,
                                                  method_options=options))
        self.weight_net = weight_net                              # None: plain training
        self.detach = detach

    def training_step(self, batch):
        x, y = batch
        losses = F.cross_entropy(self(x), y, reduction="none")     # ℓ_i, [B]
        if self.weight_net is None:
            return losses.mean()
        inp = losses.detach() if self.detach else losses
        w = self.weight_net(inp.unsqueeze(1)).squeeze(1)           # MWN_φ(ℓ_i), [B]
        return {"loss": (w * losses).mean(), "mean_w": w.mean().detach()}


class Run(NamedTuple):
    engine: mlo.Engine
    classifier: Classifier
    weight_net: Optional[WeightNet]
    data: Data


@torch.no_grad()
def accuracy(module: nn.Module, x: Tensor, y: Tensor) -> float:
    return float((module(x).argmax(1) == y).double().mean())


def build(method: str = "unrolled", seed: int = 0, plain: bool = False,
          options: Optional[dict] = None, validate_every: Optional[int] = None,
          data: Optional[Data] = None, detach: bool = True,
          early_stopping: Optional[dict] = None) -> Run:
    """The two problems and their engine (plain: the classifier alone, weights 1)."""
    data = make_data(seed) if data is None else data
    torch.manual_seed(seed)
    weight_net = None if plain else WeightNet([(data.x_meta, data.y_meta)])  # full meta batch
    torch.manual_seed(seed + 1)                    # same classifier init with and without MWN
    clf = Classifier(Batches(data.x_train, data.y_noisy, BATCH, seed), weight_net, method,
                     METHODS[method] if options is None else options, detach)

    def validation(engine):                       # runs in eval(); printed by the engine
        return {"test_acc": accuracy(clf.module, data.x_test, data.y_test),
                "meta_acc": accuracy(clf.module, data.x_meta, data.y_meta)}

    config = mlo.EngineConfig(validate_every=validate_every,
                              validation=validation if validate_every else None,
                              early_stopping=early_stopping)
    if plain:
        engine = mlo.Engine([clf], config=config)
    else:
        weight_net.classifier = clf
        engine = mlo.Engine([weight_net, clf], {"u2l": {weight_net: [clf]},   # clf's loss reads MWN
                                                "l2u": {clf: [weight_net]}},  # MWN's loss reads clf
                            config)
    return Run(engine, clf, weight_net, data)


@torch.no_grad()
def mean_weights(run: Run) -> Dict[str, float]:
    """Mean MWN weight on the training examples whose label was flipped vs kept."""
    d = run.data
    losses = F.cross_entropy(run.classifier.module(d.x_train), d.y_noisy, reduction="none")
    w = run.weight_net.module(losses.unsqueeze(1)).squeeze(1)
    flipped = d.y_noisy != d.y_clean
    return {"w_flipped": float(w[flipped].mean()), "w_clean": float(w[~flipped].mean())}


def train(method: str, seed: int, steps: int, plain: bool = False, validate_every: Optional[int] = None,
          options: Optional[dict] = None, detach: bool = True,
          early_stop: bool = False) -> Dict[str, float]:
    """One run; ``early_stop``: validate every 25 steps, stop once the clean *meta*
    accuracy has not improved for 10 validations and restore the best state."""
    es = {"metric": "meta_acc", "mode": "max", "patience": 10} if early_stop else None
    run = build(method, seed, plain, options, 25 if early_stop else validate_every,
                detach=detach, early_stopping=es)
    t0 = time.perf_counter()
    run.engine.run(steps)
    if early_stop:
        run.engine.restore_best()
    out = {"test_acc": accuracy(run.classifier.module, run.data.x_test, run.data.y_test),
           "seconds": time.perf_counter() - t0}
    if not plain:
        out.update(mean_weights(run))
    return out


def table(seeds: Sequence[int], steps: int) -> None:
    rows = [("(a) plain (weights 1, no upper)", "finite_difference", True, True, False),
            ("(b) MWN, finite_difference", "finite_difference", False, True, False),
            ("(c) MWN, unrolled", "unrolled", False, True, False),
            ("MWN, cg", "cg", False, True, False),
            ("MWN, neumann", "neumann", False, True, False),
            ("MWN(ℓ attached), finite_difference", "finite_difference", False, False, False),
            ("MWN(ℓ attached), unrolled", "unrolled", False, False, False),
            ("plain, early-stopped on meta accuracy", "finite_difference", True, True, True)]
    print(f"| training | test accuracy (seeds {', '.join(map(str, seeds))}) | mean ± std "
          f"| MWN weight flipped / clean | s per run |")
    print("|---|---|---|---|---|")
    for label, method, plain, detach, early in rows:
        with contextlib.redirect_stdout(io.StringIO()):      # the validation lines
            res = [train(method, s, steps, plain, detach=detach, early_stop=early) for s in seeds]
        accs = [100 * r["test_acc"] for r in res]
        w = ("—" if plain else f"{statistics.mean(r['w_flipped'] for r in res):.3f} / "
             f"{statistics.mean(r['w_clean'] for r in res):.3f}")
        print(f"| {label} | {' / '.join(f'{a:.2f}' for a in accs)} | {statistics.mean(accs):.2f} ± "
              f"{statistics.stdev(accs) if len(accs) > 1 else 0.0:.2f} | {w} | {statistics.mean(r['seconds'] for r in res):.1f} |",
              flush=True)
