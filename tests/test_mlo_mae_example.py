"""The MLO-MAE main job (examples/mlo_mae_cifar.py = problems.jobs.mlo_mae_job.main) end to end: tiny runs of the cpu preset (mlo-mae, mae,
blo-mae), resume from the written checkpoint, a fake CIFAR-10 in the official
format through the paper preset shrunk with --set, fake Fashion-MNIST IDX files through
``--data fashion-mnist``, and bad input (one ``error:`` line, exit code 2)."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import re
from pathlib import Path

import pytest
import torch

import mlo.checkpoint
from problems.datasets import IDX_RESOURCES, idx, load_digits, write_cifar_like, write_mnist_like
from problems.jobs import mlo_mae_data, mlo_mae_job
from problems.jobs.common import UsageError
from problems.jobs.mlo_mae_options import parse_args, read_preset
from problems.mlo_mae import MLOMAESettings, build

LAST_LINE = re.compile(r"^linear-probe test accuracy: \d+\.\d\d%$")
PNG = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("restore_threads")


@pytest.fixture(scope="module")
def script():
    """The job's ``main(argv)`` (the example script is only its command line)."""
    return mlo_mae_job


def run(script, capsys, out, *extra):
    argv = ["--quick", "--no-progress", "--device", "cpu", "--out", str(out), *extra]
    accuracy = script.main(argv)
    stdout = capsys.readouterr().out
    return accuracy, stdout.strip().splitlines()


def read_csv(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


@pytest.fixture(scope="module")
def quick_run(script, tmp_path_factory):
    """One 20-step mlo-mae run of the cpu preset, shared by the checks below:
    ``(out dir, returned accuracy, stdout lines)``."""
    out = tmp_path_factory.mktemp("quick")
    buf, n = io.StringIO(), torch.get_num_threads()
    with contextlib.redirect_stdout(buf):   # capsys is function-scoped
        acc = script.main(["--quick", "--preset", "cpu", "--steps", "20", "--no-progress",
                           "--device", "cpu", "--out", str(out)])
    torch.set_num_threads(n)
    return out, acc, buf.getvalue().strip().splitlines()


def test_quick_run_outputs(quick_run):
    out, acc, lines = quick_run
    assert LAST_LINE.match(lines[-1]), lines[-1]
    assert lines[-1] == f"linear-probe test accuracy: {100 * acc:.2f}%"
    header, rows = read_csv(out / "metrics.csv")
    assert header == ["iteration", "seconds", "loss_pretrain", "loss_finetune", "loss_mask",
                      "mask_hypergrad_norm", "seconds_pretrain", "seconds_finetune", "seconds_mask"]
    assert [int(r[0]) for r in rows] == [10, 20]
    for r in rows:
        assert all(v != "" for v in r), r          # every problem has updated by iteration 10
        assert all(float(v) >= 0 for v in r[5:])    # norm and seconds
    assert (out / "masks.png").read_bytes()[:8] == PNG
    import matplotlib.image
    assert matplotlib.image.imread(out / "masks.png").ndim == 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["accuracy"] == pytest.approx(acc) and 0.0 <= acc <= 1.0
    assert summary["variant"] == "mlo-mae" and summary["method"] == "finite_difference"
    assert summary["steps"] == 20 and summary["data"] == "digits"
    assert set(summary["problem_seconds"]) == {"pretrain", "finetune", "mask"}
    assert len(summary["mean_mask_probability"]) == 16
    assert all(0.0 < p < 1.0 for p in summary["mean_mask_probability"])
    assert sum(summary["mask_frequency"]) == pytest.approx(12)   # 12 of 16 patches masked
    try:                                                        # TensorBoard is optional
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        assert not (out / "tb").exists()
    else:
        assert list((out / "tb").iterdir())                     # TensorBoard events


def test_checkpoint_loads_into_the_same_graph(quick_run):
    out = quick_run[0]
    summary = json.loads((out / "summary.json").read_text())
    settings = MLOMAESettings.from_dict(summary["settings"])
    train = load_digits(seed=0, fractions=(0.8, 0.0, 0.2)).train.tensors
    graph = build("mlo-mae", settings, train, seed=0)
    mlo.checkpoint.load(graph.engine, out / "checkpoint.pt")
    assert graph.engine.iteration == 20
    assert graph.problems["mask"].step_count == 10   # unroll 2: one mask update per 2 iterations


def test_resume_continues(script, capsys, quick_run, tmp_path):
    out = tmp_path / "resumed"
    out.mkdir()
    (out / "metrics.csv").write_text((quick_run[0] / "metrics.csv").read_text())
    acc, lines = run(script, capsys, out, "--preset", "cpu", "--steps", "30",
                     "--resume", str(quick_run[0] / "checkpoint.pt"))
    assert any("resumed from" in line and "at iteration 20" in line for line in lines)
    assert LAST_LINE.match(lines[-1])
    _, rows = read_csv(out / "metrics.csv")
    assert [int(r[0]) for r in rows] == [10, 20, 30]           # appended after the saved rows
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 30
    assert summary["problem_updates"] == {"pretrain": 30, "finetune": 15, "mask": 15}   # records are checkpointed


@pytest.mark.parametrize("variant,columns", [
    ("mae", ["iteration", "seconds", "loss_pretrain", "seconds_pretrain"]),
    ("blo-mae", ["iteration", "seconds", "loss_pretrain", "loss_mask", "mask_hypergrad_norm",
                 "seconds_pretrain", "seconds_mask"]),
])
def test_variants(script, capsys, tmp_path, variant, columns):
    acc, lines = run(script, capsys, tmp_path, "--preset", "cpu", "--variant", variant, "--steps", "4")
    assert LAST_LINE.match(lines[-1])
    header, rows = read_csv(tmp_path / "metrics.csv")
    assert header == columns and [int(r[0]) for r in rows] == [4]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["variant"] == variant and summary["steps"] == 4
    assert (summary["mean_mask_probability"] is None) == (variant == "mae")
    assert (tmp_path / "masks.png").read_bytes()[:8] == PNG


def test_paper_preset_on_cifar_format(script, capsys, tmp_path):
    root = tmp_path / "data"
    write_cifar_like(str(root), "cifar10", n_per_file=8, n_test=8)
    tiny = {"embed_dim": 32, "depth": 1, "num_heads": 4, "decoder_dim": 32, "decoder_depth": 1,
            "decoder_heads": 4, "mask_hidden": 16, "batch_size": 4, "pretrain_lr": "1e-3"}
    sets = [a for k, v in tiny.items() for a in ("--set", f"{k}={v}")]
    acc, lines = run(script, capsys, tmp_path / "out", "--preset", "paper", "--data-dir", str(root),
                     "--steps", "3", *sets)
    assert LAST_LINE.match(lines[-1])
    assert not any("CIFAR-10 not found" in line for line in lines)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["data"] == "cifar10" and summary["steps"] == 3
    s = summary["settings"]
    assert (s["image_size"], s["patch_size"], s["in_chans"], s["embed_dim"]) == (32, 2, 3, 32)
    assert s["pretrain_lr"] == 1e-3 and s["norm_pix"] is True
    assert len(summary["mean_mask_probability"]) == 256
    assert (tmp_path / "out" / "masks.png").read_bytes()[:8] == PNG


def test_paper_preset_offline_falls_back_to_cpu(script, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(mlo_mae_data, "DEFAULT_DATA_DIRS", (str(tmp_path / "no_data"),))
    monkeypatch.setattr(mlo_mae_data, "online", lambda *a, **k: False)
    acc, lines = run(script, capsys, tmp_path / "out", "--preset", "paper", "--steps", "2",
                     "--method", "cg")
    loud = [line for line in lines if "CIFAR-10 not found" in line]
    assert len(loud) == 1 and "(offline)" in loud[0] and "cpu preset" in loud[0]
    assert LAST_LINE.match(lines[-1])
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["data"] == "digits" and summary["method"] == "cg"
    assert summary["settings"]["method_options"] == {"max_iter": 5}   # CG is never unbounded


def bad_inputs(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint\x00\x01")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "key.yaml").write_text("data: digits\nsettings: {embed_dim: 64}\nschedule: 3\n")
    (tmp_path / "setting.yaml").write_text("data: digits\nsettings: {embed_dim: 64, emb_dim: 3}\n")
    return {
        "empty resume file": (["--resume", str(tmp_path / "empty.pt")], "not a readable checkpoint"),
        "corrupt resume file": (["--resume", str(tmp_path / "corrupt.pt")], "cannot resume"),
        "foreign resume file": (["--resume", str(tmp_path / "foreign.pt")], "not an mlo checkpoint"),
        "missing resume file": (["--resume", str(tmp_path / "nope.pt")], "does not exist"),
        "paper without CIFAR": (["--preset", "paper", "--data-dir", str(tmp_path / "empty_dir")],
                                "no CIFAR-10 in --data-dir"),
        "preset unknown key": (["--preset-file", str(tmp_path / "key.yaml")], "unknown key(s) ['schedule']"),
        "preset unknown setting": (["--preset-file", str(tmp_path / "setting.yaml")], "['emb_dim']"),
        "--set unknown setting": (["--preset", "cpu", "--set", "embed=3"], "['embed']"),
        "--set invalid value": (["--preset", "cpu", "--set", "mask_ratio=1.5"], "mask_ratio"),
    }


CASES = ["empty resume file", "corrupt resume file", "foreign resume file", "missing resume file",
         "paper without CIFAR", "preset unknown key", "preset unknown setting",
         "--set unknown setting", "--set invalid value"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_error_line(script, capsys, tmp_path, case):
    argv, expected = bad_inputs(tmp_path)[case]
    with pytest.raises(SystemExit) as exc:
        script.main(["--quick", "--no-progress", "--device", "cpu", "--out", str(tmp_path / "out"), *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert expected in err[0], err[0]
    assert not (tmp_path / "out" / "checkpoint.pt").exists()


# ------------------------------------------------------- Fashion-MNIST / MNIST (IDX files)
IDX_TINY = {"image_size": 28, "patch_size": 7, "in_chans": 1, "embed_dim": 32, "depth": 1,
            "decoder_dim": 32, "mask_hidden": 16, "batch_size": 4}


@pytest.fixture
def no_idx_elsewhere(script, tmp_path, monkeypatch):
    """Neither the machine's /usr/share/datasets nor the network: only --data-dir counts."""
    for name in IDX_RESOURCES:
        monkeypatch.setitem(idx.IDX_SYSTEM_DIRS, name, str(tmp_path / "system" / name))
    monkeypatch.setattr(mlo_mae_data, "online", lambda *a, **k: False)


def test_fashion_mnist_from_data_dir(script, capsys, tmp_path, no_idx_elsewhere):
    raw = tmp_path / "data" / "FashionMNIST" / "raw"          # torchvision's layout
    write_mnist_like(str(raw), n_train=40, n_test=10)
    sets = [a for k, v in IDX_TINY.items() for a in ("--set", f"{k}={v}")]
    acc, lines = run(script, capsys, tmp_path / "out", "--preset", "cpu", "--data", "fashion-mnist",
                     "--data-dir", str(tmp_path / "data"), "--steps", "3", *sets)
    assert f"[mlo_mae] fashion-mnist read from {raw}" in lines
    assert any("(fashion-mnist: train 40, test 10)" in line for line in lines)
    assert LAST_LINE.match(lines[-1])
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["data"] == "fashion-mnist" and summary["steps"] == 3
    assert (summary["settings"]["image_size"], summary["settings"]["in_chans"]) == (28, 1)
    assert len(summary["mean_mask_probability"]) == 16        # (28 / 7)² patches


def test_preset_data_fashion_mnist_is_accepted(tmp_path):
    (tmp_path / "p.yaml").write_text("data: fashion-mnist\nsettings: {image_size: 28}\n")
    assert read_preset(tmp_path / "p.yaml")["data"] == "fashion-mnist"
    (tmp_path / "q.yaml").write_text("data: svhn\n")
    with pytest.raises(UsageError, match="data must be one of cifar10, digits, fashion-mnist, mnist"):
        read_preset(tmp_path / "q.yaml")


@pytest.mark.parametrize("case", ["corrupt file", "missing", "mnist missing", "download fails"])
def test_idx_bad_input_is_one_error_line(script, capsys, tmp_path, monkeypatch, no_idx_elsewhere, case):
    data = tmp_path / "data"
    write_mnist_like(str(data), n_train=8, n_test=4)
    bad = data / "train-labels-idx1-ubyte.gz"
    bad.write_bytes(b"not gzip")
    empty = tmp_path / "empty"
    empty.mkdir()
    argv, expected = {
        "corrupt file": (["--data", "fashion-mnist", "--data-dir", str(data)],
                         f"cannot read fashion-mnist: {bad}: not a valid gzip stream"),
        "missing": (["--data", "fashion-mnist", "--data-dir", str(empty)],
                    "install it with `apt-get install dataset-fashion-mnist`, or pass --download to fetch it"),
        "mnist missing": (["--data", "mnist", "--data-dir", str(empty)],
                          f"no mnist IDX files in {empty}, {empty / 'MNIST' / 'raw'}, "),
        "download fails": (["--data", "fashion-mnist", "--data-dir", str(empty), "--download"],
                           "the download from http://fashion-mnist"),
    }[case]

    def offline(*a, **k):
        raise OSError("network unreachable")
    monkeypatch.setattr(idx.urllib.request, "urlopen", offline)
    with pytest.raises(SystemExit) as exc:
        script.main(["--quick", "--no-progress", "--device", "cpu", "--out", str(tmp_path / "out"),
                     "--preset", "cpu", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert expected in err[0], err[0]
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------- run folders, periodic checkpoints (issue 20)
def test_quick_runs_default_to_their_own_folder():
    assert parse_args([]).out == Path("runs/mlo_mae")
    assert parse_args(["--quick"]).out == Path("runs/mlo_mae_quick")
    assert parse_args(["--quick", "--out", "x"]).out == Path("x")


def test_a_folder_holding_a_run_is_refused_untouched(script, capsys, quick_run):
    out = quick_run[0]
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(SystemExit) as exc:
        script.main(["--quick", "--no-progress", "--device", "cpu", "--out", str(out), "--steps", "2"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --out {out} already holds a run (summary.json, checkpoint.pt); pass --out DIR "
                   f"for a new folder, --overwrite to replace it, or --resume {out / 'checkpoint.pt'} to "
                   f"continue it"]
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_resume_in_place_with_periodic_checkpoints_then_overwrite(script, capsys, quick_run, tmp_path):
    """--resume from the folder's own checkpoint continues the run there (no --overwrite
    needed), writing checkpoints/ckpt-<iteration>.pt every N iterations, the newest K kept;
    --overwrite then replaces the run (old checkpoints gone)."""
    import shutil
    out = tmp_path / "run"
    shutil.copytree(quick_run[0], out)
    acc, lines = run(script, capsys, out, "--preset", "cpu", "--steps", "30", "--checkpoint-every", "4",
                     "--checkpoint-keep", "2", "--resume", str(out / "checkpoint.pt"))
    assert any("resumed from" in line and "at iteration 20" in line for line in lines)
    assert [i for i, _ in mlo.checkpoint.list_checkpoints(out / "checkpoints")] == [24, 28]
    _, rows = read_csv(out / "metrics.csv")
    assert [int(r[0]) for r in rows] == [10, 20, 30]
    assert json.loads((out / "summary.json").read_text())["steps"] == 30
    # a periodic checkpoint of the folder resumes too (into the same folder)
    acc, lines = run(script, capsys, out, "--preset", "cpu", "--steps", "30",
                     "--resume", mlo.checkpoint.latest(out / "checkpoints"))
    assert any("at iteration 28" in line for line in lines)
    # --overwrite: a new run in the folder, the old run's checkpoints deleted first
    acc, lines = run(script, capsys, out, "--preset", "cpu", "--steps", "3", "--overwrite")
    assert LAST_LINE.match(lines[-1])
    assert mlo.checkpoint.list_checkpoints(out / "checkpoints") == []
    assert json.loads((out / "summary.json").read_text())["steps"] == 3


@pytest.mark.parametrize("argv,expected", [
    (["--checkpoint-every", "0"], "error: --checkpoint-every must be >= 1, got 0"),
    (["--checkpoint-every", "5", "--checkpoint-keep", "0"], "error: --checkpoint-keep must be >= 1, got 0"),
])
def test_bad_checkpoint_flags_are_one_error_line(script, capsys, tmp_path, argv, expected):
    with pytest.raises(SystemExit) as exc:
        script.main(["--quick", "--no-progress", "--device", "cpu", "--out", str(tmp_path / "out"), *argv])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [expected]


def test_the_example_script_is_the_jobs_command_line(tmp_path):
    """examples/mlo_mae_cifar.py runs problems.jobs.mlo_mae_job.main: its --help is the
    script's docstring, and bad input exits with code 2 and one error line."""
    import subprocess
    import sys
    script = Path(__file__).resolve().parents[1] / "examples" / "mlo_mae_cifar.py"
    help_text = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True,
                               check=True).stdout
    assert "MLO-MAE on CIFAR-10" in help_text and "--checkpoint-every" in help_text
    proc = subprocess.run([sys.executable, str(script), "--checkpoint-every", "0", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: --checkpoint-every must be >= 1, got 0"]


@pytest.fixture
def default_sigint():
    """Python's own SIGINT handler (the one mlo defers), whatever the test runner set."""
    import signal
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


def _tensors(path):
    blob = torch.load(path, weights_only=True)
    return {n: p["module"] for n, p in blob["problems"].items()}, blob["iteration"]


def test_ctrl_c_saves_a_checkpoint_and_the_resume_line_continues_bit_for_bit(
        script, capsys, quick_run, tmp_path, monkeypatch, default_sigint):
    """Ctrl-C during iteration 7 stops at its end (the cpu preset's methods open no
    window) with exit code 130, a checkpoint and one line saying how to resume; running
    that line ends exactly where the uninterrupted 20-step run ended."""
    import os
    import shlex
    import signal
    real = mlo_mae_job.MetricsRows.after_iteration

    def after_iteration(self, engine):
        real(self, engine)
        if engine.iteration == 7:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(mlo_mae_job.MetricsRows, "after_iteration", after_iteration)
    out = tmp_path / "stopped"
    with pytest.raises(SystemExit) as e:
        run(script, capsys, out, "--preset", "cpu", "--steps", "20")
    assert e.value.code == 130
    lines = capsys.readouterr().out.strip().splitlines()
    line = lines[-1]
    assert line.startswith("[mlo_mae] SIGINT (Ctrl-C) received: run stopped after iteration 7") and \
        f"saved {out / 'checkpoint.pt'} (iteration 7 of 20)" in line, line
    command = shlex.split(line.split("Resume with: ", 1)[1])
    assert command[:2] == ["python", "examples/mlo_mae_cifar.py"] and command[-2:] == [
        "--resume", str(out / "checkpoint.pt")]
    monkeypatch.setattr(mlo_mae_job.MetricsRows, "after_iteration", real)
    acc = script.main(command[2:])
    assert acc == quick_run[1]
    got, it = _tensors(out / "checkpoint.pt")
    ref, it_ref = _tensors(quick_run[0] / "checkpoint.pt")
    assert it == it_ref == 20
    assert got.keys() == ref.keys() and all(
        got[n].keys() == ref[n].keys() and all(torch.equal(got[n][k], ref[n][k]) for k in ref[n]) for n in ref)


def test_resume_accepts_a_run_folder(script, capsys, quick_run, tmp_path):
    import shutil
    out = tmp_path / "run"
    shutil.copytree(quick_run[0], out)
    acc, lines = run(script, capsys, out, "--preset", "cpu", "--steps", "22", "--resume", str(out))
    assert any("resumed from" in line and "at iteration 20" in line for line in lines)
    with pytest.raises(SystemExit):
        run(script, capsys, tmp_path / "x", "--resume", str(tmp_path))
    err = capsys.readouterr().err
    assert f"error: --resume {tmp_path} is a folder with no checkpoint.pt" in err


def test_sigterm_stops_the_script_with_exit_code_143(tmp_path):
    """The real script under SIGTERM (as a scheduler or torchrun sends it): the run stops at
    an iteration boundary, saves its checkpoint and exits with 143."""
    import signal
    import subprocess
    import sys
    import time
    out = tmp_path / "run"
    script_path = Path(__file__).resolve().parents[1] / "examples" / "mlo_mae_cifar.py"
    proc = subprocess.Popen([sys.executable, str(script_path), "--quick", "--preset", "cpu", "--steps", "100000",
                             "--no-progress", "--device", "cpu", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 600          # generous: the machine may be loaded
        while not (out / "metrics.csv").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, stderr
    assert "SIGTERM received: run stopped after iteration" in stdout and "Resume with: " in stdout
    assert (out / "checkpoint.pt").is_file() and "Traceback" not in stderr
