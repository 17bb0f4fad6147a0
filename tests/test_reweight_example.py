"""The learning-to-reweight port (problems/reweight_digits.py, run by examples/reweight_digits.py):
every method runs the script's ``--quick`` run (150 steps, validation every 50) and the
script itself runs; the weight network is trained by its hypergradient
alone; finite differences approximate the mixed derivative of the loss with the weight
network's input *attached* (they cannot see ``.detach()``)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import mlo.consumed
from torch.func import functional_call

import problems.reweight_digits as E

pytestmark = pytest.mark.usefixtures("restore_threads")


@pytest.mark.parametrize("method", list(E.METHODS))
def test_quick_runs_every_method(method, capsys):
    res = E.train(method, seed=0, steps=150, validate_every=50)          # the script's --quick
    out = capsys.readouterr().out
    assert "[mlo] iter 50 validation: test_acc=" in out       # printed by the engine's validation
    assert math.isfinite(res["test_acc"]) and 0.5 < res["test_acc"] <= 1.0
    assert 0.0 < res["w_flipped"] < 1.0 and 0.0 < res["w_clean"] < 1.0


def test_quick_plain_baseline(capsys):
    res = E.train("unrolled", seed=0, steps=150, plain=True, validate_every=50)
    assert math.isfinite(res["test_acc"]) and 0.5 < res["test_acc"] <= 1.0


def test_the_example_script_runs_quick():
    """examples/reweight_digits.py is the command line over problems.reweight_digits."""
    import re
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / "examples" / "reweight_digits.py"
    proc = subprocess.run([sys.executable, str(script), "--quick", "--method", "cg"], capture_output=True,
                          text=True, check=True)
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("digits: ") and "MWN(ℓ detached) by cg" in lines[0]
    assert "[mlo] iter 150 validation: test_acc=" in proc.stdout
    assert re.match(r"^test accuracy \d+\.\d\d% \(\d+\.\d s\); mean MWN weight", lines[-1]), lines[-1]


def _flat(d):
    return torch.cat([t.reshape(-1) for t in d.values()])


@pytest.mark.parametrize("method", list(E.METHODS))
def test_weight_net_gets_a_hypergradient_and_no_direct_gradient(method):
    torch.set_num_threads(1)
    run = E.build(method, seed=0)
    run.engine.run(3)
    assert run.engine.counts() == {"mwn": 3, "classifier": 3}
    hg = _flat(run.engine.last_hypergradient["mwn"])       # the one applied at its last update
    assert torch.isfinite(hg).all() and float(hg.norm()) > 0
    if method == "unrolled":   # the 1-step window closed at that update: its path is gone
        with pytest.raises(mlo.consumed.WindowsConsumedError, match="last_hypergradient"):
            run.engine.gradient("mwn", batch=(run.data.x_meta, run.data.y_meta), by_path=True)
        return
    g = run.engine.gradient("mwn", batch=(run.data.x_meta, run.data.y_meta), by_path=True)
    assert float(_flat(g["own"]).abs().max()) == 0.0         # the MWN's loss reads only the classifier
    (path,) = g["paths"].values()
    assert torch.equal(_flat(path), _flat(g["grad"]))
    assert float(_flat(g["grad"]).norm()) > 0


def _mixed(run, v, detach):
    """−∂²f/∂φ∂θ · v by plain autograd at the classifier's state, on its last batch."""
    clf, mwn = run.classifier, run.weight_net
    x, y = clf.last_batch
    th = {k: p.detach().requires_grad_() for k, p in clf.module.named_parameters()}
    ph = {k: p.detach().requires_grad_() for k, p in mwn.module.named_parameters()}
    ell = F.cross_entropy(functional_call(clf.module, th, (x,)), y, reduction="none")
    inp = ell.detach() if detach else ell
    f = (functional_call(mwn.module, ph, (inp.unsqueeze(1),)).squeeze(1) * ell).mean()
    g = torch.autograd.grad(f, list(th.values()), create_graph=True)
    dot = sum((a * b).sum() for a, b in zip(g, v))
    return -torch.cat([m.reshape(-1) for m in torch.autograd.grad(dot, list(ph.values()))])


def test_finite_differences_do_not_see_detach():
    torch.set_num_threads(1)
    run = E.build("finite_difference", seed=0, options={"epsilon": 1e-4})
    run.engine.run(300)
    for P in (run.classifier, run.weight_net):
        P.module.double()
    d = run.data
    meta = (d.x_meta.double(), d.y_meta)
    run.classifier.last_batch = (run.classifier.last_batch[0].double(), run.classifier.last_batch[1])
    fd = _flat(run.engine.gradient("mwn", batch=meta)["grad"])
    F_meta = F.cross_entropy(run.classifier.module(meta[0]), meta[1])
    v = torch.autograd.grad(F_meta, list(run.classifier.module.parameters()))
    cos = {}
    for detach in (True, False):
        ref = _mixed(run, v, detach)
        cos[detach] = float(fd @ ref / (fd.norm() * ref.norm()))
    # FD = the attached loss's mixed derivative, to the accuracy central differences at
    # ε = 1e-4 have on this ReLU classifier (a kink within ε of the iterate costs O(ε)
    # relative: 1 − 4.4e-8 was measured on one machine, 1 − 1e-10 on another).
    assert cos[False] > 1 - 1e-6
    assert cos[True] < 0.9                   # not the detached one's
