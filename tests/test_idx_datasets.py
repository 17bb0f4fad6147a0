"""problems.datasets.idx: Fashion-MNIST / MNIST IDX files on tiny fixtures written in tmp_path
(gzipped and plain): exact values, the search order (root, torchvision's raw/ layout, the
system directory), every kind of bad file, the not-found message, and a download served
from memory (no network). One test reads the real Fashion-MNIST when it is installed."""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import urllib.error

import numpy as np
import pytest
import torch

from problems.datasets import (IDX_FILES, IDXFormatError, find_mnist_like, load_mnist_like,
                               read_idx, write_idx, write_mnist_like)
from problems.datasets import idx

REAL = "/usr/share/datasets/fashion-mnist"


@pytest.fixture(autouse=True)
def no_system_dirs(tmp_path, monkeypatch):
    """Every test sees empty system directories (never the machine's real ones)."""
    for name in idx.IDX_SYSTEM_DIRS:
        monkeypatch.setitem(idx.IDX_SYSTEM_DIRS, name, str(tmp_path / "system" / name))


def fixture(folder, compress=True, seed=0, n_train=12, n_test=5):
    """Writes the four files; returns the arrays written ``{base: uint8 array}``."""
    write_mnist_like(str(folder), n_train=n_train, n_test=n_test, seed=seed, compress=compress)
    sfx = ".gz" if compress else ""
    return {b: read_idx(str(folder / (b + sfx))) for b in IDX_FILES}


@pytest.mark.parametrize("compress", [True, False])
def test_round_trip_exact(tmp_path, compress):
    arrays = fixture(tmp_path / "d", compress)
    d = load_mnist_like("fashion-mnist", root=str(tmp_path / "d"))
    assert d.name == "fashion-mnist" and d.root == str(tmp_path / "d")
    assert d.classes[0] == "T-shirt/top" and len(d.classes) == 10
    (x, y), (xt, yt) = d.train, d.test
    assert x.shape == (12, 1, 28, 28) and xt.shape == (5, 1, 28, 28)
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and y.shape == (12,) and yt.shape == (5,)
    assert torch.equal(x, torch.from_numpy(arrays["train-images-idx3-ubyte"]).float().div(255).unsqueeze(1))
    assert torch.equal(yt, torch.from_numpy(arrays["t10k-labels-idx1-ubyte"]).long())
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0


def test_write_read_idx_any_shape(tmp_path):
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    for name in ("a.idx", "a.idx.gz"):
        write_idx(str(tmp_path / name), a)
        b = read_idx(str(tmp_path / name))
        assert b.dtype == np.uint8 and b.shape == (2, 3, 4) and np.array_equal(a, b) and b.flags.writeable
    raw = (tmp_path / "a.idx").read_bytes()
    assert raw[:4] == b"\x00\x00\x08\x03" and raw[4:16] == b"\x00\x00\x00\x02\x00\x00\x00\x03\x00\x00\x00\x04"
    assert gzip.decompress((tmp_path / "a.idx.gz").read_bytes()) == raw
    with pytest.raises(ValueError, match="uint8"):
        write_idx(str(tmp_path / "f.idx"), np.zeros(3, np.float32))


def test_mnist_and_plain_file_preferred(tmp_path):
    fixture(tmp_path, compress=True, seed=1)
    plain = fixture(tmp_path, compress=False, seed=2)      # both forms present: the plain one is read
    d = load_mnist_like("mnist", root=str(tmp_path))
    assert d.classes == [str(i) for i in range(10)]
    assert torch.equal(d.train[1], torch.from_numpy(plain["train-labels-idx1-ubyte"]).long())


def test_search_order(tmp_path):
    system = tmp_path / "system" / "fashion-mnist"
    fixture(system, seed=1)
    assert load_mnist_like("fashion-mnist").root == str(system)                     # no root
    assert load_mnist_like("fashion-mnist", root=str(tmp_path / "empty")).root == str(system)
    raw = tmp_path / "tv" / "FashionMNIST" / "raw"
    fixture(raw, compress=False, seed=2)
    assert load_mnist_like("fashion-mnist", root=str(tmp_path / "tv")).root == str(raw)  # root beats system
    assert find_mnist_like("mnist", str(tmp_path / "tv")) is None   # mnist looks in MNIST/raw
    fixture(tmp_path / "tv", seed=3)
    assert load_mnist_like("fashion-mnist", root=str(tmp_path / "tv")).root == str(tmp_path / "tv")
    (tmp_path / "partial").mkdir()
    write_idx(str(tmp_path / "partial" / "train-images-idx3-ubyte"), np.zeros((1, 28, 28), np.uint8))
    assert find_mnist_like("fashion-mnist", str(tmp_path / "partial")) == str(system)  # incomplete: skipped
    assert find_mnist_like("fashion-mnist", str(tmp_path / "partial"), system_dirs=[]) is None


def test_not_found_names_every_place(tmp_path):
    (tmp_path / "root").mkdir()
    write_idx(str(tmp_path / "root" / "t10k-labels-idx1-ubyte.gz"), np.zeros(3, np.uint8))
    with pytest.raises(FileNotFoundError) as e:
        load_mnist_like("fashion-mnist", root=str(tmp_path / "root"))
    msg = str(e.value)
    for place in (tmp_path / "root", tmp_path / "root" / "FashionMNIST" / "raw",
                  tmp_path / "system" / "fashion-mnist"):
        assert f"{place} (" in msg
    assert "missing train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte)" in msg
    assert "no such directory" in msg and "apt-get install dataset-fashion-mnist" in msg
    assert "download=True" in msg
    with pytest.raises(FileNotFoundError, match="mnist: no complete set"):
        load_mnist_like("mnist", system_dirs=[str(tmp_path / "x")])
    with pytest.raises(ValueError, match="unknown IDX dataset"):
        load_mnist_like("cifar10", root=str(tmp_path))


def _cut(path, n):
    path.write_bytes(path.read_bytes()[:n])


def _bad_cases(d):
    """case -> (file to break, how, expected message fragment)."""
    ti, tl = d / "train-images-idx3-ubyte", d / "train-labels-idx1-ubyte"
    return {
        "wrong magic": (tl, lambda: write_idx(str(tl), np.zeros((12, 1), np.uint8)),
                        "wrong magic number 0x00000802, expected 0x00000801"),
        "truncated": (ti, lambda: _cut(ti, 16 + 12 * 784 - 1), "truncated: the header says 12×28×28 = 9408"),
        "truncated header": (ti, lambda: _cut(ti, 10), "fewer than the 16-byte header"),
        "empty": (tl, lambda: _cut(tl, 0), "fewer than the 4-byte magic"),
        "trailing bytes": (tl, lambda: tl.write_bytes(tl.read_bytes() + b"\x00\x01"), "2 trailing bytes"),
        "count mismatch": (tl, lambda: write_idx(str(tl), np.zeros(11, np.uint8)),
                           "has 12 images but"),
        "label out of range": (tl, lambda: write_idx(str(tl), np.array([0] * 3 + [10] + [1] * 8, np.uint8)),
                               "label 10 at index 3 is not in 0..9"),
        "image size": (ti, lambda: write_idx(str(ti), np.zeros((12, 14, 14), np.uint8)), "14×14, expected 28×28"),
    }


@pytest.mark.parametrize("case", ["wrong magic", "truncated", "truncated header", "empty",
                                  "trailing bytes", "count mismatch", "label out of range", "image size"])
def test_bad_plain_file(tmp_path, case):
    fixture(tmp_path, compress=False)
    path, breaks, expected = _bad_cases(tmp_path)[case]
    breaks()
    with pytest.raises(IDXFormatError) as e:
        load_mnist_like("fashion-mnist", root=str(tmp_path))
    assert str(path) in str(e.value) and expected in str(e.value), str(e.value)
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize("content,expected", [
    (b"plain bytes, not gzip", "not a valid gzip stream"),
    ("cut", "not a valid gzip stream"),                       # a truncated gzip stream
    ("gz-trailing", "1 trailing bytes"),                      # valid gzip, bad content
])
def test_bad_gz_file(tmp_path, content, expected):
    fixture(tmp_path, compress=True)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    data = path.read_bytes()
    if content == "cut":
        data = data[:len(data) // 2]
    elif content == "gz-trailing":
        data = gzip.compress(gzip.decompress(data) + b"\x07")
    else:
        data = content
    path.write_bytes(data)
    with pytest.raises(IDXFormatError) as e:
        load_mnist_like("fashion-mnist", root=str(tmp_path))
    assert str(path) in str(e.value) and expected in str(e.value), str(e.value)


def _serve(monkeypatch, files, calls, fail=None):
    def urlopen(url, timeout=None):
        calls.append(url)
        if fail is not None:
            raise fail
        return io.BytesIO(files[url.rsplit("/", 1)[1]])
    monkeypatch.setattr(idx.urllib.request, "urlopen", urlopen)


def test_download_checked_and_atomic(tmp_path, monkeypatch):
    fixture(tmp_path / "src", seed=4)
    files = {b + ".gz": (tmp_path / "src" / (b + ".gz")).read_bytes() for b in IDX_FILES}
    md5 = {b: hashlib.md5(files[b + ".gz"]).hexdigest() for b in IDX_FILES}
    monkeypatch.setitem(idx.IDX_RESOURCES["fashion-mnist"], "md5", md5)
    calls = []
    _serve(monkeypatch, files, calls)
    root = tmp_path / "root"
    with pytest.raises(ValueError, match="needs a root"):
        load_mnist_like("fashion-mnist", download=True)
    d = load_mnist_like("fashion-mnist", root=str(root), download=True)
    raw = root / "FashionMNIST" / "raw"
    assert d.root == str(raw) and sorted(os.listdir(raw)) == sorted(files)   # no .part left
    assert calls == [idx.IDX_RESOURCES["fashion-mnist"]["mirror"] + b + ".gz" for b in IDX_FILES]
    assert load_mnist_like("fashion-mnist", root=str(root), download=True).root == str(raw)
    assert len(calls) == 4                                                    # found: not downloaded again

    monkeypatch.setitem(idx.IDX_RESOURCES["fashion-mnist"], "md5", dict(md5, **{IDX_FILES[2]: "0" * 32}))
    other = tmp_path / "other"
    with pytest.raises(ValueError, match="MD5 mismatch for .*t10k-images-idx3-ubyte.gz"):
        load_mnist_like("fashion-mnist", root=str(other), download=True)
    assert sorted(os.listdir(other / "FashionMNIST" / "raw")) == [b + ".gz" for b in sorted(IDX_FILES[:2])]

    _serve(monkeypatch, files, calls, fail=urllib.error.URLError("no network"))
    with pytest.raises(FileNotFoundError, match="download from .* failed .*no network"):
        load_mnist_like("fashion-mnist", root=str(tmp_path / "offline"), download=True)
    assert os.listdir(tmp_path / "offline" / "FashionMNIST" / "raw") == []


@pytest.mark.skipif(not os.path.isdir(REAL), reason=f"Fashion-MNIST is not installed in {REAL}")
def test_real_fashion_mnist(monkeypatch):
    monkeypatch.setitem(idx.IDX_SYSTEM_DIRS, "fashion-mnist", REAL)
    d = load_mnist_like("fashion-mnist")
    assert d.root == REAL
    (x, y), (xt, yt) = d.train, d.test
    assert x.shape == (60000, 1, 28, 28) and xt.shape == (10000, 1, 28, 28)
    assert y.shape == (60000,) and yt.shape == (10000,)
    assert int(y.min()) == 0 and int(y.max()) == 9 and torch.equal(y.bincount(), torch.full((10,), 6000))
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
