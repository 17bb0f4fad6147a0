"""Engine checkpoints: atomic, weights_only, resume gives the same trajectory."""
import os

import pytest
import torch
from torch import nn

import mlo
from mlo import checkpoint


class Lower(mlo.Problem):
    def __init__(self, upper, data):
        super().__init__("lower", module=nn.Linear(4, 1).double(), optimizer=torch.optim.Adam,
                         optimizer_kwargs={"lr": 0.05, "betas": (0.8, 0.9)}, data=data,
                         config=mlo.ProblemConfig(unroll_steps=3))
        self.upper = upper

    def training_step(self, batch):
        x, y = batch
        return ((self(x).squeeze(-1) - y) ** 2).mean() + (self.upper.params["wd"].exp() * self.params["weight"] ** 2).sum()


class Upper(mlo.Problem):
    def __init__(self, data):
        super().__init__("upper", params={"wd": torch.full((1, 4), -2.0, dtype=torch.float64)},
                         optimizer=torch.optim.SGD, optimizer_kwargs={"lr": 0.1, "momentum": 0.9},
                         scheduler=torch.optim.lr_scheduler.StepLR, scheduler_kwargs={"step_size": 2},
                         data=data)

    def training_step(self, batch):
        x, y = batch
        return ((self.lower(x).squeeze(-1) - y) ** 2).mean()


def build():
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 4, generator=g, dtype=torch.float64),
                torch.randn(8, generator=g, dtype=torch.float64)) for _ in range(3)]
    torch.manual_seed(0)
    up = Upper(batches[:1])
    lo = Lower(up, batches)
    up.lower = lo
    return mlo.Engine([lo, up], {"u2l": {up: [lo]}, "l2u": {lo: [up]}})


def state(engine):
    return torch.cat([p.detach().flatten() for P in engine.problems.values() for p in P.module.parameters()])


def test_resume_reproduces_trajectory(tmp_path):
    ref = build()
    ref.run(12)
    a = build()
    a.run(6)
    checkpoint.save(a, tmp_path / "ck.pt")
    b = build()
    checkpoint.load(b, tmp_path / "ck.pt")
    # data iterators restart, so align them: both engines cycle through the same batches
    for P, Q in zip(b.problems.values(), a.problems.values()):
        P._iter, P.data = Q._iter, Q.data
    b.run(6)
    assert torch.equal(state(b), state(ref))
    assert b.counts() == ref.counts() and b.iteration == 12


def test_atomic_and_weights_only(tmp_path, monkeypatch):
    e = build()
    e.run(3)
    path = tmp_path / "ck.pt"
    checkpoint.save(e, path)
    good = path.read_bytes()
    def boom(*a, **k):
        raise RuntimeError("disk full")
    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        checkpoint.save(e, path)
    assert path.read_bytes() == good                      # old checkpoint intact
    assert [f for f in os.listdir(tmp_path) if f.startswith(".mlo-ckpt-")] == []
    monkeypatch.undo()
    torch.save({"format": 1, "evil": object()}, tmp_path / "bad.pt")
    with pytest.raises(Exception):
        checkpoint.load(e, tmp_path / "bad.pt")           # weights_only refuses objects


def test_mismatched_problems(tmp_path):
    e = build()
    checkpoint.save(e, tmp_path / "ck.pt")
    blob = torch.load(tmp_path / "ck.pt", weights_only=True)
    blob["problems"]["other"] = blob["problems"].pop("upper")
    torch.save(blob, tmp_path / "ck2.pt")
    with pytest.raises(ValueError, match="missing: \\['upper'\\]"):
        checkpoint.load(e, tmp_path / "ck2.pt")
