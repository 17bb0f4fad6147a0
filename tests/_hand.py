"""Hand computations shared by the MAE tests: independent of ``problems`` code."""
from __future__ import annotations

import math

import torch

__all__ = ["pixels", "mse", "ce", "rel_scalar"]


def pixels(image, n, i, p=2):
    """Token ``i`` of sample ``n`` read straight from the image: a list of p·p·C floats
    in (row, col, channel) order — independent of ``patchify``."""
    r, c = divmod(i, image.shape[-1] // p)
    block = image[n, :, r * p:(r + 1) * p, c * p:(c + 1) * p]  # [C, p, p]
    return [block[ch, a, b].item() for a in range(p) for b in range(p)
            for ch in range(block.shape[0])]


def mse(pred, target):
    """Mean squared error of two equal-length lists of floats."""
    return sum((u - v) ** 2 for u, v in zip(pred, target)) / len(target)


def ce(logits, label):
    """Cross-entropy of a list of logits against an integer label (stable log-sum-exp)."""
    m = max(logits)
    return -(logits[label] - m - math.log(sum(math.exp(v - m) for v in logits)))


def rel_scalar(a, b):
    """Relative error of two scalars (tensors or numbers)."""
    a, b = (float(v.detach()) if torch.is_tensor(v) else float(v) for v in (a, b))
    return abs(a - b) / max(abs(b), 1e-30)
