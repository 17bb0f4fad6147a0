"""``mlo.WindowProblem`` through the engine against a naive plain-autograd reference (float64).

A window problem's variables exist for one window: ``init_window(batch)`` creates
``Z_0`` (differentiably, from the upper's variables), a fresh optimizer takes
``unroll_steps`` steps on that one batch, the upper reads ``Z_K`` / ``Z_0`` / outputs /
the batch and the window is dropped. The reference writes the same computation
by hand — ``z = z0; z = step(z, ∇_z f(z))`` K times with ``create_graph=True`` (or the
gradient detached for first order), then ``torch.autograd.grad`` of the upper loss —
with the *current* upper variables at every window, and the gradient the upper's
``torch.optim`` optimizer is asked to apply (recorded) must equal it:

1. closed-form linear model (encoder ``W``, decoder ``D``; ``Z_0 = xW``), K ∈ {1, 3},
   second / first order, SGD momentum (plain, dampening, nesterov + weight decay)
   and Adam, batch sizes changing between windows;
2. fresh optimizer state per window (a reference carrying momentum over differs);
3. the hypergradient through ``Z_0`` (upper reads only ``Z_K``: ∇W flows only via
   ``init_window``; a constant ``Z_0`` would give exactly 0);
4. a tiny transformer MAE (``problems.mae``): every parameter's gradient;
5. errors naming the problem;
6. checkpoint save / load between windows (bitwise resume) and early stopping's
   snapshot with a window open.
"""
from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call

import mlo
from _helpers import recording, rel
from mlo import checkpoint
from mlo.graph import GraphError
from problems.mae import MaskedAutoencoder
from problems.tokenizers import ImageTokenizer

DT = torch.float64
TOL = 1e-10
RecSGD = recording(torch.optim.SGD)


# ===================================================================== naive optimizers
def naive_step(opt, kw, z, g, st):
    """One ``torch.optim`` step written out (``st`` is this window's state dict)."""
    lr = kw["lr"]
    if opt is torch.optim.SGD:
        wd, mom = kw.get("weight_decay", 0.0), kw.get("momentum", 0.0)
        if wd:
            g = g + wd * z
        if mom:
            buf = st.get("buf")
            buf = g if buf is None else mom * buf + (1 - kw.get("dampening", 0.0)) * g
            st["buf"] = buf
            g = g + mom * buf if kw.get("nesterov", False) else buf
        return z - lr * g
    assert opt is torch.optim.Adam
    b1, b2 = kw.get("betas", (0.9, 0.999))
    eps = kw.get("eps", 1e-8)
    t = st["t"] = st.get("t", 0) + 1
    m = st["m"] = b1 * st.get("m", 0.0) + (1 - b1) * g
    v = st["v"] = b2 * st.get("v", 0.0) + (1 - b2) * g * g
    return z - lr * (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + eps)


def unroll(z0, inner, K, opt, kw, first_order, state=None):
    """``z_{k+1} = step(z_k, ∇f(z_k))`` K times from ``z0`` (state: fresh unless given)."""
    st = {} if state is None else state
    z = z0
    for _ in range(K):
        g, = torch.autograd.grad(inner(z), z, create_graph=True)
        if first_order:
            g = g.detach()
        z = naive_step(opt, kw, z, g, st)
    return z, st


def worst_rel(got, ref):
    """Worst relative error over variables (an all-zero reference requires exact zeros)."""
    out = 0.0
    for k, b in ref.items():
        a = got[k]
        nb = float(torch.linalg.vector_norm(b))
        out = max(out, rel(a, b) if nb > 0 else float(torch.linalg.vector_norm(a)))
    return out


# ===================================================================== 1–3: linear model
DIM, LAT = 5, 3
ALPHA, UP_LR = 0.1, 0.01
OPTS = {
    "momentum": (torch.optim.SGD, {"lr": ALPHA, "momentum": 0.9}),
    "dampening": (torch.optim.SGD, {"lr": ALPHA, "momentum": 0.9, "dampening": 0.3}),
    "nesterov_wd": (torch.optim.SGD, {"lr": ALPHA, "momentum": 0.9, "nesterov": True,
                                      "weight_decay": 0.05}),
    "adam": (torch.optim.Adam, {"lr": 0.05, "betas": (0.8, 0.95)}),
}


def linear_data(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = 0.5 * torch.randn(DIM, LAT, generator=g, dtype=DT)
    D = torch.randn(LAT, DIM, generator=g, dtype=DT)
    D = D * (0.6 / torch.linalg.matrix_norm(D, ord=2))      # inner Hessian 2DDᵀ ≤ 0.72
    return W, D, [torch.randn(n, DIM, generator=g, dtype=DT) for n in sizes]


def inner_loss(z, D, x):
    return ((z @ D - x) ** 2).sum()


def upper_loss(zK, z0, h, D, x, only_zK):
    F = ((zK @ D - x) ** 2).sum() + 0.1 * (D ** 2).sum()
    if not only_zK:
        F = F + 0.3 * (z0 ** 2).sum() + 0.7 * (h * x[:, :1]).sum()
    return F


class LinUp(mlo.Problem):
    def training_step(self, batch):
        lat = self.lat
        n = lat.outputs["n"]                                  # a non-float output, as handed over
        assert isinstance(n, torch.Tensor) and not n.is_floating_point() and int(n) == lat.batch.shape[0]
        return upper_loss(lat.params["z"], lat.initial["z"], lat.outputs["h"], self.params["D"],
                          lat.batch, self.only_zK)


class LinLat(mlo.WindowProblem):
    def init_window(self, x):
        W = self.up.params["W"]
        return {"z": x @ W}, {"h": torch.tanh(x @ W), "n": torch.tensor(x.shape[0])}

    def training_step(self, x):
        return inner_loss(self.params["z"], self.up.params["D"], x)


def linear_engine(W, D, batches, K, opt, kw, first_order=False, only_zK=False, config=None):
    up = LinUp("up", params={"W": W.clone(), "D": D.clone()}, optimizer=RecSGD,
               optimizer_kwargs={"lr": UP_LR, "momentum": 0.5})
    lat = LinLat("lat", optimizer=opt, optimizer_kwargs=dict(kw), data=batches, first_order=first_order,
                 config=mlo.ProblemConfig(method="unrolled", unroll_steps=K))
    up.lat, lat.up, up.only_zK = lat, up, only_zK
    eng = mlo.Engine([lat, up], {"u2l": {up: [lat]}, "l2u": {lat: [up]}}, config)
    return eng, up, lat


def linear_reference(W, D, x, K, opt, kw, first_order, only_zK=False, state=None, z0_const=False):
    """∂F/∂(W, D) by plain autograd; returns (grads, final inner optimizer state)."""
    W = W.detach().clone().requires_grad_()
    D = D.detach().clone().requires_grad_()
    z0 = x @ W
    if z0_const:                    # the mistake the issue describes: Z_0 copied in as a constant
        z0 = z0.detach().requires_grad_()
    zK, st = unroll(z0, lambda z: inner_loss(z, D, x), K, opt, kw, first_order, state)
    F = upper_loss(zK, z0, torch.tanh(x @ W), D, x, only_zK)
    gW, gD = torch.autograd.grad(F, [W, D], allow_unused=True)
    gW = torch.zeros_like(W) if gW is None else gW
    return {"W": gW, "D": gD}, {k: (v.detach() if torch.is_tensor(v) else v) for k, v in st.items()}


def run_windows(eng, up, K, n):
    """Runs ``n`` windows; yields (W, D at the window's start, recorded applied gradient)."""
    out = []
    for _ in range(n):
        W, D = (up.module.W.detach().clone(), up.module.D.detach().clone())
        eng.run(K)
        assert not eng.open_windows()                     # consumed and closed
        out.append((W, D, dict(zip(up.param_names, up.optimizer.record[-1]))))
    return out


@pytest.mark.parametrize("opt_name", list(OPTS))
@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
def test_linear_matches_naive(measured, opt_name, K, first_order):
    opt, kw = OPTS[opt_name]
    sizes = (4, 3, 5)
    W0, D0, batches = linear_data(sizes)
    eng, up, lat = linear_engine(W0, D0, batches, K, opt, kw, first_order)
    windows = run_windows(eng, up, K, len(sizes))
    assert eng.counts() == {"lat": K * len(sizes), "up": len(sizes)}
    err, gap = 0.0, float("inf")
    for (W, D, got), x in zip(windows, batches):
        ref, _ = linear_reference(W, D, x, K, opt, kw, first_order)
        err = max(err, worst_rel(got, ref))
        other, _ = linear_reference(W, D, x, K, opt, kw, not first_order)
        gap = min(gap, worst_rel(other, ref))
    order = "first" if first_order else "second"
    measured(f"window linear {opt_name} K={K} {order} order: applied grad vs naive (3 windows)", err, TOL)
    # the other order's reference is far off: the comparison discriminates the order. (Adam's
    # first step is lr·g/(|g|+eps) ≈ lr·sign(g), whose derivative in g is ~eps/|g|: with K=1
    # the orders differ by ~1e-9 only — still 10× the tolerance.)
    floor = 10 * TOL if (opt_name, K) == ("adam", 1) else 1e-4
    assert gap > floor, f"first and second order references agree ({gap:.2e}): the test cannot tell them apart"


def test_fresh_optimizer_state_per_window(measured):
    """Momentum restarts every window; a reference carrying the buffer over differs."""
    opt, kw = OPTS["momentum"]
    K, sizes = 3, (4, 4, 4)                  # equal sizes so that a carried buffer is defined
    W0, D0, batches = linear_data(sizes, seed=1)
    eng, up, _ = linear_engine(W0, D0, batches, K, opt, kw)
    windows = run_windows(eng, up, K, len(sizes))
    err, gap, carried = 0.0, float("inf"), None
    for i, ((W, D, got), x) in enumerate(zip(windows, batches)):
        ref, _ = linear_reference(W, D, x, K, opt, kw, False)
        err = max(err, worst_rel(got, ref))
        carry, carried = linear_reference(W, D, x, K, opt, kw, False, state=carried)
        if i:
            gap = min(gap, worst_rel(got, carry))
    measured("window fresh momentum per window vs naive restart (3 windows)", err, TOL)
    assert gap > 1e-3, f"the carried-over momentum reference also matches ({gap:.2e})"


def test_gradient_through_initial_only(measured):
    """The upper reads only Z_K: ∂F/∂W exists only through Z_0 = init_window(batch)."""
    opt, kw = OPTS["momentum"]
    W0, D0, batches = linear_data((4, 3, 5), seed=2)
    for first_order in (False, True):
        K = 3
        eng, up, _ = linear_engine(W0, D0, batches, K, opt, kw, first_order, only_zK=True)
        err = 0.0
        for (W, D, got), x in zip(run_windows(eng, up, K, 3), batches):
            ref, _ = linear_reference(W, D, x, K, opt, kw, first_order, only_zK=True)
            err = max(err, worst_rel(got, ref))
            const, _ = linear_reference(W, D, x, K, opt, kw, first_order, only_zK=True, z0_const=True)
            assert torch.count_nonzero(const["W"]) == 0          # Z_0 as a constant: ∇W ≡ 0
            assert float(got["W"].norm()) > 1e-2 * float(ref["D"].norm()), "∇W vanished"
        order = "first" if first_order else "second"
        measured(f"window ∇W only via init_window (upper reads Z_K), {order} order", err, TOL)


# ========================================================================== 4: tiny MAE
def tiny_mae():
    torch.manual_seed(0)
    return MaskedAutoencoder(ImageTokenizer(4, 1, 3, 8), depth=1, num_heads=2, decoder_dim=8,
                             decoder_depth=1, decoder_heads=2, mlp_ratio=2.0, mask_ratio=0.75,
                             attn_impl="math").to(DT)


MAE_OPT = (torch.optim.SGD, {"lr": 0.5, "momentum": 0.9})


class MAEUp(mlo.Problem):
    def training_step(self, batch):
        x = self.lat.batch[0]
        pred = self.call("forward_decoder", self.lat.params["z"], self.lat.outputs["ids_restore"])
        return self.call("forward_loss", x, pred, torch.ones_like(self.lat.outputs["mask"]))  # query


class MAELat(mlo.WindowProblem):
    def init_window(self, batch):
        x, scores = batch
        z0, mask, ids = self.up.call("forward_encoder", x, scores=scores)
        return {"z": z0}, {"mask": mask, "ids_restore": ids}

    def training_step(self, batch):
        x = batch[0]
        pred = self.up.call("forward_decoder", self.params["z"], self.outputs["ids_restore"])
        return self.up.call("forward_loss", x, pred, self.outputs["mask"])


class _Method(nn.Module):
    def __init__(self, m, name):
        super().__init__()
        self.m, self.name = m, name

    def forward(self, *a, **kw):
        return getattr(self.m, self.name)(*a, **kw)


def mae_reference(mae, params, batch, K, first_order):
    """∂F/∂θ for every MAE parameter by plain autograd (functional_call on leaves)."""
    theta = {k: v.detach().clone().requires_grad_() for k, v in params.items()}

    def call(name, *a, **kw):
        return functional_call(_Method(mae, name), {"m." + k: v for k, v in theta.items()}, a, kw)

    x, scores = batch
    z0, mask, ids = call("forward_encoder", x, scores=scores)
    inner = lambda z: call("forward_loss", x, call("forward_decoder", z, ids), mask)  # noqa: E731
    zK, _ = unroll(z0, inner, K, *MAE_OPT, first_order)
    F = call("forward_loss", x, call("forward_decoder", zK, ids), torch.ones_like(mask))
    gs = torch.autograd.grad(F, list(theta.values()), allow_unused=True)
    return {k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(theta.items(), gs)}


@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
def test_mae_every_parameter_matches_naive(measured, K, first_order):
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(n, 3, 4, 4, generator=g, dtype=DT), torch.rand(n, 16, generator=g, dtype=DT))
               for n in (3, 2)]
    mae = tiny_mae()
    up = MAEUp("mae", module=mae, optimizer=RecSGD, optimizer_kwargs={"lr": 0.05})
    lat = MAELat("lat", optimizer=MAE_OPT[0], optimizer_kwargs=MAE_OPT[1], data=batches,
                 first_order=first_order, config=mlo.ProblemConfig(unroll_steps=K))
    up.lat, lat.up = lat, up
    eng = mlo.Engine([lat, up], {"u2l": {up: [lat]}, "l2u": {lat: [up]}})
    err, worst_name, gap = 0.0, None, float("inf")
    for batch in batches:
        params = {k: p.detach().clone() for k, p in zip(up.param_names, up.variables)}
        eng.run(K)
        got = dict(zip(up.param_names, up.optimizer.record[-1]))
        ref = mae_reference(mae, params, batch, K, first_order)
        assert set(ref) == set(got) and len(ref) > 10
        for k in ref:
            e = worst_rel({k: got[k]}, {k: ref[k]})
            if worst_name is None or e > err:
                err, worst_name = e, k
        enc = [k for k in ref if k.startswith("encoder.")]
        assert enc and all(float(ref[k].norm()) > 0 for k in enc), "encoder gets no hypergradient"
        other = mae_reference(mae, params, batch, K, not first_order)
        gap = min(gap, worst_rel(other, ref))
    order = "first" if first_order else "second"
    measured(f"window MAE K={K} {order} order: worst parameter vs naive ({worst_name})", err, TOL)
    assert gap > 1e-6, f"first and second order MAE references agree ({gap:.2e})"


# =========================================================================== 5: errors
def _small(first_order=False, method="unrolled", init=None):
    W0, D0, batches = linear_data((4, 3))
    up = LinUp("up", params={"W": W0, "D": D0}, optimizer_kwargs={"lr": UP_LR})
    lat = LinLat("lat", optimizer_kwargs={"lr": ALPHA}, data=batches, first_order=first_order,
                 config=mlo.ProblemConfig(method=method, unroll_steps=2))
    if init is not None:
        lat.init_window = init
    up.lat, lat.up, up.only_zK = lat, up, False
    return up, lat


def _chain(e):
    while e is not None:
        yield e
        e = e.__cause__ or e.__context__


def test_errors_name_the_problem():
    up, lat = _small(method="cg")
    with pytest.raises(GraphError, match=r"problem 'lat' has per-window variables.*unrolled"):
        mlo.Engine([lat, up], {"u2l": {up: [lat]}, "l2u": {lat: [up]}})
    up, lat = _small()
    with pytest.raises(GraphError, match=r"problem 'lat' has per-window variables but no problem above"):
        mlo.Engine([lat], {})
    up, lat = _small()
    eng = mlo.Engine([lat, up], {"u2l": {up: [lat]}, "l2u": {lat: [up]}})
    for what in ("params", "initial", "outputs", "batch"):      # outside the engine, no window
        with pytest.raises(RuntimeError, match=rf"problem 'lat': .*{what}.* only while its window is open"):
            getattr(lat, what)
    with pytest.raises(RuntimeError, match=r"problem 'lat'.* only while its window is open"):
        eng.gradient("up")                                     # before any step: up reads lat.batch
    with pytest.raises(RuntimeError, match=r"problem 'lat' has per-window variables and no window is open"):
        eng.gradient("lat")
    eng.step()                                                 # window open (1 of 2 steps)
    assert eng.gradient("lat")["grad"]["z"].shape == (4, LAT)
    eng.step()                                                 # consumed
    with pytest.raises(RuntimeError, match=r"problem 'lat' has per-window variables and no window is open"):
        eng.gradient("lat")
    with pytest.raises(TypeError, match=r"problem 'lat' has per-window variables and no module"):
        lat.call("forward")
    with pytest.raises(TypeError, match=r"problem 'lat': first_order must be a bool"):
        LinLat("lat", first_order=1)


BAD_INIT = {
    "non-dict": (lambda x: x @ torch.ones(DIM, LAT, dtype=DT),
                 TypeError, r"problem 'lat': init_window must return a non-empty dict"),
    "integer tensor": (lambda x: {"z": torch.ones(x.shape[0], LAT, dtype=torch.long)},
                       TypeError, r"problem 'lat': init_window variable 'z' must be a floating-point tensor"),
    "bad name": (lambda x: {"not a name": x.clone()},
                 ValueError, r"problem 'lat': init_window variable name 'not a name'"),
}


@pytest.mark.parametrize("case", list(BAD_INIT))
def test_bad_init_window_message(case):
    """The validation message exists and names the problem (found in the exception chain)."""
    init, exc, msg = BAD_INIT[case]
    up, lat = _small(init=init)
    eng = mlo.Engine([lat, up], {"u2l": {up: [lat]}, "l2u": {lat: [up]}})
    with pytest.raises(BaseException) as info:
        eng.step()
    hits = [e for e in _chain(info.value) if isinstance(e, exc)]
    assert hits and any(re.search(msg, str(e)) for e in hits), repr(info.value)


@pytest.mark.parametrize("case", ["non-dict", "integer tensor"])
def test_bad_init_window_raises_its_own_error(case):
    init, exc, msg = BAD_INIT[case]
    up, lat = _small(init=init)
    eng = mlo.Engine([lat, up], {"u2l": {up: [lat]}, "l2u": {lat: [up]}})
    with pytest.raises(exc, match=msg):
        eng.step()


# ================================================================ 6: checkpoint / snapshot
def test_checkpoint_between_windows_resumes_bitwise(tmp_path):
    opt, kw = OPTS["momentum"]
    K, sizes = 2, (4, 3, 5, 4)
    W0, D0, batches = linear_data(sizes, seed=4)
    eng, up, _ = linear_engine(W0, D0, batches, K, opt, kw)
    eng.run(2 * K)
    assert not eng.open_windows()
    with warnings.catch_warnings():
        warnings.simplefilter("error")                         # no "open window" warning
        checkpoint.save(eng, tmp_path / "ck.pt")
    eng.run(2 * K)
    want = [r for r in up.optimizer.record[2:]], up.module.W.detach().clone(), up.module.D.detach().clone()

    # a fresh engine from other initial values, data realigned (one batch per window)
    W1, D1, _ = linear_data(sizes, seed=5)
    eng2, up2, lat2 = linear_engine(W1, D1, batches[2:], K, opt, kw)
    checkpoint.load(eng2, tmp_path / "ck.pt")
    assert eng2.iteration == 2 * K and lat2.step_count == 2 * K
    eng2.run(2 * K)
    got = up2.optimizer.record, up2.module.W.detach(), up2.module.D.detach()
    assert len(got[0]) == 2
    for a, b in zip(got[0], want[0]):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
    assert eng2.counts() == eng.counts()


def test_checkpoint_inside_window_warns_and_resumes(tmp_path):
    """Saved 1 step into a window: both save and load warn; the resumed run opens a fresh
    window (new batch) and the upper consumes it after the remaining K-1 steps."""
    opt, kw = OPTS["momentum"]
    K = 3
    W0, D0, batches = linear_data((4, 3, 5, 4), seed=7)
    eng, up, lat = linear_engine(W0, D0, batches, K, opt, kw)
    eng.run(K + 1)
    assert eng.open_windows() == {"lat": 1}
    with pytest.warns(RuntimeWarning, match=r"inside open unrolled window\(s\) of 'lat' \(1 step"):
        checkpoint.save(eng, tmp_path / "open.pt")
    assert lat.window_open and lat.params["z"].shape == (3, LAT)          # saving changed nothing
    eng2, up2, lat2 = linear_engine(W0, D0, batches[2:], K, opt, kw)
    with pytest.warns(RuntimeWarning, match=r"checkpoint was saved inside open unrolled window"):
        checkpoint.load(eng2, tmp_path / "open.pt")
    assert torch.equal(up2.module.W, up.module.W) and not lat2.window_open
    eng2.run(K - 1)
    assert eng2.counts() == {"lat": 2 * K, "up": 2} and not eng2.open_windows()


def test_early_stopping_snapshot_with_window_open():
    """Validation every iteration (windows open at 2 of every 3), the metric improving each
    time: snapshots taken inside windows; the run equals one without early stopping, and
    restore_best() with a window open closes it and loads the upper's state."""
    opt, kw = OPTS["momentum"]
    K, sizes = 3, (4, 3, 5)
    W0, D0, batches = linear_data(sizes, seed=6)
    seen = []

    def validation(engine):
        seen.append(bool(engine.open_windows()))
        return {"m": -float(engine.iteration)}

    cfg = mlo.EngineConfig(validate_every=1, validation=validation,
                           early_stopping={"metric": "m", "mode": "min", "patience": 3})
    eng, up, lat = linear_engine(W0, D0, batches, K, opt, kw, config=cfg)
    ref, rup, _ = linear_engine(W0, D0, batches, K, opt, kw)
    eng.run(2 * K + 1)
    ref.run(2 * K + 1)
    assert any(seen), "validation never ran with a window open"
    assert eng.early_stopping.best_iteration == 2 * K + 1 and eng.open_windows()   # snapshot inside a window
    for a, b in zip(up.optimizer.record, rup.optimizer.record):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    W = up.module.W.detach().clone()
    eng.restore_best()
    assert not eng.open_windows() and not lat.window_open
    assert torch.equal(up.module.W.detach(), W)
    eng.run(K)                                                  # continues after the restore
    assert up.step_count >= 3


def test_shared_alias_sees_a_set_params_between_window_steps(measured):
    """A reader's window shares one alias set of a source across its steps while the
    source is unchanged; an edit with set_params between two steps (the source did not
    step) must be seen by the later steps — and both values count as the same variable."""
    opt, kw = OPTS["momentum"]
    K = 3
    W0, D0, batches = linear_data((4, 4), seed=8)
    eng, up, lat = linear_engine(W0, D0, batches, K, opt, kw)
    eng.run(1)                                   # the window is open, one step in
    D1 = 0.5 * up.module.D.detach()
    up.set_params({"D": D1})                     # no step of the upper: same step count
    eng.run(K - 1)                               # the other steps, then the upper's update
    got = dict(zip(up.param_names, up.optimizer.record[-1]))
    # naive: step 1 reads D0, steps 2..K read D1; both are the upper's variable D
    x = batches[0]
    W = W0.clone().requires_grad_()
    Dv = D1.clone().requires_grad_()
    D_old = D0 + (Dv - Dv.detach())              # value D0, derivative into Dv
    z0 = x @ W
    z, buf = z0, None
    for k in range(K):
        Dk = D_old if k == 0 else Dv
        (g,) = torch.autograd.grad(inner_loss(z, Dk, x), z, create_graph=True)
        buf = g if buf is None else kw["momentum"] * buf + g
        z = z - kw["lr"] * buf
    F = upper_loss(z, z0, torch.tanh(x @ W), Dv, x, False)
    gW, gD = torch.autograd.grad(F, [W, Dv])
    measured("window: shared alias after set_params between steps vs naive (W, D)",
             max(rel(got["W"], gW), rel(got["D"], gD)), 1e-10)
    # the stale alternative (every step on D0) gives another value: the check discriminates
    W2 = W0.clone().requires_grad_()
    D2 = D1.clone().requires_grad_()
    D_all_old = D0 + (D2 - D2.detach())
    z0 = x @ W2
    z, buf = z0, None
    for _ in range(K):
        (g,) = torch.autograd.grad(inner_loss(z, D_all_old, x), z, create_graph=True)
        buf = g if buf is None else kw["momentum"] * buf + g
        z = z - kw["lr"] * buf
    (stale,) = torch.autograd.grad(upper_loss(z, z0, torch.tanh(x @ W2), D2, x, False), [D2])
    assert rel(stale, gD) > 1e-3
