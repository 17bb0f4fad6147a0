"""Scheduling through ``mlo.Engine``: step counts (2 and 3 levels), ``update_every``,
data re-iteration, validation hook, LR schedulers, and ``torch.optim`` state taken
over by unrolled windows and handed back (trajectories equal a plain torch loop)."""
from __future__ import annotations

import pytest
import torch

import mlo
from _helpers import RecSGD

DT = torch.float64


class Node(mlo.Problem):
    """Explicit tensors; ``loss(self, batch)``; records the batches it saw."""

    def __init__(self, name, x0, loss, **kw):
        super().__init__(name, params={"x": torch.as_tensor(x0, dtype=DT)}, **kw)
        self._loss, self.seen = loss, []

    def training_step(self, batch):
        self.seen.append(batch)
        return self._loss(self, batch)


def scale(batch):
    """A lower batch is a number (or a tensor of numbers: their mean); None → 1."""
    return 1.0 if batch is None else torch.as_tensor(batch, dtype=DT).mean()


def bilevel(lo_kw=None, up_kw=None, lo_cfg=None, up_cfg=None, lo_data=None, engine_cfg=None):
    """``lo``: ½‖x − a·tanh(u)‖² + log cosh terms; ``up``: ½‖x_lo − 1‖² + ε‖u‖²."""
    a = torch.tensor([0.5, -1.0, 2.0], dtype=DT)
    up = Node("up", [0.3, -0.2, 0.1], lambda s, b: 0.5 * ((s.lo.params["x"] - 1) ** 2).sum()
              + 0.01 * (s.params["x"] ** 2).sum(),
              config=up_cfg, **{"optimizer_kwargs": {"lr": 0.2}, **(up_kw or {})})
    lo = Node("lo", [1.0, 2.0, -1.5], lambda s, b: 0.5 * ((s.params["x"] - a * torch.tanh(s.up.params["x"])) ** 2).sum()
              + torch.log(torch.cosh(s.params["x"] * scale(b))).sum(),
              config=lo_cfg, data=lo_data, **{"optimizer_kwargs": {"lr": 0.1}, **(lo_kw or {})})
    up.lo, lo.up = lo, up
    eng = mlo.Engine([lo, up], {"u2l": {up: [lo]}, "l2u": {lo: [up]}}, config=engine_cfg)
    return eng, up, lo, a


# ----------------------------------------------------------------- counts
@pytest.mark.parametrize("method", ["unrolled", "cg"])
@pytest.mark.parametrize("K", [1, 3, 4])
def test_two_level_counts(K, method):
    """The lower steps exactly K times between consecutive upper steps, every time."""
    eng, up, lo, _ = bilevel(lo_cfg=mlo.ProblemConfig(unroll_steps=K, method=method))
    lo_at_up_step = []                   # the lower's step count at each upper step
    for _ in range(4 * K + (K - 1)):
        before = up.step_count
        eng.step()
        if up.step_count > before:
            assert up.step_count == before + 1
            lo_at_up_step.append(lo.step_count)
    assert lo_at_up_step == [K, 2 * K, 3 * K, 4 * K]
    assert eng.counts() == {"lo": 4 * K + K - 1, "up": 4}
    assert up.ready_count == 4 and eng.iteration == 4 * K + K - 1


def mlo_mae_shape(pre_unroll=2, mask_every=1, method="unrolled"):
    lin = lambda s: s.params["x"].sum()  # noqa: E731
    pre = Node("pretrain", [0.1, 0.2], lambda s, b: ((s.params["x"] - s.mask.params["x"]) ** 2).sum(),
               optimizer=torch.optim.AdamW, optimizer_kwargs={"lr": 1e-2, "betas": (0.9, 0.95), "weight_decay": 1e-3},
               config=mlo.ProblemConfig(unroll_steps=pre_unroll, method=method))
    fin = Node("finetune", [0.0, 1.0], lambda s, b: ((s.params["x"] - torch.sin(s.pretrain.params["x"])) ** 2).sum(),
               optimizer_kwargs={"lr": 1e-2, "momentum": 0.9}, config=mlo.ProblemConfig(method=method))
    mask = Node("mask", [0.5, -0.5], lambda s, b: (s.finetune.params["x"] ** 2).sum() + 0.1 * (s.pretrain.params["x"] ** 2).sum()
                + 0 * lin(s), optimizer_kwargs={"lr": 1e-2}, config=mlo.ProblemConfig(update_every=mask_every))
    pre.mask, fin.pretrain, mask.finetune, mask.pretrain = mask, pre, fin, pre
    return mlo.Engine([pre, fin, mask], {"u2l": {mask: [pre]},
                                         "l2u": {pre: [fin, mask], fin: [mask]}})


@pytest.mark.parametrize("method", ["unrolled", "neumann"])
def test_three_level_mlo_mae_counts(method):
    eng = mlo_mae_shape(pre_unroll=2, method=method)
    pre, fin, mask = (eng.problems[n] for n in ("pretrain", "finetune", "mask"))
    for it in range(1, 11):              # per iteration: pretrain 1; finetune, mask every 2nd
        eng.step()
        assert (pre.step_count, fin.step_count, mask.step_count) == (it, it // 2, it // 2)
    assert eng.counts() == {"pretrain": 10, "finetune": 5, "mask": 5}
    eng.run(3)
    assert eng.counts() == {"pretrain": 13, "finetune": 6, "mask": 6}


@pytest.mark.parametrize("method", ["unrolled", "cg"])
def test_three_level_chain_counts_per_level(method):
    """T → M → B with unroll_steps 2 (M) and 3 (B): B steps exactly 3 times between M's
    steps, M exactly 2 times between T's steps."""
    T = Node("T", [0.2, -0.1], lambda s, b: (s.B.params["x"] ** 2).sum() + 0 * s.params["x"].sum())
    M = Node("M", [0.5, 0.3], lambda s, b: ((s.params["x"] - s.T.params["x"]) ** 2).sum(),
             config=mlo.ProblemConfig(unroll_steps=2, method=method))
    B = Node("B", [1.0, -1.0], lambda s, b: ((s.params["x"] - torch.tanh(s.M.params["x"])) ** 2).sum(),
             optimizer_kwargs={"lr": 0.1, "momentum": 0.5}, config=mlo.ProblemConfig(unroll_steps=3, method=method))
    T.B, M.T, B.M = B, T, M
    eng = mlo.Engine([T, M, B], {"u2l": {T: [M], M: [B]}, "l2u": {B: [T]}})
    at_M, at_T = [], []
    for _ in range(20):
        m, t = M.step_count, T.step_count
        eng.step()
        if M.step_count > m:
            at_M.append(B.step_count)
        if T.step_count > t:
            at_T.append(M.step_count)
    assert at_M == [3, 6, 9, 12, 15, 18] and at_T == [2, 4, 6]
    assert eng.counts() == {"T": 3, "M": 6, "B": 20}


def test_three_level_update_every():
    """Mask updated every 5th readiness (MLO-MAE's 'every N iterations' option)."""
    eng = mlo_mae_shape(pre_unroll=1, mask_every=5)
    eng.run(12)
    assert eng.counts() == {"pretrain": 12, "finetune": 12, "mask": 2}
    assert eng.problems["mask"].ready_count == 12


def test_update_every_on_upper():
    eng, up, lo, _ = bilevel(lo_cfg=mlo.ProblemConfig(unroll_steps=2), up_cfg=mlo.ProblemConfig(update_every=3))
    w0 = lo.module.x.detach().clone()
    updated_at, ready_at = [], []
    for it in range(1, 19):
        before = (up.step_count, up.ready_count)
        eng.step()
        if up.ready_count > before[1]:
            ready_at.append(it)
        if up.step_count > before[0]:
            updated_at.append(it)
        if it == 1:      # window open: iterates not yet written back
            assert torch.equal(lo.module.x.detach(), w0)
        if it == 2:      # a skipped update still ends the lower's window
            assert not torch.equal(lo.module.x.detach(), w0)
    assert ready_at == [2, 4, 6, 8, 10, 12, 14, 16, 18]
    assert updated_at == [6, 12, 18]
    assert eng.counts() == {"lo": 18, "up": 3}


# ------------------------------------------------------------------- data
class CountingIterable:
    def __init__(self, items):
        self.items, self.iters = items, 0

    def __iter__(self):
        self.iters += 1
        return iter(self.items)


def test_data_reiterated_when_exhausted():
    data = CountingIterable([1.0, 2.0, 3.0])
    eng, up, lo, _ = bilevel(lo_data=data, lo_cfg=mlo.ProblemConfig(unroll_steps=2))
    eng.run(7)
    assert lo.seen == [1.0, 2.0, 3.0, 1.0, 2.0, 3.0, 1.0]
    assert data.iters == 3
    assert up.seen == [None, None, None]          # data=None feeds batch=None


def test_data_loader_reiterated():
    dl = torch.utils.data.DataLoader([0.5, 1.0, 1.5, 2.0, 2.5], batch_size=2, shuffle=False)
    eng, up, lo, _ = bilevel(lo_data=dl)
    eng.run(5)
    assert [b.tolist() for b in lo.seen] == [[0.5, 1.0], [1.5, 2.0], [2.5], [0.5, 1.0], [1.5, 2.0]]


# ------------------------------------------------------------- validation
def test_validation_hook_every_n_iterations():
    calls = []

    def validation(engine):
        calls.append(engine.iteration)
        return {"lo_steps": engine.counts()["lo"], "up_loss": float(engine.problems["up"].last_loss)}

    cfg = mlo.EngineConfig(validate_every=4, validation=validation)
    eng, up, lo, _ = bilevel(lo_cfg=mlo.ProblemConfig(unroll_steps=3), engine_cfg=cfg)
    history = eng.run(10)
    assert calls == [4, 8]
    assert [h["iteration"] for h in history] == [4, 8]
    assert [h["lo_steps"] for h in history] == [4, 8]
    assert history is eng.history
    eng.run(2)
    assert [h["iteration"] for h in eng.history] == [4, 8, 12]


# ------------------------------------------------------------- schedulers
def test_scheduler_stepped_per_update_of_upper():
    eng, up, lo, _ = bilevel(up_kw=dict(scheduler=torch.optim.lr_scheduler.StepLR,
                                         scheduler_kwargs={"step_size": 1, "gamma": 0.5}),
                             lo_cfg=mlo.ProblemConfig(unroll_steps=2), up_cfg=mlo.ProblemConfig(update_every=2))
    eng.run(12)                 # up ready 6 times, updates 3 times
    assert up.step_count == 3
    assert up.optimizer.param_groups[0]["lr"] == pytest.approx(0.2 * 0.5 ** 3, rel=1e-15)


def plain_lower(a, u, x0, opt_cls, kw, n, data=None, scheduler=None):
    """The lower alone with plain torch.optim at fixed upper ``u``."""
    x = torch.nn.Parameter(torch.as_tensor(x0, dtype=DT).clone())
    opt = opt_cls([x], **kw)
    sch = scheduler[0](opt, **scheduler[1]) if scheduler else None
    for k in range(n):
        b = 1.0 if data is None else data[k % len(data)]
        loss = 0.5 * ((x - a * torch.tanh(u)) ** 2).sum() + torch.log(torch.cosh(x * b)).sum()
        x.grad, = torch.autograd.grad(loss, x)
        opt.step()
        if sch:
            sch.step()
    return x.detach(), opt


LOWER_OPTS = {
    "sgd_momentum": (torch.optim.SGD, dict(lr=0.15, momentum=0.9, nesterov=True, weight_decay=0.01)),
    "sgd_dampening": (torch.optim.SGD, dict(lr=0.1, momentum=0.7, dampening=0.25)),
    "adam": (torch.optim.Adam, dict(lr=0.05, betas=(0.85, 0.99), eps=1e-3, weight_decay=0.02, amsgrad=True)),
    "adamw": (torch.optim.AdamW, dict(lr=0.05, betas=(0.7, 0.9), weight_decay=0.1)),
}


@pytest.mark.parametrize("method", ["unrolled", "cg"])
@pytest.mark.parametrize("opt", sorted(LOWER_OPTS))
def test_optimizer_state_continuity_upper_frozen(opt, method, measured):
    """Upper lr 0: the lower's trajectory (through windows of 3 steps when unrolled,
    in place with torch.optim for CG) equals a plain torch.optim loop, and so does the
    optimizer state handed back to torch.optim."""
    cls, kw = LOWER_OPTS[opt]
    data = [0.5, 1.5, -1.0, 2.0]
    eng, up, lo, a = bilevel(lo_kw=dict(optimizer=cls, optimizer_kwargs=kw), lo_data=data,
                             up_kw=dict(optimizer_kwargs={"lr": 0.0}),
                             lo_cfg=mlo.ProblemConfig(unroll_steps=3, method=method))
    x0, u = lo.module.x.detach().clone(), up.module.x.detach().clone()
    for n in (3, 6, 9, 12):
        eng.run(3)
        ref, ref_opt = plain_lower(a, u, x0, cls, kw, n, data)
        assert torch.equal(up.module.x.detach(), u)
        err = float((lo.module.x.detach() - ref).abs().max() / ref.abs().max())
        measured("lower trajectory through windows / in place vs plain torch.optim", err, 1e-14)
    p, q = lo.module.x, ref_opt.param_groups[0]["params"][0]
    assert set(lo.optimizer.state[p]) == set(ref_opt.state[q])
    for k, v in ref_opt.state[q].items():
        a, b = torch.as_tensor(lo.optimizer.state[p][k], dtype=DT), torch.as_tensor(v, dtype=DT)
        measured("optimizer state handed back to torch.optim vs plain torch.optim",
                 float((a - b).abs().max() / b.abs().max().clamp_min(1e-300)), 1e-14)


@pytest.mark.parametrize("method", [
    "unrolled", "cg"])
def test_lower_scheduler_inside_windows(method, measured):
    """A scheduler on the lower steps per update; with the upper frozen the trajectory
    must equal a plain torch loop with the same scheduler — also inside windows."""
    kw = dict(lr=0.2, momentum=0.5)
    sched = (torch.optim.lr_scheduler.StepLR, {"step_size": 1, "gamma": 0.7})
    eng, up, lo, a = bilevel(lo_kw=dict(optimizer_kwargs=kw, scheduler=sched[0], scheduler_kwargs=sched[1]),
                             up_kw=dict(optimizer_kwargs={"lr": 0.0}),
                             lo_cfg=mlo.ProblemConfig(unroll_steps=3, method=method))
    x0, u = lo.module.x.detach().clone(), up.module.x.detach().clone()
    eng.run(6)
    ref, ref_opt = plain_lower(a, u, x0, torch.optim.SGD, kw, 6, scheduler=sched)
    assert lo.optimizer.param_groups[0]["lr"] == pytest.approx(0.2 * 0.7 ** 6, rel=1e-14)
    err = float((lo.module.x.detach() - ref).abs().max() / ref.abs().max())
    measured("lower trajectory with LR scheduler inside windows vs plain torch loop", err, 1e-14)


# ------------------------------------- the top updating while a window reads it
def test_top_updates_inside_a_window_that_reads_it(measured):
    """T (the only top, loss ½‖t‖²: t ← 0.9 t per update) is read by N, which is unrolled
    for Y's only path (Y, N, Y) but on no path of T. N steps every iteration, Y is ready
    every 2nd, T every 3rd (its lower V has unroll_steps 3) — so T updates *inside* N's
    windows (iterations 3→4, 9→10). With ``f_N = ½‖n − t ⊙ y‖²`` and SGD(η) a window of
    two steps reading t_a, t_b gives ``∂n₂/∂y = diag((1−η)η t_a + η t_b)``; Y applies
    ``(y − w) + ((1−η)η t_a + η t_b) ⊙ (n₂ − 1)``."""
    eta = 0.2
    x = lambda p: p.params["x"]  # noqa: E731
    T = Node("T", [0.3, -0.2], lambda s, b: 0.5 * (x(s) ** 2).sum(), optimizer_kwargs={"lr": 0.1})
    W = Node("W", [0.1, 0.4], lambda s, b: 0.5 * ((x(s) - x(s.T)) ** 2).sum(), optimizer_kwargs={"lr": 0.1})
    V = Node("V", [1.0, 2.0], lambda s, b: 0.5 * ((x(s) - x(s.T)) ** 2).sum(), optimizer_kwargs={"lr": 0.1},
             config=mlo.ProblemConfig(unroll_steps=3))
    Y = Node("Y", [0.5, 0.5], lambda s, b: 0.5 * ((x(s.N) - 1) ** 2).sum() + 0.5 * ((x(s) - x(s.W)) ** 2).sum(),
             optimizer=RecSGD, optimizer_kwargs={"lr": 0.1})
    N = Node("N", [0.2, 0.7], lambda s, b: 0.5 * ((x(s) - x(s.T) * x(s.Y)) ** 2).sum(),
             optimizer_kwargs={"lr": eta}, config=mlo.ProblemConfig(unroll_steps=2))
    W.T, V.T, Y.N, Y.W, N.T, N.Y = T, T, N, W, T, Y
    eng = mlo.Engine([T, W, V, Y, N], {"u2l": {T: [N, W, V], W: [Y], Y: [N]}, "l2u": {N: [Y]}})
    assert eng.graph.paths("T") == [] and eng.graph.paths("Y") == [("Y", "N", "Y")]
    ts, errs = [], []
    for _ in range(12):
        ts.append(T.module.x.detach().clone())       # the t N's step of this iteration reads
        y, w, before = Y.module.x.detach().clone(), W.module.x.detach().clone(), Y.step_count
        eng.step()
        if Y.step_count > before:                    # Y updated; N's window closed
            expect = (y - w) + ((1 - eta) * eta * ts[-2] + eta * ts[-1]) * (N.module.x.detach() - 1)
            errs.append(float(torch.linalg.vector_norm(Y.optimizer.record[-1] - expect)
                              / torch.linalg.vector_norm(expect)))
    assert eng.counts() == {"T": 4, "W": 6, "V": 12, "Y": 6, "N": 12}
    measured("top updating inside a window that reads it: Y's hypergradient vs closed form",
             max(errs), 1e-12)
