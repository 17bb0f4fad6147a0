"""What a learned masking network does: its probabilities on held-out images, summarised.

For probabilities ``p [N, L]`` (one row per image, one column per patch position) and
``k = num_masked(L, r)`` masked patches per image (the top-``k`` of each row):

* ``masked_p_mean``       mean ``p`` of the masked patches — the weight their
  reconstruction losses get (``→ 0``: the masker has switched reconstruction off);
* ``masked_p_below_0.1``  the share of masked patches with ``p < 0.1``;
* ``std_across_images``   ``mean_l std_n p[n, l]``: how much the masks depend on the image;
* ``std_across_positions`` ``std_l mean_n p[n, l]``: how much they depend on the position;
* ``mean_p_per_position`` ``[L]`` and, given labels, ``mean_p_per_class`` ``[C][L]``.

Used by ``examples/mlo_mae_cifar.py`` (``summary.json``, ``masks.png``) and the MLO-MAE
benchmarks, so every report computes these the same way.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import Tensor

from problems.mae import num_masked

__all__ = ["mask_probabilities", "mask_statistics"]


@torch.no_grad()
def mask_probabilities(graph, x: Tensor, batch_size: int = 500) -> Optional[Tensor]:
    """The masking network's probabilities ``[N, L]`` on ``x`` (``None`` without one).

    ``graph`` is a :class:`problems.mlo_mae.MLOMAEGraph`; the masker reads the MAE's
    embeddings as in training (with or without positions, per
    ``graph.settings.mask_input_position``). Evaluated in eval mode, on ``x``'s device.
    """
    if graph.masker is None:
        return None
    position = getattr(graph.settings, "mask_input_position", True)
    was = graph.masker.training
    graph.masker.eval()
    try:
        return torch.cat([graph.masker(graph.mae.patch_embeddings(x[i:i + batch_size], position=position))
                          for i in range(0, len(x), batch_size)])
    finally:
        graph.masker.train(was)


@torch.no_grad()
def mask_statistics(p: Tensor, ratio: float, labels: Optional[Tensor] = None,
                    num_classes: Optional[int] = None) -> Dict[str, Any]:
    """The module docstring's statistics of ``p [N, L]`` (plain floats and lists, for JSON).

    Args:
        p: probabilities, one row per image.
        ratio: the mask ratio ``r`` (``k = num_masked(L, r)`` masked per image).
        labels: optional ``[N]`` class labels for ``mean_p_per_class``.
        num_classes: classes in ``mean_p_per_class`` (default ``max(labels) + 1``);
            a class with no image gets ``None``.
    """
    if p.dim() != 2 or p.shape[0] < 2:
        raise ValueError(f"mask_statistics: p must be [N >= 2, L], got shape {tuple(p.shape)}")
    p = p.detach().double().cpu()
    k = num_masked(p.shape[1], ratio)
    top = p.topk(k, dim=1).values                       # [N, k] the masked patches' weights
    per_pos = p.mean(0)                                 # [L]
    out: Dict[str, Any] = {
        "masked_p_mean": float(top.mean()),
        "masked_p_below_0.1": float((top < 0.1).double().mean()),
        "std_across_images": float(p.std(0).mean()),
        "std_across_positions": float(per_pos.std()) if p.shape[1] > 1 else 0.0,
        "mean_p_per_position": per_pos.tolist(),
    }
    if labels is not None:
        labels = labels.cpu()
        c = int(num_classes if num_classes is not None else int(labels.max()) + 1)
        out["mean_p_per_class"] = [p[labels == i].mean(0).tolist() if bool((labels == i).any()) else None
                                   for i in range(c)]
    return out
