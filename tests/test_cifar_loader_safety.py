"""The CIFAR loader reads its pickles with a restricted unpickler and checks every file
before anything trains (issue 20, "Silent or raw"): a pickle naming any global outside
the format's few numpy rebuilders is refused and runs nothing; labels out of range, a
label count that differs from the image count, and non-uint8 pixel data are named
errors. Through ``examples/mlo_mae_cifar.py`` each is one ``error:`` line, exit 2, and
nothing is written."""
from __future__ import annotations

import io
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from problems.datasets import cifar as C
from problems.datasets import write_cifar_like
from problems.jobs import mlo_mae_job

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ fixtures
class _Py2Pickler(pickle._Pickler):
    """Protocol 2 the way Python 2's cPickle wrote the official release: every ``str``
    (here ``bytes`` and ASCII ``str``) as a (SHORT_)BINSTRING, so no ``_codecs`` call."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_bytes(self, obj):
        n = len(obj)
        self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj if n < 256
                   else pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    def save_str(self, obj):
        if obj.isascii():
            return self.save_bytes(obj.encode("ascii"))
        return pickle._Pickler.save_str(self, obj)

    dispatch[bytes] = save_bytes
    dispatch[str] = save_str


def py2_dumps(obj) -> bytes:
    """``obj`` as the official (Python 2, numpy 1.x) files hold it: the array rebuilder
    under its numpy 1.x name ``numpy.core.multiarray``."""
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def batch(n=3, seed=0, **change):
    """One CIFAR-10 batch dict in the official layout, entries replaced by ``change``."""
    rng = np.random.default_rng(seed)
    d = {b"batch_label": b"training batch 1 of 5",
         b"labels": rng.integers(0, 10, size=n).tolist(),
         b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
         b"filenames": [f"img_{i}.png".encode() for i in range(n)]}
    d.update({k.encode(): v for k, v in change.items()})
    return d


class RunsShell:
    """A pickle whose ``__reduce__`` calls ``os.system`` (writes a marker file if run)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class Evaluates:
    def __reduce__(self):
        return eval, ("__import__('os').getpid()",)


class Rot13:
    def __reduce__(self):
        import codecs
        return codecs.encode, ("abc", "rot13")


@pytest.fixture
def cifar_root(tmp_path):
    """A tiny CIFAR-10 in the official format under tmp_path/data; returns (root, folder)."""
    root = tmp_path / "data"
    folder = Path(write_cifar_like(str(root), "cifar10", n_per_file=3, n_test=3))
    return root, folder


# ------------------------------------------------------- what the format needs is read
@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
def test_every_pickle_protocol_of_the_format_is_read(tmp_path, protocol):
    d = batch()
    (tmp_path / "b").write_bytes(pickle.dumps(d, protocol=protocol))
    got = C.read_pickle(str(tmp_path / "b"))
    assert np.array_equal(got[b"data"], d[b"data"]) and got[b"data"].dtype == np.uint8
    assert got[b"labels"] == d[b"labels"] and got[b"filenames"] == d[b"filenames"]


def test_the_official_python2_numpy1_encoding_is_read(cifar_root):
    """Official files: protocol 2, Python 2 strings, numpy.core.multiarray._reconstruct."""
    root, folder = cifar_root
    expected = C.load_cifar(str(root))
    for name in ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
                 "test_batch", "batches.meta"]:
        with open(folder / name, "rb") as f:
            d = pickle.load(f)
        (folder / name).write_bytes(py2_dumps(d))
    raw = (folder / "data_batch_1").read_bytes()
    assert b"cnumpy.core.multiarray\n_reconstruct\n" in raw and b"_codecs" not in raw
    got = C.load_cifar(str(root))
    assert np.array_equal(got.x_train, expected.x_train) and np.array_equal(got.y_train, expected.y_train)
    assert np.array_equal(got.x_test, expected.x_test) and got.classes == expected.classes


def test_str_keys_are_read_too(tmp_path):
    d = {"data": np.zeros((2, 3072), np.uint8), "labels": [0, 9]}
    x, y = C.check_batch(d, "f", ("labels",), (10,))
    assert x.shape == (2, 32, 32, 3) and y.tolist() == [0, 9]


def test_the_allowed_globals_are_exactly_the_numpy_rebuilders():
    assert set(C.PICKLE_GLOBALS) == {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode")}


# -------------------------------------------------------------- anything else is refused
def test_a_pickle_calling_os_system_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps(batch(data=RunsShell(marker))))
    with pytest.raises(C.CifarFormatError) as e:
        C.read_pickle(str(path))
    assert str(e.value).startswith(f"{path}: refused to read: the pickle asks for the global ")
    assert f"{os.system.__module__}.system" in str(e.value) and "could run code" in str(e.value)
    assert not marker.exists()
    # the same file read with plain pickle does run it: the fixture is live
    with open(path, "rb") as f:
        pickle.load(f)
    assert marker.exists()


@pytest.mark.parametrize("payload, named", [
    (Evaluates(), "builtins.eval"),
    (np.array([1, "a"], dtype=object), "a numpy array of dtype 'O8' (only numbers are read)"),
    (np.ma.masked_array([1, 2]), "numpy.ma.core"),
    (np.datetime64("2020-01-01"), "numpy"),
])
def test_other_globals_and_object_arrays_are_refused(tmp_path, payload, named):
    path = tmp_path / "test_batch"
    path.write_bytes(pickle.dumps(batch(data=payload)))
    with pytest.raises(C.CifarFormatError, match="refused to read") as e:
        C.read_pickle(str(path))
    assert named in str(e.value) and str(path) in str(e.value)


def test_codecs_encode_builds_only_latin1_bytes(tmp_path):
    path = tmp_path / "b"
    path.write_bytes(pickle.dumps(Rot13()))
    assert b"_codecs" in path.read_bytes()
    with pytest.raises(C.CifarFormatError, match="_codecs.encode with encoding 'rot13'"):
        C.read_pickle(str(path))


def test_a_file_that_is_not_a_pickle_is_named(tmp_path):
    path = tmp_path / "data_batch_2"
    path.write_bytes(pickle.dumps(batch())[:100])
    with pytest.raises(C.CifarFormatError, match=f"^{path}: not a readable CIFAR pickle"):
        C.read_pickle(str(path))


# ---------------------------------------------------------------- checked before training
def _bad(case):
    n = 3
    return {
        "label 10": (batch(labels=[0, 10, 3]), "labels must be in 0..9; 1 are not, the first 10 at position 1"),
        "negative label": (batch(labels=[-1, 2, 3]), "labels must be in 0..9; 1 are not, the first -1 at position 0"),
        "fewer labels": (batch(labels=[1, 2]), "2 labels for 3 images (expected one per image)"),
        "more labels": (batch(labels=[1, 2, 3, 4]), "4 labels for 3 images (expected one per image)"),
        "float pixels": (batch(data=np.full((n, 3072), 0.5, np.float32)),
                         "image data has dtype float32, expected uint8 (pixel values 0..255; other pixel "
                         "data is not cast)"),
        "int64 pixels": (batch(data=np.zeros((n, 3072), np.int64)),
                         "image data has dtype int64, expected uint8 (pixel values 0..255; other pixel "
                         "data is not cast)"),
        "wrong size": (batch(data=np.zeros((n, 1024), np.uint8)),
                       "image data has shape [3, 1024], expected [N, 3072] (one 3x32x32 image per row)"),
        "pixels as a list": (batch(data=[[0] * 3072] * n), "data must be a uint8 numpy array [N, 3072], got list"),
        "float labels": (batch(labels=[1.0, 2.5, 3.0]), "labels must be a flat list of integers, got dtype float64"),
        "bool labels": (batch(labels=[True, False, True]), "labels must be a flat list of integers, got booleans"),
        "no labels": ({b"data": np.zeros((n, 3072), np.uint8)}, "no 'labels' entry (the file has b'data')"),
        "not a dict": ([1, 2], "expected a dict with 'data' and ['labels'], got list"),
    }[case]


CASES = ["label 10", "negative label", "fewer labels", "more labels", "float pixels", "int64 pixels",
         "wrong size", "pixels as a list", "float labels", "bool labels", "no labels", "not a dict"]


@pytest.mark.parametrize("case", CASES)
def test_bad_batches_are_named_errors(cifar_root, case):
    root, folder = cifar_root
    d, message = _bad(case)
    path = folder / "data_batch_3"
    path.write_bytes(pickle.dumps(d))
    with pytest.raises(C.CifarFormatError) as e:
        C.load_cifar(str(root))
    assert str(e.value) == f"{path}: {message}"


def test_float_pixels_are_never_cast(cifar_root):
    """The old loader cast [0.5, 200.7] to uint8 [0, 200] silently."""
    root, folder = cifar_root
    (folder / "test_batch").write_bytes(pickle.dumps(batch(data=np.full((3, 3072), 200.7))))
    with pytest.raises(C.CifarFormatError, match="dtype float64, expected uint8"):
        C.load_cifar(str(root))


def test_meta_must_name_ten_classes(cifar_root):
    root, folder = cifar_root
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"a", b"b"]}))
    with pytest.raises(C.CifarFormatError,
                       match=f"^{folder / 'batches.meta'}: label_names must be a list of 10 names, got 2 entries$"):
        C.load_cifar(str(root))


def test_cifar100_label_ranges_are_checked(tmp_path):
    folder = Path(write_cifar_like(str(tmp_path), "cifar100", n_per_file=3, n_test=3))
    C.load_cifar(str(tmp_path), "cifar100")
    with open(folder / "train", "rb") as f:
        d = pickle.load(f)
    d[b"coarse_labels"] = [0, 20, 1]
    (folder / "train").write_bytes(pickle.dumps(d))
    with pytest.raises(C.CifarFormatError, match="coarse_labels must be in 0..19; 1 are not, the first 20"):
        C.load_cifar(str(tmp_path), "cifar100")


# --------------------------------------------------------------- through the example's job
def _main_error(capsys, out, root):
    with pytest.raises(SystemExit) as e:
        mlo_mae_job.main(["--preset", "paper", "--data-dir", str(root), "--quick", "--no-progress",
                          "--device", "cpu", "--out", str(out)])
    assert e.value.code == 2
    cap = capsys.readouterr()
    return cap.err.strip().splitlines(), cap.out


@pytest.mark.parametrize("case", ["label 10", "fewer labels", "float pixels"])
def test_the_job_stops_with_one_error_line_and_writes_nothing(capsys, tmp_path, cifar_root, case):
    root, folder = cifar_root
    d, message = _bad(case)
    path = folder / "data_batch_5"
    path.write_bytes(pickle.dumps(d))
    err, _ = _main_error(capsys, tmp_path / "out", root)
    assert err == [f"error: cannot read CIFAR-10 in {root}: {path}: {message}"]
    assert not (tmp_path / "out").exists()


def test_the_job_refuses_a_pickle_that_runs_code(capsys, tmp_path, cifar_root):
    root, folder = cifar_root
    marker = tmp_path / "ran"
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": RunsShell(marker)}))
    err, _ = _main_error(capsys, tmp_path / "out", root)
    assert len(err) == 1 and err[0].startswith(
        f"error: cannot read CIFAR-10 in {root}: {folder / 'batches.meta'}: refused to read: the pickle "
        f"asks for the global {os.system.__module__}.system")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_the_example_script_refuses_it_in_a_real_process(tmp_path, cifar_root):
    root, folder = cifar_root
    marker = tmp_path / "ran"
    (folder / "data_batch_1").write_bytes(pickle.dumps(batch(data=RunsShell(marker))))
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "mlo_mae_cifar.py"), "--preset", "paper",
                           "--data-dir", str(root), "--quick", "--device", "cpu", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"error: cannot read CIFAR-10 in {root}: {folder / 'data_batch_1'}: refused to read"), err
    assert not marker.exists() and not (tmp_path / "out").exists()
