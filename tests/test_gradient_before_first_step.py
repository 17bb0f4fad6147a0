"""``engine.gradient`` before the first step: the lower takes its next batch, the value
equals an explicit-batch call (and the IFT closed form for CG), and the lower's data
order is the same as without the call."""
from __future__ import annotations

import pytest
import torch

import mlo
from _helpers import rel

torch.set_num_threads(1)

DT = torch.float64


class BatchLo(mlo.Problem):
    def __init__(self, method, opts, data):
        super().__init__("lo", params={"w": torch.tensor([0.5, -0.3, 0.2], dtype=DT)}, data=data,
                         optimizer_kwargs={"lr": 0.1},
                         config=mlo.ProblemConfig(method=method, method_options=opts, unroll_steps=2))

    def training_step(self, batch):
        X, y = batch
        w = self.params["w"]
        return 0.5 * ((X @ w - y) ** 2).sum() + 0.5 * (self.up.params["lam"].exp() * w ** 2).sum()


class BatchUp(mlo.Problem):
    def __init__(self, data):
        super().__init__("up", params={"lam": torch.tensor([-1.0, 0.0, 0.5], dtype=DT)}, data=data)

    def training_step(self, batch):
        X, y = batch
        return 0.5 * ((X @ self.lo.params["w"] - y) ** 2).sum()


def batches(seed, k=4):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, 3, generator=g, dtype=DT), torch.randn(6, generator=g, dtype=DT)) for _ in range(k)]


LO_BATCHES, UP_BATCHES = batches(1), batches(2)
FRESH = {"cg": {"max_iter": 3, "tol": 0.0}, "neumann": {"iterations": 3, "alpha": 0.1},
         "finite_difference": {}}


def batch_engine(method):
    lo, up = BatchLo(method, FRESH[method], LO_BATCHES), BatchUp(UP_BATCHES)
    lo.up, up.lo = up, lo
    return mlo.Engine([lo, up], {"u2l": {up: [lo]}, "l2u": {lo: [up]}}), lo, up


@pytest.mark.parametrize("method", list(FRESH))
def test_gradient_before_any_step(method, measured):
    eng, lo, up = batch_engine(method)
    assert lo.last_batch is None
    got = eng.gradient("up")
    # The lower was evaluated on its next batch, which stays next for its first step:
    # a report changes no problem's state (only the reported problem's last_batch).
    assert lo.last_batch is None and lo.peek_batch() is LO_BATCHES[0]
    eng2, lo2, up2 = batch_engine(method)
    lo2.last_batch = LO_BATCHES[0]
    ref = eng2.gradient("up", batch=UP_BATCHES[0])
    assert torch.equal(got["grad"]["lam"], ref["grad"]["lam"]) and got["loss"] == ref["loss"]
    assert float(torch.linalg.vector_norm(got["grad"]["lam"])) > 0
    if method == "cg":   # 3 CG iterations on a 3×3 system: the IFT value at the current w
        X, y = LO_BATCHES[0]
        Xv, yv = UP_BATCHES[0]
        w, lam = lo.params["w"].detach(), up.params["lam"].detach()
        H = X.T @ X + torch.diag(lam.exp())
        exact = -(lam.exp() * w) * torch.linalg.solve(H, Xv.T @ (Xv @ w - yv))
        measured("engine.gradient before the first step (CG) vs IFT closed form",
                 rel(got["grad"]["lam"], exact), 1e-10)


@pytest.mark.parametrize("method", ["cg", "finite_difference"])
def test_gradient_before_any_step_leaves_the_lower_data_alone(method):
    eng, lo, up = batch_engine(method)
    eng.gradient("up")
    eng.run(2)
    ref, lo_ref, _ = batch_engine(method)
    ref.run(2)
    index = lambda b: next(i for i, x in enumerate(LO_BATCHES) if x is b)  # noqa: E731
    assert index(lo.last_batch) == index(lo_ref.last_batch) == 1   # batches 0, 1 trained on
    assert torch.equal(lo.params["w"].detach(), lo_ref.params["w"].detach())
