"""Learning to reweight noisy labels (Meta-Weight-Net), Betty's pattern written the mlo way.

Betty's ``examples/learning_to_reweight`` trains a classifier on a corrupted training set
with per-example weights from a *weight network*, and trains the weight network on a small
clean *meta* set through the classifier's best response (Shu et al., 2019, Meta-Weight-Net).
Here it is shrunk to scikit-learn's digits (8×8 images, flattened to 64 features):

    data:   digits split 70/10/20 (seeded); 40 % of the training labels replaced by a
            uniformly drawn *other* class (seeded); the 10 % meta split and the test split
            keep their clean labels
    lower ("classifier"):  θ*(φ) = argmin_θ  mean_i  MWN_φ(ℓ_i) · ℓ_i,
            ℓ_i = CE(f_θ(x_i), ỹ_i) on a noisy minibatch, MWN's input ℓ_i detached
            (as in Meta-Weight-Net; ``--mwn-input attached`` keeps its graph);
            f_θ: MLP 64 → 64 → 10, SGD lr 0.1 momentum 0.9
    upper ("mwn"):  min_φ  CE(f_θ*(φ)(x_meta), y_meta)   on the clean meta split;
            MWN_φ: MLP 1 → 32 → 1 with a sigmoid, Adam lr 1e-3, weight decay 1e-4 (input:
            the loss, as in Meta-Weight-Net; Betty's current example feeds a ResNet-32 the
            image and the label)

As in Betty's example the weight network updates after every classifier step
(``unroll_steps=1``). The upper loss reads only the classifier, so the weight network's
gradient is its hypergradient alone (its direct gradient is zero). Training is one
``engine.run(steps)``; the test accuracy is printed by the engine's validation
(``EngineConfig(validate_every, validation)``), with the modules in ``eval()``. Nothing
needs a hook here: Betty's version has none either (no reset, no clamp).

    python examples/reweight_digits.py                          # MWN, unrolled (1-step window)
    python examples/reweight_digits.py --method finite_difference   # Betty's darts; or cg / neumann
    python examples/reweight_digits.py --plain                  # baseline: all weights 1, no upper
    python examples/reweight_digits.py --quick                  # a few seconds
    python examples/reweight_digits.py --table                  # every variant, seeds 0 1 2

``--table`` prints the measured table of ``docs/porting_from_betty.md``.

Finite differences do not see ``.detach()``: they re-evaluate the lower loss at θ ± εv,
where the detached ℓ_i has moved too, so they approximate the mixed derivative of the
*attached* loss: at one state after 300 steps, in float64 with ε = 1e-4, FD differs from
it by 2e-8 (relative) and has cosine 0.61 with the detached loss's
(``tests/test_reweight_example.py``). Unrolled, CG and Neumann differentiate the loss as
written. With the detached input, ``--method finite_difference`` therefore trains the
weight network on another objective's hypergradient (the docs' table shows the cost).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import statistics
import sys
import time
from typing import Dict, List, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import mlo  # noqa: E402
from problems.datasets import load_digits  # noqa: E402

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


def main(argv=None) -> Dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="unrolled", choices=list(METHODS),
                    help="how the classifier's best response is differentiated (Betty's example: "
                         "darts = finite_difference)")
    ap.add_argument("--plain", action="store_true", help="baseline: weights all 1, no weight network")
    ap.add_argument("--mwn-input", choices=["detached", "attached"], default="detached",
                    help="the weight network's input ℓ_i: detached (Meta-Weight-Net) or with its graph")
    ap.add_argument("--steps", type=int, default=2000, help="classifier steps (= MWN updates)")
    ap.add_argument("--validate-every", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="150 steps, validation every 50")
    ap.add_argument("--table", action="store_true", help="plain / MWN-FD / MWN-unrolled over --seeds")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.steps, args.validate_every = 150, 50
    if args.table:
        table(args.seeds, args.steps)
        return {}
    data = make_data(args.seed)
    print(f"digits: {len(data.y_noisy)} training examples, {100 * float((data.y_noisy != data.y_clean).double().mean()):.1f}% "
          f"labels flipped; clean meta {len(data.y_meta)}, test {len(data.y_test)}; seed {args.seed}; "
          f"{'plain training' if args.plain else f'MWN(ℓ {args.mwn_input}) by {args.method} {METHODS[args.method]}'}, "
          f"{args.steps} steps")
    res = train(args.method, args.seed, args.steps, args.plain, args.validate_every,
                detach=args.mwn_input == "detached")
    extra = "" if args.plain else (f"; mean MWN weight on flipped / clean training labels "
                                   f"{res['w_flipped']:.3f} / {res['w_clean']:.3f}")
    print(f"test accuracy {100 * res['test_acc']:.2f}% ({res['seconds']:.1f} s){extra}")
    if not math.isfinite(res["test_acc"]):
        raise SystemExit("non-finite accuracy")
    return res


if __name__ == "__main__":
    main()
