"""Modules with buffers (BatchNorm in training mode) and randomness (Dropout) in a lower.

Implicit and finite-difference hypergradients re-evaluate the lower loss (CG and
Neumann once for their Hessian-vector products, finite differences twice). Those
evaluations are not training steps: BatchNorm's running statistics, its
``num_batches_tracked`` and the global RNG stream after N engine iterations must be
those of a plain ``torch`` loop that does only the N training steps (plus the
upper's own forward through the lower, which any hand-written bilevel loop does
too). Unrolled windows step with the differentiable twin through
``functional_call``: the trajectory of parameters *and* buffers must equal plain
``torch.optim`` training, and the hypergradient through BatchNorm must equal a
naive autograd unroll. ``mlo.compare``'s reference engine must receive the
buffers too. float64, non-default hyperparameters.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call

import mlo
from _helpers import RecSGD, Vars, rel

DT = torch.float64
D, H, K = 4, 6, 3                  # inputs, hidden width, lower steps per upper update
SGD_LO = dict(lr=0.05, momentum=0.7, dampening=0.1, weight_decay=0.01)
METHODS = {
    "unrolled": {},
    "cg": {"max_iter": 4, "damping": 0.5},
    "neumann": {"iterations": 3, "alpha": 0.05},
    "finite_difference": {"epsilon": 0.02, "scale_by_lr": True},
}


class Call(mlo.Problem):
    """A module problem with loss ``loss(self)``; other problems wired as attributes."""

    def __init__(self, name, module, loss, **kw):
        super().__init__(name, module=module, **kw)
        self._loss = loss

    def training_step(self, batch):
        return self._loss(self)


def make_data(seed=0, n=8, batches=3):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=DT)  # noqa: E731
    train = [(2 * r(n, D) + 1, r(n)) for _ in range(batches)]
    val = [(r(n, D) - 0.5, r(n)) for _ in range(2)]
    return train, val


def make_module(dropout: float, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.BatchNorm1d(D, momentum=0.3), nn.Linear(D, H),
                         nn.BatchNorm1d(H, momentum=None),       # cumulative average
                         nn.Tanh(), nn.Dropout(dropout), nn.Linear(H, 1)).double()


def lower_loss(out, y, w1, lam):
    return ((out.squeeze(-1) - y) ** 2).mean() + (lam.exp() * w1 ** 2).sum()


def upper_loss(out, y, lam):
    return ((out.squeeze(-1) - y) ** 2).mean() + 0.01 * (lam ** 2).sum()


class Lower(mlo.Problem):
    def training_step(self, batch):
        x, y = batch
        return lower_loss(self(x), y, self.params["1.weight"], self.up.params["lam"])


class Upper(mlo.Problem):
    def training_step(self, batch):
        x, y = batch                           # a forward of the lower in training mode
        return upper_loss(self.lo(x), y, self.params["lam"])


def build(method, module, train, val):
    lo = Lower("lo", module=module, optimizer_kwargs=SGD_LO, data=train,
               config=mlo.ProblemConfig(unroll_steps=K, method=method, method_options=METHODS[method]))
    up = Upper("up", params={"lam": torch.full((1, D), -1.0, dtype=DT)}, optimizer=RecSGD,
               optimizer_kwargs={"lr": 0.2, "momentum": 0.4}, data=val)
    lo.up, up.lo = up, lo
    return mlo.Engine([lo, up], {"u2l": {up: [lo]}, "l2u": {lo: [up]}}), lo, up


def plain_loop(module, train, val, lams):
    """The N lower training steps with ``torch.optim`` (λ as the engine had it at each
    step) and, after every K-th, the upper's forward through the lower."""
    opt = torch.optim.SGD(module.parameters(), **SGD_LO)
    for i, lam in enumerate(lams):
        x, y = train[i % len(train)]
        opt.zero_grad()
        lower_loss(module(x), y, module[1].weight, lam).backward()
        opt.step()
        if (i + 1) % K == 0:
            with torch.no_grad():
                module(val[((i + 1) // K - 1) % len(val)][0])


@pytest.mark.parametrize("method", sorted(METHODS))
def test_buffers_and_rng_follow_the_training_steps_only(method, measured):
    """Params, running statistics, ``num_batches_tracked`` and the RNG stream (Dropout
    masks) after 3 windows equal the plain loop's, for every method."""
    train, val = make_data()
    module = make_module(dropout=0.2)
    ref_module = copy.deepcopy(module)
    eng, lo, up = build(method, module, train, val)
    torch.manual_seed(123)
    lams = []
    for _ in range(3 * K):
        lams.append(up.module.lam.detach().clone())   # the λ the lower's step will read
        eng.step()
    eng.close_windows()
    rng_engine = torch.get_rng_state()
    assert up.step_count == 3 and len({float(l.sum()) for l in lams}) == 3   # λ moved
    torch.manual_seed(123)
    plain_loop(ref_module, train, val, lams)
    assert torch.equal(torch.get_rng_state(), rng_engine), "RNG stream differs from the plain loop"
    bn0, bn2 = module[0], module[2]
    ref0, ref2 = ref_module[0], ref_module[2]
    assert int(bn0.num_batches_tracked) == int(ref0.num_batches_tracked) == 3 * K + 3
    assert int(bn2.num_batches_tracked) == int(ref2.num_batches_tracked) == 3 * K + 3
    err_p = max(rel(p.detach(), q.detach()) for p, q in zip(module.parameters(), ref_module.parameters()))
    err_b = max(rel(b.double(), c.double()) for b, c in zip(module.buffers(), ref_module.buffers()))
    tol = 1e-13 if method == "unrolled" else 1e-15   # in place: the same torch.optim arithmetic
    measured("BN+Dropout lower: params after 3 windows vs plain torch loop", err_p, tol)
    measured("BN+Dropout lower: running stats after 3 windows vs plain torch loop", err_b, tol)


def test_gradient_leaves_buffers_and_rng_alone():
    """``Engine.gradient`` (used by mlo.compare, repeatedly) changes nothing: calling it
    twice gives identical results (same Dropout mask) and the same buffers."""
    train, val = make_data()
    eng, lo, up = build("cg", make_module(dropout=0.3), train, val)
    eng.run(K + 1)
    before = [b.clone() for b in lo.module.buffers()]
    rng = torch.get_rng_state()
    g1 = eng.gradient("up", batch=val[0])["grad"]["lam"]
    g2 = eng.gradient("up", batch=val[0])["grad"]["lam"]
    assert torch.equal(g1, g2)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(a, b) for a, b in zip(lo.module.buffers(), before))


def test_unrolled_hypergradient_through_batchnorm_vs_naive(measured):
    """Two windows of K SGD(momentum, dampening, wd) steps through BatchNorm in
    training mode: the upper's gradient equals a naive ``functional_call`` unroll in
    plain autograd (window 2 starts from the detached end of window 1, momentum
    handed over)."""
    train, val = make_data(seed=1)
    module = make_module(dropout=0.0, seed=1)
    ref_module = copy.deepcopy(module)
    eng, lo, up = build("unrolled", module, train, val)
    eng.run(2 * K)

    names = [n for n, _ in ref_module.named_parameters()]
    params = {n: p.detach().clone() for n, p in ref_module.named_parameters()}
    bufs = {}
    up_opt_lam = torch.full((1, D), -1.0, dtype=DT, requires_grad=True)
    up_opt = torch.optim.SGD([up_opt_lam], lr=0.2, momentum=0.4)
    lr, mom, damp, wd = (SGD_LO[k] for k in ("lr", "momentum", "dampening", "weight_decay"))
    grads = []
    step = 0
    for window in range(2):
        lam_t = up_opt_lam.detach().clone().requires_grad_()
        ps = {n: params[n].detach().clone().requires_grad_() for n in names}
        for _ in range(K):
            x, y = train[step % len(train)]
            out = functional_call(ref_module, ps, (x,))
            g = torch.autograd.grad(lower_loss(out, y, ps["1.weight"], lam_t), [ps[n] for n in names],
                                    create_graph=True)
            new = {}
            for n, gi in zip(names, g):
                gi = gi + wd * ps[n]
                b = bufs.get(n)
                b = gi if b is None else mom * b + (1 - damp) * gi
                bufs[n] = b
                new[n] = ps[n] - lr * b
            ps = new
            step += 1
        xv, yv = val[window % len(val)]
        gl, = torch.autograd.grad(upper_loss(functional_call(ref_module, ps, (xv,)), yv, lam_t), lam_t)
        grads.append(gl)
        up_opt_lam.grad = gl
        up_opt.step()
        params = {n: t.detach() for n, t in ps.items()}
        bufs = {n: t.detach() for n, t in bufs.items()}
    err = max(rel(r[0], g) for r, g in zip(up.optimizer.record, grads))
    measured("unrolled through BatchNorm (train mode), 2 windows: hypergradient vs naive", err, 1e-11)
    err_b = max(rel(b.double(), c.double()) for b, c in zip(module.buffers(), ref_module.buffers()))
    measured("unrolled through BatchNorm: running stats vs naive functional_call unroll", err_b, 1e-13)


def test_compare_reference_engine_gets_the_buffers(measured):
    """``mlo.compare`` evaluates a reference Setting in its own engine into which the
    measured engine's state is copied. With BatchNorm in eval mode in the upper's loss
    the running statistics are part of that state, and with two validation batches
    the reference must use the measured upper's batch: CG compared with the very same
    CG setting must agree."""
    from mlo.compare import Setting, compare
    from mlo.compare.graphs import HOLD

    train, val = make_data(seed=2)

    class EvalUpper(Upper):
        def training_step(self, batch):
            x, y = batch
            self.lo.module.eval()                      # validation in eval mode
            try:
                return upper_loss(self.lo(x), y, self.params["lam"])
            finally:
                self.lo.module.train()

    def factory(method, options):
        lo = Lower("lo", module=make_module(dropout=0.0, seed=2), optimizer_kwargs=SGD_LO, data=train,
                   config=mlo.ProblemConfig(unroll_steps=HOLD, method=method, method_options=options))
        up = EvalUpper("up", params={"lam": torch.full((1, D), -1.0, dtype=DT)}, data=val)
        lo.up, up.lo = up, lo
        return mlo.Engine([lo, up], {"u2l": {up: [lo]}, "l2u": {lo: [up]}}), "up"

    cg = Setting("cg", {"max_iter": 50, "tol": 0.0, "damping": 0.5})
    rep = compare(factory, [cg], cg, warmup=5, repeats=1, memory=False)
    measured("mlo.compare: CG vs the same CG reference, BN in eval mode", rep.rows[0].rel_error, 1e-12)


class EvalBN(nn.Module):
    """``BatchNorm1d`` in eval mode with its statistics as plain constants (no buffers)."""

    def __init__(self, bn):
        super().__init__()
        self.weight, self.bias = nn.Parameter(bn.weight.detach().clone()), nn.Parameter(bn.bias.detach().clone())
        self.mean, self.var, self.eps = bn.running_mean.clone(), bn.running_var.clone(), bn.eps

    def forward(self, x):
        return (x - self.mean) / torch.sqrt(self.var + self.eps) * self.weight + self.bias


def test_eval_mode_batchnorm_in_a_middle_window_with_implicit_bottom(measured):
    """T → M (unrolled, BatchNorm in eval mode) → B (CG). M's update graph saves the
    BatchNorm statistics and stays pending until T backpropagates through M's window;
    B's CG runs in between (restoring buffers). Restoring must not invalidate that
    graph: T's gradients equal those of the same graph with the statistics as
    constants instead of buffers."""
    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(6, D, generator=gen, dtype=DT), torch.randn(6, generator=gen, dtype=DT)

    def run(first):
        torch.manual_seed(5)
        bn = nn.BatchNorm1d(D).double()
        with torch.no_grad():
            bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 2.0), bn.weight.uniform_(0.5, 1.5)
        module = nn.Sequential(bn if first else EvalBN(bn), nn.Linear(D, 1)).double().eval()
        B = Vars("B", {"b": torch.zeros(D, dtype=DT)},
                 lambda s: 0.5 * ((s.params["b"] - s.M.params["1.weight"].squeeze(0)) ** 2).sum(),
                 config=mlo.ProblemConfig(method="cg"))
        M = Call("M", module, lambda s: ((s(x).squeeze(-1) - y - s.B.params["b"].sum()) ** 2).mean()
                 + (s.T.params["t"].exp() * s.params["1.weight"] ** 2).sum(),
                 optimizer_kwargs={"lr": 0.1, "momentum": 0.5}, config=mlo.ProblemConfig(unroll_steps=2))
        T = Vars("T", {"t": torch.zeros(1, D, dtype=DT)},
                 lambda s: ((s.M(x).squeeze(-1) - y) ** 2).mean() + 0.1 * (s.params["t"] ** 2).sum(),
                 optimizer=RecSGD, optimizer_kwargs={"lr": 0.2})
        B.M, M.B, M.T, T.M = M, B, T, M
        eng = mlo.Engine([T, M, B], {"u2l": {T: [M], M: [B]}, "l2u": {B: [M], M: [T]}})
        eng.run(8)
        assert eng.counts() == {"T": 4, "M": 8, "B": 8}
        return torch.stack(T.optimizer.record)

    got, ref = run(True), run(False)
    measured("eval-mode BN in an unrolled middle window (CG bottom): T's gradients vs constants",
             rel(got, ref), 1e-12)
