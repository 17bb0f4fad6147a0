"""benchmarks/gpu_smoke.py's toy path (what runs on a CPU-only machine) as CI runs it:
a subprocess, both presets in fp32 and bf16, under 60 s; and a failure exits non-zero."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_smoke.py"
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def test_toy_path_runs_both_presets_in_both_precisions(tmp_path):
    out = tmp_path / "smoke.json"
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(SCRIPT), "--toy", "--out", str(out)], capture_output=True,
                          text=True, env=ENV, timeout=60)
    seconds = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert "toy sizes" in lines[0] and "not a measurement" in lines[0], lines[0]
    assert lines[-1] == "[gpu_smoke] all runs passed"
    r = json.loads(out.read_text())
    assert r["toy"] and r["iterations"] == 20 and set(r["jobs"]) == {"mlo_mae", "meta_mae"}
    for name, job in r["jobs"].items():
        for precision in ("fp32", "bf16"):
            run = job["runs"][precision]
            assert run["iterations_per_s"] > 0 and run["peak_memory_gb"] > 0, (name, precision, run)
            assert 0.0 <= run["probe_accuracy"] <= 1.0
        assert math.isfinite(job["agreement"]["cosine"]) and job["agreement"]["rel_error"] >= 0
    # MetaMAE's meta-gradient survives bf16; MLO-MAE's finite differences at ε = 0.01 are
    # below what bf16 resolves, and the run says so.
    assert r["jobs"]["meta_mae"]["agreement"]["cosine"] > 0.99
    assert any("below what bfloat16 (autocast) resolves" in w
               for w in r["jobs"]["mlo_mae"]["runs"]["bf16"]["warnings"])
    assert not r["jobs"]["mlo_mae"]["runs"]["fp32"]["warnings"]
    assert seconds < 60


def test_a_failure_exits_nonzero_after_reporting_it():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--toy", "--jobs", "mlo_mae",
                           "--mlo-mae-batch-size", "0"], capture_output=True, text=True, env=ENV, timeout=60)
    assert proc.returncode == 1
    assert "[gpu_smoke] mlo_mae: FAILED to set up: ValueError: MLOMAESettings: batch_size must be an integer >= 1" \
        in proc.stdout, proc.stdout
    assert proc.stdout.splitlines()[-1] == "[gpu_smoke] FAILED: mlo_mae"
