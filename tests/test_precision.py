"""EngineConfig(device=..., precision=...): bf16 autocast with float32 variables and
hypergradient vectors, vs the same runs in fp32 (mlo.precision)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mlo

torch.set_num_threads(1)
METHODS = {"unrolled": {}, "cg": {"max_iter": 10}, "neumann": {"iterations": 10, "alpha": 0.5},
           "finite_difference": {"epsilon": 0.01}}


class Classifier(mlo.Problem):
    def __init__(self, hyper, data, method):
        super().__init__("classifier", module=nn.Linear(8, 1), data=data,
                         optimizer=torch.optim.SGD, optimizer_kwargs={"lr": 0.5, "momentum": 0.5},
                         config=mlo.ProblemConfig(unroll_steps=5, method=method,
                                                  method_options=METHODS[method]))
        self.hyper = hyper

    def training_step(self, batch):
        x, y = batch
        w = self.params["weight"].squeeze(0)
        return F.binary_cross_entropy_with_logits(self(x).squeeze(-1), y) \
            + 0.5 * (self.hyper.params["log_wd"].exp() * w * w).sum()


class WeightDecay(mlo.Problem):
    def __init__(self, data):
        super().__init__("hyper", params={"log_wd": torch.full((8,), -2.0)}, data=data,
                         optimizer=torch.optim.Adam, optimizer_kwargs={"lr": 0.05})
        self.classifier = None

    def training_step(self, batch):
        x, y = batch
        return F.binary_cross_entropy_with_logits(self.classifier(x).squeeze(-1), y)


def quickstart(method, precision, device=None):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(128, 8, generator=g)
    Y = (X[:, 0] - X[:, 1] + 0.5 * torch.randn(128, generator=g) > 0).float()
    torch.manual_seed(0)
    hyper = WeightDecay([(X[64:], Y[64:])])
    clf = Classifier(hyper, [(X[:64], Y[:64])], method)
    hyper.classifier = clf
    return mlo.Engine([clf, hyper], {"u2l": {hyper: [clf]}, "l2u": {clf: [hyper]}},
                      config=mlo.EngineConfig(precision=precision, device=device))


def flat(engine):
    return torch.cat([t.detach().reshape(-1) for P in engine.problems.values() for t in P.variables])


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("method", sorted(METHODS))
def test_bf16_quickstart_stays_close_to_fp32(method, measured):
    runs = {}
    for precision in ("fp32", "bf16"):
        e = quickstart(method, precision)
        start = flat(e)
        e.run(50)                       # 10 upper updates
        e.close_windows()
        runs[precision] = flat(e)
        assert all(t.dtype == torch.float32 for P in e.problems.values() for t in P.variables)
        assert e.last_hypergradient["hyper"]["log_wd"].dtype == torch.float32
    assert rel(runs["fp32"], start) > 1e-2
    measured(f"precision: quickstart {method}, 50 it., bf16 vs fp32 (rel. params)",
             rel(runs["bf16"], runs["fp32"]), 1e-2)
    assert rel(runs["bf16"], runs["fp32"]) > 1e-6   # bf16 really was used


class Ridge(mlo.Problem):
    """P1: w*(λ) = argmin ½‖Xw − y‖² + ½Σλ_j w_j² (per-feature weight decay)."""

    def __init__(self, hyper, X, y):
        super().__init__("lower", params={"w": torch.zeros(X.shape[1])}, data=[(X, y)],
                         config=mlo.ProblemConfig(method="cg", method_options={"max_iter": 50,
                                                                               "tol": 1e-12}))
        self.hyper = hyper

    def training_step(self, batch):
        X, y = batch
        w = self.params["w"]
        return 0.5 * ((X @ w - y) ** 2).sum() + 0.5 * (self.hyper.params["lam"] * w * w).sum()


class Val(mlo.Problem):
    def __init__(self, Xv, yv):
        super().__init__("upper", params={"lam": torch.linspace(0.5, 2.0, 6)}, data=[(Xv, yv)])
        self.lower = None

    def training_step(self, batch):
        X, y = batch
        return 0.5 * ((X @ self.lower.params["w"] - y) ** 2).sum()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_p1_hypergradient_in_bf16_mode(precision, measured):
    g = torch.Generator().manual_seed(0)
    X, Xv = torch.randn(30, 6, generator=g), torch.randn(20, 6, generator=g)
    y, yv = torch.randn(30, generator=g), torch.randn(20, generator=g)
    up = Val(Xv, yv)
    lo = Ridge(up, X, y)
    up.lower = lo
    lam = up.params["lam"].detach().double()
    H = X.double().T @ X.double() + torch.diag(lam)
    w = torch.linalg.solve(H, X.double().T @ y.double())
    with torch.no_grad():
        lo.params["w"].copy_(w.float())                    # at the lower optimum
    engine = mlo.Engine([lo, up], {"u2l": {up: [lo]}, "l2u": {lo: [up]}},
                        config=mlo.EngineConfig(precision=precision))
    got = engine.gradient("upper")["grad"]["lam"]
    gv = Xv.double().T @ (Xv.double() @ w - yv.double())
    exact = -w * torch.linalg.solve(H, gv)                  # ∂F/∂λ_j = −w*_j (H⁻¹g)_j
    assert got.dtype == torch.float32
    tol = {"fp32": 1e-4, "bf16": 2e-2}[precision]
    if precision == "bf16":   # autocast really ran the losses in bfloat16
        assert rel(got.double(), exact) > 1e-5
    measured(f"precision: P1 implicit CG hypergradient, {precision} mode vs closed form",
             rel(got.double(), exact), tol)


def test_device_and_precision_options():
    with pytest.raises(ValueError, match="gradient scaler"):
        mlo.EngineConfig(precision="fp16")
    with pytest.raises(ValueError, match="precision must be one of"):
        mlo.EngineConfig(precision="int8")
    with pytest.raises(ValueError, match="EngineConfig.device"):
        mlo.EngineConfig(device="nodevice")
    e = quickstart("cg", "fp32", device="cpu")      # batches and modules moved (a no-op here)
    e.run(10)
    assert e.records["hyper"]["updates"] == 2


def test_unusable_device_is_a_named_error_at_config_time(monkeypatch):
    """EngineConfig(device="cuda") on a CPU-only torch used to end in torch's raw
    ``AssertionError: Torch not compiled with CUDA enabled`` when the engine moved the
    modules; now the config names the field and what is available."""
    from mlo.precision import available_devices

    assert available_devices()[0] == "cpu"
    if torch.version.cuda is None:                     # this machine: a CPU-only torch
        with pytest.raises(ValueError, match=r"EngineConfig\.device='cuda': this torch .* is built "
                                             r"without CUDA; available devices: \['cpu'"):
            mlo.EngineConfig(device="cuda")
    # A CUDA build: no visible GPU, an index past the last GPU, a valid one.
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"device='cuda:0': no CUDA device is visible .*CUDA_VISIBLE_DEVICES"):
        mlo.EngineConfig(device="cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match=r"device='cuda:3': there are 2 CUDA device\(s\) \(cuda:0 … cuda:1\); "
                                         r"available devices: \['cpu', 'cuda:0', 'cuda:1'"):
        mlo.EngineConfig(device="cuda:3")
    assert mlo.EngineConfig(device="cuda:1").device == "cuda:1"
    assert mlo.EngineConfig(device="cpu", precision="bf16").device == "cpu"


# ------------------------------------------- finite differences in low precision
def _fd_quickstart(precision, epsilon, method="finite_difference"):
    e = quickstart("cg", precision)
    opts = {"epsilon": epsilon} if method == "finite_difference" else {"alpha": epsilon}
    e.problems["classifier"].config = mlo.ProblemConfig(unroll_steps=5, method=method, method_options=opts)
    return e


def _precision_warnings(record):
    return [str(w.message) for w in record if "resolves" in str(w.message)]


@pytest.mark.parametrize("method", ["finite_difference", "sama"])
def test_finite_difference_below_bf16_resolution_warns_once(method):
    """ε/‖θ‖ below bfloat16's spacing 2⁻⁷: the engine's bf16 autocast run warns (naming the
    problem, once per problem/method/ε); fp32 at the same ε and bf16 at a resolvable ε
    do not warn."""
    import warnings

    from engines import finite_difference as fdm

    option = "epsilon" if method == "finite_difference" else "alpha"
    fdm._WARNED_PRECISION.clear()
    for precision, eps, warns in (("fp32", 1e-3, False), ("bf16", 1e-3, True), ("bf16", 0.5, False)):
        e = _fd_quickstart(precision, eps, method)
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            e.run(20)                                       # 4 hypergradients
            ours = _precision_warnings(rec)
        theta = float(torch.cat([t.detach().reshape(-1) for t in e.problems["classifier"].variables]).norm())
        assert eps / theta < 2 ** -7 or not warns           # the case is what it claims
        if warns:
            assert len(ours) == 1, ours                      # once, not per update
            assert ours[0].startswith(f"problem 'classifier': {method}: {option}=0.001 is below what "
                                      f"bfloat16 (autocast) resolves"), ours[0]
            assert "precision='fp32'" in ours[0]
        else:
            assert ours == [], (precision, eps, ours)


def test_finite_difference_with_bf16_parameters_warns():
    """A model whose parameters are bfloat16 (no autocast): the same check, naming the
    parameters' dtype; the float32 copy of the model at the same ε does not warn."""
    import warnings

    from engines import finite_difference as fdm
    from engines.base import Lower
    from engines.finite_difference import finite_difference

    torch.manual_seed(0)
    x = torch.randn(16, 8)
    net = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
    lam = torch.full((8,), 0.1, requires_grad=True)
    fdm._WARNED_PRECISION.clear()
    grads = {}
    for dtype in (torch.float32, torch.bfloat16):
        params = tuple(p.detach().to(dtype).requires_grad_() for p in net.parameters())

        def loss(ps, xs, dtype=dtype):
            h = torch.tanh(x.to(dtype) @ ps[0].T + ps[1])
            out = (h @ ps[2].T + ps[3]).float()
            return (out ** 2).mean() + (xs[0] * ps[0].float() ** 2).sum()

        v = tuple(torch.randn_like(p) for p in params)
        lower = Lower(params=params, inputs=(lam,), loss_fn=loss, label="problem 'small'")
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            grads[dtype] = finite_difference(lower, v, epsilon=1e-2)[0]
        ours = _precision_warnings(rec)
        if dtype == torch.float32:
            assert ours == []
        else:
            assert len(ours) == 1 and ours[0].startswith(
                "problem 'small': finite_difference: epsilon=0.01 is below what bfloat16 (the "
                "parameters' dtype) resolves"), ours
    a, b = grads[torch.float32], grads[torch.bfloat16]
    assert float((a - b).norm() / a.norm()) > 0.3      # why it warns (measured: 1.47)
