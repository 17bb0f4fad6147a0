"""Parameters a loss does not use get no gradient (``None``), as in ``torch.optim``.

``torch.optim`` skips a parameter whose ``.grad`` is ``None``: no weight decay (coupled
or AdamW's decoupled), no momentum step, no state. The engine keeps that through
the whole update (issue 21): the own gradient, the guard and the records, the
hypergradient (a variable no path reaches gets none), unrolled windows (the twins
skip a ``None`` gradient), the in-place SGD fast path and data-parallel averaging.

* higher's partially-used model (``_PartiallyUsed``: ``b`` never used) with a third
  parameter ``c`` used by every other batch, 30 steps with SGD(momentum 0.9, wd 0.1),
  Adam(wd 0.1) and AdamW (default wd), trained by the engine — as a top-level problem,
  as a lower stepping in place under ``cg`` and ``finite_difference``, and inside
  unrolled windows — against plain ``torch.optim`` on the same batches (the lower's
  upper values replayed): parameters and optimizer states **bitwise** equal; ``b`` keeps
  its initial values and has no state. (Before: ``b`` ended 1.12 (SGD), 1.01 (Adam) and
  2.9e-2 (AdamW) away from ``torch.optim``.)
* the upper's variables: ``idle`` (read by nobody) and ``dead`` (read by the lower's
  loss only in a term without the lower's variables, so no best response depends on
  it) get no gradient at all and stay untouched by Adam(wd 0.1) — under ``cg`` and
  ``unrolled``; ``engine.gradient`` reports zeros for them (a report).
* the methods (``engines``): with ``Lower.unused_as_none`` an input the result does
  not reach is ``None`` (cg, neumann, finite_difference, unrolled, first-order unrolled),
  zeros without it; the in-place SGD fast path with a ``None`` gradient in a second
  param group is still taken and bitwise ``step()``; SAMA with an unused Adam parameter.
* 2 gloo ranks: ``b`` used on rank 1 only is averaged with rank 0's zeros (DDP), ``c``
  used on no rank keeps no gradient; in place and in windows, equal to one process on
  the global batch.
* per-group learnable hyperparameters (higher's ``testDiffOptGroupedParamLearn``):
  betas (0.9, 0.999) for group 0 and (0.8, 0.888) for group 1 of Adam, and a learnable
  scale of the groups' base learning rates (0.2, 0.1): the forward equals
  ``torch.optim`` with the same per-group values (bitwise in place; in windows to the
  rounding of tensor hyperparameters), the meta-gradients equal central differences of
  ``torch.optim`` runs in float64; a wrong number of groups is a named error.
"""
from __future__ import annotations

import datetime
import time
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import mlo
from _helpers import rel
from mlo import distributed as mdist

STEPS = 30
OPTS = {"sgd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=0.1)),
        "adam": (torch.optim.Adam, dict(lr=0.1, weight_decay=0.1)),
        "adamw": (torch.optim.AdamW, dict(lr=0.1))}
SETTINGS = {"top": None, "cg": {"max_iter": 5}, "finite_difference": {}, "unrolled": {}}


class PartiallyUsed(nn.Module):
    """higher's ``_PartiallyUsed`` (``x @ a``; ``b`` never used) and ``c``, added to the
    output of the batches that ask for it (every other one)."""

    def __init__(self, seed=0, dtype=torch.float32):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a = nn.Parameter(torch.rand(4, 3, generator=g, dtype=dtype))
        self.b = nn.Parameter(torch.rand(4, 3, generator=g, dtype=dtype))
        self.c = nn.Parameter(torch.rand(3, generator=g, dtype=dtype))

    def forward(self, x, use_c=False):
        y = x @ self.a
        return y + self.c if use_c else y


def batches(n=STEPS, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(10, 4, generator=g), i % 2 == 1) for i in range(n)]


def lower_loss(module_out, lam):
    loss = module_out.pow(2).sum()
    return loss if lam is None else loss + (module_out * lam).sum()


class Lower(mlo.Problem):
    def __init__(self, cls, kw, data, method=None, options=None, K=5):
        config = None if method is None else mlo.ProblemConfig(method=method, method_options=options,
                                                                unroll_steps=K)
        super().__init__("lower", module=PartiallyUsed(), optimizer=cls, optimizer_kwargs=kw,
                         data=data, config=config)
        self.up, self.seen = None, []

    def training_step(self, batch):
        x, use_c = batch
        out = self(x, use_c)
        if self.up is None:
            return lower_loss(out, None)
        # ``dead``: read, but in a term without the lower's variables (no best response
        # depends on it); ``idle`` is read by nobody.
        return lower_loss(out, self.up.params["lam"]) + self.up.params["dead"].pow(2).sum()

    def after_step(self):        # the upper values this step used (for the replay)
        self.seen.append(None if self.up is None else self.up.params["lam"].detach().clone())


class Upper(mlo.Problem):
    def __init__(self, lower, data):
        super().__init__("upper", params={"lam": torch.full((3,), 0.1), "idle": torch.ones(3),
                                          "dead": torch.ones(2)},
                         optimizer=torch.optim.Adam, optimizer_kwargs={"lr": 0.05, "weight_decay": 0.1},
                         data=data)
        self.lower = lower

    def training_step(self, batch):
        return self.lower(batch).pow(2).mean()


def build(setting, opt):
    cls, kw = OPTS[opt]
    if setting == "top":
        lo = Lower(cls, kw, batches())
        return mlo.Engine([lo]), lo, None
    lo = Lower(cls, kw, batches(), setting, SETTINGS[setting])
    xv = torch.rand(8, 4, generator=torch.Generator().manual_seed(5))
    up = Upper(lo, [xv])
    lo.up = up
    return mlo.Engine([lo, up], {"u2l": {up: [lo]}, "l2u": {lo: [up]}}), lo, up


def torch_reference(cls, kw, seen):
    """The lower trained by plain ``torch.optim`` on the same batches and upper values."""
    m = PartiallyUsed()
    opt = cls(m.parameters(), **kw)
    for (x, use_c), lam in zip(batches(), seen):
        opt.zero_grad()             # (set_to_none: unused parameters have no .grad)
        lower_loss(m(x, use_c), lam).backward()
        opt.step()
    return m, opt


def states(opt, module):
    return {n: dict(opt.state[p]) for n, p in module.named_parameters() if p in opt.state}


@pytest.mark.parametrize("opt", sorted(OPTS))
@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_partially_used_model_bitwise_vs_torch_optim(setting, opt, measured):
    eng, lo, up = build(setting, opt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)     # (graph lint: `dead` on purpose)
        eng.run(STEPS)
    eng.close_windows()
    assert lo.step_count == STEPS and len(lo.seen) == STEPS
    ref, ref_opt = torch_reference(*OPTS[opt], lo.seen)
    init = PartiallyUsed()
    err = max(float((p - q).detach().abs().max()) for p, q in zip(lo.module.parameters(), ref.parameters()))
    measured(f"partially used model, engine ({setting}) vs torch.optim, 30 steps: parameters", err, 0.0)
    assert torch.equal(lo.module.b, init.b)                    # never used: never touched
    assert not torch.equal(lo.module.c, init.c) and not torch.equal(lo.module.a, init.a)
    got, want = states(lo.optimizer, lo.module), states(ref_opt, ref)
    assert sorted(got) == sorted(want) == ["a", "c"]            # no state for b
    serr = max(float((got[n][k] - want[n][k]).abs().max()) for n in want for k in want[n])
    assert all(sorted(got[n]) == sorted(want[n]) for n in want)
    measured(f"partially used model, engine ({setting}) vs torch.optim: optimizer state", serr, 0.0)
    if up is not None:
        assert up.step_count == STEPS // 5
        assert not torch.equal(up.module.lam, torch.full((3,), 0.1))
        assert torch.equal(up.module.idle, torch.ones(3))      # no own gradient, no path
        assert up.module.idle not in up.optimizer.state
        if setting in ("cg", "unrolled"):
            # ``dead``: the lower loss reads it, no best response depends on it. (Finite
            # differences reach it through f(θ+εv) − f(θ−εv): a zero hypergradient.)
            assert torch.equal(up.module.dead, torch.ones(2))
            assert up.module.dead not in up.optimizer.state
        rec = eng.records["upper"]
        assert rec["own_grad_norm"] == 0.0 and rec["hypergrad_norm"] > 0


def test_update_records_and_gradient_report_zeros():
    """``engine.gradient`` reports zeros for variables without a gradient; the
    update's records (norms) count them as zeros; grad_clip skips them."""
    eng, lo, up = build("cg", "adam")
    eng.run(5)
    rep = eng.gradient("upper")
    assert torch.equal(rep["grad"]["idle"], torch.zeros(3)) and torch.equal(rep["own"]["idle"], torch.zeros(3))
    assert float(rep["grad"]["lam"].abs().max()) > 0
    assert torch.equal(eng.last_hypergradient["upper"]["idle"], torch.zeros(3))
    rep = eng.gradient("lower")
    assert torch.equal(rep["grad"]["b"], torch.zeros(4, 3))

    cls, kw = OPTS["sgd"]
    lo = Lower(cls, kw, batches())
    lo.config.grad_clip = 0.5
    eng = mlo.Engine([lo])
    eng.run(4)
    assert torch.equal(lo.module.b, PartiallyUsed().b) and lo.module.b not in lo.optimizer.state
    assert eng.records["lower"]["grad_norm"] > 0


def test_sama_with_an_unused_adam_parameter():
    """SAMA reads the lower's last Adam step per tensor: one without a gradient there
    (skipped by torch.optim) has ``D = 0`` instead of stopping the run."""
    cls, kw = OPTS["adam"]
    lo = Lower(cls, kw, batches(), "sama", {})
    up = Upper(lo, [torch.rand(8, 4, generator=torch.Generator().manual_seed(5))])
    lo.up = up
    eng = mlo.Engine([lo, up], {"u2l": {up: [lo]}, "l2u": {lo: [up]}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        eng.run(10)
    assert up.step_count == 2 and torch.equal(lo.module.b, PartiallyUsed().b)
    assert all(torch.isfinite(p).all() for p in up.module.parameters())


@pytest.mark.parametrize("method", ["cg", "neumann", "finite_difference", "unrolled"])
def test_methods_report_unreached_inputs_as_none_when_asked(method):
    """``Lower.unused_as_none``: ``None`` for an input the result does not reach (the
    default stays zeros, one tensor per input)."""
    import engines.base as eb

    th = torch.tensor([0.5, -1.0], dtype=DT, requires_grad=True)
    x_used, x_idle = torch.tensor(0.3, dtype=DT, requires_grad=True), torch.tensor(2.0, dtype=DT, requires_grad=True)

    def f(ps, xs):
        return 0.5 * (ps[0] ** 2).sum() + xs[0] * ps[0].sum()

    outputs = None
    if method == "unrolled":       # two SGD steps on f, differentiable in x_used
        t = th
        for _ in range(2):
            g, = torch.autograd.grad(f((t,), (x_used, x_idle)), t, create_graph=True)
            t = t - 0.1 * g
        outputs = (t,)
    v = (torch.ones(2, dtype=DT),)
    for flag in (False, True):
        lower = eb.Lower(params=(th,), inputs=(x_used, x_idle), loss_fn=f, outputs=outputs, unused_as_none=flag)
        out = eb.get(method)(lower, v)
        assert len(out) == 2 and float(out[0].abs()) > 0
        assert (out[1] is None) if flag else torch.equal(out[1], torch.zeros((), dtype=DT))
    if method == "unrolled":
        lower = eb.Lower(params=(th,), inputs=(x_used, x_idle), loss_fn=f, outputs=outputs, unused_as_none=True)
        assert eb.get(method)(lower, v, first_order=True) == (None, None)


def test_in_place_sgd_fast_path_skips_none_in_groups():
    """``sgd_step`` with several param groups and a ``None`` gradient: bitwise
    ``step()``, and it is taken (not declined)."""
    from mlo.fastpath import sgd_step

    ms = [PartiallyUsed(), PartiallyUsed()]
    opts = [torch.optim.SGD([{"params": [m.a, m.b], "lr": 0.3}, {"params": [m.c]}], lr=0.1, momentum=0.9,
                            weight_decay=0.1) for m in ms]
    for i in range(3):
        grads = [torch.full((4, 3), 0.5 + i), None, None if i % 2 == 0 else torch.ones(3)]
        assert sgd_step(opts[0], [ms[0].a, ms[0].b, ms[0].c], grads)
        for p, g in zip([ms[1].a, ms[1].b, ms[1].c], grads):
            p.grad = g
        opts[1].step()
    for p, q in zip(ms[0].parameters(), ms[1].parameters()):
        assert torch.equal(p, q)
    assert ms[0].b not in opts[0].state and ms[1].b not in opts[1].state
    assert torch.equal(opts[0].state[ms[0].c]["momentum_buffer"], opts[1].state[ms[1].c]["momentum_buffer"])


# ---------------------------------------------------------------- data parallel
WORLD, TIMEOUT = 2, 600
DIST = {"top": ("sgd", None), "cg": ("adam", {"max_iter": 5}), "unrolled": ("adamw", {})}
DT = torch.float64


class DistLower(mlo.Problem):
    """``b`` is used by rank 1's rows only, ``c`` by no rank. One process computes the
    global-batch loss: the mean of the two ranks' local losses (rows ``r::2``)."""

    def __init__(self, cls, kw, data, method, options):
        config = None if method is None else mlo.ProblemConfig(method=method, method_options=options,
                                                                unroll_steps=3)
        super().__init__("lower", module=PartiallyUsed(dtype=DT), optimizer=cls, optimizer_kwargs=kw,
                         data=data, config=config)
        self.up = None

    def local(self, x, use_b):
        p = self.params
        y = x @ p["a"] + (x @ p["b"] if use_b else 0.0)
        loss = y.pow(2).mean()
        return loss if self.up is None else loss + (y * self.up.params["lam"]).mean()

    def training_step(self, batch):
        if mdist.is_distributed():
            return self.local(batch, mdist.rank() == 1)
        return 0.5 * (self.local(batch[0::2], False) + self.local(batch[1::2], True))


class DistUpper(mlo.Problem):
    def __init__(self, lower, data):
        super().__init__("upper", params={"lam": torch.full((3,), 0.1, dtype=DT), "idle": torch.ones(3, dtype=DT)},
                         optimizer=torch.optim.Adam, optimizer_kwargs={"lr": 0.05, "weight_decay": 0.1}, data=data)
        self.lower = lower

    def training_step(self, batch):
        return self.lower(batch).pow(2).mean()


def dist_run(setting, shard):
    opt, options = DIST[setting]
    cls, kw = OPTS[opt]
    g = torch.Generator().manual_seed(3)
    train = [torch.rand(8, 4, generator=g, dtype=DT) for _ in range(4)]
    val = [torch.rand(8, 4, generator=g, dtype=DT)]
    wrap = mdist.shard_batches if shard else (lambda d: d)
    lo = DistLower(cls, kw, wrap(train), None if setting == "top" else setting, options)
    if setting == "top":
        eng = mlo.Engine([lo])
        up = None
    else:
        up = DistUpper(lo, wrap(val))
        lo.up = up
        eng = mlo.Engine([lo, up], {"u2l": {up: [lo]}, "l2u": {lo: [up]}})
    eng.run(9)
    eng.close_windows()
    out = {f"lower.{k}": v.detach().clone() for k, v in lo.module.named_parameters()}
    out["lower.state"] = sorted(n for n, p in lo.module.named_parameters() if p in lo.optimizer.state)
    if up is not None:
        out.update({f"upper.{k}": v.detach().clone() for k, v in up.module.named_parameters()})
        out["upper.state"] = sorted(n for n, p in up.module.named_parameters() if p in up.optimizer.state)
    return out


def _dist_worker(rank, init_file, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=TIMEOUT))
    result = {s: dist_run(s, shard=True) for s in DIST}
    torch.save(result, f"{out}.rank{rank}")
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_two_ranks_ddp_semantics_for_unused_parameters(tmp_path, measured):
    ctx = mp.start_processes(_dist_worker, args=(str(tmp_path / "init"), str(tmp_path / "out")),
                             nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"spawned ranks did not finish within {TIMEOUT}s (hang?)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    ranks = [torch.load(tmp_path / f"out.rank{r}", weights_only=True) for r in range(WORLD)]
    init = PartiallyUsed(dtype=DT)
    for setting in DIST:
        want = dist_run(setting, shard=False)
        for got in (r[setting] for r in ranks):
            assert got["lower.state"] == want["lower.state"] == ["a", "b"]   # c: no gradient anywhere
            assert torch.equal(got["lower.c"], init.c) and not torch.equal(got["lower.b"], init.b)
            if setting != "top":
                assert got["upper.state"] == want["upper.state"] == ["lam"]
                assert torch.equal(got["upper.idle"], torch.ones(3, dtype=DT))
            tensors = [k for k in want if not k.endswith(".state")]
            for k in tensors:
                assert torch.equal(got[k], ranks[0][setting][k])          # every rank the same
            err = max(rel(got[k], want[k]) for k in tensors)
            measured(f"unused parameters, 2 ranks vs 1 process ({setting})", err, 1e-9)


# --------------------------------------------------- per-group learnable hyperparameters
BETAS = [[0.9, 0.999], [0.8, 0.888]]
BASE_LR = (0.2, 0.1)
K = 3


def higher_model():
    """higher's ``self._model`` (float64)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 4, bias=False), nn.Sigmoid(),
                         nn.Linear(4, 2)).double()


def hp_batches(n):
    g = torch.Generator().manual_seed(11)
    return [torch.rand(10, 4, generator=g, dtype=DT) for _ in range(n)]


XV = torch.rand(6, 4, generator=torch.Generator().manual_seed(12), dtype=DT)
LEFT = ["0.weight", "0.bias"]            # higher's split: the first half of the parameters


class GroupLower(mlo.Problem):
    """Adam with higher's two groups (lr 0.2 for the first half, the default 0.1 for the
    rest); betas per group and a scale of the base lrs from the upper's variables."""

    def __init__(self, method, n, form="per-group"):
        super().__init__("lower", module=higher_model(), optimizer=torch.optim.Adam,
                         optimizer_kwargs={"lr": BASE_LR[1]},
                         param_groups=[{"params": LEFT, "lr": BASE_LR[0]}], data=hp_batches(n),
                         config=mlo.ProblemConfig(method=method, unroll_steps=K,
                                                  method_options={"max_iter": 5} if method == "cg" else {}))
        self.up, self.form, self.seen = None, form, []

    def optimizer_hyperparameters(self):
        b, s = self.up.params["betas"], self.up.params["lr_scale"]
        if self.form == "per-group":
            return {"betas": [(b[0, 0], b[0, 1]), (b[1, 0], b[1, 1])], "lr": [s * base for base in BASE_LR]}
        if self.form == "too-few":
            return {"betas": [(b[0, 0], b[0, 1])]}
        if self.form == "flat-betas":
            return {"betas": [b[0, 0], b[0, 1]]}
        if self.form == "one-for-all":
            return {"betas": (b[1, 0], b[1, 1])}
        return [{"lr": s}]            # (not a dict)

    def training_step(self, batch):
        return self(batch).pow(2).sum()

    def after_step(self):
        groups = (self._run.window.fopt.param_groups if self._run.window is not None
                  else self.optimizer.param_groups)
        num = lambda v: float(v.detach()) if isinstance(v, torch.Tensor) else float(v)  # noqa: E731
        self.seen.append([(num(g["lr"]), tuple(num(b) for b in g["betas"])) for g in groups])


class RecSGD(torch.optim.SGD):
    """SGD recording the gradient it applies (``None`` where a variable has none)."""

    def __init__(self, params, **kw):
        super().__init__(params, **kw)
        self.record = []

    def step(self, closure=None):
        self.record.append([None if p.grad is None else p.grad.detach().clone()
                            for g in self.param_groups for p in g["params"]])
        return super().step(closure)


class GroupUpper(mlo.Problem):
    def __init__(self, lower, lr=0.0):
        super().__init__("upper", params={"betas": torch.tensor(BETAS, dtype=DT),
                                          "lr_scale": torch.tensor(1.0, dtype=DT)},
                         optimizer=RecSGD, optimizer_kwargs={"lr": lr}, data=[XV])
        self.lower = lower

    def training_step(self, batch):
        return self.lower(batch).pow(2).mean()


def group_engine(method, n, form="per-group", lr=0.0):
    lo = GroupLower(method, n, form)
    up = GroupUpper(lo, lr)
    lo.up = up
    return mlo.Engine([lo, up], {"u2l": {up: [lo]}, "l2u": {lo: [up]}}), lo, up


def torch_groups(seen_or_values, n):
    """Plain torch.optim.Adam over higher's groups, step i with ``values[i]`` =
    ``[(lr, betas) per group]``; returns the model."""
    m = higher_model()
    named = dict(m.named_parameters())
    opt = torch.optim.Adam([{"params": [named[k] for k in LEFT], "lr": BASE_LR[0]},
                            {"params": [p for k, p in named.items() if k not in LEFT]}], lr=BASE_LR[1])
    for x, values in zip(hp_batches(n), seen_or_values):
        for g, (lr, betas) in zip(opt.param_groups, values):
            g["lr"], g["betas"] = lr, betas
        opt.zero_grad()
        m(x).pow(2).sum().backward()
        opt.step()
    return m


@pytest.mark.parametrize("method", ["cg", "unrolled"])
def test_per_group_hyperparameters_forward_vs_torch_optim(method, measured):
    """Each step's per-group values are replayed in torch. Unrolled: the upper learns
    them (lr 0.01). CG: they get no hypergradient (the implicit function theorem's
    fixed point does not depend on the optimizer) — none at all, so they stay."""
    n = 4 * K
    eng, lo, up = group_engine(method, n, lr=0.01)
    eng.run(n)
    eng.close_windows()
    first = lo.seen[0]
    assert first == [(BASE_LR[0], (0.9, 0.999)), (BASE_LR[1], (0.8, 0.888))]
    if method == "unrolled":
        assert lo.seen[-1] != first                   # the upper learned them
    else:
        assert up.optimizer.record[-1] == [None, None] and lo.seen[-1] == first
    ref = torch_groups(lo.seen, n)
    err = max(float((p - q).detach().abs().max()) for p, q in zip(lo.module.parameters(), ref.parameters()))
    # In place the values are floats and torch.optim steps: bitwise. In windows they are
    # 0-dim tensors in the twin's arithmetic (float / tensor is a reciprocal times the
    # float, tensor ** 0.5 a sqrt, a tensor β2 enters through lerp): 1-ulp differences.
    measured(f"per-group betas and lr scale, engine ({method}) vs torch.optim (12 steps)",
             err, 0.0 if method == "cg" else 1e-14)


def test_per_group_meta_gradients_vs_central_differences(measured):
    """higher's learnable betas per group and a learnable lr scale, K=3 unrolled Adam
    steps; the upper's hypergradient against central differences of torch.optim (float64)."""
    eng, lo, up = group_engine("unrolled", K)
    eng.run(K)
    got = torch.cat([x.flatten() for x in up.optimizer.record[0]])
    x0 = torch.cat([torch.tensor(BETAS, dtype=DT).flatten(), torch.tensor([1.0], dtype=DT)])

    def J(x):
        b, s = x[:4].tolist(), float(x[4])
        values = [(s * BASE_LR[0], (b[0], b[1])), (s * BASE_LR[1], (b[2], b[3]))]
        return float(torch_groups([values] * K, K)(XV).pow(2).mean().detach())

    h, fd = 1e-6, torch.zeros_like(x0)
    for i in range(x0.numel()):
        e = torch.zeros_like(x0)
        e[i] = h
        fd[i] = (J(x0 + e) - J(x0 - e)) / (2 * h)
    assert torch.isfinite(got).all() and float(got.abs().min()) > 0
    measured("per-group learnable betas + lr scale (unrolled Adam, K=3) vs central FD", rel(got, fd), 1e-6)


def test_one_value_applies_to_every_group():
    eng, lo, up = group_engine("cg", K, form="one-for-all")
    eng.run(1)
    assert [g["betas"] for g in lo.optimizer.param_groups] == [(0.8, 0.888), (0.8, 0.888)]
    assert [g["lr"] for g in lo.optimizer.param_groups] == list(BASE_LR)


@pytest.mark.parametrize("method", ["cg", "unrolled"])
@pytest.mark.parametrize("form,error,match", [
    ("too-few", ValueError, r"problem 'lower'.*\['betas'\] is a list of 1 value.*2 param group"),
    ("flat-betas", ValueError, r"problem 'lower'.*\['betas'\]\[0\] is .*takes 2 values"),
    ("not-a-dict", TypeError, r"problem 'lower'.*must return a dict")])
def test_per_group_values_validated(method, form, error, match):
    eng, lo, up = group_engine(method, K, form=form)
    with pytest.raises(error, match=match):
        eng.run(1)
