"""benchmarks/meta_mae_ablation.py's bookkeeping, without training: the job's command line
per (row, seed) and column (the Fashion-MNIST preset for ``--image-data fashion-mnist``),
claims (live owner respected, dead owner's claim taken over), resuming from a stored run
file (checked against the arguments and the preset's settings), the Table-4 layout with
mean ± std over seeds and the floors, and the ``table`` command."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ab():
    spec = importlib.util.spec_from_file_location("meta_mae_ablation", ROOT / "benchmarks" / "meta_mae_ablation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_job_command_lines(ab):
    assert ab.column_of("image", "fashion-mnist") == "image-fmnist" and ab.column_of("image", "digits") == "image"
    assert ab.column_of("tabular", "fashion-mnist") == "tabular"
    last = len(ab.ROWS) - 1
    argv = ab.job_argv("image", "fashion-mnist", 2, last, None)
    assert argv[argv.index("--config") + 1] == "examples/configs/meta_mae_fmnist.yaml"
    assert "--no-floors" not in argv and argv[argv.index("--seed") + 1] == "2"
    argv = ab.job_argv("image", "fashion-mnist", 0, 0, 7)
    assert argv[-3:] == ["--steps", "7", "--no-floors"] and "--decoder-depth" in argv
    assert "--config" not in ab.job_argv("image", "digits", 0, 1, None)
    assert "--config" not in ab.job_argv("tabular", "fashion-mnist", 0, 1, None)
    assert ab.result_name(["image"], "fashion-mnist") == "ablation_fmnist.json"
    assert ab.result_name(["image", "tabular"], "digits") == "ablation.json"
    assert ab.result_name(["tokens"], "fashion-mnist") == "ablation_tokens.json"


def test_claims(ab, tmp_path):
    lock = tmp_path / "x.claim"
    assert ab.claim(lock) and lock.read_text() == str(os.getpid())
    assert not ab.claim(lock)                               # held by a live process (us)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(str(dead.pid))
    assert ab.claim(lock) and lock.read_text() == str(os.getpid())


def _fake_run(ab, argv, column, row, seed, accuracy, **extra):
    return {"modality": "tabular", "column": column, "row": row, "seed": seed, "steps": 5,
            "accuracy": accuracy, "argv": argv, "settings": ab.expected_settings(argv), **extra}


def test_resume_from_stored_runs(ab, tmp_path):
    """A stored run is returned, not re-run; one made with other arguments or settings
    stops the benchmark naming the file; a run claimed by a live process is skipped."""
    argv = ab.job_argv("tabular", "digits", 1, 2, 5)
    done, lock = ab.run_paths(tmp_path, 2, 1)
    assert done.name == "latent-adaptation__seed1.json" and lock.name == "latent-adaptation__seed1.claim"
    done.write_text(json.dumps(_fake_run(ab, argv, "tabular", 2, 1, 0.5)))
    r = ab.one_run(("tabular", "tabular", 1, 2, argv, tmp_path))
    assert r["resumed"] and r["accuracy"] == 0.5 and not lock.exists()
    other = ab.job_argv("tabular", "digits", 1, 2, 6)
    with pytest.raises(ab.StaleRun, match=r"latent-adaptation__seed1\.json holds a run made with other arguments"):
        ab.one_run(("tabular", "tabular", 1, 2, other, tmp_path))
    stale = _fake_run(ab, argv, "tabular", 2, 1, 0.5)
    stale["settings"]["lr"] = 0.5
    done.write_text(json.dumps(stale))
    with pytest.raises(ab.StaleRun, match="other settings"):
        ab.one_run(("tabular", "tabular", 1, 2, argv, tmp_path))
    done.unlink()
    lock.write_text(str(os.getpid()))                       # another worker (alive) is on it
    assert ab.one_run(("tabular", "tabular", 1, 2, argv, tmp_path)) is None and lock.exists()


def test_table_layout_and_command(ab, tmp_path, capsys):
    runs = tmp_path / "runs" / "image-fmnist"
    runs.mkdir(parents=True)
    last = len(ab.ROWS) - 1
    acc = {0: [0.80, 0.82], 1: [0.70, 0.74], last: [0.60, 0.66]}
    for row, values in acc.items():
        for seed, a in enumerate(values):
            argv = ab.job_argv("image", "fashion-mnist", seed, row, None)
            floors = {"random_init_accuracy": 0.5 + seed / 10, "raw_accuracy": 0.83} if row == last else {}
            run = {"column": "image-fmnist", "modality": "image", "row": row, "seed": seed, "steps": 2500,
                   "accuracy": a, "argv": argv, "job_seconds": 60.0 * (row + 1), **floors}
            if (row, seed) != (1, 1):
                ab.write_json(ab.run_paths(runs, row, seed)[0], run)
    table = ab.make_table(ab.gather(tmp_path, ["image-fmnist"], [0, 1]), ["image-fmnist"])["image-fmnist"]
    assert table["MAE, linear decoder"] == "81.00 ± 1.41"
    assert table["MAE, Transformer decoder"] == "70.00 ± 0.00 (n=1)"
    assert table["MetaMAE (adapt + contrast)"] == "63.00 ± 4.24"
    assert table["+ latent adaptation"] == "—"
    assert table["random-init encoder (floor)"] == "55.00 ± 7.07" and table["raw input (floor)"] == "83.00"
    ab.main(["table", "--modalities", "image", "--image-data", "fashion-mnist", "--seeds", "0", "1",
             "--out", str(tmp_path)])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("linear-probe test accuracy (%), mean ± std over seeds [0, 1], [2500] steps")
    assert out[1] == "| row | image-fmnist |" and "| MAE, linear decoder | 81.00 ± 1.41 |" in out
    assert "| raw input (floor) | 83.00 |" in out and "MetaMAE (adapt + contrast): 5.0" in out[-1] and out[-1].startswith("image-fmnist, minutes")
    with pytest.raises(SystemExit) as e:
        ab.main(["table", "--modalities", "tabular", "--out", str(tmp_path)])
    assert e.value.code == 2 and "no finished runs of ['tabular']" in capsys.readouterr().err
