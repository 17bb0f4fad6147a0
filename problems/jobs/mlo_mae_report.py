"""The MLO-MAE main job's evaluation: mask statistics, the two accuracies, ``summary.json``.

* :func:`mask_statistics` — the masking network's probabilities and top-k masks on the
  test images (random masks for ``mae``), summarised by :mod:`problems.mask_statistics`;
* :func:`probe_accuracy` — an L-BFGS logistic-regression probe on the frozen encoder's
  CLS feature (:func:`problems.evaluation.linear_probe`);
* :func:`head_test_accuracy` — the trained stage-II head's (the paper's "linear probing");
* :func:`write_summary` — ``summary.json``.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from problems.datasets import take
from problems.evaluation import Features, linear_probe
from problems.mae import num_masked
from problems.mask_statistics import mask_probabilities
from problems.mask_statistics import mask_statistics as masking_summary
from problems.mlo_mae import MLOMAEGraph, head_accuracy
from problems.jobs.mlo_mae_data import Data

__all__ = ["top_k_masks", "mask_statistics", "probe_accuracy", "head_test_accuracy", "write_summary"]


def top_k_masks(scores: Tensor, ratio: float) -> Tensor:
    """``[N, L]`` bool, True at the ``num_masked(L, ratio)`` highest scores (as the MAE masks)."""
    k = num_masked(scores.shape[1], ratio)
    idx = scores.argsort(dim=1, descending=True, stable=True)[:, :k]
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, idx, True)


def mask_statistics(graph: MLOMAEGraph, x_test: Tensor, y_test: Optional[Tensor] = None) -> Dict[str, Any]:
    """Probabilities and masks of the test images; random masks for ``mae``. With a masking
    network, also :func:`problems.mask_statistics.mask_statistics` under ``"learned"``."""
    s = graph.settings
    probs = mask_probabilities(graph, x_test)
    probs = None if probs is None else probs.cpu()
    learned = None if probs is None else masking_summary(
        probs, s.mask_ratio, None if y_test is None else y_test.cpu(), s.num_classes)
    if probs is None:
        gen = torch.Generator().manual_seed(0)
        scores = torch.rand(len(x_test), graph.mae.num_tokens, generator=gen)
    else:
        scores = probs
    masks = top_k_masks(scores, s.mask_ratio)
    return {"probs": probs, "masks": masks, "learned": learned,
            "mean_probability": None if probs is None else probs.mean(0).tolist(),
            "mask_frequency": masks.float().mean(0).tolist()}


def probe_accuracy(graph: MLOMAEGraph, train: Data, test: Data, preset: Dict[str, Any], quick: bool) -> float:
    """Linear probe (logistic regression) on the frozen encoder's CLS feature; the preset's
    ``probe`` sizes (``quick``: its ``quick`` ones)."""
    cfg, q = preset["probe"], preset["quick"]
    n_train = q.get("probe_train") if quick else cfg.get("max_train")
    n_test = q.get("probe_test") if quick else cfg.get("max_test")
    result = linear_probe(Features(graph.mae, "cls"), take(TensorDataset(*train), n_train),
                          take(TensorDataset(*test), n_test), num_classes=graph.settings.num_classes,
                          batch_size=cfg.get("batch_size", 512))
    return result.accuracy


def head_test_accuracy(graph: MLOMAEGraph, test: Data, preset: Dict[str, Any], quick: bool) -> Optional[float]:
    """The trained head's test accuracy (:func:`problems.mlo_mae.head_accuracy`; None without
    a head); ``quick``: on the probe's test subset."""
    n = preset["quick"].get("probe_test") if quick else None
    return head_accuracy(graph, test[0][:n], test[1][:n], batch_size=preset["probe"].get("batch_size", 512))


def write_summary(path: Path, graph: MLOMAEGraph, preset: Dict[str, Any], args: argparse.Namespace,
                  seconds: float, accuracy: float, stats: Dict[str, Any], head: Optional[float] = None) -> None:
    """``summary.json``: the run's options, timings, final losses, both accuracies and the
    learned masks' statistics (null for ``mae``)."""
    rec = graph.engine.records
    summary = {
        "variant": graph.variant, "method": graph.settings.method, "preset": preset["name"],
        "data": preset["data"], "seed": args.seed, "steps": graph.engine.iteration,
        "resumed_from": str(args.resume) if args.resume else None,
        "seconds": round(seconds, 3), "accuracy": accuracy,
        "linear_probe_test_accuracy": accuracy,   # L-BFGS probe on the frozen encoder (= accuracy)
        "stage2_head_test_accuracy": head,        # the trained head (the paper's "linear probing"); null: no head
        "problem_seconds": {n: round(r["seconds"], 3) for n, r in rec.items()},
        "problem_updates": {n: r["updates"] for n, r in rec.items()},
        "final_losses": {n: r.get("loss") for n, r in rec.items()},
        "mean_mask_probability": stats["mean_probability"],
        # the learned masks on the test images (problems.mask_statistics); null for mae
        **{k: (stats["learned"] or {}).get(k) for k in (
            "masked_p_mean", "masked_p_below_0.1", "std_across_images", "std_across_positions",
            "mean_p_per_class")},
        "mask_frequency": stats["mask_frequency"],
        "settings": asdict(graph.settings),
    }
    path.write_text(json.dumps(summary, indent=2) + "\n")
