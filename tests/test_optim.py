"""mlo.optim: functional optimizers reproduce torch.optim and are differentiable."""

import pytest
import torch

from mlo.optim import FunctionalAdam, FunctionalOptimizer, FunctionalSGD, functional_optimizer

DT = torch.float64
TOL = 1e-12
SHAPES = [(3, 4), (4,), (4, 2), ()]
X = torch.randn(5, 3, dtype=DT, generator=torch.Generator().manual_seed(1))
Y = torch.randn(5, 2, dtype=DT, generator=torch.Generator().manual_seed(2))


def make_params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, dtype=DT, generator=gen).requires_grad_() for s in SHAPES]


def loss_fn(ps, lam=0.3):
    """Tiny MLP regression + a non-quadratic term coupling an upper variable ``lam``."""
    w1, b1, w2, s = ps
    pred = torch.tanh(X @ w1 + b1) @ w2 * torch.cos(s)
    return ((pred - Y) ** 2).mean() + lam * sum(torch.sin(p).sum() for p in ps) + 0.1 * s**4


def make_opt(cls, kw, params, two_groups):
    if not two_groups:
        return cls(params, **kw)
    g2 = {"lr": kw["lr"] * 0.5}
    if kw.get("weight_decay"):
        g2["weight_decay"] = 2 * kw["weight_decay"]
    return cls([{"params": params[:2]}, {"params": params[2:], **g2}], **kw)


def torch_steps(opt, params, n, lam=0.3):
    traj = []
    for _ in range(n):
        opt.zero_grad()
        loss_fn(params, lam).backward()
        opt.step()
        traj.append([p.detach().clone() for p in params])
    return traj


def functional_steps(fopt, ps, n, lam=0.3, create_graph=False):
    traj = []
    for _ in range(n):
        grads = torch.autograd.grad(loss_fn(ps, lam), ps, create_graph=create_graph)
        ps = fopt.step(ps, grads)
        traj.append(ps)
    return traj


def rel_err(traj_a, traj_b):
    """Max over steps and tensors of ||a - b||_inf / ||b||_inf."""
    return max(((a.detach() - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()
               for sa, sb in zip(traj_a, traj_b) for a, b in zip(sa, sb))


SGD_CASES = [{}, {"momentum": 0.9}, {"momentum": 0.9, "dampening": 0.1},
             {"momentum": 0.9, "nesterov": True}, {"weight_decay": 0.01, "momentum": 0.5},
             {"maximize": True, "momentum": 0.9},
             # every hyperparameter non-default at once
             {"momentum": 0.8, "dampening": 0.25, "weight_decay": 0.03, "maximize": True},
             {"momentum": 0.7, "nesterov": True, "weight_decay": 0.02, "maximize": True}]
ADAM_CASES = [{}, {"eps": 0.1}, {"betas": (0.8, 0.9)}, {"weight_decay": 0.05},
              {"amsgrad": True}, {"amsgrad": True, "maximize": True, "weight_decay": 0.05},
              # every hyperparameter non-default at once
              {"betas": (0.75, 0.95), "eps": 0.1, "weight_decay": 0.07, "amsgrad": True},
              {"betas": (0.85, 0.9), "eps": 1e-4, "weight_decay": 0.03, "amsgrad": True, "maximize": True}]
GRID = ([(torch.optim.SGD, dict(c, lr=lr)) for c in SGD_CASES for lr in (0.05, 0.2)]
        + [(cls, dict(c, lr=lr)) for cls in (torch.optim.Adam, torch.optim.AdamW)
           for c in ADAM_CASES for lr in (3e-3, 0.05)])
IDS = [f"{c.__name__}-{kw}" for c, kw in GRID]


@pytest.mark.parametrize("cls,kw", GRID, ids=IDS)
def test_trajectory_matches_torch(cls, kw, measured):
    two_groups = kw["lr"] in (0.2, 0.05)  # the non-default lr runs with 2 groups (lr, lr/2; wd, 2 wd)
    real = make_params()
    fopt = FunctionalOptimizer.from_torch(make_opt(cls, kw, real, two_groups), real)
    got = functional_steps(fopt, [p.detach().clone().requires_grad_() for p in real], 20)
    for foreach in (False, True):  # torch's single-tensor and multi-tensor paths
        ref = make_params()
        expected = torch_steps(make_opt(cls, dict(kw, foreach=foreach), ref, two_groups), ref, 20)
        name = "SGD" if cls is torch.optim.SGD else "Adam/AdamW"
        measured(f"functional {name} trajectory vs torch.optim (20 steps)", rel_err(got, expected), TOL)


@pytest.mark.parametrize("kw", [{"differentiable": True}, {"differentiable": True, "maximize": True, "betas": (0.8, 0.9)},
                                {"fused": True, "amsgrad": True, "weight_decay": 0.1},
                                {"differentiable": True, "amsgrad": True, "weight_decay": 0.1}])
def test_adam_other_modes(kw, measured):
    ref = make_params()
    if kw.get("differentiable"):  # differentiable torch.optim updates non-leaf params in place
        ref = [p.clone() for p in ref]
    opt, expected = torch.optim.Adam(ref, lr=0.05, **kw), []
    for _ in range(20):
        for p, g in zip(ref, torch.autograd.grad(loss_fn(ref), ref)):
            p.grad = g
        opt.step()
        expected.append([p.detach().clone() for p in ref])
    real = make_params()
    fopt = functional_optimizer(torch.optim.Adam(real, lr=0.05, **kw), real)
    got = functional_steps(fopt, [p.detach().clone().requires_grad_() for p in real], 20)
    measured("functional Adam vs torch.optim differentiable/fused modes (20 steps)", rel_err(got, expected), TOL)


INTERLEAVE = [(torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
              (torch.optim.SGD, {"lr": 0.1, "momentum": 0.8, "dampening": 0.2, "maximize": True}),
              (torch.optim.Adam, {"lr": 0.03, "amsgrad": True, "weight_decay": 0.05}),
              (torch.optim.Adam, {"lr": 0.04, "betas": (0.7, 0.9), "eps": 0.1, "weight_decay": 0.02,
                                  "amsgrad": True}),
              (torch.optim.AdamW, {"lr": 0.03, "betas": (0.8, 0.9), "eps": 0.1, "weight_decay": 0.1,
                                   "amsgrad": True})]


@pytest.mark.parametrize("cls,kw", INTERLEAVE, ids=[f"{c.__name__}-{kw}" for c, kw in INTERLEAVE])
def test_interleave_torch_functional_torch(cls, kw, measured):
    ref = make_params()
    expected = torch_steps(make_opt(cls, kw, ref, True), ref, 20)
    real = make_params()
    opt = make_opt(cls, kw, real, True)
    got = torch_steps(opt, real, 5)
    fopt = FunctionalOptimizer.from_torch(opt, real)
    got += functional_steps(fopt, [p.detach().clone().requires_grad_() for p in real], 10)
    fopt.state_to_torch(opt, real)
    with torch.no_grad():
        for p, q in zip(real, got[-1]):
            p.copy_(q)
    got += torch_steps(opt, real, 5)
    measured("torch 5 → functional 10 → torch 5 steps vs torch.optim 20 (state taken over, handed back)",
             rel_err(got, expected), TOL)
    if cls is not torch.optim.SGD:
        assert all(opt.state[p]["step"].item() == 20 and opt.state[p]["step"].dtype == torch.float32 for p in real)


DIFF = [(torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01}),
        (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
        (torch.optim.Adam, {"lr": 0.05, "weight_decay": 0.01}),
        (torch.optim.AdamW, {"lr": 0.05, "amsgrad": True})]
W = [torch.randn(s, dtype=DT, generator=torch.Generator().manual_seed(7)) for s in SHAPES]


def torch_objective(cls, kw, lam, k=3):
    """Independent reference: K torch.optim steps, then sum(W * params_K)."""
    ps = make_params()
    torch_steps(make_opt(cls, kw, ps, True), ps, k, lam)
    return sum((w * p).sum() for w, p in zip(W, ps)).item()


@pytest.mark.parametrize("cls,kw", DIFF, ids=[f"{c.__name__}-{kw}" for c, kw in DIFF])
def test_hypergradient_matches_finite_differences(cls, kw, measured):
    real = make_params()
    fopt = FunctionalOptimizer.from_torch(make_opt(cls, kw, real, True), real)
    lr = torch.tensor(kw["lr"], dtype=DT, requires_grad=True)
    lam = torch.tensor(0.3, dtype=DT, requires_grad=True)
    fopt.param_groups[0]["lr"] = lr  # second group keeps its float lr (lr * 0.5)
    ps = functional_steps(fopt, [p.detach().clone().requires_grad_() for p in real], 3, lam, create_graph=True)[-1]
    d_lr, d_lam = torch.autograd.grad(sum((w * p).sum() for w, p in zip(W, ps)), [lr, lam])
    h = 1e-6

    def fd_lr(delta):
        def make(cls_, kw_, params, two):
            opt = make_opt(cls_, kw_, params, two)
            opt.param_groups[0]["lr"] = kw["lr"] + delta
            return opt
        ps_ = make_params()
        torch_steps(make(cls, kw, ps_, True), ps_, 3)
        return sum((w * p).sum() for w, p in zip(W, ps_)).item()

    fd_lam = (torch_objective(cls, kw, 0.3 + h) - torch_objective(cls, kw, 0.3 - h)) / (2 * h)
    fd_lr_val = (fd_lr(h) - fd_lr(-h)) / (2 * h)
    measured("functional optimizer d/d(lr) through 3 steps vs central FD",
             abs(d_lr.item() - fd_lr_val) / abs(fd_lr_val), 1e-6)
    measured("functional optimizer d/d(loss parameter) through 3 steps vs central FD",
             abs(d_lam.item() - fd_lam) / abs(fd_lam), 1e-6)


@pytest.mark.parametrize("opt_fn", [lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.1),
                                    lambda p: torch.optim.AdamW(p, lr=0.1, amsgrad=True)])
def test_inputs_not_modified(opt_fn):
    real = make_params()
    opt = opt_fn(real)
    torch_steps(opt, real, 2)
    fopt = FunctionalOptimizer.from_torch(opt, real)
    ps = [p.detach().clone().requires_grad_() for p in real]
    grads = list(torch.autograd.grad(loss_fn(ps), ps))
    watched = ps + grads + [t for st in fopt.state for t in st.values() if isinstance(t, torch.Tensor)]
    before = [(t.clone(), t._version) for t in watched]
    torch_state = {k: v.clone() for k, v in opt.state[real[0]].items()}
    new = fopt.step(ps, grads)
    for t, (val, ver) in zip(watched, before):
        assert t._version == ver and torch.equal(t, val)
    assert all(n is not p for n, p in zip(new, ps))
    assert all(torch.equal(v, opt.state[real[0]][k]) for k, v in torch_state.items())  # torch state was cloned


def test_none_grad_skips_param_like_torch():
    ref = make_params()
    opt = torch.optim.Adam(ref, lr=0.1)
    loss_fn(ref).backward()
    ref[1].grad = None
    opt.step()
    real = make_params()
    fopt = FunctionalOptimizer.from_torch(torch.optim.Adam(real, lr=0.1), real)
    grads = list(torch.autograd.grad(loss_fn(real), real))
    grads[1] = None
    got = fopt.step(real, grads)
    assert rel_err([got], [[p.detach() for p in ref]]) == 0 and "step" not in fopt.state[1]


def test_types_and_errors():
    real = make_params()
    assert isinstance(FunctionalOptimizer.from_torch(torch.optim.SGD(real, lr=0.1), real), FunctionalSGD)
    assert isinstance(functional_optimizer(torch.optim.AdamW(real), real), FunctionalAdam)
    with pytest.raises(TypeError, match="Rprop.*SGD, Adam, AdamW, RMSprop"):
        FunctionalOptimizer.from_torch(torch.optim.Rprop(real), real)
    with pytest.raises(ValueError, match="complex"):
        z = torch.zeros(2, dtype=torch.complex128, requires_grad=True)
        FunctionalOptimizer.from_torch(torch.optim.Adam([z]), [z])
    with pytest.raises(ValueError, match="sparse"):
        fopt = FunctionalOptimizer.from_torch(torch.optim.SGD(real, lr=0.1), real)
        fopt.step(real, [torch.zeros(s, dtype=DT).to_sparse() if s else torch.zeros((), dtype=DT) for s in SHAPES])
    with pytest.raises(ValueError, match="not in the optimizer"):
        FunctionalOptimizer.from_torch(torch.optim.SGD(real[:2], lr=0.1), real)
    with pytest.raises(ValueError, match="more than once"):
        FunctionalOptimizer.from_torch(torch.optim.SGD(real, lr=0.1), real + real[:1])
    fopt = FunctionalOptimizer.from_torch(torch.optim.SGD(real, lr=0.1), real)
    with pytest.raises(ValueError, match="expected 4"):
        fopt.step(real[:2], real[:2])
    with pytest.raises(TypeError, match="cannot hand state"):
        fopt.state_to_torch(torch.optim.Adam(real), real)


HYPER = [(torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.1}, n)
         for n in ("momentum", "dampening", "weight_decay")] + \
        [(cls, {"lr": 0.05, "betas": (0.8, 0.9), "eps": 1e-3, "weight_decay": 0.1}, n)
         for cls in (torch.optim.Adam, torch.optim.AdamW) for n in ("beta1", "beta2", "eps", "weight_decay")]


def _with(kw, name, v):
    kw = dict(kw)
    if name.startswith("beta"):
        b = list(kw["betas"])
        b[int(name[-1]) - 1] = v
        kw["betas"] = tuple(b)
    else:
        kw[name] = v
    return kw


@pytest.mark.parametrize("cls,kw,name", HYPER, ids=[f"{c.__name__}-{n}" for c, _, n in HYPER])
def test_tensor_hyperparameters_forward_exact_and_differentiable(cls, kw, name, measured):
    base = kw["betas"][int(name[-1]) - 1] if name.startswith("beta") else kw[name]

    def torch_j(v):
        ps = make_params()
        torch_steps(cls(ps, **_with(kw, name, v)), ps, 3)
        return sum((w * p).sum() for w, p in zip(W, ps)).item()

    real = make_params()
    fopt = FunctionalOptimizer.from_torch(cls(real, **kw), real)
    t = torch.tensor(base, dtype=DT, requires_grad=True)
    fopt.param_groups[0].update(_with(kw, name, t))
    ps = functional_steps(fopt, [p.detach().clone().requires_grad_() for p in real], 3, create_graph=True)[-1]
    j = sum((w * p).sum() for w, p in zip(W, ps))
    measured("tensor-valued hyperparameter: forward vs torch.optim", abs(j.item() - torch_j(base)) / abs(j.item()), TOL)
    (d,) = torch.autograd.grad(j, t)
    h = 1e-6
    fd = (torch_j(base + h) - torch_j(base - h)) / (2 * h)
    measured("tensor-valued hyperparameter: derivative vs central FD", abs(d.item() - fd) / abs(fd), 1e-6)
