"""MAML on sinusoid regression (issue 21): :mod:`problems.maml` and ``examples/maml_sinusoid.py``.

(a) The meta-gradient mlo applies at every outer step equals a hand-written MAML in plain
    autograd (the inner SGD steps unrolled with ``create_graph``; first order: the inner
    gradients as constants), float64, 1 and 2 inner steps, non-default learning rates.
(b) The graph gets no lint warning (``warnings.simplefilter("error")``).
(c) The example's ``--quick`` run in a subprocess; without the peers it says so.
(d) With torchopt / higher installed: the same tasks give the same meta-parameters.
"""
from __future__ import annotations

import copy
import importlib.util
import os
import pathlib
import subprocess
import sys
import time
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from _helpers import recording, rel
from problems.maml import (FastWeights, MetaLearner, maml_engine, meta_batches, mlp, run_higher,
                           run_mlo, run_torchopt, sample_tasks)

torch.set_num_threads(1)
ROOT = pathlib.Path(__file__).resolve().parents[1]
INNER_LR, META_LR = 0.05, 0.01          # not the example's defaults
STEPS, B = 3, 3


def batches(shots=5, seed=1):
    return meta_batches(sample_tasks(STEPS * B, shots, query=7, seed=seed), B)


# ---------------------------------------------------------------- (a) a naive reference
def naive_maml(model, batches, inner_lr, inner_steps, meta_lr, first_order):
    """MAML written out: per task, ``inner_steps`` SGD steps from θ (differentiated through
    unless ``first_order``), the mean query loss, its gradient in θ, one Adam step.
    Returns the meta-gradient of every outer step and the final parameters."""
    net = copy.deepcopy(model)
    names = [n for n, _ in net.named_parameters()]
    theta = list(net.parameters())
    opt = torch.optim.Adam(theta, lr=meta_lr)

    def f(w, x):
        return functional_call(net, dict(zip(names, w)), (x,))

    grads = []
    for step in batches:
        meta = 0.0
        for xs, ys, xq, yq in step:
            w = list(theta)
            for _ in range(inner_steps):
                g = torch.autograd.grad(F.mse_loss(f(w, xs), ys), w, create_graph=not first_order)
                w = [a - inner_lr * b for a, b in zip(w, g)]
            meta = meta + F.mse_loss(f(w, xq), yq)
        g = torch.autograd.grad(meta / len(step), theta)
        grads.append(g)
        for p, gp in zip(theta, g):
            p.grad = gp
        opt.step()
    return grads, [p.detach() for p in theta]


def mlo_maml(model, batches, inner_lr, inner_steps, meta_lr, first_order):
    net = copy.deepcopy(model)
    engine, meta = maml_engine(net, batches, inner_lr, inner_steps, meta_lr, first_order,
                               meta_optimizer=recording(torch.optim.Adam))
    engine.run(inner_steps * len(batches))
    return meta.optimizer.record, [p.detach() for p in net.parameters()], engine


def worst(got, ref):
    return max(rel(a, b) for a, b in zip(got, ref))


@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
@pytest.mark.parametrize("inner_steps", [1, 2])
def test_meta_gradient_equals_hand_written_maml(inner_steps, first_order, measured):
    model, bs = mlp(seed=3), batches()
    got, theta, _ = mlo_maml(model, bs, INNER_LR, inner_steps, META_LR, first_order)
    ref, ref_theta = naive_maml(model, bs, INNER_LR, inner_steps, META_LR, first_order)
    assert len(got) == STEPS
    order = "first" if first_order else "second"
    err = max(worst(g, r) for g, r in zip(got, ref))
    measured(f"MAML {order} order, {inner_steps} inner step(s): meta-gradient vs hand-written", err, 1e-12)
    measured(f"MAML {order} order, {inner_steps} inner step(s): θ after {STEPS} steps",
             worst(theta, ref_theta), 1e-12)


def test_second_and_first_order_differ():
    """The reference can tell them apart: (a) is not passing for first order by accident."""
    model, bs = mlp(seed=3), batches()
    second, _ = naive_maml(model, bs[:1], INNER_LR, 1, META_LR, False)
    first, _ = naive_maml(model, bs[:1], INNER_LR, 1, META_LR, True)
    assert worst(first[0], second[0]) > 1e-4


# ---------------------------------------------------------------- (b) the lint
def test_maml_graph_gives_no_lint_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, _, engine = mlo_maml(mlp(seed=3), batches(), INNER_LR, 2, META_LR, False)
    assert engine.state.linted == set(engine.problems)       # every problem was looked at
    assert len(engine.problems) == B + 1


# ---------------------------------------------------------------- the pieces
def test_tasks_are_drawn_from_the_seed_within_the_ranges():
    a, b, c = sample_tasks(50, 10, seed=4), sample_tasks(50, 10, seed=4), sample_tasks(50, 10, seed=5)
    assert all(torch.equal(x, y) for ta, tb in zip(a, b) for x, y in zip(ta, tb))
    assert not torch.equal(a[0][0], c[0][0])
    xs = torch.cat([torch.cat([t[0], t[2]]) for t in a])
    ys = torch.cat([torch.cat([t[1], t[3]]) for t in a])
    assert a[0][0].shape == (10, 1) and a[0][2].shape == (10, 1) and xs.dtype == torch.float64
    assert float(xs.min()) >= -5 and float(xs.max()) <= 5 and float(ys.abs().max()) <= 5
    amp = torch.stack([torch.cat([t[1], t[3]]).abs().max() for t in a])
    assert float(amp.max()) > 2.5                               # amplitudes spread over [0.1, 5]
    assert len(sample_tasks(3, 5, query=2)[0][2]) == 2


def test_mlp_is_1_40_40_1_relu():
    net = mlp()
    shapes = [tuple(p.shape) for p in net.parameters()]
    assert shapes == [(40, 1), (40,), (40, 40), (40,), (1, 40), (1,)]
    assert sum(isinstance(m, torch.nn.ReLU) for m in net) == 2


def test_bad_input_named():
    with pytest.raises(ValueError, match="do not split into meta-batches of 4"):
        meta_batches(sample_tasks(6, 5), 4)
    with pytest.raises(ValueError, match="shots must be >= 1"):
        sample_tasks(3, 0)
    with pytest.raises(TypeError, match="problem 'task0': source must be an mlo.Problem"):
        FastWeights("task0", mlp(), data=[None])

    class Clash(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Module()
            self.a.b = torch.nn.Parameter(torch.zeros(1))
            self.a__b = torch.nn.Parameter(torch.zeros(1))

    with pytest.raises(ValueError, match="problem 't': the parameter names of 'meta'"):
        FastWeights("t", MetaLearner(Clash()), data=[None])
    with pytest.raises(RuntimeError, match="problem 'meta': no task problems"):
        MetaLearner(mlp()).training_step(None)


# ---------------------------------------------------------------- (c) the example
def example(*args, block_peers=None):
    """Runs ``examples/maml_sinusoid.py args`` (``block_peers``: a folder whose modules
    shadow torchopt and higher with an ImportError). Returns (process, seconds)."""
    path = [str(ROOT)] + ([str(block_peers)] if block_peers else [])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(path[::-1]))
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "maml_sinusoid.py"), *args],
                         capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr
    return out, time.perf_counter() - t0


def test_example_quick_runs_in_a_subprocess():
    out, seconds = example("--quick", "--shots", "10", "--inner-steps", "2")
    assert "10-shot sinusoid MAML: 5 outer steps x 4 tasks, 2 inner SGD step(s)" in out.stdout
    assert "| mlo |" in out.stdout and "graph lint" not in out.stderr
    assert seconds < 60, seconds


def test_example_without_peers_says_so(tmp_path):
    for name in ("torchopt", "higher"):
        (tmp_path / f"{name}.py").write_text("raise ImportError('hidden for the test')\n")
    out, _ = example("--quick", "--compare-peers", block_peers=tmp_path)
    assert "note: torchopt is not installed, skipped" in out.stdout
    assert "note: higher is not installed, skipped" in out.stdout
    rows = [line for line in out.stdout.splitlines()
            if line.startswith("| ") and "implementation" not in line]
    assert [r.split("|")[1].strip() for r in rows] == ["mlo"]


# ---------------------------------------------------------------- (d) the peers
@pytest.mark.parametrize("peer", ["torchopt", "higher"])
@pytest.mark.parametrize("inner_steps", [1, 2])
def test_peers_agree(peer, inner_steps, measured):
    if importlib.util.find_spec(peer) is None:
        pytest.skip(f"{peer} is not installed (optional: pip install torchopt==0.7.3 higher==0.2.1)")
    run = {"torchopt": run_torchopt, "higher": run_higher}[peer]
    model, bs = mlp(seed=3), batches(shots=10)
    ours = run_mlo(model, bs, INNER_LR, inner_steps, META_LR)
    theirs = run(model, bs, INNER_LR, inner_steps, META_LR)
    diff = max(float((ours["params"][k] - theirs["params"][k]).abs().max()) for k in ours["params"])
    moved = max(float((ours["params"][k] - p.detach()).abs().max()) for k, p in model.named_parameters())
    assert moved > 2 * META_LR                      # Adam moved θ (≤ lr a step): not compared at θ_0
    measured(f"MAML vs {peer}, {inner_steps} inner step(s): max |Δθ| after {STEPS} steps", diff, 1e-10)
    measured(f"MAML vs {peer}: meta-losses", max(abs(a - b) for a, b in
                                                 zip(ours["meta_loss"], theirs["meta_loss"])), 1e-10)
