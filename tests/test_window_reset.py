"""A reset of a lower's variables to constants inside an open window cuts the path there.

``set_params`` with constants inside a window (an inner-loop reset, as in Betty's
``nesting="exact"`` examples) replaces the iterate: the steps after it differentiate
from the constant, the paths through the earlier steps end. Checked against a
hand-written loop (SGD with momentum, float64, the reset after step 2 of a 3-step
window) and with an edit that keeps the graph (a shrink of the iterate), whose path
runs through the edit.
"""
from __future__ import annotations

import pytest
import torch

import mlo

DT = torch.float64
LR, MU, WD, K = 0.1, 0.5, 0.3, 3


def f(w, lam):
    return ((w - lam) ** 2).sum() + WD * (w ** 2).sum() + (w ** 3).sum() * 0.05


class Lo(mlo.Problem):
    edit = None

    def training_step(self, batch):
        return f(self.params["w"], self.up.params["lam"])

    def after_step(self):
        if self.step_count % K == 2:       # after the 2nd step of every window
            self.set_params({"w": self.edit(self.params["w"])})


class Up(mlo.Problem):
    def training_step(self, batch):
        return ((self.lo.params["w"] - 1.0) ** 2).sum()


EDITS = {
    "reset to constants": lambda w: torch.full_like(w, 0.25).detach(),
    "shrink (keeps the graph)": lambda w: 0.5 * w,
}


def engine(edit, momentum=MU):
    lo = Lo("lo", params={"w": torch.tensor([1.0, -0.5, 2.0], dtype=DT)},
            optimizer_kwargs={"lr": LR, "momentum": momentum},
            config=mlo.ProblemConfig(unroll_steps=K, method="unrolled"))
    lo.edit = edit
    up = Up("up", params={"lam": torch.tensor([0.5, 0.1, -0.3], dtype=DT)}, optimizer_kwargs={"lr": 0.1})
    lo.up, up.lo = up, lo
    return mlo.Engine([lo, up], {"u2l": {up: [lo]}, "l2u": {lo: [up]}}), lo, up


def by_hand(edit, w0, lam0, buf0=None):
    """One window by hand: K momentum-SGD steps, the edit after step 2; the upper's
    hypergradient d F(w_K) / d lam by reverse mode."""
    lam = lam0.clone().requires_grad_()
    w, buf = w0.clone().requires_grad_(), buf0
    for k in range(1, K + 1):
        g, = torch.autograd.grad(f(w, lam), w, create_graph=True)
        buf = g if buf is None else MU * buf + g
        w = w - LR * buf
        if k == 2:
            w = edit(w)
            if not w.requires_grad:
                w = w.requires_grad_()
    F = ((w - 1.0) ** 2).sum()
    h, = torch.autograd.grad(F, lam)
    return w.detach(), h, buf.detach()


@pytest.mark.parametrize("name", list(EDITS))
def test_an_edit_inside_a_window_matches_the_hand_written_loop(name, measured):
    edit = EDITS[name]
    eng, lo, up = engine(edit)
    w, lam, buf = lo.params["w"].detach().clone(), up.params["lam"].detach().clone(), None
    for window in range(3):
        eng.run(K)
        w_ref, h_ref, buf = by_hand(edit, w, lam, buf)
        h = eng.last_hypergradient["up"]["lam"]
        err = float((h - h_ref).norm() / h_ref.norm())
        measured(f"window edit '{name}': hypergradient vs hand-written loop (window {window + 1})", err, 1e-13)
        assert torch.allclose(lo.params["w"].detach(), w_ref, rtol=0, atol=1e-14)
        assert float(h_ref.norm()) > 0
        w, lam = w_ref, up.params["lam"].detach().clone()


def test_a_reset_cuts_the_earlier_steps():
    """Plain SGD (no momentum to carry the earlier steps): after the reset the
    hypergradient is that of the last step alone, whatever the window started from;
    without the reset it is not."""
    for name, same in (("reset to constants", True), ("shrink (keeps the graph)", False)):
        grads = []
        for start in ([1.0, -0.5, 2.0], [3.0, 0.0, -1.0]):
            eng, lo, up = engine(EDITS[name], momentum=0.0)
            lo.set_params({"w": torch.tensor(start, dtype=DT)})
            eng.run(K)
            grads.append(eng.last_hypergradient["up"]["lam"])
        assert torch.equal(grads[0], grads[1]) is same, name
