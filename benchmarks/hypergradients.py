#!/usr/bin/env python
"""Benchmark: hypergradient methods — time, pass-count floor, memory, and Betty side by side.

A benchmark, not a test: it prints (and with ``--out`` writes) Markdown tables.

Problems (synthetic data, upper = learned log weight decay ``λ`` of the lower)::

    lower  f(θ, λ) = CE(model_θ(x_tr), y_tr) + ½ Σ_i Σ exp(λ_i) ⊙ θ_i²
    upper  F(θ)    = CE(model_θ(x_val), y_val)

- ``linear``: multinomial logistic regression 100 → 10 (1 010 parameters), one
  ``λ`` per lower parameter element (1 010 hyperparameters).
- ``mlp``: 784 → 1024 → 256 → 10 ReLU MLP (1 068 810 parameters), one ``λ`` per
  parameter tensor.
- ``transformer``: 16 tokens × 32 features → Linear(64) → 2 pre-norm blocks
  (width 64, 4 heads, MLP ratio 2, math attention: double backward through SDPA is
  not implemented on CPU) → mean pool → Linear(10); one ``λ`` per parameter tensor.

Measurements (all interleaved in one process, repeated, median):

1. ``ours / plain``: time of one hypergradient divided by one plain lower training
   step (forward + backward + ``torch.optim.SGD.step``) on the same batch. For
   implicit / finite-difference methods the hypergradient is ``engine.gradient
   ("upper")`` at the current state; for unrolled-K it is a whole window (K
   differentiable lower steps + the upper update), which is the only way it exists.
2. ``ours / floor``: the floor is a hand-written pure-PyTorch implementation doing
   exactly the method's passes and nothing else (no framework), on the same state.
   The pass counts are also given in primitive units measured in the same run:
   ``U`` upper forward+backward, ``G`` lower forward + backward with
   ``create_graph=True``, ``H`` one Hessian-vector product on that graph,
   ``Fλ`` lower forward + backward to ``λ`` only.
3. Memory vs unroll steps: peak RSS (``resource.getrusage(...).ru_maxrss``, a
   high-water mark) of a fresh subprocess per configuration, minus the high-water
   after setup and one plain training step. CPU tensors are allocated with malloc
   (torch has no CPU caching allocator with statistics), so RSS is what we can see;
   ``tracemalloc`` does not see torch allocations.
4. ``--betty``: the same problems in Betty 0.1.1 (``pip install --no-deps
   betty-ml==0.1.1``): time per outer step, ours vs Betty, and the hypergradient on
   the same state in float64, ours vs Betty vs an independent reference.

Usage::

    python benchmarks/hypergradients.py [--quick] [--betty] [--repeats N] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import mlo  # noqa: E402
from rss import peak_mb, reset_peak  # noqa: E402  (benchmarks/rss.py)
from problems.transformer import Transformer  # noqa: E402

Tensors = Tuple[torch.Tensor, ...]


# =============================================================== problem specs
class TokenClassifier(nn.Module):
    """``x: [N, L, C] -> Linear(D) -> Transformer -> mean over L -> Linear(classes)``."""

    def __init__(self, in_dim=32, dim=64, depth=2, heads=4, classes=10):
        super().__init__()
        self.embed = nn.Linear(in_dim, dim)
        self.body = Transformer(dim, depth, heads, mlp_ratio=2.0, attn_impl="math")
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        return self.head(self.body(self.embed(x)).mean(dim=1))


@dataclass
class Spec:
    name: str
    make_module: Callable[[], nn.Module]
    train: Tuple[torch.Tensor, torch.Tensor]
    val: Tuple[torch.Tensor, torch.Tensor]
    per_element: bool          # one λ per parameter element (else one per tensor)
    lam0: float                # initial log weight decay
    lr: float                  # lower SGD learning rate
    upper_lr: float = 0.1

    def lam_init(self, module: nn.Module, dtype) -> List[torch.Tensor]:
        return [torch.full(p.shape if self.per_element else (), self.lam0, dtype=dtype)
                for p in module.parameters()]

    def n_params(self) -> int:
        return sum(p.numel() for p in self.make_module().parameters())


def _data(shape, classes, n, gen, dtype):
    x = torch.randn(n, *shape, generator=gen, dtype=dtype)
    teacher = torch.randn(int(math.prod(shape)), classes, generator=gen, dtype=dtype)
    y = (x.reshape(n, -1) @ teacher).argmax(-1)
    return x, y


def make_spec(size: str, dtype=torch.float32, batch: int = 128) -> Spec:
    gen = torch.Generator().manual_seed({"linear": 1, "mlp": 2, "transformer": 3}[size])
    if size == "linear":
        shape, mk, per_el, lam0, lr = (100,), (lambda: nn.Linear(100, 10)), True, math.log(1e-2), 0.5
    elif size == "mlp":
        shape = (784,)
        mk = (lambda: nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 256),
                                    nn.ReLU(), nn.Linear(256, 10)))
        per_el, lam0, lr = False, math.log(1e-4), 0.05
    elif size == "transformer":
        shape, mk, per_el, lam0, lr = (16, 32), TokenClassifier, False, math.log(1e-4), 0.05
    else:
        raise ValueError(size)
    tr = _data(shape, 10, batch, gen, dtype)
    va = _data(shape, 10, batch, gen, dtype)
    seed = 100 + len(size)

    def make_module():
        torch.manual_seed(seed)
        return mk().to(dtype)

    return Spec(size, make_module, tr, va, per_el, lam0, lr)


def lower_objective(logits, y, params: Sequence[torch.Tensor], lams: Sequence[torch.Tensor]):
    reg = sum((l.exp() * p * p).sum() for p, l in zip(params, lams))
    return F.cross_entropy(logits, y) + 0.5 * reg


# ============================================================= methods (table)
@dataclass(frozen=True)
class Method:
    label: str
    kind: str        # unrolled | neumann | cg | fd
    k: int = 1
    alpha: float = 1.0

    def mlo_config(self) -> mlo.ProblemConfig:
        if self.kind == "unrolled":
            return mlo.ProblemConfig(unroll_steps=self.k, method="unrolled")
        if self.kind == "neumann":
            return mlo.ProblemConfig(method="neumann",
                                     method_options={"iterations": self.k, "alpha": self.alpha})
        if self.kind == "cg":
            # tol=0: exactly k iterations, like Betty's cg_iterations.
            return mlo.ProblemConfig(method="cg", method_options={"max_iter": self.k, "tol": 0.0})
        return mlo.ProblemConfig(method="finite_difference", method_options={"epsilon": 0.01})

    @property
    def unroll(self) -> int:
        return self.k if self.kind == "unrolled" else 1

    def passes(self) -> str:
        return {"unrolled": f"{self.k}·G + U + {self.k}·R",
                "neumann": f"U + G + {self.k}·H + H",
                "cg": f"U + G + {self.k}·H + H",
                "fd": "U + 2·Fλ"}[self.kind]


METHODS = [Method("unrolled K=1", "unrolled", 1), Method("unrolled K=5", "unrolled", 5),
           Method("neumann K=1", "neumann", 1), Method("neumann K=5", "neumann", 5),
           Method("neumann K=5 α=0.5", "neumann", 5, 0.5),
           Method("cg K=1", "cg", 1), Method("cg K=5", "cg", 5),
           Method("finite_difference", "fd")]


# ==================================================================== mlo side
class MloLower(mlo.Problem):
    def __init__(self, spec: Spec, module: nn.Module, config: mlo.ProblemConfig):
        super().__init__("lower", module=module, optimizer=torch.optim.SGD,
                         optimizer_kwargs={"lr": spec.lr}, data=[spec.train], config=config)
        self.upper: Optional[mlo.Problem] = None

    def training_step(self, batch):
        x, y = batch
        own, lam = self.params, self.upper.params
        return lower_objective(self(x), y, [own[k] for k in self.param_names],
                               [lam[f"lam{i}"] for i in range(len(self.param_names))])


class MloUpper(mlo.Problem):
    def __init__(self, spec: Spec, lams: Sequence[torch.Tensor], lower: MloLower):
        super().__init__("upper", params={f"lam{i}": t.clone() for i, t in enumerate(lams)},
                         optimizer=torch.optim.SGD, optimizer_kwargs={"lr": spec.upper_lr},
                         data=[spec.val])
        self.lower = lower

    def training_step(self, batch):
        x, y = batch
        return F.cross_entropy(self.lower(x), y)


def build_mlo(spec: Spec, method: Method, module: nn.Module, lams, nonfinite: str = "raise") -> mlo.Engine:
    lo = MloLower(spec, module, method.mlo_config())
    up = MloUpper(spec, lams, lo)
    lo.upper = up
    return mlo.Engine([up, lo], {"u2l": {up: [lo]}, "l2u": {lo: [up]}},
                      config=mlo.EngineConfig(nonfinite=nonfinite))


def capture_upper_grads(optimizer: torch.optim.Optimizer, store: List):
    """Records the gradient an optimizer is about to apply (works for mlo and Betty)."""

    def hook(opt, args, kwargs):
        store.append([p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                      for g in opt.param_groups for p in g["params"]])

    return optimizer.register_step_pre_hook(hook)


# ============================================== hand-written floors / references
class Reference:
    """Pure-PyTorch hypergradients: exactly each method's passes, no framework.

    Also an independent reference for accuracy (its CG is the textbook algorithm).
    """

    def __init__(self, spec: Spec, module: nn.Module):
        self.spec, self.module = spec, module
        self.names = [n for n, _ in module.named_parameters()]

    def _call(self, th, x):
        return functional_call(self.module, dict(zip(self.names, th)), (x,))

    def f(self, th, lams):
        x, y = self.spec.train
        return lower_objective(self._call(th, x), y, th, lams)

    def upper(self, th):
        x, y = self.spec.val
        return F.cross_entropy(self._call(th, x), y)

    # primitives -------------------------------------------------------------
    def plain_step(self, module: nn.Module, opt: torch.optim.Optimizer, lams):
        x, y = self.spec.train
        opt.zero_grad(set_to_none=True)
        lower_objective(module(x), y, list(module.parameters()), lams).backward()
        opt.step()

    def prim_U(self, th):
        th = [t.detach().requires_grad_() for t in th]
        return torch.autograd.grad(self.upper(th), th)

    def prim_G(self, th, lams):
        th = [t.detach().requires_grad_() for t in th]
        return torch.autograd.grad(self.f(th, lams), th, create_graph=True)

    def prim_H_setup(self, th, lams):
        th = [t.detach().requires_grad_() for t in th]
        lams = [l.detach().requires_grad_() for l in lams]
        g = torch.autograd.grad(self.f(th, lams), th, create_graph=True)
        v = [torch.randn_like(t) for t in th]
        return th, g, v

    @staticmethod
    def prim_H(setup):
        th, g, v = setup
        return torch.autograd.grad(g, th, v, retain_graph=True)

    def prim_Flam(self, th, lams):
        lams = [l.detach().requires_grad_() for l in lams]
        return torch.autograd.grad(self.f([t.detach() for t in th], lams), lams)

    # methods ------------------------------------------------------------------
    def hypergrad(self, m: Method, th, lams) -> Tensors:
        lams = [l.detach().requires_grad_() for l in lams]
        if m.kind == "unrolled":
            cur = [t.detach().requires_grad_() for t in th]
            for _ in range(m.k):
                g = torch.autograd.grad(self.f(cur, lams), cur, create_graph=True)
                cur = [t - self.spec.lr * gi for t, gi in zip(cur, g)]
            return torch.autograd.grad(self.upper(cur), lams)
        v = self.prim_U(th)
        if m.kind == "fd":
            norm = torch.sqrt(sum((t * t).sum() for t in v))
            eps = 0.01 / norm
            gp = torch.autograd.grad(self.f([t.detach() + eps * vi for t, vi in zip(th, v)], lams), lams)
            gm = torch.autograd.grad(self.f([t.detach() - eps * vi for t, vi in zip(th, v)], lams), lams)
            return tuple(-(a - b) / (2 * eps) for a, b in zip(gp, gm))
        th = [t.detach().requires_grad_() for t in th]
        g = torch.autograd.grad(self.f(th, lams), th, create_graph=True)

        def hvp(u):
            return torch.autograd.grad(g, th, u, retain_graph=True)

        if m.kind == "neumann":
            term = [m.alpha * t for t in v]
            p = list(term)
            for _ in range(m.k):
                hu = hvp(term)
                term = [t - m.alpha * h for t, h in zip(term, hu)]
                p = [a + b for a, b in zip(p, term)]
        else:  # textbook CG, x0 = 0
            x = [torch.zeros_like(t) for t in v]
            r = list(v)
            d = list(v)
            rs = sum((t * t).sum() for t in r)
            for _ in range(m.k):
                hd = hvp(d)
                a = rs / sum((s * t).sum() for s, t in zip(d, hd))
                x = [xi + a * di for xi, di in zip(x, d)]
                r = [ri - a * hi for ri, hi in zip(r, hd)]
                rs_new = sum((t * t).sum() for t in r)
                d = [ri + (rs_new / rs) * di for ri, di in zip(r, d)]
                rs = rs_new
            p = x
        mixed = torch.autograd.grad(g, lams, p)
        return tuple(-t for t in mixed)


# ================================================================== Betty side
def import_betty():
    """Imports Betty 0.1.1 and silences its INFO logging.

    Betty 0.1.1 imports cleanly with torch 2.13 (``functorch.make_functional_with_buffers``
    still exists, deprecated); no runtime patch of Betty is needed. Its problems below
    are ordinary user subclasses using its public API.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import betty  # noqa: F401
        from betty.configs import Config, EngineConfig
        from betty.engine import Engine
        from betty.logging.logger_base import get_logger
        from betty.problems import ImplicitProblem, IterativeProblem
    get_logger().setLevel(logging.WARNING)
    return Config, EngineConfig, Engine, ImplicitProblem, IterativeProblem


class LamModule(nn.Module):
    def __init__(self, lams):
        super().__init__()
        self.lams = nn.ParameterList([nn.Parameter(t.clone()) for t in lams])


def build_betty(spec: Spec, method: Method, module: nn.Module, lams):
    Config, EngineConfig, Engine, ImplicitProblem, IterativeProblem = import_betty()

    class BUpper(ImplicitProblem):
        def training_step(self, batch):
            x, y = batch
            return F.cross_entropy(self.lower(x), y)

    class BLower(ImplicitProblem):
        def training_step(self, batch):
            x, y = batch
            return lower_objective(self.module(x), y, list(self.module.parameters()),
                                   list(self.upper.module.lams))

    class BLowerUnrolled(IterativeProblem):
        def forward(self, x):
            return self.fmodule(self.params, self.buffers, x)

        def training_step(self, batch):
            x, y = batch
            return lower_objective(self.forward(x), y, list(self.params),
                                   list(self.upper.module.lams))

        def on_inner_loop_start(self):
            # Truncated backprop: start each window from detached iterates (Betty 0.1.1's
            # IterativeProblem otherwise keeps the graph of all past windows).
            self.params = tuple(p.detach().requires_grad_() for p in self.params)
            for st in self.optimizer.state:
                if st:
                    for k, v in list(st.items()):
                        if isinstance(v, torch.Tensor):
                            st[k] = v.detach()

    if method.kind == "unrolled":
        up_cfg = Config(first_order=False, retain_graph=True)
        lo_cfg = Config(type="darts", unroll_steps=method.k, retain_graph=True)
        lo_cls = BLowerUnrolled
    else:
        up_cfg = Config(first_order=True, retain_graph=True)
        kw = {"neumann": dict(type="neumann", neumann_iterations=method.k, neumann_alpha=method.alpha),
              "cg": dict(type="cg", cg_iterations=method.k, cg_alpha=method.alpha),
              "fd": dict(type="darts", darts_alpha=0.01)}[method.kind]
        lo_cfg = Config(unroll_steps=1, **kw)
        lo_cls = BLower
    lmod = LamModule(lams)
    up = BUpper(name="upper", config=up_cfg, module=lmod,
                optimizer=torch.optim.SGD(lmod.parameters(), lr=spec.upper_lr),
                train_data_loader=[spec.val], device="cpu")
    lo = lo_cls(name="lower", config=lo_cfg, module=module,
                optimizer=torch.optim.SGD(module.parameters(), lr=spec.lr),
                train_data_loader=[spec.train], device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eng = Engine(problems=[up, lo], config=EngineConfig(train_iters=10 ** 9, logger_type="none"),
                     dependencies={"u2l": {up: [lo]}, "l2u": {lo: [up]}})
    return eng, up, lo


def betty_outer_step(eng, k: int):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(k):
            eng.global_step += 1
            eng.train_step()


def mlo_outer_step(eng: mlo.Engine, k: int):
    for _ in range(k):
        eng.step()


# ===================================================================== timing
def now():
    return time.perf_counter()


def timed(fn) -> float:
    t = now()
    fn()
    return now() - t


def interleaved(fns: Dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> Dict[str, float]:
    """Median seconds per call; each repeat runs every fn once (noise hits all alike), in
    an order rotated from repeat to repeat (each fn follows each other one equally often:
    what ran just before — its cache footprint — is not always the same fn's)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: Dict[str, List[float]] = {k: [] for k in fns}
    items = list(fns.items())
    for r in range(repeats):
        i = r % len(items)
        for k, fn in items[i:] + items[:i]:
            samples[k].append(timed(fn))
    return {k: statistics.median(v) for k, v in samples.items()}


def rel(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    num = math.sqrt(sum(float(((x - y) ** 2).sum()) for x, y in zip(a, b)))
    den = math.sqrt(sum(float((y ** 2).sum()) for y in b))
    return num / den if den else num


# ============================================================ 1. time vs floor
def bench_time(size: str, methods: Sequence[Method], repeats: int) -> List[dict]:
    spec = make_spec(size)
    ref = Reference(spec, spec.make_module())
    th = [p.detach() for p in ref.module.parameters()]
    lams = spec.lam_init(ref.module, torch.float32)
    plain_mod = spec.make_module()
    plain_opt = torch.optim.SGD(plain_mod.parameters(), lr=spec.lr)
    hsetup = ref.prim_H_setup(th, lams)
    engines = {m: build_mlo(spec, m, spec.make_module(), lams) for m in methods}
    fns: Dict[str, Callable] = {
        "plain": lambda: ref.plain_step(plain_mod, plain_opt, lams),
        "U": lambda: ref.prim_U(th), "G": lambda: ref.prim_G(th, lams),
        "H": lambda: ref.prim_H(hsetup), "Flam": lambda: ref.prim_Flam(th, lams),
    }
    for m in methods:
        fns["floor:" + m.label] = (lambda m=m: ref.hypergrad(m, th, lams))
        eng = engines[m]
        if m.kind == "unrolled":
            fns["ours:" + m.label] = (lambda eng=eng, k=m.k: mlo_outer_step(eng, k))
        else:
            eng.step()  # the lower has a last batch / iterate
            fns["ours:" + m.label] = (lambda eng=eng: eng.gradient("upper"))
    t = interleaved(fns, repeats)
    P, U, G, H, Fl = t["plain"], t["U"], t["G"], t["H"], t["Flam"]
    # R (backward through one differentiable step) is not a separate primitive: estimate it
    # as the unrolled floor's remainder.
    rows = []
    for m in methods:
        ours, floor = t["ours:" + m.label], t["floor:" + m.label]
        comp = {"unrolled": None, "neumann": U + G + (m.k + 1) * H, "cg": U + G + (m.k + 1) * H,
                "fd": U + 2 * Fl}[m.kind]
        rows.append(dict(size=size, method=m.label, passes=m.passes(), ours_ms=ours * 1e3,
                         floor_ms=floor * 1e3, composed_ms=None if comp is None else comp * 1e3,
                         ours_over_plain=ours / P, floor_over_plain=floor / P,
                         ours_over_floor=ours / floor))
    prims = dict(size=size, params=spec.n_params(), P=P * 1e3, U=U * 1e3, G=G * 1e3, H=H * 1e3,
                 Flam=Fl * 1e3)
    return rows, prims


# ========================================================== 2. memory vs steps
def memory_child(size: str, kind: str, k: int) -> dict:
    """Peak RSS of two outer steps above the resident set after setup + plain steps.

    The high-water mark is reset (``/proc/self/clear_refs`` ← 5, Linux ≥ 4.0) right
    before the measured steps and read from ``VmHWM``; ``ru_maxrss`` cannot be reset
    and stays at the import/setup peak, so it is the fallback only.
    """
    torch.set_num_threads(1)
    spec = make_spec(size)
    m = {"unrolled": Method("u", "unrolled", k), "neumann": Method("n", "neumann", k),
         "cg": Method("c", "cg", k), "fd": Method("f", "fd"), "plain": None}[kind]
    module = spec.make_module()
    lams = spec.lam_init(module, torch.float32)
    eng = build_mlo(spec, m or Method("u", "unrolled", 1), module, lams)
    lo = eng.problems["lower"]
    x, y = spec.train

    def plain():
        lo.optimizer.zero_grad(set_to_none=True)
        lower_objective(module(x), y, list(module.parameters()),
                        list(eng.problems["upper"].variables)).backward()
        lo.optimizer.step()

    for _ in range(2):  # weights, grads, activations, optimizer state exist
        plain()
    lo.optimizer.zero_grad(set_to_none=True)
    base, how = reset_peak()
    for _ in range(2):
        if m is None:
            plain()
        else:
            mlo_outer_step(eng, m.unroll)
    peak = peak_mb(how)
    return {"base_mb": base, "extra_mb": peak - base, "how": how}


def bench_memory(size: str, configs: Sequence[Tuple[str, int]]) -> List[dict]:
    rows = []
    for kind, k in configs:
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--_memory", size, kind, str(k)],
                             capture_output=True, text=True, cwd=ROOT)
        if out.returncode:
            raise RuntimeError(out.stderr)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(dict(size=size, method=kind, k=k, **r))
    return rows


# ========================================================= 3. Betty comparison
def floor_outer_step(spec: Spec, m: Method) -> Callable[[], None]:
    """A hand-written outer step: the method's passes and nothing else.

    Unrolled: K differentiable SGD steps + the upper backward (``Reference.hypergrad``),
    then the iterate and λ are updated. Implicit / FD: one plain lower step, then the
    hypergradient at the new iterate, then the λ update.
    """
    ref = Reference(spec, spec.make_module())
    mod = ref.module
    opt = torch.optim.SGD(mod.parameters(), lr=spec.lr)
    lams = [l.clone().requires_grad_() for l in spec.lam_init(mod, torch.float32)]
    # λ steps with torch.optim.SGD, as in both frameworks (a bare in-place update would
    # make the floor cheaper than any loop that uses an optimizer: ~10 µs here)
    lam_opt = torch.optim.SGD(lams, lr=spec.upper_lr)

    def step():
        if m.kind == "unrolled":
            lam_req = [l.detach().requires_grad_() for l in lams]
            cur = [p.detach().requires_grad_() for p in mod.parameters()]
            for _ in range(m.k):
                g = torch.autograd.grad(ref.f(cur, lam_req), cur, create_graph=True)
                cur = [t - spec.lr * gi for t, gi in zip(cur, g)]
            hg = torch.autograd.grad(ref.upper(cur), lam_req)
            with torch.no_grad():
                for p, c in zip(mod.parameters(), cur):
                    p.copy_(c)
        else:
            fixed = [l.detach() for l in lams]
            ref.plain_step(mod, opt, fixed)
            hg = ref.hypergrad(m, [p.detach() for p in mod.parameters()], fixed)
        for l, g in zip(lams, hg):
            l.grad = g
        lam_opt.step()

    return step


def bench_betty_time(size: str, methods: Sequence[Method], repeats: int) -> List[dict]:
    """Time per outer step of ours, Betty and the hand-written floor, interleaved."""
    spec = make_spec(size)
    rows = []
    for m in methods:
        mod0 = spec.make_module()
        lams = spec.lam_init(mod0, torch.float32)
        ours = build_mlo(spec, m, spec.make_module(), lams)
        lean = build_mlo(spec, m, spec.make_module(), lams, nonfinite="ignore")
        beng, _, _ = build_betty(spec, m, spec.make_module(), lams)
        t = interleaved({"ours": lambda: mlo_outer_step(ours, m.unroll),
                         "lean": lambda: mlo_outer_step(lean, m.unroll),
                         "betty": lambda: betty_outer_step(beng, m.unroll),
                         "floor": floor_outer_step(spec, m)}, repeats, warmup=2)
        rows.append(dict(size=size, method=m.label, ours_ms=t["ours"] * 1e3,
                         betty_ms=t["betty"] * 1e3, floor_ms=t["floor"] * 1e3,
                         lean_ms=t["lean"] * 1e3, speedup=t["betty"] / t["ours"],
                         ours_over_floor=t["ours"] / t["floor"], lean_over_floor=t["lean"] / t["floor"]))
    return rows


def bench_betty_accuracy(size: str, methods: Sequence[Method]) -> List[dict]:
    """One outer step from identical float64 states; the upper gradient each framework applies."""
    spec = make_spec(size, torch.float64)
    rows = []
    for m in methods:
        lams = spec.lam_init(spec.make_module(), torch.float64)
        # ours
        ours = build_mlo(spec, m, spec.make_module(), lams)
        got: List = []
        snap: List = []
        lo = ours.problems["lower"]
        h = capture_upper_grads(ours.problems["upper"].optimizer, got)
        h2 = ours.problems["upper"].optimizer.register_step_pre_hook(
            lambda *a: snap.append([t.detach().clone() for t in lo.own_state().values()]))
        theta0 = [p.detach().clone() for p in lo.variables]
        mlo_outer_step(ours, m.unroll)
        h.remove(), h2.remove()
        # reference at the same state: window start for unrolled, current iterate otherwise
        ref = Reference(spec, spec.make_module())
        r = ref.hypergrad(m, theta0 if m.kind == "unrolled" else snap[0], lams)
        row = dict(size=size, method=m.label, ours_vs_ref=rel(got[0], r))
        try:
            beng, bup, _ = build_betty(spec, m, spec.make_module(), lams)
            bgot: List = []
            capture_upper_grads(bup.optimizer, bgot)
            betty_outer_step(beng, m.unroll)
            row["betty_vs_ref"] = rel(bgot[0], r)
            row["ours_vs_betty"] = rel(got[0], bgot[0])
        except Exception as e:  # report, don't die
            row["betty_error"] = f"{type(e).__name__}: {e}"[:120]
        rows.append(row)
    return rows


# ==================================================================== report
def _rng(row: dict, field: str) -> str:
    r = row.get(field + "_range")
    return f" ({r[0]:.2f}–{r[1]:.2f})" if r and r[0] != r[1] else ""


def fmt(x, spec="{:.2f}"):
    return "—" if x is None else spec.format(x)


def tables(res: dict) -> str:
    out = []
    if res.get("prims"):
        out += ["### Primitive passes (ms, float32, median)", "",
                "| problem | lower params | plain step P | U (upper f+b) | G (f + b, create_graph) "
                "| H (one HVP) | Fλ (f + b to λ) |", "|---|---|---|---|---|---|---|"]
        for p in res["prims"]:
            out.append(f"| {p['size']} | {p['params']:,} | {p['P']:.2f} | {p['U']:.2f} | {p['G']:.2f} "
                       f"| {p['H']:.2f} | {p['Flam']:.2f} |")
        out.append("")
    if res.get("time"):
        out += ["### Hypergradient time vs a plain step and vs the pass-count floor", "",
                "| problem | method | passes | ours ms | floor ms | Σ primitives ms | ours / plain "
                "| floor / plain | ours / floor |", "|---|---|---|---|---|---|---|---|---|"]
        for r in res["time"]:
            out.append(f"| {r['size']} | {r['method']} | {r['passes']} | {r['ours_ms']:.2f} | "
                       f"{r['floor_ms']:.2f} | {fmt(r['composed_ms'])} | {r['ours_over_plain']:.2f} | "
                       f"{r['floor_over_plain']:.2f} | **{r['ours_over_floor']:.2f}**{_rng(r, 'ours_over_floor')} |")
        out.append("")
    if res.get("memory"):
        out += ["### Peak memory of two outer steps (RSS high-water above the resident set after "
                "setup and plain steps, MB; fresh process each)", "",
                "| problem | method | K | extra MB | base RSS MB | measured by |", "|---|---|---|---|---|---|"]
        for r in res["memory"]:
            out.append(f"| {r['size']} | {r['method']} | {r['k']} | {r['extra_mb']:.1f} | {r['base_mb']:.0f} "
                       f"| {r.get('how', '')} |")
        out.append("")
    if res.get("betty_time"):
        out += ["### Time per outer step, ours vs Betty 0.1.1 (float32, median)", "",
                "outer step = K lower steps + one upper update; floor = a hand-written outer step "
                "doing exactly the method's passes (`floor_outer_step`); ours = the default engine "
                "(non-finite guard on), ours·ignore = `EngineConfig(nonfinite=\"ignore\")` (no "
                "guard, as Betty and the floor); all four timed interleaved in rotating order; "
                "ratios are medians of per-round ratios (range over rounds)", "",
                "| problem | method | ours ms | Betty ms | Betty / ours | floor ms | ours / floor "
                "| ours·ignore / floor | Betty / floor |", "|---|---|---|---|---|---|---|---|---|"]
        for r in res["betty_time"]:
            f = r.get("floor_ms")
            of = r.get("ours_over_floor", f and r["ours_ms"] / f)
            lf = r.get("lean_over_floor")
            out.append(f"| {r['size']} | {r['method']} | {r['ours_ms']:.2f} | {r['betty_ms']:.2f} "
                       f"| **{r['speedup']:.2f}×**{_rng(r, 'speedup')} | {fmt(f)} | {fmt(of)}{_rng(r, 'ours_over_floor')} "
                       f"| {fmt(lf)}{_rng(r, 'lean_over_floor')} | {fmt(f and r['betty_ms'] / f)} |")
        out.append("")
    if res.get("betty_acc"):
        out += ["### Hypergradient on the same state (float64, relative L2 difference)", "",
                "| problem | method | ours vs reference | Betty vs reference | ours vs Betty |",
                "|---|---|---|---|---|"]
        for r in res["betty_acc"]:
            b = r.get("betty_error")
            out.append(f"| {r['size']} | {r['method']} | {r['ours_vs_ref']:.1e} | "
                       f"{b if b else format(r['betty_vs_ref'], '.1e')} | "
                       f"{'—' if b else format(r['ours_vs_betty'], '.1e')} |")
        out.append("")
    return "\n".join(out)


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"torch {torch.__version__}, {torch.get_num_threads()} intra-op thread(s), "
            f"Python {platform.python_version()}")


def median_rows(rounds: List[List[dict]], key: Tuple[str, ...], range_of=None) -> List[dict]:
    """Per-row median over rounds of every numeric field (ratios are medians of the
    per-round ratios, not ratios of medians); ``range_of`` (a field or a tuple of fields)
    also keeps min/max."""
    out = []
    for row in rounds[0]:
        k = tuple(row[f] for f in key)
        same = [r for rows in rounds for r in rows if tuple(r[f] for f in key) == k]
        agg = dict(row)
        for f, v in row.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and f not in key:
                agg[f] = statistics.median(r[f] for r in same)
        for f in ((range_of,) if isinstance(range_of, str) else range_of or ()):
            if f in row:
                agg[f + "_range"] = (min(r[f] for r in same), max(r[f] for r in same))
        out.append(agg)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats and configurations (< 2 min)")
    ap.add_argument("--betty", action="store_true", help="also run Betty 0.1.1 side by side")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--sizes", default=None, help="comma list of linear,mlp,transformer")
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat the timing sections this many times; tables report the median "
                         "of each row's numbers and ratios over rounds, with the ratio's range")
    ap.add_argument("--out", default=None, help="write the Markdown tables to this file")
    ap.add_argument("--json", default=None, help="also dump the raw results as JSON")
    ap.add_argument("--_memory", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a._memory:
        size, kind, k = a._memory
        print(json.dumps(memory_child(size, kind, int(k))))
        return
    torch.set_num_threads(a.threads)
    repeats = a.repeats or (3 if a.quick else 15)
    sizes = a.sizes.split(",") if a.sizes else ["linear", "mlp", "transformer"]
    methods = METHODS if not a.quick else [m for m in METHODS if m.label in (
        "unrolled K=1", "unrolled K=5", "neumann K=5", "cg K=5", "finite_difference")]
    res: dict = {"time": [], "prims": [], "memory": [], "betty_time": [], "betty_acc": []}
    t0 = now()
    print(f"# machine: {machine()}", flush=True)
    time_rounds, prim_rounds = [], []
    for r in range(a.rounds):
        rows_r, prims_r = [], []
        for size in sizes:
            rows, prims = bench_time(size, methods, repeats)
            rows_r += rows
            prims_r.append(prims)
            print(f"[time] round {r + 1}: {size} done ({now() - t0:.0f}s)", flush=True)
        time_rounds.append(rows_r)
        prim_rounds.append(prims_r)
    res["time"] = median_rows(time_rounds, ("size", "method"), range_of="ours_over_floor")
    res["prims"] = median_rows(prim_rounds, ("size",))
    mem_cfgs = ([("plain", 1), ("unrolled", 1), ("unrolled", 5), ("neumann", 5), ("fd", 1)] if a.quick
                else [("plain", 1)] + [("unrolled", k) for k in (1, 2, 5, 10)]
                + [(kind, k) for kind in ("neumann", "cg") for k in (1, 5, 10)] + [("fd", 1)])
    res["memory"] = bench_memory("mlp", mem_cfgs)
    print(f"[memory] done ({now() - t0:.0f}s)", flush=True)
    if a.betty:
        bsizes = [s for s in sizes if s in ("linear", "mlp")]
        betty_rounds = []
        for r in range(a.rounds):
            rows_r = []
            for size in bsizes:
                rows_r += bench_betty_time(size, methods, repeats)
                print(f"[betty time] round {r + 1}: {size} done ({now() - t0:.0f}s)", flush=True)
            betty_rounds.append(rows_r)
        res["betty_time"] = median_rows(betty_rounds, ("size", "method"),
                                        range_of=("speedup", "ours_over_floor", "lean_over_floor"))
        acc_methods = methods + ([Method("cg K=5 α=0.5", "cg", 5, 0.5)] if not a.quick else [])
        for size in bsizes:
            res["betty_acc"] += bench_betty_accuracy(size, acc_methods)
        print(f"[betty accuracy] done ({now() - t0:.0f}s)", flush=True)
    text = f"Machine: {machine()}; repeats={repeats}; rounds={a.rounds}; total {now() - t0:.0f}s\n\n" + tables(res)
    print(text)
    if a.out:
        with open(a.out, "w") as fh:
            fh.write(text + "\n")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
