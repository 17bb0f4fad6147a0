"""``problems.mlo_mae``: the MLO-MAE graph, its baselines and its hypergradients.

Tiny settings (4×4 or 8×8 single-channel images, patch 2, width 8, one block),
random tensors. What docs/design.md#mlo-mae fixes and these tests check:

* two hypergradient paths reach ``mask`` — ``mask → pretrain → mask`` and
  ``mask → pretrain → finetune → mask``; BLO-MAE has one;
* the masking network has no direct gradient (``own`` exactly zero), each path is
  nonzero and the total is the sum of the paths; the gradient the optimizer applies
  is ``engine.last_hypergradient["mask"]``;
* masking is the deterministic top-k of the probabilities, the loss is
  ``Σ_masked ℓ_i p_i / #masked`` (checked by hand);
* the masking network's input (the MAE's embeddings) is not detached: the pretrain
  gradient on the patch embedding differs from the detached-input one by exactly
  the route through ``p``; the frozen-mask control keeps that route;
* every variant × method runs end to end, finite, with the documented counts;
* the ``unrolled`` hypergradient of ``mask`` (per path) equals an independent naive
  autograd implementation of the same schedule (two differentiable AdamW steps of
  pretrain, one of finetune, the mask loss) in float64.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from problems.mae import num_masked, random_masking
from problems.mlo_mae import MLOMAESettings, build
from problems.transformer import math_attention

torch.set_num_threads(1)

PATHS = {("mask", "pretrain", "mask"), ("mask", "pretrain", "finetune", "mask")}
METHODS = {"finite_difference": {}, "cg": {"max_iter": 3},
           "neumann": {"iterations": 3, "alpha": 0.1}, "unrolled": {}}


def settings(**kw) -> MLOMAESettings:
    d = dict(image_size=4, patch_size=2, in_chans=1, embed_dim=8, depth=1, num_heads=2,
             decoder_dim=8, decoder_depth=1, decoder_heads=2, mask_hidden=8, batch_size=8,
             steps=20, num_classes=3)
    d.update(kw)
    return MLOMAESettings(**d)


def data(n=40, image_size=4, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, image_size, image_size, generator=g, dtype=dtype)
    return x, torch.randint(0, 3, (n,), generator=g)


class float64:
    """Default dtype float64 inside the block (models built in it are float64)."""

    def __enter__(self):
        self.old = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)

    def __exit__(self, *exc):
        torch.set_default_dtype(self.old)


def vnorm(d) -> float:
    return float(torch.linalg.vector_norm(torch.cat([t.reshape(-1) for t in d.values()])))


def dict_rel(a, b) -> float:
    num = torch.cat([(a[k] - b[k]).reshape(-1) for k in b])
    return float(torch.linalg.vector_norm(num)) / vnorm(b)


# ------------------------------------------------------------------- paths
def test_paths_reaching_mask():
    x, y = data()
    g = build("mlo-mae", settings(), (x, y))
    assert set(g.engine.graph.paths("mask")) == PATHS
    assert len(g.engine.graph.paths("mask")) == 2
    assert g.engine.graph.paths("pretrain") == [] and g.engine.graph.paths("finetune") == []
    b = build("blo-mae", settings(), (x, y))
    assert b.engine.graph.paths("mask") == [("mask", "pretrain", "mask")]
    assert set(b.problems) == {"pretrain", "mask"}


# ---------------------------------------------- hypergradient only, by path
@pytest.mark.parametrize("method", ["neumann", "finite_difference", "cg"])
def test_mask_gets_hypergradient_only_and_paths_sum(method, measured):
    """``own`` exactly zero, each path nonzero, ``grad`` = Σ paths.

    Neumann is linear in the cotangent, so the engine's one push of the summed
    cotangent equals the two separate path pushes to rounding. Finite differences
    (ε relative to ‖v‖) are not linear in ``v``: the sum of the paths is only close
    to the total (checked loosely). CG stopped after 3 iterations is a Krylov
    solve, far from linear in its right-hand side on this indefinite Hessian (the
    paths summed differ from the total by ~50 %): only the structure is checked."""
    x, y = data()
    with float64():
        g = build("mlo-mae", settings(method=method, method_options=METHODS[method],
                                      pretrain_lr=1e-2, finetune_lr=1e-2, mask_lr=1e-2),
                  (x.double(), y))
        eng = g.engine
        eng.run(3)
        out = eng.gradient("mask", by_path=True)
    assert set(out["paths"]) == PATHS
    for k, t in out["own"].items():
        assert torch.count_nonzero(t) == 0, f"mask has a direct gradient on {k}"
    for p, vec in out["paths"].items():
        assert vnorm(vec) > 0, f"path {p} contributes nothing"
    tol = {"neumann": 1e-12, "finite_difference": 5e-2}.get(method)
    if tol is None:
        return
    summed = {k: sum(vec[k] for vec in out["paths"].values()) for k in out["grad"]}
    err = dict_rel(summed, out["grad"])
    measured(f"MLO-MAE mask: total hypergradient vs sum of the 2 paths ({method})", err, tol)


def test_last_hypergradient_is_the_applied_gradient():
    x, y = data()
    g = build("mlo-mae", settings(cosine=False), (x, y))   # no scheduler around the wrapped step
    mask = g.problems["mask"]
    applied = []
    step = mask.optimizer.step

    def recording_step(*a, **kw):
        applied.append({k: p.grad.detach().clone() for k, p in zip(mask.param_names, mask.variables)})
        return step(*a, **kw)

    mask.optimizer.step = recording_step
    for it in range(6):
        before = mask.step_count
        g.engine.step()
        if mask.step_count > before:
            last = g.engine.last_hypergradient["mask"]
            assert set(last) == set(mask.param_names)
            for k in mask.param_names:   # own gradient is exactly zero: applied == hyper
                assert torch.equal(applied[-1][k], last[k]), k
            assert vnorm(last) > 0
    assert len(applied) == 3 == g.engine.records["mask"]["updates"]


# ------------------------------------------------------------------- masking
def test_top_k_masks_highest_probabilities_and_weights_loss(measured):
    """pretrain's masker: p = σ(MLP(E)); the masked set is the top-num_masked(L, r) of p;
    loss = Σ_n Σ_{i masked} ℓ_{n,i} p_{n,i} / #masked with the norm_pix MSE ℓ (by hand)."""
    x, y = data(n=16, image_size=8, dtype=torch.float64)
    with float64():
        g = build("mlo-mae", settings(image_size=8), (x, y))
    pre, mae = g.problems["pretrain"], g.mae
    xb = x[:8]
    scores, weights = pre.masker(xb, pre)
    assert scores is weights and scores.shape == (8, 16)
    assert ((scores > 0) & (scores < 1)).all()
    p = scores.detach()
    tokens = mae.patch_embeddings(xb)
    r = g.settings.mask_ratio
    k = num_masked(16, r)
    assert k == 12
    kept, mask, ids_restore = random_masking(tokens, r, scores=p)
    for n in range(8):
        top = set(torch.topk(p[n], k).indices.tolist())
        assert set(torch.nonzero(mask[n]).flatten().tolist()) == top, n
        # the kept tokens are the lowest-probability ones, in increasing order
        low = torch.argsort(p[n])[:16 - k]
        assert torch.equal(kept[n], tokens[n, low])
    # the model's own forward masks the same set (deterministic)
    with torch.no_grad():
        loss, pred, mask2 = mae(xb, scores=p, token_weights=p)
    assert torch.equal(mask2, mask)
    # hand computation: patches (row, col) of 2×2, norm_pix target, MSE per token
    total, count = 0.0, 0
    for n in range(8):
        for i in range(16):
            if mask[n, i] != 1:
                continue
            r0, c0 = divmod(i, 4)
            patch = [float(xb[n, 0, 2 * r0 + a, 2 * c0 + b]) for a in range(2) for b in range(2)]
            mu = sum(patch) / 4
            var = sum((v - mu) ** 2 for v in patch) / 3
            target = [(v - mu) / math.sqrt(var + 1e-6) for v in patch]
            ell = sum((float(pred[n, i, j]) - target[j]) ** 2 for j in range(4)) / 4
            total += ell * float(p[n, i])
            count += 1
    assert count == 8 * 12
    hand = total / count
    measured("MLO-MAE forward_loss Σ_masked ℓ·p / #masked vs hand",
             abs(loss.item() - hand) / abs(hand), 1e-12)
    # the problem's loss (masker inside) is the same number
    measured("MLO-MAE pretrain training_step vs hand",
             abs(pre.training_step((xb,))["loss"].item() - hand) / abs(hand), 1e-12)


def _patch_embed_grad(pre, xb, masker=None):
    old = pre.masker
    if masker is not None:
        pre.masker = masker
    try:
        loss = pre.training_step((xb,))["loss"]
    finally:
        pre.masker = old
    w = pre.module.tokenizer.proj.weight
    (gw,) = torch.autograd.grad(loss, w)
    return gw


def test_masker_input_is_not_detached(measured):
    """∇_W L for the tokenizer's patch-embedding weight W, L = Σ ℓ_i(W) p_i(W) m_i / M.

    With the masker's input detached only ``Σ ∂ℓ_i p_i m_i / M`` remains; the difference
    must be exactly the route through the probabilities, ``∇_W Σ ℓ_i p_i(W) m_i / M`` with
    ``ℓ`` held fixed. The frozen-mask control (same seed → same MAE and masking network)
    keeps that route too: its gradient equals MLO-MAE's."""
    x, y = data(dtype=torch.float64)
    with float64():
        g = build("mlo-mae", settings(), (x, y))
        f = build("frozen-mask", settings(), (x, y))
    pre, mae, net = g.problems["pretrain"], g.mae, g.masker
    xb = x[:8]
    full = _patch_embed_grad(pre, xb)

    def detached(xx, problem):
        p = net(problem.patch_embeddings(xx).detach())
        return p, p

    cut = _patch_embed_grad(pre, xb, detached)
    diff = float(torch.linalg.vector_norm(full - cut) / torch.linalg.vector_norm(full))
    assert diff > 1e-3, "the pretrain gradient does not reach the embeddings through p"
    # the difference is exactly the route through p (ℓ and the selection held fixed)
    p = net(mae.patch_embeddings(xb))
    _, pred, mask = mae(xb, scores=p.detach(), token_weights=None)
    ell = mae.token_losses(xb, pred).detach()
    route = (ell * mask * p).sum() / mask.sum()
    (g_route,) = torch.autograd.grad(route, mae.tokenizer.proj.weight)
    measured("MLO-MAE ∇_W(pretrain) − ∇_W(detached masker input) vs route through p",
             float(torch.linalg.vector_norm(full - cut - g_route) / torch.linalg.vector_norm(g_route)),
             1e-10)
    # frozen-mask: same models at init, same (not detached) gradient
    assert torch.equal(f.mae.tokenizer.proj.weight, mae.tokenizer.proj.weight)
    assert torch.equal(f.masker.fc1.weight, net.fc1.weight)
    assert not any(q.requires_grad for q in f.masker.parameters())
    frozen = _patch_embed_grad(f.problems["pretrain"], xb)
    measured("frozen-mask ∇_W(pretrain) vs MLO-MAE's (input not detached either)",
             float(torch.linalg.vector_norm(frozen - full) / torch.linalg.vector_norm(full)), 1e-12)


# ------------------------------------------------------------ end to end runs
def _finite_everything(g):
    for name, P in g.problems.items():
        for k, t in zip(P.param_names, P.variables):
            assert torch.isfinite(t).all(), f"{g.variant}: {name}.{k} is not finite"
        assert P.last_loss is not None and torch.isfinite(P.last_loss), f"{g.variant}: {name} loss"
    for name, rec in g.engine.records.items():
        for k, v in rec.items():
            assert math.isfinite(v), f"{g.variant}: records[{name!r}][{k!r}] = {v}"
    for name, h in g.engine.last_hypergradient.items():
        for k, t in h.items():
            assert torch.isfinite(t).all(), f"{g.variant}: hypergradient {name}.{k}"


@pytest.mark.parametrize("variant,counts", [
    ("mlo-mae", {"pretrain": 20, "finetune": 10, "mask": 10}),
    ("blo-mae", {"pretrain": 20, "mask": 10}),
    ("mae", {"pretrain": 20}),
    ("frozen-mask", {"pretrain": 20}),
])
def test_variants_run_end_to_end(variant, counts):
    x, y = data()
    # constant rates: with the default η-weighted hypergradient a cosine schedule that
    # reaches 0 at the last step makes the last mask hypergradient exactly 0
    g = build(variant, settings(cosine=False), (x, y))
    mae0 = {k: v.detach().clone() for k, v in g.mae.state_dict().items()}
    net0 = None if g.masker is None else {k: v.detach().clone() for k, v in g.masker.state_dict().items()}
    g.engine.run(20)
    assert g.engine.counts() == counts
    assert {n: r["updates"] for n, r in g.engine.records.items()} == counts
    _finite_everything(g)
    assert any(not torch.equal(mae0[k], v) for k, v in g.mae.state_dict().items())
    if variant == "mae":
        assert g.masker is None and g.problems["pretrain"].masker is None
    elif variant == "frozen-mask":
        assert all(torch.equal(net0[k], v) for k, v in g.masker.state_dict().items())
    else:
        assert any(not torch.equal(net0[k], v) for k, v in g.masker.state_dict().items())
        assert g.engine.records["mask"]["hypergrad_norm"] > 0
        assert g.engine.records["mask"]["own_grad_norm"] == 0


@pytest.mark.parametrize("variant", ["mlo-mae", "blo-mae"])
def test_mask_every_5_iterations(variant):
    """mask_every=5 → update_every_iterations=5: mask ready at iterations 1, 3, 5, ...
    (0-based), updated at the first readiness of each block of 5: 1, 5, 11, 15."""
    x, y = data()
    g = build(variant, settings(mask_every=5), (x, y))
    assert g.problems["mask"].config.update_every_iterations == 5
    at = []
    for it in range(20):
        before = g.problems["mask"].step_count
        g.engine.step()
        if g.problems["mask"].step_count > before:
            at.append(it)
    assert at == [1, 5, 11, 15]
    assert g.engine.counts()["mask"] == 4 and g.engine.counts()["pretrain"] == 20
    assert g.problems["mask"].ready_count == 10
    if variant == "mlo-mae":
        assert g.engine.counts()["finetune"] == 10
    _finite_everything(g)


@pytest.mark.parametrize("method", list(METHODS))
def test_mlo_mae_every_method_is_finite(method):
    """unrolled windows through AdamW (zero gradients at attention key biases) once gave
    NaN hypergradients; every method must now give finite, nonzero ones."""
    x, y = data()
    g = build("mlo-mae", settings(method=method, method_options=METHODS[method], steps=10,
                                  cosine=False), (x, y))   # (cosine to 0: last η-weighted FD step 0)
    g.engine.run(10)
    assert g.engine.counts() == {"pretrain": 10, "finetune": 5, "mask": 5}
    _finite_everything(g)
    assert g.engine.records["mask"]["hypergrad_norm"] > 0


# --------------------------------------------- unrolled vs naive autograd
class _Call(nn.Module):
    """``forward(method, *args)`` runs ``module.<method>`` (for ``functional_call``)."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, method, *args, **kwargs):
        return getattr(self.m, method)(*args, **kwargs)


def _run(module, params, method, *args, **kwargs):
    return functional_call(_Call(module), {"m." + k: v for k, v in params.items()},
                           (method,) + args, kwargs)


def _sqrt0(v):
    """``√v`` with derivative 0 (not NaN) at v = 0, where Adam's gradient is exactly 0."""
    pos = v > 0
    return torch.where(pos, torch.where(pos, v, torch.ones_like(v)).sqrt(), torch.zeros_like(v))


def _adamw(params, grads, state, lr, betas, wd, eps=1e-8):
    """One differentiable step of ``torch.optim.AdamW`` (decoupled decay, bias correction)."""
    b1, b2 = betas
    state["step"] += 1
    t = state["step"]
    out = {}
    for k, p in params.items():
        g = grads[k]
        m = state["m"].get(k, torch.zeros_like(p)) * b1 + (1 - b1) * g
        v = state["v"].get(k, torch.zeros_like(p)) * b2 + (1 - b2) * g * g
        state["m"][k], state["v"][k] = m, v
        denom = _sqrt0(v) / math.sqrt(1 - b2 ** t) + eps
        out[k] = p * (1 - lr * wd) - (lr / (1 - b1 ** t)) * m / denom
    return out


def _grad_dict(loss, params):
    gs = torch.autograd.grad(loss, list(params.values()), create_graph=True, allow_unused=True)
    return {k: torch.zeros_like(p) if gi is None else gi for (k, p), gi in zip(params.items(), gs)}


def test_unrolled_hypergradient_matches_naive_autograd(measured):
    """mlo-mae, all lowers unrolled (pretrain unroll 2, AdamW; finetune AdamW), float64,
    no dropout, constant lr. Schedule: iteration 0 pretrain step; iteration 1 pretrain
    step, finetune step (reads θ₂), mask update on CE(head_ψ₁(cls_θ₂(x)), y). The naive
    reference builds the same graph by hand and splits dL/dφ into the path through
    θ₂ directly and the one through ψ₁."""
    x, y = data(n=24, dtype=torch.float64, seed=3)
    s = settings(method="unrolled", cosine=False, head_dropout=0.0, pretrain_lr=3e-2,
                 finetune_lr=5e-2, mask_lr=1e-2)
    with float64():
        g = build("mlo-mae", s, (x, y))
    pre, fin, mask = (g.problems[n] for n in ("pretrain", "finetune", "mask"))
    xp0, xp1, (xf, yf), (xm, ym) = x[:8], x[8:16], (x[16:20], y[16:20]), (x[20:], y[20:])
    pre.data, fin.data, mask.data = [(xp0,), (xp1,)], [(xf, yf)], [(xm, ym)]
    theta0 = {k: t.detach().clone() for k, t in zip(pre.param_names, pre.variables)}
    psi0 = {k: t.detach().clone() for k, t in zip(fin.param_names, fin.variables)}
    phi = {k: t.detach().clone().requires_grad_() for k, t in zip(mask.param_names, mask.variables)}

    eng = g.engine
    captured = []
    # per-path hypergradient at the state the mask update sees: the top's
    # on_window_start hook runs right before its (first) update
    mask.on_window_start = lambda: captured.append(eng.gradient("mask", batch=(xm, ym), by_path=True))
    eng.run(2)
    assert eng.counts() == {"pretrain": 2, "finetune": 1, "mask": 1} and len(captured) == 1
    ours = captured[0]
    applied = eng.last_hypergradient["mask"]
    for k in mask.param_names:
        assert torch.equal(ours["grad"][k], applied[k]), k

    # ---- naive: the same schedule by hand
    with math_attention():   # fused CPU attention has no double backward
        naive = _naive(g, s, theta0, psi0, phi, xp0, xp1, xf, yf, xm, ym)
    names = list(phi)
    assert dict_rel({k: naive[PATHS_D][k] + naive[PATHS_F][k] for k in names}, naive["total"]) < 1e-12
    for path in (PATHS_D, PATHS_F):
        assert vnorm(naive[path]) > 0
        measured(f"MLO-MAE unrolled (AdamW) mask hypergradient, path {'→'.join(path)}, vs naive autograd",
                 dict_rel(ours["paths"][path], naive[path]), 1e-9)
    measured("MLO-MAE unrolled (AdamW) mask hypergradient, total, vs naive autograd",
             dict_rel(ours["grad"], naive["total"]), 1e-9)


def _naive(g, s, theta0, psi0, phi, xp0, xp1, xf, yf, xm, ym):
    mae, head, net = g.mae, g.head, g.masker
    betas, wd = tuple(s.betas), s.weight_decay

    def f_pre(theta, xb):
        p = functional_call(net, phi, (_run(mae, theta, "patch_embeddings", xb),))
        return _run(mae, theta, "forward", xb, scores=p, token_weights=p)[0]

    def ce(psi, theta, xb, yb):
        return F.cross_entropy(functional_call(head, psi, (_run(mae, theta, "features", xb, pool="cls"),)), yb)

    th = {k: v.clone().requires_grad_() for k, v in theta0.items()}
    st = {"step": 0, "m": {}, "v": {}}
    th1 = _adamw(th, _grad_dict(f_pre(th, xp0), th), st, s.pretrain_lr, betas, wd)
    th2 = _adamw(th1, _grad_dict(f_pre(th1, xp1), th1), st, s.pretrain_lr, betas, wd)

    def finetune(theta2):
        ps = {k: v.clone().requires_grad_() for k, v in psi0.items()}
        return _adamw(ps, _grad_dict(ce(ps, theta2, xf, yf), ps), {"step": 0, "m": {}, "v": {}},
                      s.finetune_lr, betas, wd)

    psi1 = finetune(th2)
    names = list(phi)
    total = torch.autograd.grad(ce(psi1, th2, xm, ym), [phi[k] for k in names], retain_graph=True)
    th2_cut = {k: v.detach() for k, v in th2.items()}
    direct = torch.autograd.grad(ce(finetune(th2_cut), th2, xm, ym), [phi[k] for k in names],
                                 retain_graph=True)
    via_ft = torch.autograd.grad(ce(psi1, th2_cut, xm, ym), [phi[k] for k in names])
    return {"total": dict(zip(names, total)), PATHS_D: dict(zip(names, direct)),
            PATHS_F: dict(zip(names, via_ft))}


PATHS_D = ("mask", "pretrain", "mask")
PATHS_F = ("mask", "pretrain", "finetune", "mask")
