#!/usr/bin/env python
"""Peak memory of the MLO-MAE ``paper`` preset at batch 128, estimated on a CPU.

A benchmark, not a test. The ``paper`` preset (ViT-B/2: 768 wide, 12 layers, 257
tokens; decoder 512 × 8; masking network 196 608 → 512 → 256; finite differences) is
built with a small batch ``B`` on random data in its shapes, in float32, and two
iterations are run (the second one updates the head and the masking network, so
every optimizer state exists). Iterations 3–4 (a pretraining step, then a pretraining
step + the head's update + the mask update with its two finite differences) are then
measured twice over:

* **saved activations**: the live bytes of the tensors autograd saves for backward
  (``torch.autograd.graph.saved_tensors_hooks``; one count per storage, the modules'
  own parameters excluded), their peak and the update in which it happens;
* **peak RSS increase**: the resident set's high-water mark over iterations 3–4 above
  the resident set before them (``benchmarks/rss.py``; glibc's ``malloc_trim`` first, so
  the baseline is the live memory) — everything transient: saved activations,
  temporaries, gradients, the perturbed copies ``θ ± εv`` and the hypergradient vectors.

Each batch size runs in a fresh process (one thread). Both are linear in ``B``
(``a + b·B``: the per-sample activations plus what does not depend on the batch), so
two batch sizes give the line, extrapolated to 128 and added to the static memory:
parameters + gradients + AdamW's two moments = 16 bytes a parameter. The RSS increase
hardly depends on the batch at these sizes (its peak is elsewhere: the gradients and the
perturbed copies ``θ ± εv`` of 111 M pretraining parameters); it is added whole as the
upper end of the range::

    python benchmarks/mlo_mae_memory.py                 # batches 2 and 4, ~3–4 min
    python benchmarks/mlo_mae_memory.py --out docs-table.md

What a GPU adds (not measured here): the CUDA context (~0.5–1 GB, outside
``torch.cuda.max_memory_allocated``), cuBLAS workspaces and the caching allocator's
fragmentation (typically 5–15 %).
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import time
import weakref
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parents[1]
GB = 1e9


class _Held:
    """What the pack hook returns: the saved tensor, released with the graph."""

    __slots__ = ("t", "__weakref__")

    def __init__(self, t):
        self.t = t


class SavedBytes:
    """Live bytes of the tensors autograd saves for backward, deduplicated by storage;
    ``peak`` and the ``phase`` (the update running) at the peak."""

    def __init__(self, exclude):
        self.exclude = exclude          # storage pointers not to count (parameters)
        self.live: Dict[int, List[int]] = {}
        self.now = self.peak = 0
        self.phase = self.peak_phase = ""

    def _release(self, ptr: int) -> None:
        entry = self.live[ptr]
        entry[1] -= 1
        if entry[1] == 0:
            self.now -= entry[0]
            del self.live[ptr]

    def pack(self, t):
        st = t.untyped_storage()
        ptr, n = st.data_ptr(), st.nbytes()
        if ptr in self.exclude or n == 0 or t.device.type != "cpu":
            return t
        held = _Held(t)
        entry = self.live.get(ptr)
        if entry is None:
            self.live[ptr] = [n, 1]
            self.now += n
            if self.now > self.peak:
                self.peak, self.peak_phase = self.now, self.phase
        else:
            entry[1] += 1
        weakref.finalize(held, self._release, ptr)
        return held

    @staticmethod
    def unpack(h):
        return h.t if isinstance(h, _Held) else h


def _malloc_trim() -> None:
    """glibc's ``malloc_trim(0)``: without it, memory freed by the warm-up iterations stays
    resident and is reused, so the peak RSS *increase* under-reports (nothing on other
    C libraries)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure(batch: int, precision: str = "fp32") -> Dict[str, Any]:
    """One batch size (in this process): static sizes, saved-activation peak, RSS peak."""
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch

    import engines.finite_difference as fdm
    import mlo
    import mlo.update as upd
    import rss
    from mlo.config import load_yaml
    from problems.mlo_mae import MLOMAESettings, build

    torch.set_num_threads(1)
    cfg = load_yaml(ROOT / "examples/configs/mlo_mae_paper.yaml")
    s = MLOMAESettings.from_dict(dict(cfg["settings"], batch_size=batch,
                                      method_options=cfg["method_options"]["finite_difference"]))
    g = torch.Generator().manual_seed(0)
    n = 16 * batch
    x = torch.rand(n, s.in_chans, s.image_size, s.image_size, generator=g)
    y = torch.randint(0, s.num_classes, (n,), generator=g)
    graph = build("mlo-mae", s, (x, y), seed=0, engine_config=mlo.EngineConfig(precision=precision))
    engine = graph.engine
    t0 = time.perf_counter()
    engine.run(2)                             # every optimizer state now exists
    warm = time.perf_counter() - t0

    counter = SavedBytes({p.untyped_storage().data_ptr() for P in engine.problems.values()
                          for p in list(P.module.parameters()) + list(P.module.buffers())})
    update, grad_inputs = upd.UpdateMixin._update, fdm._grad_inputs

    def traced_update(self, P):
        prev, counter.phase = counter.phase, f"update of {P.name!r}"
        try:
            return update(self, P)
        finally:
            counter.phase = prev

    def traced_fd(lower, *a, **k):
        prev, counter.phase = counter.phase, f"{counter.phase}: finite difference through {lower.label}"
        try:
            return grad_inputs(lower, *a, **k)
        finally:
            counter.phase = prev

    upd.UpdateMixin._update, fdm._grad_inputs = traced_update, traced_fd
    gc.collect()
    _malloc_trim()      # freed-but-retained heap back to the OS: the baseline is what is live
    before, how = rss.reset_peak()
    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
        engine.run(2)
    seconds = time.perf_counter() - t0
    peak_rss = rss.peak_mb(how)
    upd.UpdateMixin._update, fdm._grad_inputs = update, grad_inputs
    assert engine.records["mask"]["updates"] == 2, engine.records["mask"]
    params = {name: sum(p.numel() for p in P.variables) for name, P in engine.problems.items()}
    return {"batch": batch, "precision": precision, "params": params, "saved_peak_bytes": counter.peak,
            "saved_peak_phase": counter.peak_phase, "rss_before_mb": before,
            "rss_increase_bytes": (peak_rss - before) * 2 ** 20, "rss_method": how,
            "seconds_iterations_1_2": warm, "seconds_iterations_3_4": seconds,
            "torch": torch.__version__}


def extrapolate(rows: List[Dict[str, Any]], target: int) -> Dict[str, Any]:
    """The saved activations' line through the two smallest batches, at ``target``; the
    estimate's range adds the static memory and, for the upper end, the largest RSS
    increase (the batch-independent transient: gradients, ``θ ± εv``, ``v``)."""
    a, b = sorted(rows, key=lambda r: r["batch"])[:2]
    slope = (b["saved_peak_bytes"] - a["saved_peak_bytes"]) / (b["batch"] - a["batch"])
    saved = {"per_sample": slope, "fixed": a["saved_peak_bytes"] - slope * a["batch"],
             "at_target": a["saved_peak_bytes"] + slope * (target - a["batch"])}
    n = sum(a["params"].values())
    static = 16 * n            # fp32 parameter + gradient + AdamW exp_avg, exp_avg_sq
    transient = max(r["rss_increase_bytes"] for r in rows)
    return {"target_batch": target, "saved": saved, "parameters": n, "static_bytes": static,
            "transient_bytes": transient, "low_bytes": static + saved["at_target"],
            "high_bytes": static + saved["at_target"] + transient}


def fits(est: Dict[str, Any], gib: float, context: float = 1e9, slack: float = 0.10) -> int:
    """The largest batch whose upper estimate fits a ``gib`` GiB GPU after the CUDA context
    and ``slack`` of allocator fragmentation."""
    usable = (gib * 2 ** 30 - context) * (1 - slack)
    per = est["saved"]["per_sample"]
    return int((usable - est["static_bytes"] - est["transient_bytes"] - est["saved"]["fixed"]) // per)


def table(rows: List[Dict[str, Any]], est: Dict[str, Any]) -> str:
    lines = ["| batch | saved activations, peak | in | peak RSS increase | s (iterations 3–4) |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['saved_peak_bytes'] / GB:.2f} GB | {r['saved_peak_phase']} | "
                     f"{r['rss_increase_bytes'] / GB:.2f} GB | {r['seconds_iterations_3_4']:.0f} |")
    s = est["saved"]
    lines += ["", f"saved activations: {s['per_sample'] / 1e6:.0f} MB a sample + {s['fixed'] / 1e6:.1f} MB; "
              f"at batch {est['target_batch']}: {s['at_target'] / GB:.1f} GB",
              f"static ({est['parameters'] / 1e6:.1f} M parameters x 16 B): {est['static_bytes'] / GB:.2f} GB; "
              f"batch-independent transient (largest RSS increase): {est['transient_bytes'] / GB:.2f} GB",
              f"peak at batch {est['target_batch']}: {est['low_bytes'] / GB:.1f} – {est['high_bytes'] / GB:.1f} GB "
              f"({est['low_bytes'] / 2 ** 30:.1f} – {est['high_bytes'] / 2 ** 30:.1f} GiB)",
              "largest batch (upper estimate, 1 GB CUDA context, 10 % fragmentation): "
              + ", ".join(f"{g} GiB: {fits(est, g)}" for g in (24, 40, 48, 80))]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[2, 4], help="batch sizes to measure")
    p.add_argument("--target", type=int, default=128, help="batch to extrapolate to (the preset's)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="EngineConfig(precision=...) of the measured run")
    p.add_argument("--out", type=Path, help="also write the table (Markdown) and the raw numbers (.json)")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)      # child process: one batch size
    args = p.parse_args(argv)
    if args.one is not None:
        print(json.dumps(measure(args.one, args.precision)))
        return
    if len(set(args.batches)) < 2:
        p.error("--batches needs two different batch sizes to fit a line")
    rows = []
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    for b in args.batches:
        proc = subprocess.run([sys.executable, __file__, "--one", str(b), "--precision", args.precision],
                              capture_output=True, text=True, env=env, check=False)
        if proc.returncode:
            sys.exit(f"batch {b} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"[mlo_mae_memory] batch {b}: saved activations peak {rows[-1]['saved_peak_bytes'] / GB:.2f} GB "
              f"({rows[-1]['saved_peak_phase']}), peak RSS increase {rows[-1]['rss_increase_bytes'] / GB:.2f} GB",
              flush=True)
    est = extrapolate(rows, args.target)
    text = table(rows, est)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
        args.out.with_suffix(".json").write_text(json.dumps({"rows": rows, "estimate": est}, indent=2) + "\n")


if __name__ == "__main__":
    main()
