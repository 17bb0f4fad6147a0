"""Engine features inside unrolled windows, against naive autograd references.

float64, non-default hyperparameters, two windows of K steps each (the second
window starts from the detached end of the first, optimizer state handed over):

* ``ProblemConfig.grad_clip`` on the lower (inside the windows, differentiated
  through ``clip_grad_norm_``'s formula ``g · min(1, c / (‖g‖ + 1e-6))``) and on
  the upper (in place, against ``torch.nn.utils.clip_grad_norm_`` itself), with
  clipping active and inactive;
* ``optimizer_hyperparameters()`` — a learnable ``lr = exp(log_lr)`` of an
  Adam/AdamW lower — against a naive unroll and central finite differences of
  plain ``torch.optim`` runs;
* several param groups (per-group lr / weight decay / momentum or betas, a
  per-group ``LambdaLR``): trajectory equals ``torch.optim``, hypergradient equals
  the naive unroll;
* data: a finite list re-iterates in order, a generator fails clearly once spent.
"""
from __future__ import annotations

import math

import pytest
import torch

import mlo
from _helpers import recording, rel

DT = torch.float64
K = 4
N, D = 10, 3


RecordingSGD = recording(torch.optim.SGD)


def data(seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=DT)  # noqa: E731
    return dict(X=r(N, D), y=r(N), Xv=r(N, D), yv=r(N), w=r(D), b=r(()), lam=0.3 * r(D))


def f_lower(p, u, P):
    return torch.log(torch.cosh(P["X"] @ p["w"] + p["b"] - P["y"])).mean() \
        + 0.5 * (u["lam"].exp() * p["w"] ** 2).sum()


def F_upper(p, u, P):
    return 0.5 * ((P["Xv"] @ p["w"] + p["b"] - P["yv"]) ** 2).mean() + 0.01 * (u["lam"] ** 2).sum() \
        + sum(0 * t.sum() for t in u.values())


class Lo(mlo.Problem):
    def __init__(self, P, groups=None, hyper=False, schedule=None, **kw):
        if groups is not None:          # per-group settings, declared by parameter name
            cls, defaults, g = groups
            kw.update(optimizer=cls, optimizer_kwargs=defaults,
                      param_groups=[{"params": ["w"], **g[0]}, {"params": ["b"], **g[1]}])
            if schedule is not None:
                kw.update(scheduler=torch.optim.lr_scheduler.LambdaLR,
                          scheduler_kwargs={"lr_lambda": schedule})
        super().__init__("lo", params={"w": P["w"], "b": P["b"]}, **kw)
        self.P, self.hyper = P, hyper

    def training_step(self, batch):
        return f_lower(self.params, self.up.params, self.P)

    def optimizer_hyperparameters(self):
        return self.hyper(self.up.params) if self.hyper else None


class Up(mlo.Problem):
    def __init__(self, P, u0, **kw):
        super().__init__("up", params=u0, optimizer=RecordingSGD, **kw)
        self.P = P

    def training_step(self, batch):
        return F_upper(self.lo.params, self.params, self.P)


def build(P, lower_opt, lower_kw, u0, clip_lo=None, clip_up=None, **lo_extra):
    up = Up(P, u0, optimizer_kwargs=UP_KW, config=mlo.ProblemConfig(grad_clip=clip_up))
    lo = Lo(P, optimizer=lower_opt, optimizer_kwargs=lower_kw,
            config=mlo.ProblemConfig(unroll_steps=K, grad_clip=clip_lo), **lo_extra)
    up.lo, lo.up = lo, up
    return mlo.Engine([lo, up], {"u2l": {up: [lo]}, "l2u": {lo: [up]}}), lo, up


UP_KW = dict(lr=0.3, momentum=0.5)


# ------------------------------------------------------------ naive references
def sgd(p, g, st, h, lr, t):
    g = g + h.get("weight_decay", 0.0) * p
    mom = h.get("momentum", 0.0)
    if mom:
        st["buf"] = g if "buf" not in st else mom * st["buf"] + (1 - h.get("dampening", 0.0)) * g
        g = g + mom * st["buf"] if h.get("nesterov") else st["buf"]
    return p - lr * g


def adam(p, g, st, h, lr, t, decoupled=False):
    b1, b2 = h["betas"]
    wd = h.get("weight_decay", 0.0)
    if decoupled:
        p = p * (1 - lr * wd)
    else:
        g = g + wd * p
    st["m"] = b1 * st.get("m", 0.0) + (1 - b1) * g
    st["v"] = b2 * st.get("v", 0.0) + (1 - b2) * g * g
    v = st["v"]
    if h.get("amsgrad"):
        v = st["vmax"] = torch.maximum(st.get("vmax", torch.zeros_like(v)), v)
    return p - lr / (1 - b1 ** t) * st["m"] / (v.sqrt() / math.sqrt(1 - b2 ** t) + h["eps"])


def clip(gs, c):
    """clip_grad_norm_'s formula, differentiable."""
    norm = torch.sqrt(sum((g ** 2).sum() for g in gs))
    return [g * torch.clamp(c / (norm + 1e-6), max=1.0) for g in gs], float(norm.detach())


def naive(P, u0, update, hp, windows=2, clip_lo=None, clip_up=None, lr_of=None, schedule=None,
          hp_of=None):
    """Plain autograd: ``windows`` windows of K differentiable lower steps; the upper
    (torch.optim.SGD + clip_grad_norm_) steps on ``∂F/∂u`` after each.

    ``hp[name]``: the hyperparameters of parameter ``name``; ``lr_of(u)``: learned lr;
    ``hp_of(u)``: other learned hyperparameters (override ``hp``).
    Returns (upper gradients per window, final lower params, lower grad norms)."""
    u_leaf = {k: v.clone().requires_grad_() for k, v in u0.items()}
    uopt = torch.optim.SGD(list(u_leaf.values()), **UP_KW)
    p = {"w": P["w"].clone(), "b": P["b"].clone()}
    st = {"w": {}, "b": {}}
    grads, norms, step = [], [], 0
    for _ in range(windows):
        u = {k: v.detach().clone().requires_grad_() for k, v in u_leaf.items()}
        p = {k: v.detach().requires_grad_() for k, v in p.items()}
        st = {n: {k: v.detach() if torch.is_tensor(v) else v for k, v in s.items()} for n, s in st.items()}
        for _ in range(K):
            gs = torch.autograd.grad(f_lower(p, u, P), [p["w"], p["b"]], create_graph=True)
            if clip_lo is not None:
                gs, nrm = clip(gs, clip_lo)
                norms.append(nrm)
            new = {}
            for (n, x), g in zip(p.items(), gs):
                lr = lr_of(u) if lr_of else hp[n]["lr"]
                lr = lr * (schedule[n](step) if schedule else 1.0)
                h = {**hp[n], **hp_of(u)} if hp_of else hp[n]
                new[n] = update(x, g, st[n], h, lr, step + 1)
            p, step = new, step + 1
        g_u = torch.autograd.grad(F_upper(p, u, P), list(u.values()))
        grads.append([g.detach() for g in g_u])
        for leaf, g in zip(u_leaf.values(), g_u):
            leaf.grad = g.detach().clone()
        if clip_up is not None:
            torch.nn.utils.clip_grad_norm_(list(u_leaf.values()), clip_up)
        uopt.step()
    return grads, {k: v.detach() for k, v in p.items()}, norms


def applied_error(up, grads, clip_up=None):
    """Upper gradients the engine applied vs the naive ones (clipped like torch would)."""
    errs = []
    for rec, g in zip(up.optimizer.record, grads):
        if clip_up is not None:
            norm = float(torch.sqrt(sum((x ** 2).sum() for x in g)))
            g = [x * min(1.0, clip_up / (norm + 1e-6)) for x in g]
        errs.append(rel(torch.cat([x.flatten() for x in rec]), torch.cat([x.flatten() for x in g])))
    return max(errs)


# ------------------------------------------------------------------ grad_clip
SGD_LO = dict(lr=0.4, momentum=0.6, nesterov=True, weight_decay=0.02)


@pytest.mark.parametrize("regime", ["active", "inactive"])
def test_grad_clip_inside_unrolled_windows(regime, measured):
    P = data()
    clip_lo, clip_up = (0.15, 0.02) if regime == "active" else (50.0, 50.0)
    u0 = {"lam": P["lam"]}
    eng, lo, up = build(P, torch.optim.SGD, SGD_LO, u0, clip_lo, clip_up)
    eng.run(2 * K)
    hp = {"w": SGD_LO, "b": SGD_LO}
    grads, p, norms = naive(P, u0, sgd, hp, clip_lo=clip_lo, clip_up=clip_up)
    unclipped, *_ = naive(P, u0, sgd, hp)
    if regime == "active":
        assert sum(n > clip_lo for n in norms) >= 2 and sum(n < clip_lo for n in norms) >= 1
        assert rel(grads[1][0], unclipped[1][0]) > 1e-2     # clipping changes the hypergradient
    else:
        assert max(norms) < clip_lo and rel(grads[1][0], unclipped[1][0]) < 1e-14
    measured(f"grad_clip ({regime}) in unrolled windows: lower iterate vs naive",
             max(rel(lo.module.w.detach(), p["w"]), rel(lo.module.b.detach(), p["b"])), 1e-13)
    measured(f"grad_clip ({regime}) in unrolled windows: hypergradient vs naive",
             applied_error(up, grads, clip_up), 1e-11)


# ------------------------------------------------- learnable lr (Adam, AdamW)
ADAMS = {
    "adam": (torch.optim.Adam, dict(lr=0.5, betas=(0.8, 0.9), eps=0.05, weight_decay=0.03), False),
    "adamw_amsgrad": (torch.optim.AdamW, dict(lr=0.5, betas=(0.7, 0.95), eps=0.05, weight_decay=0.2,
                                              amsgrad=True), True),
}


def plain_torch(P, cls, kw, us, lrs=None, groups=None, schedule=None):
    """The lower trajectory with ``torch.optim``: window j at upper value ``us[j]``."""
    w, b = P["w"].clone().requires_grad_(), P["b"].clone().requires_grad_()
    if groups is None:
        opt = cls([w, b], **kw)
    else:
        opt = cls([{"params": [w], **groups[0]}, {"params": [b], **groups[1]}], **kw)
    sch = torch.optim.lr_scheduler.LambdaLR(opt, schedule) if schedule else None
    for j, u in enumerate(us):
        if lrs is not None:
            for g in opt.param_groups:
                g["lr"] = lrs[j]
        for _ in range(K):
            w.grad, b.grad = torch.autograd.grad(f_lower({"w": w, "b": b}, u, P), [w, b])
            opt.step()
            if sch:
                sch.step()
    return {"w": w.detach(), "b": b.detach()}


@pytest.mark.parametrize("opt", sorted(ADAMS))
def test_learnable_lr_adam_vs_naive_and_finite_differences(opt, measured):
    cls, kw, decoupled = ADAMS[opt]
    P = data(seed=1)
    u0 = {"log_lr": torch.tensor(math.log(0.08), dtype=DT), "lam": P["lam"]}
    eng, lo, up = build(P, cls, kw, u0, hyper=lambda u: {"lr": u["log_lr"].exp()})
    us = []
    for _ in range(2):
        us.append({k: v.detach().clone() for k, v in zip(up.param_names, up.variables)})
        eng.run(K)
    update = (lambda *a: adam(*a, decoupled=True)) if decoupled else adam
    grads, p, _ = naive(P, u0, update, {"w": kw, "b": kw}, lr_of=lambda u: u["log_lr"].exp())
    assert all(float(g[0].abs()) > 1e-3 for g in grads)          # the lr gets a real signal
    measured("learnable lr Adam/AdamW windows: trajectory vs plain torch.optim",
             rel(lo.module.w.detach(), plain_torch(P, cls, kw, us, [float(u["log_lr"].exp()) for u in us])["w"]),
             1e-13)
    measured("learnable lr Adam/AdamW windows: hypergradient vs naive", applied_error(up, grads), 1e-11)

    # central differences of plain torch.optim runs, window 2 perturbed (window 1 truncated)
    h = 1e-5
    fd = []
    for key in ("log_lr", "lam"):
        base = us[1][key]
        for i in range(base.numel()):
            vals = []
            for s in (1, -1):
                u = {k: v.clone() for k, v in us[1].items()}
                u[key] = (base.flatten() + s * h * torch.eye(base.numel(), dtype=DT)[i]).reshape(base.shape)
                pk = plain_torch(P, cls, kw, [us[0], u], [float(us[0]["log_lr"].exp()), float(u["log_lr"].exp())])
                vals.append(float(F_upper(pk, u, P)))
            fd.append((vals[0] - vals[1]) / (2 * h))
    got = torch.cat([x.flatten() for x in up.optimizer.record[1]])
    measured("learnable lr Adam/AdamW windows: hypergradient vs central FD", rel(got, torch.tensor(fd, dtype=DT)),
             1e-6)


def test_learnable_betas_in_windows_and_in_place(measured):
    """``optimizer_hyperparameters`` returning ``betas = (sigmoid(s), 0.95)``: inside
    windows the hypergradient through β₁ equals the naive unroll; a lower stepping in
    place (CG) gets the tuple as floats (it used to fail on ``float(tuple)``)."""
    P = data(seed=4)
    kw = dict(lr=0.05, betas=(0.9, 0.999), eps=0.05)
    hyper = lambda u: {"betas": (torch.sigmoid(u["s"]), 0.95)}  # noqa: E731
    u0 = {"s": torch.tensor(0.4, dtype=DT), "lam": P["lam"]}
    eng, lo, up = build(P, torch.optim.Adam, kw, u0, hyper=hyper)
    eng.run(2 * K)
    grads, _, _ = naive(P, u0, adam, {"w": kw, "b": kw}, hp_of=hyper)
    assert all(float(g[0].abs()) > 1e-4 for g in grads)
    measured("learnable Adam β₁ in windows: hypergradient vs naive", applied_error(up, grads), 1e-10)

    eng, lo, up = build(P, torch.optim.Adam, kw, u0, hyper=hyper)
    lo.config.method = "cg"
    eng = mlo.Engine([lo, up], {"u2l": {up: [lo]}, "l2u": {lo: [up]}})
    s = float(up.module.s.detach())
    eng.step()
    assert lo.optimizer.param_groups[0]["betas"] == (1 / (1 + math.exp(-s)), 0.95)


# ------------------------------------------------------------- param groups
GROUPS = {
    "sgd": (torch.optim.SGD, dict(lr=0.1),
            [dict(lr=0.3, momentum=0.8, nesterov=True, weight_decay=0.05),
             dict(lr=0.05, momentum=0.3, dampening=0.2)], sgd),
    "adamw": (torch.optim.AdamW, dict(lr=0.1, eps=0.05),
              [dict(lr=0.2, betas=(0.8, 0.9), weight_decay=0.3),
               dict(lr=0.04, betas=(0.6, 0.99), weight_decay=0.0)],
              lambda *a: adam(*a, decoupled=True)),
}
SCHEDULE = [lambda e: 0.9 ** e, lambda e: 1.0 / (1 + e)]


@pytest.mark.parametrize("opt", sorted(GROUPS))
def test_param_groups_in_unrolled_windows(opt, measured):
    cls, defaults, groups, update = GROUPS[opt]
    P = data(seed=2)
    u0 = {"lam": P["lam"]}
    eng, lo, up = build(P, torch.optim.SGD, {"lr": 1.0}, u0,
                        groups=(cls, defaults, groups), schedule=SCHEDULE)
    us = []
    for _ in range(2):
        us.append({"lam": up.module.lam.detach().clone()})
        eng.run(K)
    ref = plain_torch(P, cls, defaults, us, groups=groups, schedule=SCHEDULE)
    measured("param groups + per-group LambdaLR in windows: trajectory vs torch.optim",
             max(rel(lo.module.w.detach(), ref["w"]), rel(lo.module.b.detach(), ref["b"])), 1e-13)
    hp = {"w": {**defaults, **groups[0]}, "b": {**defaults, **groups[1]}}
    grads, p, _ = naive(P, u0, update, hp, schedule={"w": SCHEDULE[0], "b": SCHEDULE[1]})
    single, *_ = naive(P, u0, update, {"w": hp["w"], "b": hp["w"]}, schedule={"w": SCHEDULE[0], "b": SCHEDULE[0]})
    assert rel(grads[1][0], single[1][0]) > 1e-3       # the groups matter to the hypergradient
    measured("param groups + per-group LambdaLR in windows: hypergradient vs naive",
             applied_error(up, grads), 1e-11)


# ---------------------------------------------------------------------- data
class Seen(mlo.Problem):
    def __init__(self, data_, **kw):
        super().__init__("seen", params={"w": torch.zeros(2, dtype=DT)}, data=data_, **kw)
        self.seen = []

    def training_step(self, batch):
        self.seen.append(int(batch[0]))
        return ((self.params["w"] - batch) ** 2).sum()


def test_finite_list_reiterates_in_order():
    batches = [torch.tensor([float(i), 1.0], dtype=DT) for i in range(3)]
    P = Seen(batches)
    mlo.Engine([P]).run(7)
    assert P.seen == [0, 1, 2, 0, 1, 2, 0]


def test_spent_generator_fails_clearly():
    P = Seen(torch.tensor([float(i), 1.0], dtype=DT) for i in range(3))
    eng = mlo.Engine([P])
    eng.run(3)
    with pytest.raises(RuntimeError, match="single-use"):
        eng.step()
    with pytest.raises(RuntimeError, match="yielded no batches"):
        mlo.Engine([Seen([])]).step()


# ------------------------------------------- FD scale_by_lr with per-group lrs
def test_finite_difference_scale_by_lr_per_param_group(measured):
    """DARTS's ``H⁻¹ ≈ η I`` with per-group learning rates is ``diag(η_w I, η_b)``:
    ``∂F/∂λ = −η ⊙ ∂²_{λθ} f · v``. With ``f = mean logcosh(Xw + b − y) + ½e^{λ_w}·w² +
    ½e^{λ_b} b²`` the mixed term is ``(e^{λ_w} w v_w, e^{λ_b} b v_b)`` and central
    differences of ``∂f/∂λ`` (quadratic in θ) are exact."""
    P = data(seed=3)
    eta_w, eta_b = 0.3, 0.05

    class L(mlo.Problem):
        def training_step(self, batch):
            p, lam = self.params, self.up.params["lam"]
            return torch.log(torch.cosh(P["X"] @ p["w"] + p["b"] - P["y"])).mean() \
                + 0.5 * (lam[:D].exp() * p["w"] ** 2).sum() + 0.5 * lam[D].exp() * p["b"] ** 2

    class U(mlo.Problem):
        def training_step(self, batch):
            p = self.lo.params
            return 0.5 * ((P["Xv"] @ p["w"] + p["b"] - P["yv"]) ** 2).mean() + 0 * self.params["lam"].sum()

    lo = L("lo", params={"w": P["w"], "b": P["b"]},
           config=mlo.ProblemConfig(unroll_steps=2, method="finite_difference",
                                    method_options={"epsilon": 0.01, "scale_by_lr": True}))
    lo.optimizer = torch.optim.SGD([{"params": [lo.module.w], "lr": eta_w},
                                    {"params": [lo.module.b], "lr": eta_b}])
    up = U("up", params={"lam": 0.2 * torch.arange(D + 1, dtype=DT) - 0.3}, optimizer=RecordingSGD,
           optimizer_kwargs={"lr": 0.1})
    lo.up, up.lo = up, lo
    eng = mlo.Engine([lo, up], {"u2l": {up: [lo]}, "l2u": {lo: [up]}})
    errs = []
    for _ in range(2):
        lam = up.module.lam.detach().clone()
        eng.run(2)
        w, b = lo.module.w.detach(), lo.module.b.detach()
        r = (P["Xv"] @ w + b - P["yv"]) / N
        v_w, v_b = P["Xv"].T @ r, r.sum()
        expected = -torch.cat([eta_w * lam[:D].exp() * w * v_w, (eta_b * lam[D].exp() * b * v_b)[None]])
        errs.append(rel(up.optimizer.record[-1][0], expected))
    measured("FD scale_by_lr, two param groups (η_w, η_b) vs closed form", max(errs), 1e-9)
