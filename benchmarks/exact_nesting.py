#!/usr/bin/env python
"""Benchmark: memory and time of ``EngineConfig(nesting="exact")`` vs ``"betty"`` as K grows.

A benchmark, not a test: it prints (and writes) a Markdown table and raw JSON.

The graph is the three-level quadratic of ``tests/test_exact_nesting.py`` (float64),
with a larger dimension ``d`` (default 2000, dense ``A``: one state vector is 16 KB,
``A`` itself 32 MB, allocated before the baseline)::

    B (θ):  f_B(θ; μ, λ) = ½‖θ − Aμ − λ‖²          reads T and M, unrolled K_B = K
    M (μ):  f_M(μ; θ)    = ½‖θ − c‖² + ½ρ‖μ‖²      reads B,       unrolled K_M = K
    T (λ):  F_T(μ)       = ½‖μ − m‖²               reads M (the single top)

One top update = K·K bottom steps + K middle steps + 1 top step (``K²`` engine
iterations). Modes run by default: ``exact`` and ``betty`` (the engine) and
``ref_partial``, a plain-autograd nested unroll without the engine (:class:`Reference`):
every bottom step uses ``∂f_B/∂θ`` at the current μ, λ (the gradient w.r.t. a fresh view
of θ), plain SGD at every level, differentiated totally — the correct nested unroll (the
reference of ``tests/test_exact_nesting.py``) and the memory floor of exact nesting
(all K² + K step graphs, nothing more). The engine's exact mode takes the bottom level's
gradient the same way (since commit c55c876) and reproduces ``ref_partial``: the λ-
hypergradient and θ, μ, λ after each of two top updates agree to ~1e-16 (checked at
d=50 before the measurement, printed and written). Memory and time of ``exact`` grow
~K² like ``ref_partial``.

Optional mode ``ref_total`` (``--modes exact,betty,ref_partial,ref_total``; not run by
default): the flawed variant, kept to show what the fix changed. Its
``autograd.grad(f_B, θ)`` on the live θ also follows μ's dependence on earlier θ
(through M's hypergradient graph) after M's first update — what the engine's exact mode
computed before c55c876: hypergradient off by ~1e-2 (the consistency table then also
shows exact vs ref_total), memory and time ~K³ (at K=16 one top update took ~16 s);
it stops at ``--max-k-slow`` (default 16). For every K and mode, in a fresh subprocess:

1. Memory: peak RSS of one top update above the resident set just before it. After
   setup (``A``, the engine) and a warm-up top update of a separate K=1 engine (lazy
   initialisation of torch/autograd), freed heap is returned with ``malloc_trim(0)``,
   the high-water mark is reset (``/proc/self/clear_refs`` ← 5, Linux ≥ 4.0) and
   ``VmHWM − VmRSS(before)`` is read after the update. ``ru_maxrss`` (not resettable)
   is the fallback only. CPU tensors come from malloc, so RSS is what we can see.
2. Open windows right before the top update (``engine.open_windows()`` after K²−1
   iterations): the steps whose differentiable graphs are alive at the peak. Analytic
   count: exact keeps all K² bottom and K middle steps (each middle step with the
   double-backward graph of its gradient through its K bottom steps) until the top
   update; betty keeps one window of K steps per level.
3. Time: wall time (and CPU time: the machine may be shared) of one top update, median
   of ``--repeats`` (default 3) further top updates in the same subprocess (the first,
   measured for memory, is excluded).

Fits, per mode, of memory and CPU time: least squares of ``y = a + b·K + c·K²`` and the
power p of y ≈ C·K^p (log-log least squares over K ≥ 4).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/exact_nesting.py [--d 2000] [--ks 2,4,8,16,32]
        [--repeats 3] [--modes exact,betty,ref_partial[,ref_total]] [--max-k-slow 16]
    [--outdir benchmarks/results/exact_nesting]
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Dict, List

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import mlo  # noqa: E402
from problems import nesting  # noqa: E402
from rss import peak_mb, reset_peak  # noqa: E402  (benchmarks/rss.py)

DT = torch.float64
RHO = 0.3
ETA_B, ETA_M, ETA_T = 0.7, 0.4, 0.05


# ====================================================================== problem
def data(d: int, seed: int = 0) -> Dict[str, torch.Tensor]:
    """``A = I + 0.3/√d · N(0, 1)`` (dense; ‖A‖ ≈ 1.6 so the step sizes of the test stay stable)."""
    g = torch.Generator().manual_seed(seed)
    A = torch.eye(d, dtype=DT) + (0.3 / math.sqrt(d)) * torch.randn(d, d, generator=g, dtype=DT)
    return dict(A=A, **{k: torch.randn(d, generator=g, dtype=DT) for k in ("c", "m", "lam", "mu", "th")})


def build(P: Dict[str, torch.Tensor], K: int, mode: str) -> mlo.Engine:
    """:func:`problems.nesting.build` (``examples/nesting.py``'s graph) at this benchmark's rates."""
    return nesting.build(P, K, mode, rho=RHO, eta_b=ETA_B, eta_m=ETA_M, lr_top=ETA_T)


def top_update(eng: mlo.Engine, K: int) -> None:
    for _ in range(K * K):
        eng.step()


# ============================================================ child (one config)
def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class Reference:
    """One top update by plain autograd (no engine): the nested unroll, state carried over.

    ``partial=True`` (``ref_partial``, correct): each bottom step uses ``∂f_B/∂θ`` at the
    current μ, λ (the gradient is taken w.r.t. a fresh view of θ, so μ's dependence on
    earlier θ is not followed; its graph to μ, λ, θ is kept): plain SGD at every level,
    differentiated totally — the reference of ``tests/test_exact_nesting.py``, which the
    engine's exact mode reproduces, and the memory floor of exact nesting (all K² + K
    step graphs, nothing more). ``partial=False`` (``ref_total``, the flawed variant, kept
    to show what the fix changed): ``autograd.grad(f_B, θ)`` on the live θ, which also
    follows μ_j(θ) through M's hypergradient graph — what the engine computed before
    c55c876."""

    def __init__(self, P, K: int, partial: bool):
        self.P, self.K, self.partial = P, K, partial
        self.lam, self.mu, self.th = P["lam"].clone(), P["mu"].clone(), P["th"].clone()
        self.hyper = None

    def __call__(self):
        P, K = self.P, self.K
        A, c, m = P["A"], P["c"], P["m"]
        lam = self.lam.clone().requires_grad_()
        mu, th = self.mu.clone().requires_grad_(), self.th.clone().requires_grad_()
        for _ in range(K):
            for _ in range(K):
                x = th.view_as(th) if self.partial else th
                (g,) = torch.autograd.grad(0.5 * ((x - A @ mu - lam) ** 2).sum(), x, create_graph=True)
                th = th - ETA_B * g
            (g,) = torch.autograd.grad(0.5 * ((th - c) ** 2).sum() + 0.5 * RHO * (mu ** 2).sum(), mu,
                                       create_graph=True)
            mu = mu - ETA_M * g
        (h,) = torch.autograd.grad(0.5 * ((mu - m) ** 2).sum(), lam)
        self.hyper = h
        self.lam, self.mu, self.th = (lam - ETA_T * h).detach(), mu.detach(), th.detach()


def child(mode: str, K: int, d: int, repeats: int) -> dict:
    torch.set_num_threads(1)
    P = data(d)

    def make(k):
        if mode in ("exact", "betty"):
            eng = build(P, k, mode)
            return eng, (lambda: top_update(eng, k))
        ref = Reference(P, k, partial=(mode == "ref_partial"))
        return ref, ref

    _, warm = make(1)                      # torch / autograd / engine lazy initialisation
    warm()
    del warm, _
    obj, update = make(K)
    _trim()
    base, how = reset_peak()
    t0, c0 = time.perf_counter(), time.process_time()
    live = None
    if isinstance(obj, mlo.Engine):
        for _ in range(K * K - 1):
            obj.step()
        live = dict(obj.open_windows())    # the steps whose graphs are alive at the peak
        obj.step()                         # the top update consumes the nest
    else:
        update()
    first_s, first_cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = peak_mb(how)
    if isinstance(obj, mlo.Engine):
        assert obj.counts() == {"B": K * K, "M": K, "T": 1}, obj.counts()
        assert not obj.open_windows()
        hyper = obj.last_hypergradient["T"]["lam"]
    else:
        hyper = obj.hyper
    secs, cpus = [first_s], [first_cpu]
    if repeats:
        secs, cpus = [], []
        for _ in range(repeats):
            t, c = time.perf_counter(), time.process_time()
            update()
            secs.append(time.perf_counter() - t)
            cpus.append(time.process_time() - c)
    return dict(mode=mode, K=K, d=d, base_mb=base, extra_mb=peak - base, how=how,
                live_at_peak=live, hypergrad_norm=float(torch.linalg.vector_norm(hyper)),
                first_update_s=first_s, time_s=statistics.median(secs), cpu_s=statistics.median(cpus),
                time_samples_s=secs, timed_updates=len(secs) if repeats else 0)


def run_child(mode: str, K: int, d: int, repeats: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--_child", mode, str(K),
                          str(d), str(repeats)], capture_output=True, text=True, cwd=ROOT, env=env)
    if out.returncode:
        raise RuntimeError(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ====================================================================== analysis
MODES = {"exact": "engine, nesting='exact'", "betty": "engine, nesting='betty' (default)",
         "ref_partial": "plain autograd, ∂f_B/∂θ at fixed μ, λ (correct nested unroll; floor)",
         "ref_total": "plain autograd, grad(f_B, live θ) (the flawed variant, kept to show what the fix changed)"}


def analytic_live(mode: str, K: int) -> Dict[str, int]:
    """Step graphs alive at the top update: exact (and the references) all K² + K, betty
    one window of K per level (at most K − 1 bottom + K − 1 middle steps taken before)."""
    return {"B": K * K, "M": K} if mode != "betty" else {"B": K, "M": K}


def lstsq(xs: List[List[float]], ys: List[float]) -> List[float]:
    X = torch.tensor(xs, dtype=DT)
    y = torch.tensor(ys, dtype=DT).unsqueeze(1)
    return torch.linalg.lstsq(X, y).solution.squeeze(1).tolist()


def fit(rows: List[dict], field: str = "extra_mb") -> dict:
    """``y = a + b·K + c·K²`` by least squares, and the power ``p`` of ``y ≈ C·K^p``
    (log-log least squares over K ≥ 4: at K = 2 the fixed costs dominate)."""
    ks = [r["K"] for r in rows]
    ys = [r[field] for r in rows]
    out: dict = dict(field=field, ks=ks)
    if len(ks) >= 3:
        a, b, c = lstsq([[1.0, k, k * k] for k in ks], ys)
        pred = [a + b * k + c * k * k for k in ks]
        ss = sum((y - p) ** 2 for y, p in zip(ys, pred))
        tot = sum((y - statistics.mean(ys)) ** 2 for y in ys) or 1.0
        out.update(a=a, b=b, c=c, r2=1 - ss / tot)
    big = [(k, y) for k, y in zip(ks, ys) if k >= 4 and y > 0]
    out["loglog_slope"] = (lstsq([[1.0, math.log(k)] for k, _ in big], [math.log(y) for _, y in big])[1]
                           if len(big) >= 2 else None)
    out["ks_in_slope"] = [k for k, _ in big]
    return out


def consistency(d: int = 50, ks=(2, 3), total: bool = False) -> List[dict]:
    """Small-d cross-checks (two top updates each, relative L2 differences): the engine's
    exact λ-hypergradient and its θ, μ, λ vs ``ref_partial`` after each update (λ is
    updated with the compared hypergradient, so the states stay comparable); betty's θ, μ
    vs ``ref_partial``'s after the first update (both plain SGD at every level; afterwards
    λ differs: betty's hypergradient is 0). ``total``: also exact's hypergradient vs the
    flawed ``ref_total`` (what the fix changed)."""
    P = data(d)
    out = []

    def rel(a, b):
        return float((a.detach() - b).norm() / b.norm())

    for K in ks:
        ex, bt = build(P, K, "exact"), build(P, K, "betty")
        rp = Reference(P, K, True)
        rt = Reference(P, K, False) if total else None
        for it in range(2):
            for f in (lambda: top_update(ex, K), lambda: top_update(bt, K), rp, rt):
                if f is not None:
                    f()
            st = {n: {v: e.problems[p].module.get_parameter(v) for p, v in (("B", "th"), ("M", "mu"),
                                                                             ("T", "lam"))}
                  for n, e in (("exact", ex), ("betty", bt))}
            h = ex.last_hypergradient["T"]["lam"]
            c = dict(K=K, d=d, top_update=it + 1,
                     exact_hyper_vs_ref_partial=rel(h, rp.hyper),
                     exact_theta_vs_ref_partial=rel(st["exact"]["th"], rp.th),
                     exact_mu_vs_ref_partial=rel(st["exact"]["mu"], rp.mu),
                     exact_lam_vs_ref_partial=rel(st["exact"]["lam"], rp.lam),
                     betty_theta_vs_ref_partial=rel(st["betty"]["th"], rp.th) if it == 0 else None,
                     betty_mu_vs_ref_partial=rel(st["betty"]["mu"], rp.mu) if it == 0 else None,
                     betty_hyper_norm=float(bt.last_hypergradient["T"]["lam"].norm()))
            if rt is not None:
                c["exact_hyper_vs_ref_total"] = rel(h, rt.hyper)
            out.append(c)
    return out


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"torch {torch.__version__}, 1 intra-op thread, Python {platform.python_version()}")


def _f(x, spec):
    return "—" if x is None else format(x, spec)


def table(rows: List[dict], fits: Dict[str, dict], d: int, modes: List[str]) -> str:
    by = {(r["mode"], r["K"]): r for r in rows}
    ks = sorted({r["K"] for r in rows})
    out = [f"### One top update (K² bottom + K middle steps), d={d}, float64, 1 thread", "",
           "Peak extra RSS (MB) above the resident set just before the update, fresh process each; "
           "s = median wall seconds per top update (CPU seconds in the JSON). Modes: "
           + "; ".join(f"`{m}` = {MODES[m]}" for m in modes) + ".", "",
           "| K | K² | " + " | ".join(f"{m} MB" for m in modes) + " | "
           + " | ".join(f"{m} s" for m in modes) + " | live B+M exact / betty (measured) |",
           "|" + "---|" * (3 + 2 * len(modes))]
    for k in ks:
        mb = [_f(by[(m, k)]["extra_mb"], ".1f") if (m, k) in by else "—" for m in modes]
        ts = [_f(by[(m, k)]["time_s"], ".3f") if (m, k) in by else "—" for m in modes]

        def live(m):
            r = by.get((m, k))
            return "—" if r is None or not r["live_at_peak"] else \
                f"{r['live_at_peak'].get('B', 0) + 1}+{r['live_at_peak'].get('M', 0) + 1}"

        out.append(f"| {k} | {k * k} | " + " | ".join(mb) + " | " + " | ".join(ts)
                   + f" | {live('exact')} / {live('betty')} |")
    out += ["", "Analytic live step graphs at the top update: exact K² bottom + K middle (each middle "
            "step with the double-backward graph of its gradient through K bottom steps); betty "
            "K + K (one window per level). Measured = open window steps before the top's "
            "iteration + the bottom and middle step of that iteration.", "",
            "Fits, per mode: `y = a + b·K + c·K²` (least squares, all K) and the power p of "
            "`y ≈ C·K^p` (log-log least squares, K ≥ 4):", "",
            "| mode | quantity | a | b | c | R² | p (Ks used) |", "|---|---|---|---|---|---|---|"]
    for m, fs in fits.items():
        for f in fs:
            out.append(f"| {m} | {f['field']} | {_f(f.get('a'), '.3g')} | {_f(f.get('b'), '.3g')} | "
                       f"{_f(f.get('c'), '.3g')} | {_f(f.get('r2'), '.4f')} | {_f(f['loglog_slope'], '.2f')} "
                       f"({','.join(map(str, f['ks_in_slope']))}) |")
    return "\n".join(out)


def checks_table(checks: List[dict]) -> str:
    total = any("exact_hyper_vs_ref_total" in c for c in checks)
    out = ["### Consistency (d=50, relative L2 differences after each of two top updates)", "",
           "exact vs ref_partial: λ-hypergradient of the update and θ, μ, λ after it; betty vs "
           "ref_partial: θ, μ after the first update (afterwards λ differs: betty's hypergradient is 0)"
           + ("; exact vs ref_total (the flawed variant): what the fix changed." if total else "."), "",
           "| K | update | exact hypergrad | exact θ | exact μ | exact λ | betty θ | betty μ "
           "| betty hypergrad norm |" + (" exact hypergrad vs ref_total |" if total else ""),
           "|" + "---|" * (9 + total)]
    for c in checks:
        out.append(f"| {c['K']} | {c['top_update']} | {c['exact_hyper_vs_ref_partial']:.1e} | "
                   f"{c['exact_theta_vs_ref_partial']:.1e} | {c['exact_mu_vs_ref_partial']:.1e} | "
                   f"{c['exact_lam_vs_ref_partial']:.1e} | {_f(c['betty_theta_vs_ref_partial'], '.1e')} | "
                   f"{_f(c['betty_mu_vs_ref_partial'], '.1e')} | {c['betty_hyper_norm']:.1e} |"
                   + (f" {_f(c.get('exact_hyper_vs_ref_total'), '.1e')} |" if total else ""))
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--d", type=int, default=2000, help="dimension of λ, μ, θ (default 2000)")
    ap.add_argument("--ks", default="2,4,8,16,32", help="comma list of K = K_B = K_M")
    ap.add_argument("--max-k-slow", type=int, default=16,
                    help="largest K for the optional ref_total mode (its cost grows ~K³)")
    ap.add_argument("--repeats", type=int, default=3, help="timed top updates per config (median)")
    ap.add_argument("--modes", default="exact,betty,ref_partial",
                    help="comma list; ref_total (the flawed variant, kept to show what the fix "
                         "changed) is optional, not run by default")
    ap.add_argument("--outdir", default=os.path.join(ROOT, "benchmarks", "results", "exact_nesting"))
    ap.add_argument("--render", default=None, metavar="JSON",
                    help="only recompute the fits and tables from a results.json of an earlier run")
    ap.add_argument("--_child", nargs=4, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a._child:
        mode, K, d, rep = a._child
        print(json.dumps(child(mode, int(K), int(d), int(rep))))
        return
    t0 = time.perf_counter()
    if a.render:
        with open(a.render) as fh:
            res = json.load(fh)
        rows, checks, modes = res["rows"], res["consistency"], list(res["modes"])
        head = res["header"]
    else:
        ks = [int(k) for k in a.ks.split(",")]
        modes = a.modes.split(",")
        print(f"# machine: {machine()}", flush=True)
        torch.set_num_threads(1)
        checks = consistency(total="ref_total" in modes)
        for c in checks:
            print("[check] " + ", ".join(f"{k}={v:.1e}" if isinstance(v, float) else f"{k}={v}"
                                         for k, v in c.items()), flush=True)
        rows = []
        for K in ks:                          # one child at a time
            for mode in modes:
                if mode == "ref_total" and K > a.max_k_slow:
                    continue
                r = run_child(mode, K, a.d, a.repeats)
                r["analytic_live"] = analytic_live(mode, K)
                rows.append(r)
                print(f"[{mode} K={K}] extra {r['extra_mb']:.1f} MB, {r['time_s']:.3f} s/top update "
                      f"(cpu {r['cpu_s']:.3f}), live {r['live_at_peak']}, |hypergrad| "
                      f"{r['hypergrad_norm']:.6g} ({time.perf_counter() - t0:.0f}s)", flush=True)
        cmd = " ".join(["OMP_NUM_THREADS=1 python benchmarks/exact_nesting.py",
                        *(argv if argv is not None else sys.argv[1:])])
        head = (f"Machine: {machine()}; d={a.d}; repeats={a.repeats}; total "
                f"{time.perf_counter() - t0:.0f}s. Command: `{cmd}`")
    d = rows[0]["d"]
    fits = {m: [fit([r for r in rows if r["mode"] == m], f) for f in ("extra_mb", "cpu_s")] for m in modes}
    text = head + "\n\n" + table(rows, fits, d, modes) + "\n\n" + checks_table(checks)
    print(text)
    os.makedirs(a.outdir, exist_ok=True)
    with open(os.path.join(a.outdir, "results.md"), "w") as fh:
        fh.write(text + "\n")
    with open(os.path.join(a.outdir, "results.json"), "w") as fh:
        json.dump(dict(header=head, machine=machine(), d=d, repeats=rows[0]["timed_updates"],
                       modes={m: MODES[m] for m in modes}, rows=rows, fits=fits, consistency=checks),
                  fh, indent=1)


if __name__ == "__main__":
    main()
