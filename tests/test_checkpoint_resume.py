"""Checkpoint save/resume against the uninterrupted run, bit for bit.

The lower has BatchNorm (buffers) and Dropout (randomness), an Adam optimizer, and
is unrolled or implicit; the upper has SGD momentum and a StepLR scheduler. A run
saved at iteration s and resumed in a fresh engine (data realigned by skipping
``P.step_count`` batches, as mlo.checkpoint documents) must reproduce every
parameter, buffer and the RNG stream of the run that never stopped. Inside an open
unrolled window the autograd graph cannot be saved: saving must not change the
running engine, and the resumed run must equal a run whose windows were closed at
that iteration (a truncation), with a warning at save and at load.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import mlo
from mlo import checkpoint

DT = torch.float64
D, K, TOTAL = 4, 3, 11


class Lower(mlo.Problem):
    def training_step(self, batch):
        x, y = batch
        return ((self(x).squeeze(-1) - y) ** 2).mean() \
            + (self.up.params["lam"].exp() * self.params["1.weight"] ** 2).sum()


class Upper(mlo.Problem):
    def training_step(self, batch):
        x, y = batch
        return ((self.lo(x).squeeze(-1) - y) ** 2).mean() + 0.01 * (self.params["lam"] ** 2).sum()


METHODS = {"unrolled": {}, "cg": {"max_iter": 3, "damping": 0.5},
           "neumann": {"iterations": 2, "alpha": 0.05}, "finite_difference": {"epsilon": 0.02}}


def build(method):
    gen = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=DT)  # noqa: E731
    train = [(2 * r(8, D) + 1, r(8)) for _ in range(4)]
    val = [(r(8, D), r(8)) for _ in range(3)]
    torch.manual_seed(1)
    module = nn.Sequential(nn.BatchNorm1d(D, momentum=0.2), nn.Linear(D, 5), nn.Tanh(),
                           nn.Dropout(0.25), nn.Linear(5, 1)).double()
    lo = Lower("lo", module=module, optimizer=torch.optim.Adam, data=train,
               optimizer_kwargs={"lr": 0.05, "betas": (0.8, 0.9), "weight_decay": 0.01},
               config=mlo.ProblemConfig(unroll_steps=K, method=method, method_options=METHODS[method]))
    up = Upper("up", params={"lam": torch.full((1, D), -1.0, dtype=DT)},
               optimizer_kwargs={"lr": 0.3, "momentum": 0.6}, data=val,
               scheduler=torch.optim.lr_scheduler.StepLR, scheduler_kwargs={"step_size": 2, "gamma": 0.5})
    lo.up, up.lo = up, lo
    return mlo.Engine([lo, up], {"u2l": {up: [lo]}, "l2u": {lo: [up]}})


def snapshot(engine):
    """Every parameter and buffer (real tensors, windows closed by the caller) + RNG."""
    tensors = [t.detach().clone() for P in engine.problems.values()
               for t in list(P.module.parameters()) + list(P.module.buffers())]
    return tensors, torch.get_rng_state()


def same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a[0], b[0])) and torch.equal(a[1], b[1])


def uninterrupted(method, total=TOTAL):
    torch.manual_seed(7)
    eng = build(method)
    torch.manual_seed(7)
    eng.run(total)
    eng.close_windows()
    return snapshot(eng), eng


def resume(method, path, remaining):
    eng = build(method)
    checkpoint.load(eng, path)
    for P in eng.problems.values():          # realign the data: skip what was consumed
        for _ in range(P.step_count):
            P.next_batch()
    eng.run(remaining)
    eng.close_windows()
    return snapshot(eng), eng


@pytest.mark.parametrize("method,stop", [("unrolled", 6), ("cg", 5), ("neumann", 4),
                                         ("finite_difference", 7)])
def test_resume_reproduces_the_uninterrupted_run(method, stop, tmp_path):
    """Unrolled saved between windows; implicit / FD at any iteration (no window)."""
    ref, ref_eng = uninterrupted(method)
    torch.manual_seed(7)
    a = build(method)
    torch.manual_seed(7)
    a.run(stop)
    with warnings.catch_warnings():
        warnings.simplefilter("error")           # no open window: no warning
        checkpoint.save(a, tmp_path / "ck.pt")
        got, b = resume(method, tmp_path / "ck.pt", TOTAL - stop)
    assert same(got, ref), f"{method}: resumed run differs from the uninterrupted one"
    assert b.counts() == ref_eng.counts() and b.iteration == TOTAL
    assert int(b.problems["lo"].module[0].num_batches_tracked) == TOTAL + b.counts()["up"]
    assert b.problems["up"].scheduler.last_epoch == ref_eng.problems["up"].scheduler.last_epoch


@pytest.mark.parametrize("stop", [4, 5])
def test_save_inside_a_window_leaves_the_run_alone_and_resume_truncates(stop, tmp_path):
    ref, _ = uninterrupted("unrolled")
    torch.manual_seed(7)
    a = build("unrolled")
    torch.manual_seed(7)
    a.run(stop)
    lo = a.problems["lo"]
    iterates = [t.detach().clone() for t in lo.own_state().values()]
    with pytest.warns(RuntimeWarning, match=r"'lo' \(%d step" % (stop % K)):
        checkpoint.save(a, tmp_path / "ck.pt")
    a.run(TOTAL - stop)                            # the saving run continues unchanged
    a.close_windows()
    assert same(snapshot(a), ref), "saving inside a window changed the running engine"

    # the checkpoint holds the window's iterates; resuming = closing the window there
    b = build("unrolled")
    with pytest.warns(RuntimeWarning, match="saved inside open unrolled window"):
        checkpoint.load(b, tmp_path / "ck.pt")
    assert all(torch.equal(p.detach(), t) for p, t in zip(b.problems["lo"].variables, iterates))
    for P in b.problems.values():
        for _ in range(P.step_count):
            P.next_batch()
    b.run(TOTAL - stop)
    b.close_windows()
    torch.manual_seed(7)
    c = build("unrolled")
    torch.manual_seed(7)
    c.run(stop)
    c.close_windows()                              # truncate exactly there
    c.run(TOTAL - stop)
    c.close_windows()
    assert same(snapshot(b), snapshot(c))
    assert not same(snapshot(b), ref)              # the truncation is real
