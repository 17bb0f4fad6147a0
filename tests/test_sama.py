"""SAMA (engines/sama.py) through ``mlo.Engine`` on P1 ridge with an Adam lower (float64).

Lower ``f(w, λ) = ½‖Xw − y‖² + ½ Σ_j λ_j w_j²``, upper ``F = ½‖X_v w − y_v‖²``
(the problem of tests/test_engine_methods_closed_form.py), ``w`` split over two tensors
``a = w[:3]``, ``b = w[3:]``. ``∂²_{λw} f · u = w ⊙ u`` and ``f`` is quadratic in
``w``, so SAMA's central difference is exact up to rounding and every applied upper
gradient must equal::

    −w ⊙ (η ⊙ D ⊙ g(w)),   g(w) = X_vᵀ(X_v w − y_v),
    D = ((1−β1) β2 v_old − β1 (1−β2) ĝ m_old) / (√v + ε)³,

where the test tracks the Adam moments by hand (``m_old``, ``v_old`` before the
lower's last step, ``m``, ``v`` after it) from gradients it computes itself at the
iterate before each lower step, ``ĝ = Xᵀ(Xw − y) + λ ⊙ w`` (+ ``wd·w`` for Adam's
coupled weight decay), and ``η`` is each tensor's group learning rate.
"""
from __future__ import annotations

import pytest
import torch

import mlo
from _helpers import RecSGD, Vars, recording, rel
from engines.base import Lower, get
from test_engine_methods_closed_form import data, g_of

DT = torch.float64
K = 3                          # lower steps per upper update
ADAM = {"lr": 0.05, "betas": (0.8, 0.95), "eps": 1e-6}


def build(P, optimizer=torch.optim.Adam, opt_kw=None, groups=None, options=None):
    X, y, Xv, yv = P["X"], P["y"], P["Xv"], P["yv"]

    def w_of(s):
        return torch.cat([s.params["a"], s.params["b"]])

    up = Vars("up", {"lam": P["lam"]},
              lambda s: 0.5 * ((Xv @ w_of(s.lo) - yv) ** 2).sum() + 0 * s.params["lam"].sum(),
              optimizer=RecSGD, optimizer_kwargs={"lr": 0.01, "momentum": 0.3})
    lo = Vars("lo", {"a": P["w0"][:3], "b": P["w0"][3:]},
              lambda s: 0.5 * ((X @ w_of(s) - y) ** 2).sum() + 0.5 * (s.up.params["lam"] * w_of(s) ** 2).sum(),
              optimizer=optimizer, optimizer_kwargs=dict(ADAM) if opt_kw is None else opt_kw,
              param_groups=groups,
              config=mlo.ProblemConfig(unroll_steps=K, method="sama", method_options=options or {}))
    up.lo, lo.up = lo, up
    return mlo.Engine([lo, up], {"u2l": {up: [lo]}, "l2u": {lo: [up]}}), up, lo


def w_now(lo):
    return torch.cat([lo.module.a, lo.module.b]).detach().clone()


def run(P, n_updates=3, opt_kw=None, groups=None, options=None, optimizer=torch.optim.Adam, coupled_wd=0.0):
    """Runs ``n_updates`` upper updates one lower step at a time; returns per update
    ``(applied gradient, SAMA closed form, closed form with D = 1, closed form ignoring
    coupled weight decay)`` and the worst hand-vs-torch moment mismatch."""
    eng, up, lo = build(P, optimizer, opt_kw, groups, options)
    kw = dict(ADAM) if opt_kw is None else opt_kw
    (b1, b2), eps = kw["betas"], kw["eps"]
    lr = {id(p): float(g["lr"]) for g in lo.optimizer.param_groups for p in g["params"]}
    eta = torch.cat([torch.full((p.numel(),), lr[id(p)], dtype=DT) for p in (lo.module.a, lo.module.b)])
    X, y = P["X"], P["y"]
    m = torch.zeros_like(P["w0"]); v = torch.zeros_like(m)
    out, moment_err = [], 0.0
    for _ in range(n_updates * K):
        lam, w_prev, n = up.module.lam.detach().clone(), w_now(lo), len(up.optimizer.record)
        eng.run(1)                                    # one lower step (then the upper, when ready)
        g_plain = X.T @ (X @ w_prev - y) + lam * w_prev
        gh = g_plain + coupled_wd * w_prev            # what torch's Adam fed to its moments
        m_old, v_old = m, v
        m, v = b1 * m + (1 - b1) * gh, b2 * v + (1 - b2) * gh ** 2
        # D from torch's moments but the applied gradient (coupled weight decay ignored)
        Dp = ((1 - b1) * v - (1 - b2) * g_plain * m) / (v.sqrt() + eps) ** 3
        st = [lo.optimizer.state[p] for p in (lo.module.a, lo.module.b)]
        moment_err = max(moment_err, rel(torch.cat([s["exp_avg"] for s in st]), m),
                         rel(torch.cat([s["exp_avg_sq"] for s in st]), v))
        if len(up.optimizer.record) == n:
            continue
        w = w_now(lo)
        Dm = ((1 - b1) * b2 * v_old - b1 * (1 - b2) * gh * m_old) / (v.sqrt() + eps) ** 3
        gw = g_of(P, w)
        out.append((up.optimizer.record[-1], -w * eta * Dm * gw, -w * eta * gw, -w * eta * Dp * gw))
    assert eng.counts() == {"lo": n_updates * K, "up": n_updates}
    return out, moment_err


@pytest.mark.parametrize("case", ["adam", "per_group_lr", "adamw", "adam_coupled_wd"])
def test_sama_adam_closed_form_through_engine(case, measured):
    P = data(seed=7)
    opt_kw, groups, optimizer, wd = dict(ADAM), None, torch.optim.Adam, 0.0
    if case == "per_group_lr":
        groups = [{"params": ["b"], "lr": 0.02}]       # a: 0.05 (default group), b: 0.02
    elif case == "adamw":
        optimizer, opt_kw["weight_decay"] = torch.optim.AdamW, 0.1
    elif case == "adam_coupled_wd":
        opt_kw["weight_decay"] = wd = 0.05
    res, moment_err = run(P, opt_kw=opt_kw, groups=groups, optimizer=optimizer, options={"alpha": 0.7},
                          coupled_wd=wd)
    assert moment_err < 1e-12                          # the hand-tracked moments are torch's
    errs = [rel(got, ref) for got, ref, *_ in res]
    measured(f"SAMA Adam lower ({case}, 3 upper updates) vs closed form −w⊙ηD⊙g", max(errs), 1e-9)
    # The test can fail: without the update Jacobian (D = 1) the value is far off ...
    assert min(rel(got, no_d) for got, _, no_d, _ in res) > 0.5
    if case == "adam_coupled_wd":   # ... and so is D from the applied gradient alone
        assert min(rel(got, plain) for got, _, _, plain in res) > 1e-2
    if case == "per_group_lr":      # ... and one rate for both groups
        got, ref, *_ = res[-1]
        one = ref * torch.cat([torch.ones(3, dtype=DT), torch.full((2,), 0.05 / 0.02, dtype=DT)])
        assert rel(got, one) > 1e-3


def test_sama_sgd_is_identity_and_needs_no_state(measured):
    """SGD lower: ``u = v`` (Betty's ``precondition_sgd``), at any time — also before
    the first lower update — and without side effects on the optimizer state."""
    P = data(seed=8)
    eng, up, lo = build(P, torch.optim.SGD, {"lr": 0.3, "momentum": 0.5}, options={"alpha": 0.2})
    for _ in range(2):
        w = w_now(lo)
        got = eng.gradient("up")["grad"]["lam"]
        measured("SAMA SGD lower vs identity form −w⊙g (engine.gradient)", rel(got, -w * g_of(P, w)), 1e-9)
        eng.run(K)
    state = {k: t.clone() for k, t in lo.optimizer.state[lo.module.a].items()}
    eng.gradient("up")
    assert all(torch.equal(t, lo.optimizer.state[lo.module.a][k]) for k, t in state.items())


def test_first_update_error_names_problem():
    P = data(seed=9)
    eng, up, lo = build(P)
    with pytest.raises(ValueError, match=r"problem 'lo': sama needs the state of the lower's last "
                                         r"Adam update .* none yet"):
        eng.gradient("up")
    eng.run(K)                       # after the lower's steps the upper updates fine
    assert eng.counts() == {"lo": K, "up": 1}


@pytest.mark.parametrize("optimizer, kw, match", [
    (torch.optim.RMSprop, {"lr": 0.01}, r"problem 'lo': sama supports .*'SGD', 'Adam', 'AdamW'.*got 'RMSprop'"),
    (torch.optim.NAdam, {"lr": 0.01}, r"got 'NAdam'"),
    (recording(torch.optim.Adam), {"lr": 0.01}, r"got 'RecordingAdam'"),
    (torch.optim.Adam, {"lr": 0.01, "amsgrad": True}, r"problem 'lo': sama: .*amsgrad=True"),
    (torch.optim.SGD, {"lr": 0.01, "maximize": True}, r"problem 'lo': sama: .*maximize=True"),
])
def test_unsupported_optimizer_names_problem_and_type(optimizer, kw, match):
    eng, _, _ = build(data(seed=10), optimizer, kw)
    with pytest.raises(ValueError, match=match):
        eng.run(K)


@pytest.mark.parametrize("options, exc, match", [
    ({"alpha": 0.0}, ValueError, r"problem 'lo'.*sama: alpha must be a number > 0, got 0.0"),
    ({"alpha": -1.0}, ValueError, r"alpha must be a number > 0, got -1.0"),
    ({"alpha": float("nan")}, ValueError, r"alpha must be a number > 0.*not finite"),
    ({"alpha": "1"}, ValueError, r"alpha must be a number > 0, got '1' \(str\)"),
    ({"create_graph": "no"}, ValueError, r"sama: create_graph must be a bool"),
    ({"darts_adam_alpha": 1.0}, TypeError, r"problem 'lo'.*\['darts_adam_alpha'\].*'alpha'"),
])
def test_option_validation(options, exc, match):
    with pytest.raises(exc, match=match):
        build(data(seed=11), options=options)


def test_direct_call_errors_and_tiny_alpha_warning():
    sama = get("sama")
    with pytest.raises(ValueError, match="alpha"):
        sama(None, (), alpha=-1.0)
    w = torch.ones(2, dtype=DT, requires_grad=True)
    lam = torch.ones(2, dtype=DT, requires_grad=True)
    lower = Lower(params=(w,), inputs=(lam,), loss_fn=lambda p, x: 0.5 * (x[0] * p[0] ** 2).sum(), label="L")
    with pytest.raises(ValueError, match=r"L: sama needs lower.optimizer"):
        sama(lower, (torch.ones(2, dtype=DT),))
    lower.optimizer = [{"type": "SGD", "lr": 0.1, "maximize": False}]
    assert torch.allclose(sama(lower, (torch.ones(2, dtype=DT),))[0], -torch.ones(2, dtype=DT))
    with pytest.warns(RuntimeWarning, match=r"L: sama: alpha=1e-300 is too small"):
        out = sama(lower, (torch.ones(2, dtype=DT),), alpha=1e-300)
    assert torch.equal(out[0], torch.zeros(2, dtype=DT))
