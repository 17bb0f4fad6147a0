"""Lifecycle hooks (issue 13 item 1): ``on_window_start``, ``after_step``, ``set_params``
and engine-level callbacks.

The main check is Betty's HPO pattern — reset the lower to zero at the start of each
inner loop, clamp it after each of its steps (inside the unrolled window: a
differentiable projection of the iterate), clamp λ after each upper step — run through
the engine and compared, in float64, with a hand-written loop: unrolled (reverse mode
through the clamped steps) and CG (dense implicit hypergradient at the last iterate).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mlo

torch.set_num_threads(1)
D, N, K, OUTER = 6, 40, 5, 4
LR_IN, LR_OUT, MOM, W_MAX, LAM_MIN = 0.5, 3.0, 0.9, 0.25, 0.5


def data():
    g = torch.Generator().manual_seed(0)
    w_gt = torch.randn(D, generator=g, dtype=torch.float64)

    def split():
        x = torch.randn(N, D, generator=g, dtype=torch.float64)
        return x, (x @ w_gt + 0.3 * torch.randn(N, generator=g, dtype=torch.float64) > 0).double()
    return split(), split()


def f_lower(w, lam, batch):
    x, y = batch
    return F.binary_cross_entropy_with_logits(x @ w, y) + 0.5 * (lam * w * w).sum()


def F_upper(w, batch):
    x, y = batch
    return F.binary_cross_entropy_with_logits(x @ w, y)


class Inner(mlo.Problem):
    def __init__(self, outer, batch, method, options):
        super().__init__("inner", params={"w": torch.zeros(D, dtype=torch.float64)}, data=[batch],
                         optimizer=torch.optim.SGD, optimizer_kwargs={"lr": LR_IN},
                         config=mlo.ProblemConfig(unroll_steps=K, method=method, method_options=options))
        self.outer, self.starts = outer, []

    def training_step(self, batch):
        return f_lower(self.params["w"], self.outer.params["lam"], batch)

    def on_window_start(self):                     # Betty: on_inner_loop_start
        self.starts.append(self.step_count)
        self.set_params({"w": torch.zeros(D, dtype=torch.float64)})

    def after_step(self):                          # Betty: param_callback (on the lower)
        self.set_params({"w": self.params["w"].clamp(-W_MAX, W_MAX)})


class Outer(mlo.Problem):
    def __init__(self, batch):
        super().__init__("outer", params={"lam": torch.ones(D, dtype=torch.float64)}, data=[batch],
                         optimizer=torch.optim.SGD, optimizer_kwargs={"lr": LR_OUT, "momentum": MOM})
        self.inner = None

    def training_step(self, batch):
        return F_upper(self.inner.params["w"], batch)

    def after_step(self):
        self.set_params({"lam": self.params["lam"].clamp(min=LAM_MIN)})


def build(method, options=None, config=None):
    tr, va = data()
    outer = Outer(va)
    inner = Inner(outer, tr, method, options or {})
    outer.inner = inner
    return mlo.Engine([outer, inner], {"u2l": {outer: [inner]}, "l2u": {inner: [outer]}}, config), inner, outer


def hand_written(method):
    """The same schedule without mlo: per outer step the hypergradients and (w, λ)."""
    tr, va = data()
    lam, buf, out = torch.ones(D, dtype=torch.float64), None, []
    for _ in range(OUTER):
        lam_t = lam.clone().requires_grad_()
        w = torch.zeros(D, dtype=torch.float64, requires_grad=True)
        for _ in range(K):
            g, = torch.autograd.grad(f_lower(w, lam_t, tr), w, create_graph=method == "unrolled")
            w = (w - LR_IN * g).clamp(-W_MAX, W_MAX)
            if method != "unrolled":
                w = w.detach().requires_grad_()
        if method == "unrolled":
            h, = torch.autograd.grad(F_upper(w, va), lam_t)
        else:   # implicit: −∂²_{λw} f H⁻¹ ∇_w F at the last iterate (dense)
            wd = w.detach()
            H = torch.autograd.functional.hessian(lambda t: f_lower(t, lam, tr), wd)
            mixed = torch.autograd.functional.jacobian(
                lambda l: torch.autograd.functional.jacobian(lambda t: f_lower(t, l, tr), wd,
                                                             create_graph=True), lam)
            v = torch.autograd.functional.jacobian(lambda t: F_upper(t, va), wd)
            h = -mixed.T @ torch.linalg.solve(H, v)
        buf = h.clone() if buf is None else MOM * buf + h
        lam = (lam - LR_OUT * buf).clamp(min=LAM_MIN)
        out.append((h, w.detach(), lam.clone()))
    return out


@pytest.mark.parametrize("method,options,tol", [("unrolled", {}, 1e-12),
                                                ("cg", {"max_iter": 50, "tol": 1e-13}, 1e-9)])
def test_betty_reset_and_clamp_equal_the_hand_written_loop(method, options, tol, measured):
    engine, inner, outer = build(method, options)
    ref = hand_written(method)
    for k in range(OUTER):
        engine.run(K)
        h, w, lam = ref[k]
        hyper = engine.last_hypergradient["outer"]["lam"]
        err = max(float((hyper - h).norm() / h.norm()),
                  float((inner.params["w"].detach() - w).norm() / w.norm()),
                  float((outer.params["lam"].detach() - lam).norm() / lam.norm()))
        assert err <= tol, (k, err)
    measured(f"hooks: reset+clamp through the engine vs hand-written loop ({method})", err, tol)
    assert inner.starts == [0, K, 2 * K, 3 * K]
    # the clamps were active: the projections changed the problem
    assert float(outer.params["lam"].detach().min()) == LAM_MIN
    assert float(inner.params["w"].detach().abs().max()) == W_MAX


def test_set_params_errors_and_in_window_replacement():
    engine, inner, outer = build("unrolled")
    with pytest.raises(KeyError, match="no variable 'v'"):
        inner.set_params({"v": torch.zeros(D)})
    with pytest.raises(ValueError, match=r"got shape \(3,\)"):
        inner.set_params({"w": torch.zeros(3)})

    class Bad(Outer):
        def training_step(self, batch):
            self.set_params({"lam": torch.ones(D, dtype=torch.float64)})

    tr, va = data()
    bad = Bad(va)
    bad.inner = Inner(bad, tr, "cg", {})
    e = mlo.Engine([bad, bad.inner], {"u2l": {bad: [bad.inner]}, "l2u": {bad.inner: [bad]}})
    with pytest.raises(RuntimeError, match="set_params inside a loss"):
        e.run(K)
    engine.run(2)                                    # inside the window: the iterate is replaced,
    real = dict(inner.module.named_parameters())["w"]
    inner.set_params({"w": torch.full((D,), 0.125, dtype=torch.float64)})
    assert torch.equal(inner.params["w"], torch.full((D,), 0.125, dtype=torch.float64))
    assert not torch.equal(real, inner.params["w"])  # not the module's parameter


def test_engine_callbacks_and_request_stop():
    engine, inner, outer = build("cg", {"max_iter": 5},
                                 mlo.EngineConfig(validate_every=3, validation=lambda e: {"x": 1.0}))
    seen = []

    class CB(mlo.callbacks.Callback):
        def after_update(self, engine, problem):
            seen.append(("update", engine.iteration, problem.name))

        def after_iteration(self, engine):
            seen.append(("iter", engine.iteration))
            if engine.iteration == 7:
                engine.request_stop()

        def after_validation(self, engine, metrics):
            seen.append(("val", engine.iteration, metrics["x"]))

    engine.run(20, callbacks=[CB()])
    assert engine.iteration == 7
    assert ("update", 4, "outer") in seen and ("val", 3, 1.0) in seen and ("val", 6, 1.0) in seen
    assert seen.index(("val", 6, 1.0)) < seen.index(("iter", 6))
    assert sum(s[0] == "update" for s in seen) == 7 + 1
