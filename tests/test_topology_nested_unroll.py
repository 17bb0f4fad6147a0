"""unroll_steps > 1 at two levels at once, plus ``update_every`` at the middle (float64).

Three levels, both lowers unrolled (SGD with momentum, a differentiable twin)::

    B  f_B(b; m)       = ½‖b − A₁ tanh m‖² + 0.2 Σ log cosh(b ⊙ x)     x: B's batch
    M  f_M(m; t [, b]) = ½‖m − A₂ tanh t [− ½A₃ tanh b]‖² + 0.1 Σ log cosh m
    T  F(t; [m,] b)    = ½‖[C₁ sin m +] C₂ b − y‖² + 0.05‖t‖² + 0.1 Σ cos t

* ``chain``: ``u2l = {T: [M], M: [B]}, l2u = {B: [T]}`` — one path (T, M, B, T);
  M has no path of its own.
* ``full``: ``l2u = {B: [M, T], M: [T]}`` adds the bracketed reads — T has three
  paths (T, M, T), (T, M, B, T), (T, M, B, M, T); M has one, (M, B, M).

Schedule (engine docstring), with B ``unroll_steps = K1 = 2``, M ``unroll_steps =
K2 = 3`` and M ``update_every = 2``: B steps every iteration; M becomes ready after
K1 B steps (iterations 2, 4, 6, ...) and updates on every 2nd readiness (4, 8, 12,
...); T becomes ready after K2 M *updates* (12, 24): per T update, M updates 3 times
and B steps 12 times.

Window semantics (what the naive reference implements):

* B and M lie on T's paths and are unrolled: every step is differentiable; M's
  step differentiates its own gradient ``∂f_M/∂m`` (create_graph) and adds its
  hypergradient as a constant.
* A window ends (iterates detached) at the end of an iteration in which a problem
  that has it on its paths becomes ready — also when that readiness skips its update:
  T's readiness ends M's and B's; in ``full`` every readiness of M ends B's.
* A path through a closed window is truncated: in ``full``, an M step that read b
  keeps the link b → (B's window → m) for T only if T becomes ready in the same
  iteration (B's window is still open then); earlier M steps see b as a constant.
"""
from __future__ import annotations

import pytest
import torch

import mlo
from _helpers import RecSGD, rel, Vars

DT = torch.float64
K1, K2, EVERY = 2, 3, 2
PERIOD = K1 * EVERY * K2              # iterations per T update
SGD_B = dict(lr=0.2, momentum=0.5, weight_decay=0.01, nesterov=True)
SGD_M = dict(lr=0.15, momentum=0.7, dampening=0.2, weight_decay=0.02)
SGD_T = dict(lr=0.05, momentum=0.4)


def data(seed=31):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=DT)  # noqa: E731
    return dict(A1=r(5, 4), A2=r(4, 2), A3=r(4, 5), C1=r(3, 4) / 2, C2=r(3, 5), y=r(3),
                xs=[r(5) for _ in range(3)], t=r(2), m=r(4), b=r(5))


def losses(d, full):
    lc = lambda x: torch.log(torch.cosh(x)).sum()  # noqa: E731

    def f_B(b, m, x):
        return 0.5 * ((b - d["A1"] @ torch.tanh(m)) ** 2).sum() + 0.2 * lc(b * x)

    def f_M(m, t, b):
        tgt = d["A2"] @ torch.tanh(t) + (0.5 * d["A3"] @ torch.tanh(b) if full else 0)
        return 0.5 * ((m - tgt) ** 2).sum() + 0.1 * lc(m)

    def F_T(t, m, b):
        pred = d["C2"] @ b + (d["C1"] @ torch.sin(m) if full else 0)
        return 0.5 * ((pred - d["y"]) ** 2).sum() + 0.05 * (t ** 2).sum() + 0.1 * torch.cos(t).sum()

    return f_B, f_M, F_T


def build(d, full):
    f_B, f_M, F_T = losses(d, full)
    T = Vars("T", {"t": d["t"]}, lambda s: F_T(s.params["t"], s.M.params["m"] if full else None, s.B.params["b"]),
             optimizer=RecSGD, optimizer_kwargs=SGD_T)
    M = Vars("M", {"m": d["m"]}, lambda s: f_M(s.params["m"], s.T.params["t"], s.B.params["b"] if full else None),
             optimizer_kwargs=SGD_M, config=mlo.ProblemConfig(unroll_steps=K2, update_every=EVERY))
    B = Batched("B", {"b": d["b"]}, lambda s, x: f_B(s.params["b"], s.M.params["m"], x),
                optimizer_kwargs=SGD_B, data=d["xs"], config=mlo.ProblemConfig(unroll_steps=K1))
    T.M, T.B, M.T, M.B, B.M = M, B, T, B, M
    l2u = {B: [M, T], M: [T]} if full else {B: [T]}
    return mlo.Engine([T, M, B], {"u2l": {T: [M], M: [B]}, "l2u": l2u})


class Batched(mlo.Problem):
    def __init__(self, name, params, loss, **kw):
        super().__init__(name, params=params, **kw)
        self._loss = loss

    def training_step(self, batch):
        return self._loss(self, batch)


def sgd(p, g, buf, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False):
    """torch.optim.SGD's documented update, out of place."""
    g = g + weight_decay * p
    buf = g if buf is None else momentum * buf + (1 - dampening) * g
    return p - lr * (g + momentum * buf if nesterov else buf), buf


def naive(d, full, iterations, truncate=True):
    """The schedule and window semantics of the module docstring in plain autograd.
    ``truncate=False`` keeps every M step's link to b (no truncation at B's windows)."""
    f_B, f_M, F_T = losses(d, full)
    t_par = torch.nn.Parameter(d["t"].clone())
    opt_t = torch.optim.SGD([t_par], **SGD_T)
    leaf = lambda x: x.detach().clone().requires_grad_()  # noqa: E731
    t, m, b = leaf(d["t"]), leaf(d["m"]), leaf(d["b"])
    m_buf = b_buf = None
    ready_m = updates_m = 0
    grads_t = []
    for it in range(1, iterations + 1):
        gb, = torch.autograd.grad(f_B(b, m, d["xs"][(it - 1) % 3]), b, create_graph=True)
        b, b_buf = sgd(b, gb, b_buf, **SGD_B)                  # reads m (M's window)
        close_b = close_m = False
        if it % K1 == 0:                                       # M ready
            ready_m += 1
            close_b = full                                     # B lies on M's path
            if ready_m % EVERY == 0:                           # M updates
                updates_m += 1
                t_ready = updates_m % K2 == 0
                b_in = b if (not truncate or t_ready) else b.detach()
                mi = m.clone()
                g, = torch.autograd.grad(f_M(mi, t, b_in if full else None), mi, create_graph=True)
                if full:                                       # hypergradient via B's window: a constant
                    h, = torch.autograd.grad(f_M(m.detach(), t.detach(), b), m, retain_graph=True)
                    g = g + h.detach()
                m, m_buf = sgd(m, g, m_buf, **SGD_M)
                if t_ready:                                    # T ready: it consumes M's and B's windows
                    gt, = torch.autograd.grad(F_T(t, m if full else None, b), t)
                    grads_t.append(gt)
                    t_par.grad = gt
                    opt_t.step()
                    t = leaf(t_par)
                    close_b = close_m = True
        if close_b:
            b, b_buf = leaf(b), b_buf.detach()
        if close_m:
            m, m_buf = leaf(m), m_buf.detach()
    return grads_t, (t_par.detach(), m.detach(), b.detach())


@pytest.mark.parametrize("full", [False, True], ids=["chain", "full"])
def test_schedule_counts_every_iteration(full):
    eng = build(data(), full)
    T, M, B = (eng.problems[n] for n in "TMB")
    assert eng.graph.paths("M") == ([("M", "B", "M")] if full else [])
    for it in range(1, 2 * PERIOD + 1):
        eng.step()
        assert (B.step_count, M.ready_count, M.step_count, T.ready_count, T.step_count) == \
            (it, it // K1, it // (K1 * EVERY), it // PERIOD, it // PERIOD), it
        # B's window ends with every readiness of M (full) or of T (chain); M's with T's,
        # and M's window opens at its first update after T's readiness
        b_open = it % (K1 if full else PERIOD) != 0
        m_open = it % PERIOD >= K1 * EVERY
        assert ("B" in eng.open_windows(), "M" in eng.open_windows()) == (b_open, m_open), it


@pytest.mark.parametrize("full", [False, True], ids=["chain", "full"])
def test_top_gradient_matches_naive_nested_unroll(full, measured):
    d = data()
    eng = build(d, full)
    eng.run(2 * PERIOD)
    eng.close_windows()
    rec = eng.problems["T"].optimizer.record
    grads, (t, m, b) = naive(d, full, 2 * PERIOD)
    assert len(rec) == len(grads) == 2
    kind = "full (3 paths)" if full else "chain (1 path)"
    measured(f"nested unroll K1=2, K2=3, update_every=2, {kind}: T's gradients vs naive",
             max(rel(a, g) for a, g in zip(rec, grads)), 1e-11)
    P = eng.problems
    measured(f"nested unroll K1=2, K2=3, update_every=2, {kind}: final states vs naive",
             max(rel(P["T"].module.t.detach(), t), rel(P["M"].module.m.detach(), m),
                 rel(P["B"].module.b.detach(), b)), 1e-11)
    if full:   # the truncation is visible: keeping every M step's link to b changes T's gradient
        untrunc, _ = naive(d, full, 2 * PERIOD, truncate=False)
        assert min(rel(a, g) for a, g in zip(untrunc, grads)) > 1e-4
