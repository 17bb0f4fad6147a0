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

The port itself (data, problems, engine, runs, table) is :mod:`problems.reweight_digits`;
this script is its command line.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Dict

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from problems.reweight_digits import METHODS, make_data, table, train  # noqa: E402


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
