"""The MLO-MAE main job's figures: ``masks.png`` and ``masks_by_class.png``.

Both take the statistics of :func:`problems.jobs.mlo_mae_report.mask_statistics`
(probabilities and top-k masks of the test images). matplotlib is imported when a figure
is drawn (Agg backend).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import torch
from torch import Tensor

from problems.mae import num_masked
from problems.mlo_mae import MLOMAEGraph

__all__ = ["plot_masks", "plot_class_masks", "imshow", "heatmap"]


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_masks(graph: MLOMAEGraph, x_test: Tensor, stats: Dict[str, Any], path: Path, n_show: int = 6) -> None:
    """``masks.png``: images, their masked patches, the probability maps, and per-position means."""
    plt = _pyplot()
    s = graph.settings
    g = s.image_size // s.patch_size
    n = min(n_show, len(x_test))
    x = x_test[:n].cpu()
    probs, masks = stats["probs"], stats["masks"]
    fig, axes = plt.subplots(3, n + 1, figsize=(1.8 * (n + 1), 5.6), squeeze=False)
    for i in range(n):
        pix = masks[i].view(g, g).repeat_interleave(s.patch_size, 0).repeat_interleave(s.patch_size, 1)
        shown = torch.where(pix, torch.full_like(x[i], 0.5), x[i])
        imshow(axes[0, i], x[i], "image" if i == 0 else "")
        imshow(axes[1, i], shown, "masked (grey)" if i == 0 else "")
        heat = probs[i] if probs is not None else torch.full((g * g,), s.mask_ratio)
        heatmap(axes[2, i], heat.view(g, g), "p(mask)" if i == 0 else "")
    mean = torch.tensor(stats["mean_probability"] or [s.mask_ratio] * g * g)
    heatmap(axes[0, n], mean.view(g, g), f"mean p, test (max {mean.max():.2g})")
    heatmap(axes[1, n], torch.tensor(stats["mask_frequency"]).view(g, g), "masked freq., test")
    axes[2, n].axis("off")
    k = num_masked(g * g, s.mask_ratio)
    if graph.variant == "mae":
        title = f"mae: RANDOM masks (uniform noise, {k}/{g * g} patches), no masking network"
    else:
        kind = "untrained frozen" if graph.variant == "frozen-mask" else "learned"
        title = f"{graph.variant}: top-{k} of {g * g} patches by the {kind} masking network's probability"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_class_masks(graph: MLOMAEGraph, x_test: Tensor, y_test: Tensor, stats: Dict[str, Any],
                     path: Path) -> None:
    """``masks_by_class.png``: per class, the mean image and the mean ``p(mask)`` of its test
    images — whether the learned masks follow the object (nothing for ``mae``)."""
    learned = stats.get("learned")
    if not learned or "mean_p_per_class" not in learned:
        return
    plt = _pyplot()
    s = graph.settings
    g = s.image_size // s.patch_size
    maps = learned["mean_p_per_class"]
    c = len(maps)
    fig, axes = plt.subplots(2, c, figsize=(1.5 * c, 3.4), squeeze=False)
    x, y = x_test.cpu(), y_test.cpu()
    for i, m in enumerate(maps):
        if m is None:
            axes[0, i].axis("off"), axes[1, i].axis("off")
            continue
        imshow(axes[0, i], x[y == i].mean(0), f"class {i}")
        heatmap(axes[1, i], torch.tensor(m).view(g, g), "")
    axes[1, 0].set_title("mean p(mask)", fontsize=8)
    fig.suptitle(f"{graph.variant}: mean test image and mean p(mask) per class "
                 f"(p varies across images by {learned['std_across_images']:.3f}, "
                 f"across positions by {learned['std_across_positions']:.3f})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def imshow(ax, img: Tensor, title: str) -> None:
    """An image ``[C, H, W]`` (grey for one channel), clamped to ``[0, 1]``, no axes."""
    img = img.clamp(0, 1)
    if img.shape[0] == 1:
        ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(img.permute(1, 2, 0).numpy())
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def heatmap(ax, values: Tensor, title: str) -> None:
    """Values in ``[0, 1]`` as a viridis map, no axes."""
    ax.imshow(values.numpy(), cmap="viridis", vmin=0, vmax=1)
    ax.set_title(title, fontsize=8)
    ax.axis("off")
