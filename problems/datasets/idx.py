"""Fashion-MNIST and MNIST from the standard IDX files.

Four files per dataset, each plain or gzipped (``.gz``)::

    train-images-idx3-ubyte   train-labels-idx1-ubyte
    t10k-images-idx3-ubyte    t10k-labels-idx1-ubyte

An IDX file is a big-endian header -- a 4-byte magic number ``0x000008NN`` (``08``:
unsigned bytes, ``NN``: number of dimensions; ``0x00000803`` for images ``[N, 28, 28]``,
``0x00000801`` for labels ``[N]``), then one uint32 per dimension -- followed by
exactly ``prod(dims)`` data bytes in row-major order.

:func:`load_mnist_like` looks in ``root`` (the files directly in it, or torchvision's
``root/FashionMNIST/raw/`` / ``root/MNIST/raw/``), then in the system location
(:data:`IDX_SYSTEM_DIRS`; Debian's ``dataset-fashion-mnist`` installs the gzipped files in
``/usr/share/datasets/fashion-mnist/``), then, with ``download=True``, downloads the
official gzipped files into ``root/<FashionMNIST|MNIST>/raw/`` and checks their MD5s.
"""
from __future__ import annotations

import gzip
import os
import shutil
import tempfile
import urllib.request
import zlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from .cifar import md5sum

__all__ = ["IDXFormatError", "MnistData", "IDX_RESOURCES", "IDX_SYSTEM_DIRS", "IDX_FILES",
           "load_mnist_like", "find_mnist_like", "search_places", "read_idx", "write_idx", "write_mnist_like"]

IMAGES_MAGIC, LABELS_MAGIC = 0x00000803, 0x00000801
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

# name -> torchvision directory, download mirror, MD5 of each official .gz file, class names
IDX_RESOURCES: Dict[str, dict] = {
    "fashion-mnist": {
        "dir": "FashionMNIST",
        "mirror": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "md5": dict(zip(IDX_FILES, ("8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
                                    "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12a480ee83cd310"))),
        "classes": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"],
    },
    "mnist": {
        "dir": "MNIST",
        "mirror": "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "md5": dict(zip(IDX_FILES, ("f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
                                    "9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c"))),
        "classes": [str(i) for i in range(10)],
    },
}

# System-wide locations searched after ``root`` (tests point these at temporary directories).
IDX_SYSTEM_DIRS: Dict[str, str] = {
    "fashion-mnist": "/usr/share/datasets/fashion-mnist",
    "mnist": "/usr/share/datasets/mnist",
}


class IDXFormatError(ValueError):
    """An IDX file that is not what it should be; the message names the file and the problem."""


@dataclass
class MnistData:
    """One MNIST-like dataset in memory.

    Attributes:
        name: ``"fashion-mnist"`` or ``"mnist"``.
        train, test: ``(x, y)``: float32 images ``[N, 1, 28, 28]`` in [0, 1] (``uint8 / 255``)
            and int64 labels ``[N]`` in ``0..9``.
        classes: the 10 label names.
        root: the directory the files were read from.
    """

    name: str
    train: Tuple[Tensor, Tensor]
    test: Tuple[Tensor, Tensor]
    classes: List[str]
    root: str


def read_idx(path: str, magic: Optional[int] = None) -> np.ndarray:
    """Reads one IDX file of unsigned bytes (gzipped when ``path`` ends in ``.gz``).

    Args:
        path: the file.
        magic: the expected magic number (e.g. ``0x00000803``); by default any
            unsigned-byte IDX file (``0x000008NN``, ``NN >= 1``) is accepted.

    Returns:
        uint8 array of the header's shape (writable, C-contiguous).

    Raises:
        IDXFormatError: not a valid gzip stream, wrong magic, truncated or trailing bytes.
    """
    with open(path, "rb") as f:
        raw = f.read()
    if path.endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:   # BadGzipFile is an OSError
            raise IDXFormatError(f"{path}: not a valid gzip stream ({e or type(e).__name__})") from None
    if len(raw) < 4:
        raise IDXFormatError(f"{path}: truncated: {len(raw)} bytes, fewer than the 4-byte magic number")
    got = int.from_bytes(raw[:4], "big")
    ndim = got & 0xFF
    if (magic is not None and got != magic) or (got >> 8) != 0x08 or ndim == 0:
        want = f"0x{magic:08X}" if magic is not None else "0x000008NN (unsigned bytes, NN dimensions)"
        raise IDXFormatError(f"{path}: wrong magic number 0x{got:08X}, expected {want}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IDXFormatError(f"{path}: truncated: {len(raw)} bytes, fewer than the {header}-byte header")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, 4))
    size = int(np.prod(dims, dtype=np.int64))
    body = len(raw) - header
    shape = "×".join(map(str, dims))
    if body < size:
        raise IDXFormatError(f"{path}: truncated: the header says {shape} = {size} data bytes, "
                             f"the file has {body}")
    if body > size:
        raise IDXFormatError(f"{path}: {body - size} trailing bytes after the {shape} = {size} "
                             f"data bytes the header announces")
    return np.frombuffer(bytearray(raw[header:]), np.uint8).reshape(dims)


def write_idx(path: str, array: np.ndarray) -> str:
    """Writes ``array`` (uint8, any number of dimensions) as an IDX file; gzipped if
    ``path`` ends in ``.gz``. Returns ``path``."""
    a = np.ascontiguousarray(array)
    if a.dtype != np.uint8 or not 1 <= a.ndim <= 255:
        raise ValueError(f"write_idx: expected a uint8 array with 1..255 dimensions, got {a.dtype} {a.shape}")
    data = ((0x0800 | a.ndim).to_bytes(4, "big") + np.asarray(a.shape, ">u4").tobytes() + a.tobytes())
    if str(path).endswith(".gz"):
        data = gzip.compress(data, mtime=0)
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def write_mnist_like(folder: str, n_train: int = 12, n_test: int = 5, seed: int = 0,
                     compress: bool = True) -> str:
    """Writes a tiny random MNIST-like dataset (four IDX files, ``.gz`` if ``compress``)
    into ``folder`` (created), for tests and smoke runs. Returns ``folder``."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    suffix = ".gz" if compress else ""
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx(os.path.join(folder, f"{split}-images-idx3-ubyte{suffix}"),
                  rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8))     # [n, 28, 28]
        write_idx(os.path.join(folder, f"{split}-labels-idx1-ubyte{suffix}"),
                  rng.integers(0, 10, size=n, dtype=np.uint8))                 # [n]
    return str(folder)


def _check_name(name: str) -> dict:
    if name not in IDX_RESOURCES:
        raise ValueError(f"unknown IDX dataset {name!r}; choose from {sorted(IDX_RESOURCES)}")
    return IDX_RESOURCES[name]


def _file(folder: str, base: str) -> Optional[str]:
    """``folder/base`` or ``folder/base.gz`` (the plain file first), else ``None``."""
    for p in (os.path.join(folder, base), os.path.join(folder, base + ".gz")):
        if os.path.isfile(p):
            return p
    return None


def search_places(name: str, root: Optional[str] = None,
                  system_dirs: Optional[Sequence[str]] = None) -> List[str]:
    """The directories :func:`load_mnist_like` searches, in order: ``root``,
    ``root/<FashionMNIST|MNIST>/raw`` (when ``root`` is given), then the system ones."""
    res = _check_name(name)
    places = []
    if root is not None:
        root = os.path.expanduser(str(root))
        places += [root, os.path.join(root, res["dir"], "raw")]
    places += list(system_dirs) if system_dirs is not None else [IDX_SYSTEM_DIRS[name]]
    return places


def _missing(folder: str) -> List[str]:
    return [b for b in IDX_FILES if _file(folder, b) is None]


def find_mnist_like(name: str, root: Optional[str] = None,
                    system_dirs: Optional[Sequence[str]] = None) -> Optional[str]:
    """The first directory in the search order of :func:`load_mnist_like` that holds all
    four IDX files of ``name`` (plain or ``.gz``), else ``None``. Nothing is read."""
    return next((p for p in search_places(name, root, system_dirs) if not _missing(p)), None)


def _download(name: str, folder: str, bases: Sequence[str]) -> None:
    """Downloads the official ``.gz`` files into ``folder``: MD5-checked, each written
    to a temporary file and renamed into place (never a partial file under the real name)."""
    res = IDX_RESOURCES[name]
    os.makedirs(folder, exist_ok=True)
    for base in bases:
        url = res["mirror"] + base + ".gz"
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".part")
        os.close(fd)
        try:
            with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:  # noqa: S310 (fixed URLs)
                shutil.copyfileobj(r, f)
            got = md5sum(tmp)
            if got != res["md5"][base]:
                raise ValueError(f"MD5 mismatch for {url}: expected {res['md5'][base]}, got {got}; "
                                 f"the download is corrupt or not the official file")
            os.replace(tmp, os.path.join(folder, base + ".gz"))
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


def _not_found(name: str, places: List[str], extra: str = "") -> FileNotFoundError:
    def why(p: str) -> str:
        missing = _missing(p)
        return ("no such directory" if not os.path.isdir(p) else "none of the files"
                if len(missing) == len(IDX_FILES) else "missing " + ", ".join(missing))
    looked = "; ".join(f"{p} ({why(p)})" for p in places)
    hint = ("install the Debian package dataset-fashion-mnist (apt-get install dataset-fashion-mnist), "
            if name == "fashion-mnist" else "")
    return FileNotFoundError(
        f"{name}: no complete set of IDX files ({', '.join(IDX_FILES)}, each plain or .gz) found; "
        f"looked in: {looked}{extra}. To get them: {hint}put the four files in root, or pass "
        f"download=True with a root to fetch them from {IDX_RESOURCES[name]['mirror']}")


def load_mnist_like(name: str, root: Optional[str] = None, download: bool = False,
                    system_dirs: Optional[Sequence[str]] = None) -> MnistData:
    """Loads Fashion-MNIST or MNIST from IDX files.

    Args:
        name: ``"fashion-mnist"`` or ``"mnist"``.
        root: searched first: the files directly in it, then ``root/FashionMNIST/raw/``
            (``root/MNIST/raw/``), torchvision's layout. Downloads go to the latter.
        download: when no location holds the four files, download them (needs ``root``).
        system_dirs: searched after ``root``; default ``[IDX_SYSTEM_DIRS[name]]``.

    Returns:
        :class:`MnistData` with float32 ``[N, 1, 28, 28]`` images and int64 labels.

    Raises:
        FileNotFoundError: nothing found (and no download); the message names every
            place looked and how to get the files.
        IDXFormatError: a file is corrupt (named in the message with the problem).
        ValueError: ``download=True`` without ``root``, or a download's MD5 differs.
    """
    res = _check_name(name)
    places = search_places(name, root, system_dirs)
    folder = find_mnist_like(name, root, system_dirs)
    if folder is None and download:
        if root is None:
            raise ValueError(f"load_mnist_like({name!r}, download=True) needs a root to download into")
        folder = places[1]
        try:
            _download(name, folder, _missing(folder))
        except OSError as e:   # no network, DNS failure, HTTP error (URLError is an OSError)
            raise _not_found(name, places, f"; the download from {res['mirror']} failed ({e})") from e
    if folder is None:
        raise _not_found(name, places)

    def split(prefix: str) -> Tuple[Tensor, Tensor]:
        xp, yp = _file(folder, f"{prefix}-images-idx3-ubyte"), _file(folder, f"{prefix}-labels-idx1-ubyte")
        x, y = read_idx(xp, IMAGES_MAGIC), read_idx(yp, LABELS_MAGIC)    # [N, 28, 28], [N]
        if x.shape[1:] != (28, 28):
            raise IDXFormatError(f"{xp}: images are {x.shape[1]}×{x.shape[2]}, expected 28×28")
        if len(x) != len(y):
            raise IDXFormatError(f"count mismatch: {xp} has {len(x)} images but {yp} has {len(y)} labels")
        bad = np.flatnonzero(y >= len(res["classes"]))
        if bad.size:
            raise IDXFormatError(f"{yp}: label {int(y[bad[0]])} at index {int(bad[0])} is not in "
                                 f"0..{len(res['classes']) - 1} ({bad.size} such labels)")
        x_t = torch.from_numpy(x).unsqueeze(1).float().div_(255.0)        # [N, 1, 28, 28] in [0, 1]
        return x_t, torch.from_numpy(y.astype(np.int64))                  # [N] int64

    return MnistData(name, split("train"), split("t10k"), list(res["classes"]), folder)
