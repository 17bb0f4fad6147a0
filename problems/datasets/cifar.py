"""CIFAR-10 / CIFAR-100 from the official "python version" release.

Layout on disk (as extracted from the official tarballs)::

    root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}
    root/cifar-100-python/{train, test, meta}

Each batch file is a Python pickle of a dict with byte-string keys:
``b"data"`` (uint8 ``[N, 3072]``, row-major channel-first: 1024 red, 1024 green,
1024 blue values of a 32×32 image), and ``b"labels"`` (CIFAR-10) or
``b"fine_labels"`` / ``b"coarse_labels"`` (CIFAR-100). Meta files hold
``b"label_names"`` (CIFAR-10) or ``b"fine_label_names"`` / ``b"coarse_label_names"``.

Pickle is the dataset's official format, and a plain ``pickle.load`` runs whatever code
the file names. The files are therefore read with a restricted unpickler
(:func:`read_pickle`) that builds only what the format holds — dicts, lists, tuples,
bytes/str, numbers, and numpy arrays of a numeric dtype — and refuses any other global
with a :class:`CifarFormatError` naming the file and the global. Then every file is
checked before anything trains (:func:`check_batch`): the images are a uint8
``[N, 3072]`` array (float pixel data is refused, never cast), there are as many labels
as images, and every label is an integer in ``0..classes-1``.
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

__all__ = ["CIFAR_RESOURCES", "CifarData", "CifarFormatError", "load_cifar", "download_and_extract",
           "safe_extract", "md5sum", "images_to_tensor", "write_cifar_like", "CIFAR_MEAN", "CIFAR_STD",
           "read_pickle", "check_batch", "PICKLE_GLOBALS"]

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


class CifarFormatError(ValueError):
    """A CIFAR file that is not in the official format, or a pickle naming a global the
    format never uses; the message names the file and the problem."""


class _RefusedGlobal(pickle.UnpicklingError):
    """A pickle asked for a global outside :data:`PICKLE_GLOBALS`."""


# dtype kinds an array may have when read: bool, signed/unsigned integers, floats (the
# checks after reading then want exactly uint8 images and integer labels)
_ARRAY_KINDS = "biuf"
_PROBE = np.zeros(1, np.uint8)
_RECONSTRUCT = _PROBE.__reduce__()[0]        # numpy's own array rebuilder (protocols 0-4)
_FROMBUFFER = _PROBE.__reduce_ex__(5)[0]     # its protocol-5 rebuilder


def _dtype(spec, align=False, copy=True):
    """``numpy.dtype`` for a pickle, only of the kinds in :data:`_ARRAY_KINDS`."""
    if isinstance(spec, bytes):               # Python 2 pickles read with encoding="bytes"
        spec = spec.decode("ascii", "replace")
    if not isinstance(spec, str):
        raise _RefusedGlobal(f"a numpy dtype built from {type(spec).__name__}, not a type code")
    dt = np.dtype(spec, bool(align), bool(copy))
    if dt.kind not in _ARRAY_KINDS or dt.fields is not None or dt.subdtype is not None:
        raise _RefusedGlobal(f"a numpy array of dtype {spec!r} (only numbers are read)")
    return dt


def _reconstruct(subtype, shape, code):
    """numpy's ``_reconstruct``, only for plain ``numpy.ndarray``."""
    if subtype is not np.ndarray:
        raise _RefusedGlobal(f"an array of type {getattr(subtype, '__name__', type(subtype).__name__)}, "
                             f"not numpy.ndarray")
    return _RECONSTRUCT(np.ndarray, shape, code)


def _frombuffer(buf, dtype, shape, order):
    """numpy's protocol-5 ``_frombuffer``, only with a dtype :func:`_dtype` admitted."""
    if not isinstance(dtype, np.dtype) or dtype.kind not in _ARRAY_KINDS or dtype.fields is not None:
        raise _RefusedGlobal(f"a numpy array of dtype {dtype!r} (only numbers are read)")
    return _FROMBUFFER(buf, dtype, shape, order)


def _latin1(text, encoding):
    """``_codecs.encode(text, "latin1")``: how Python 3 writes ``bytes`` at protocols 0-2."""
    if not isinstance(text, str) or str(encoding).replace("-", "").lower() != "latin1":
        raise _RefusedGlobal(f"_codecs.encode with encoding {encoding!r} (only latin1 builds bytes)")
    return text.encode("latin1")


# (module, name) a CIFAR pickle may name -> what it gets. numpy arrays need the array
# rebuilder (under numpy 1.x's and 2.x's module names), ndarray, dtype, and for protocol 5
# _frombuffer; bytes written by Python 3 at protocols 0-2 need _codecs.encode.
PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _dtype,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("_codecs", "encode"): _latin1,
}


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that resolves only :data:`PICKLE_GLOBALS`."""

    def find_class(self, module: str, name: str):
        try:
            return PICKLE_GLOBALS[(module, name)]
        except KeyError:
            raise _RefusedGlobal(f"the global {module}.{name}, which the CIFAR format never "
                                 f"uses (it could run code)") from None

    def persistent_load(self, pid):
        raise _RefusedGlobal("a persistent id, which the CIFAR format never uses")


def read_pickle(path: str) -> object:
    """The object in the pickle ``path``, read with the restricted unpickler (Python 2
    strings as ``bytes``, as the official release was written).

    Raises:
        CifarFormatError: the pickle names a global outside :data:`PICKLE_GLOBALS` (nothing
            it names is called), or is not a readable pickle.
    """
    try:
        with open(path, "rb") as f:
            return _CifarUnpickler(f, encoding="bytes").load()
    except _RefusedGlobal as e:
        raise CifarFormatError(f"{path}: refused to read: the pickle asks for {e}; a CIFAR file "
                               f"holds only dicts, lists, bytes, str, numbers and numeric numpy "
                               f"arrays") from None
    except OSError:
        raise
    except Exception as e:  # truncated, not a pickle, malformed opcodes
        raise CifarFormatError(f"{path}: not a readable CIFAR pickle ({type(e).__name__}: "
                               f"{' '.join(str(e).split())[:120]})") from None


def _entry(d: dict, key: str, path: str):
    """``d[b"key"]`` or ``d["key"]``."""
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    have = ", ".join(repr(k) for k in list(d)[:8])
    raise CifarFormatError(f"{path}: no {key!r} entry (the file has {have})")


def _labels(value, path: str, key: str) -> np.ndarray:
    """The labels ``value`` (a list of ints or an integer array) as int64, else an error."""
    if isinstance(value, np.ndarray):
        y = value
    elif isinstance(value, (list, tuple)):
        y = np.asarray(value) if len(value) else np.zeros(0, np.int64)
    else:
        raise CifarFormatError(f"{path}: {key} must be a list of integers, got {type(value).__name__}")
    if y.ndim != 1 or y.dtype.kind not in "iu":
        kind = "booleans" if y.dtype.kind == "b" else f"dtype {y.dtype}" if y.ndim == 1 else f"shape {y.shape}"
        raise CifarFormatError(f"{path}: {key} must be a flat list of integers, got {kind}")
    return y.astype(np.int64)


def check_batch(d: object, path: str, label_keys: Tuple[str, ...], classes: Tuple[int, ...]
                ) -> Tuple[np.ndarray, ...]:
    """``(images [N, 32, 32, 3] uint8, labels...)`` of one batch file, after checking it.

    Args:
        d: what :func:`read_pickle` returned.
        path: the file (named in errors).
        label_keys: ``("labels",)`` (CIFAR-10) or ``("fine_labels", "coarse_labels")``.
        classes: the number of classes of each label key (10; 100 and 20).

    Raises:
        CifarFormatError: not a dict; images not a uint8 ``[N, 3072]`` array (float pixel
            data is refused, not cast); a label list not of ``N`` integers in
            ``0..classes-1``.
    """
    if not isinstance(d, dict):
        raise CifarFormatError(f"{path}: expected a dict with 'data' and {list(label_keys)}, "
                               f"got {type(d).__name__}")
    x = _entry(d, "data", path)
    if not isinstance(x, np.ndarray):
        raise CifarFormatError(f"{path}: data must be a uint8 numpy array [N, 3072], got {type(x).__name__}")
    if x.dtype != np.uint8:
        raise CifarFormatError(f"{path}: image data has dtype {x.dtype}, expected uint8 (pixel values "
                               f"0..255; other pixel data is not cast)")
    if x.ndim != 2 or x.shape[1] != 3072:
        raise CifarFormatError(f"{path}: image data has shape {list(x.shape)}, expected [N, 3072] "
                               f"(one 3x32x32 image per row)")
    ys = []
    for key, n_classes in zip(label_keys, classes):
        y = _labels(_entry(d, key, path), path, key)
        if len(y) != len(x):
            raise CifarFormatError(f"{path}: {len(y)} {key} for {len(x)} images (expected one per image)")
        bad = np.flatnonzero((y < 0) | (y >= n_classes))
        if len(bad):
            raise CifarFormatError(f"{path}: {key} must be in 0..{n_classes - 1}; {len(bad)} are not, "
                                   f"the first {int(y[bad[0]])} at position {int(bad[0])}")
        ys.append(y)
    return (x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), *ys)


def _names(meta: object, path: str, key: str, n: int) -> List[str]:
    """The ``n`` class names under ``key`` of a meta file."""
    if not isinstance(meta, dict):
        raise CifarFormatError(f"{path}: expected a dict with {key!r}, got {type(meta).__name__}")
    names = _entry(meta, key, path)
    if not isinstance(names, (list, tuple)) or len(names) != n \
            or not all(isinstance(v, (bytes, str)) for v in names):
        got = f"{len(names)} entries" if isinstance(names, (list, tuple)) else type(names).__name__
        raise CifarFormatError(f"{path}: {key} must be a list of {n} names, got {got}")
    return _decode(names)


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


def _read(paths: List[str], keys: Tuple[str, ...], classes: Tuple[int, ...]) -> Tuple[np.ndarray, ...]:
    """The checked images and labels of ``paths``, concatenated."""
    parts = [check_batch(read_pickle(p), p, keys, classes) for p in paths]
    x = np.ascontiguousarray(np.concatenate([part[0] for part in parts]))
    return (x, *(np.concatenate([part[1 + i] for part in parts]) for i in range(len(keys))))


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
        CifarFormatError: a file that is not in the official format (a pickle naming
            a global the format never uses, images not uint8 ``[N, 3072]``, labels not
            one integer in range per image); nothing is trained on such data.
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
    meta = read_pickle(path(res["meta"]))
    if name == "cifar10":
        classes = _names(meta, path(res["meta"]), "label_names", 10)
        x_tr, y_tr = _read([path(f) for f in res["train"]], ("labels",), (10,))
        x_te, y_te = _read([path(f) for f in res["test"]], ("labels",), (10,))
        return CifarData(x_tr, y_tr, x_te, y_te, classes)
    fine = _names(meta, path(res["meta"]), "fine_label_names", 100)
    coarse = _names(meta, path(res["meta"]), "coarse_label_names", 20)
    keys, classes_per_key = ("fine_labels", "coarse_labels"), (100, 20)
    x_tr, y_tr, c_tr = _read([path(f) for f in res["train"]], keys, classes_per_key)
    x_te, y_te, c_te = _read([path(f) for f in res["test"]], keys, classes_per_key)
    return CifarData(x_tr, y_tr, x_te, y_te, fine, c_tr, c_te, coarse)


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
