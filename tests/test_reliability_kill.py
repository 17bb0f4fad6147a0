"""SIGKILL kill test (issue 11): a child process saves a checkpoint after every
iteration to the same path; the test kills it with SIGKILL at seeded random
moments (in a step or in a save) and restarts it, resuming from the last file. After every kill the last
file loads, the next save removes the temp files the killed save left behind, and
the resumed run ends bit-identical to an uninterrupted one.

The child's graph: an upper (per-feature weight decay, Adam) above a ridge
regression (SGD with momentum, ``method="cg"``, ``unroll_steps=2``) — no unrolled
window is ever open, so every save is an exact resume point. Data are a function
of ``engine.iteration`` (data iterators are not checkpointed), and the lower loss
also draws from the global RNG, which the checkpoint restores.
"""
import importlib.util
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from mlo import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 200            # iterations of a full run
KILLS = 15

CHILD = r'''
import os, sys
import torch
from torch import nn
import mlo
from mlo import checkpoint


def batch(it, salt):
    g = torch.Generator().manual_seed(1000 * salt + it)
    x = torch.randn(16, 5, generator=g, dtype=torch.float64)
    return x, x @ torch.arange(1.0, 6.0, dtype=torch.float64) + 0.1 * torch.randn(16, generator=g, dtype=torch.float64)


class Lower(mlo.Problem):
    def training_step(self, _):
        x, y = batch(self.engine.iteration, 1)
        noise = 0.01 * torch.randn(16, dtype=torch.float64)        # the global RNG
        return ((self(x).squeeze(-1) - y - noise) ** 2).mean() + \
            (self.upper.params["log_wd"].exp() * self.params["weight"] ** 2).sum()


class Upper(mlo.Problem):
    def training_step(self, _):
        x, y = batch(self.engine.iteration, 2)
        return ((self.lower(x).squeeze(-1) - y) ** 2).mean()


def build():
    torch.manual_seed(0)
    up = Upper("upper", params={"log_wd": torch.full((1, 5), -1.0, dtype=torch.float64)},
               optimizer=torch.optim.Adam, optimizer_kwargs={"lr": 0.05})
    lo = Lower("lower", module=nn.Linear(5, 1).double(), optimizer_kwargs={"lr": 0.05, "momentum": 0.9},
               config=mlo.ProblemConfig(method="cg", unroll_steps=2, method_options={"max_iter": 5}))
    up.lower, lo.upper = lo, up
    eng = mlo.Engine([lo, up], {"u2l": {up: [lo]}, "l2u": {lo: [up]}})
    up.engine = lo.engine = eng
    return eng


def final_state(eng):
    return {n: {"module": P.module.state_dict(), "optimizer": P.optimizer.state_dict(),
                "counts": (P.step_count, P.ready_count)} for n, P in eng.problems.items()}


def run(path, out, n):
    eng = build()
    if os.path.exists(path):
        checkpoint.load(eng, path)
    print("start", os.getpid(), eng.iteration, flush=True)
    while eng.iteration < n:
        eng.step()
        checkpoint.save(eng, path)
        print("saved", eng.iteration, flush=True)
    torch.save(final_state(eng), out)
    print("done", flush=True)


def serve(path, out, n):
    """Forks one run per line on stdin (torch is imported once), reaps it, reports."""
    eng = build()
    eng.step()                       # warm up torch's lazy imports for the forked runs
    while sys.stdin.readline():
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                run(path, out, n)
                code = 0
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        print("reaped", pid, status, flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    {"run": run, "serve": serve}[sys.argv[1]](sys.argv[2], sys.argv[3], int(sys.argv[4]))
'''


def _child(mode, script, path, out):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-u", str(script), mode, str(path), str(out), str(N)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def _temps(folder, except_pid=None):
    return sorted(f for f in os.listdir(folder) if f.startswith(".mlo-ckpt-")
                  and not f.startswith(f".mlo-ckpt-{except_pid}-"))


def _equal(a, b):
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.skipif(not hasattr(signal, "SIGKILL") or not hasattr(os, "fork"), reason="needs POSIX")
def test_sigkill_during_save_loop_resumes_bit_identical(tmp_path):
    """Each run is a process forked by one server subprocess (so torch is imported
    once, not per restart); the test SIGKILLs it and the server reaps it (its pid is
    gone, so its temp file is stale)."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    spec = importlib.util.spec_from_file_location("mlo_kill_child", script)
    child = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(child)
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref_dir.mkdir()
    run_dir.mkdir()
    path, out = run_dir / "ckpt.pt", run_dir / "final.pt"
    # the uninterrupted run: a plain process of its own
    ref = _child("run", script, ref_dir / "ckpt.pt", ref_dir / "final.pt")
    server = _child("serve", script, path, out)

    def line():
        got = server.stdout.readline().split()
        if not got:
            server.kill()
            pytest.fail("the server died: " + server.communicate()[1][-3000:])
        return got[0], [int(x) for x in got[1:]]

    rng = random.Random(11)
    resumed_at, mid_save = [], 0
    try:
        for kill in range(KILLS + 1):
            server.stdin.write("go\n")
            server.stdin.flush()
            what, (pid, start) = line()
            assert what == "start"
            resumed_at.append(start)
            if kill == KILLS:       # the last run goes to the end
                while line()[0] != "reaped":
                    pass
                break
            target, it = start + rng.randint(1, 10), start
            while it < target:
                what, (it,) = line()
                assert what == "saved"
                if it == start + 1:     # the first save removed the killed save's temp file
                    assert _temps(run_dir, except_pid=pid) == [], "a stale temp file survived a save"
            time.sleep(rng.uniform(0.0, 0.009))     # a random moment in the next step or save (~3 + ~5 ms)
            os.kill(pid, signal.SIGKILL)
            while True:
                what, args = line()
                if what == "reaped":
                    break
                assert what == "saved"
                it = args[0]
            assert args[0] == pid and os.WIFSIGNALED(args[1]) and os.WTERMSIG(args[1]) == signal.SIGKILL
            mid_save += bool(_temps(run_dir))
            eng = child.build()
            checkpoint.load(eng, path)                # the last file always loads
            assert it <= eng.iteration <= it + 1       # ... and is the last save, or the one after
        server.stdin.close()
        assert server.wait(timeout=300) == 0, server.stderr.read()
        assert ref.wait(timeout=300) == 0, ref.stderr.read()
    finally:
        for p in (server, ref):
            if p.poll() is None:
                p.kill()
                p.wait()
            for f in (p.stdin, p.stdout, p.stderr):
                if not f.closed:
                    f.close()
    assert _temps(run_dir) == []
    got, want = torch.load(out, weights_only=True), torch.load(ref_dir / "final.pt", weights_only=True)
    assert want["lower"]["counts"][0] == N and want["upper"]["counts"][0] == N // 2
    assert _equal(got, want), "the resumed run differs from the uninterrupted one"
    print(f"\n{KILLS} SIGKILLs (resumed at iterations {resumed_at}); {mid_save} left a temp file "
          f"(killed mid-save); final parameters and optimizer states bit-identical")
