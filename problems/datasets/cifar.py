"""CIFAR-10 / CIFAR-100 from the official "python version" release.

Layout on disk (as extracted from the official tarballs)::

    root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}
    root/cifar-100-python/{train, test, meta}

Each batch file is a Python pickle of a dict with byte-string keys:
``b"data"`` (uint8 ``[N, 3072]``, row-major channel-first: 1024 red, 1024 green,
1024 blue values of a 32×32 image), and ``b"labels"`` (CIFAR-10) or
``b"fine_labels"`` / ``b"coarse_labels"`` (CIFAR-100). Meta files hold
``b"label_names"`` (CIFAR-10) or ``b"fine_label_names"`` / ``b"coarse_label_names"``.

Security note: pickle is the dataset's official format and unpickling runs code
chosen by whoever wrote the file. Load only files that came from the official
tarball (``download=True`` checks its published MD5) or that you wrote yourself.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

__all__ = ["CIFAR_RESOURCES", "CifarData", "load_cifar", "download_and_extract",
           "safe_extract", "md5sum", "images_to_tensor", "write_cifar_like", "CIFAR_MEAN", "CIFAR_STD"]

# name -> (url, tarball md5, extracted directory, train files, test files, meta file)
CIFAR_RESOURCES: Dict[str, dict] = {
    "cifar10": {
        "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "md5": "c58f30108f718f92721af3b95e74349a",
        "dir": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "meta": "batches.meta",
    },
    "cifar100": {
        "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "md5": "eb9058c3a382ffc7106ca6d5c8d81db9",
        "dir": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "meta": "meta",
    },
}

# Per-channel statistics of the CIFAR-10 training images (in [0, 1]), for normalization.
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


@dataclass
class CifarData:
    """One CIFAR release in memory.

    Attributes:
        x_train, x_test: uint8 images ``[N, 32, 32, 3]`` (height, width, RGB).
        y_train, y_test: int64 labels ``[N]`` (fine labels for CIFAR-100).
        classes: label names.
        y_train_coarse, y_test_coarse, coarse_classes: CIFAR-100's 20 superclasses
            (``None`` / empty for CIFAR-10).
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: List[str]
    y_train_coarse: Optional[np.ndarray] = None
    y_test_coarse: Optional[np.ndarray] = None
    coarse_classes: List[str] = field(default_factory=list)

    def tensors(self, split: str = "train", coarse: bool = False) -> Tuple[Tensor, Tensor]:
        """``(x, y)``: float images ``[N, 3, 32, 32]`` in [0, 1] and int64 labels."""
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        x = self.x_train if split == "train" else self.x_test
        y = getattr(self, f"y_{split}_coarse" if coarse else f"y_{split}")
        if y is None:
            raise ValueError("coarse labels exist only for CIFAR-100")
        return images_to_tensor(x), torch.from_numpy(np.asarray(y, dtype=np.int64))


def images_to_tensor(images: np.ndarray, mean=None, std=None) -> Tensor:
    """uint8 ``[N, H, W, C]`` -> float32 ``[N, C, H, W]`` in [0, 1], optionally normalized."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    if mean is not None:
        x = (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    return x


def md5sum(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def safe_extract(archive: str, dest: str) -> None:
    """Extracts a tar archive, refusing anything that could escape ``dest``.

    Rejected: absolute names, ``..`` components, links, devices and FIFOs. Only
    regular files and directories are written.
    """
    dest_real = os.path.realpath(dest)
    with tarfile.open(archive, "r:*") as tar:
        members = tar.getmembers()
        for m in members:
            target = os.path.realpath(os.path.join(dest_real, m.name))
            if (os.path.isabs(m.name) or ".." in m.name.replace("\\", "/").split("/")
                    or os.path.commonpath([dest_real, target]) != dest_real):
                raise ValueError(f"refusing to extract {m.name!r} from {archive}: path escapes {dest}")
            if not (m.isfile() or m.isdir()):
                raise ValueError(f"refusing to extract {m.name!r} from {archive}: not a regular file or directory")
        if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4 / 3.12: a second line of defence
            tar.extractall(dest_real, members=members, filter="data")
        else:  # pragma: no cover
            tar.extractall(dest_real, members=members)


def download_and_extract(url: str, root: str, md5: str) -> None:
    """Downloads ``url`` into ``root``, checks its MD5, then extracts it safely.

    Raises:
        ValueError: if the checksum differs (the partial download is deleted).
    """
    os.makedirs(root, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=root, suffix=".part")
    os.close(fd)
    try:
        with urllib.request.urlopen(url) as r, open(tmp, "wb") as f:  # noqa: S310 (fixed URLs)
            shutil.copyfileobj(r, f)
        got = md5sum(tmp)
        if got != md5:
            raise ValueError(f"MD5 mismatch for {url}: expected {md5}, got {got}; "
                             f"the download is corrupt or not the official file")
        safe_extract(tmp, root)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _unpickle(path: str) -> dict:
    # Trusted data only: see the module docstring.
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


def _missing_message(name: str, root: str, folder: str, missing: List[str]) -> str:
    res = CIFAR_RESOURCES[name]
    return (f"{name}: missing {', '.join(missing)} in {folder}.\n"
            f"Place the official python-version release there: download {res['url']} "
            f"(MD5 {res['md5']}) and extract it inside {root!r} "
            f"(`tar -xzf {os.path.basename(res['url'])} -C {root}`), which creates "
            f"{res['dir']}/ with {', '.join(res['train'] + res['test'] + [res['meta']])}; "
            f"or call load_cifar(root, {name!r}, download=True) on a machine with network access.")


def _decode(names) -> List[str]:
    return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]


def _read(paths: List[str], keys: Tuple[bytes, ...]) -> Tuple[np.ndarray, ...]:
    xs, ys = [], {k: [] for k in keys}
    for p in paths:
        d = _unpickle(p)
        xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        for k in keys:
            ys[k].append(np.asarray(d[k], dtype=np.int64))
    x = np.ascontiguousarray(np.concatenate(xs))
    return (x, *(np.concatenate(ys[k]) for k in keys))


def load_cifar(root: str, name: str = "cifar10", download: bool = False) -> CifarData:
    """Loads CIFAR-10 or CIFAR-100 (python-pickle release) from ``root``.

    Args:
        root: directory containing ``cifar-10-batches-py/`` or ``cifar-100-python/``.
        name: ``"cifar10"`` or ``"cifar100"``.
        download: if the files are absent, fetch the official tarball, verify its MD5
            and extract it into ``root``.

    Returns:
        :class:`CifarData` with uint8 ``[N, 32, 32, 3]`` images and int64 labels.

    Raises:
        FileNotFoundError: files absent and ``download=False``; the message says
            which files to put where and how to get them.
    """
    if name not in CIFAR_RESOURCES:
        raise ValueError(f"unknown CIFAR variant {name!r}; choose from {sorted(CIFAR_RESOURCES)}")
    res = CIFAR_RESOURCES[name]
    root = os.path.expanduser(str(root))
    folder = os.path.join(root, res["dir"])
    files = res["train"] + res["test"] + [res["meta"]]
    missing = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
    if missing and download:
        try:
            download_and_extract(res["url"], root, res["md5"])
        except OSError as e:  # no network, DNS failure, HTTP error (URLError is an OSError)
            raise FileNotFoundError(f"download of {res['url']} failed ({e}).\n"
                                    + _missing_message(name, root, folder, missing)) from e
        missing = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise FileNotFoundError(_missing_message(name, root, folder, missing))

    path = lambda f: os.path.join(folder, f)  # noqa: E731
    meta = _unpickle(path(res["meta"]))
    if name == "cifar10":
        x_tr, y_tr = _read([path(f) for f in res["train"]], (b"labels",))
        x_te, y_te = _read([path(f) for f in res["test"]], (b"labels",))
        return CifarData(x_tr, y_tr, x_te, y_te, _decode(meta[b"label_names"]))
    keys = (b"fine_labels", b"coarse_labels")
    x_tr, y_tr, c_tr = _read([path(f) for f in res["train"]], keys)
    x_te, y_te, c_te = _read([path(f) for f in res["test"]], keys)
    return CifarData(x_tr, y_tr, x_te, y_te, _decode(meta[b"fine_label_names"]),
                     c_tr, c_te, _decode(meta[b"coarse_label_names"]))


def write_cifar_like(root: str, name: str = "cifar10", n_per_file: int = 4, n_test: int = 4,
                     seed: int = 0) -> str:
    """Writes a tiny random dataset in the official on-disk format (for tests and smoke runs).

    Returns the folder written (``root/cifar-10-batches-py`` or ``root/cifar-100-python``).
    """
    res = CIFAR_RESOURCES[name]
    folder = os.path.join(str(root), res["dir"])
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_fine, n_coarse = (10, 0) if name == "cifar10" else (100, 20)

    def batch(n: int) -> dict:
        d = {b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
             b"filenames": [f"img_{i}.png".encode() for i in range(n)]}
        fine = rng.integers(0, n_fine, size=n).tolist()
        if name == "cifar10":
            d[b"labels"] = fine
        else:
            d[b"fine_labels"], d[b"coarse_labels"] = fine, rng.integers(0, n_coarse, size=n).tolist()
        return d

    for f in res["train"]:
        with open(os.path.join(folder, f), "wb") as fh:
            pickle.dump(batch(n_per_file), fh)
    for f in res["test"]:
        with open(os.path.join(folder, f), "wb") as fh:
            pickle.dump(batch(n_test), fh)
    if name == "cifar10":
        meta = {b"label_names": [f"class_{i}".encode() for i in range(n_fine)]}
    else:
        meta = {b"fine_label_names": [f"fine_{i}".encode() for i in range(n_fine)],
                b"coarse_label_names": [f"coarse_{i}".encode() for i in range(n_coarse)]}
    with open(os.path.join(folder, res["meta"]), "wb") as fh:
        pickle.dump(meta, fh)
    return folder
