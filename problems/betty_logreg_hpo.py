"""Betty's logistic-regression HPO example ported to mlo, and the same problem in Betty 0.1.1.

The port behind ``examples/betty_logreg_hpo.py`` (its docstring describes the problem
and the command line; ``docs/porting_from_betty.md`` the differences). mlo side: the
problems :class:`Classifier` (lower, reset to ``w = 0`` by ``on_window_start``) and
:class:`WeightDecay` (upper, ``λ`` clamped by ``after_step``), :func:`build_mlo` and
:func:`outer_step`; Betty side: :func:`build_betty` and :func:`betty_outer_step` (Betty
imported only there); :func:`train` and :func:`first_hypergradients` run both
interleaved; :func:`metrics` and :func:`exact_hypergradient` (closed-form IFT) evaluate.
"""
from __future__ import annotations

import logging
import statistics
import time
import warnings
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import mlo

DIM, N_TRAIN, N_VAL, N_TEST = 20, 500, 500, 1000
INNER_LR, OUTER_LR, OUTER_MOMENTUM, CLAMP_MIN = 0.1, 1.0, 0.9, 1e-8

#: method -> (mlo method_options, the same settings in Betty's Config)
METHODS: Dict[str, Tuple[dict, dict]] = {
    "unrolled": ({}, {}),                                        # a 100-step window
    "neumann": ({"iterations": 10, "alpha": 1.0}, {"type": "neumann", "neumann_iterations": 10,
                                                   "neumann_alpha": 1.0}),
    "cg": ({"max_iter": 3, "tol": 0.0}, {"type": "cg", "cg_iterations": 3, "cg_alpha": 1.0}),
    "finite_difference": ({"epsilon": 0.01}, {"type": "darts", "darts_alpha": 0.01}),
}


class Data(NamedTuple):
    train: Tuple[Tensor, Tensor]
    val: Tuple[Tensor, Tensor]
    test: Tuple[Tensor, Tensor]


def make_data(seed: int = 0, dtype=torch.float32, dim: int = DIM, n_train: int = N_TRAIN,
              n_val: int = N_VAL, n_test: int = N_TEST) -> Data:
    """``x ~ N(0, I)``, ``y = [x·w_gt + 0.1 ε > 0]`` (float targets), seeded."""
    g = torch.Generator().manual_seed(seed)
    w_gt = torch.randn(dim, generator=g, dtype=torch.float64)

    def split(n):
        x = torch.randn(n, dim, generator=g, dtype=torch.float64)
        y = (x @ w_gt + 0.1 * torch.randn(n, generator=g, dtype=torch.float64) > 0)
        return x.to(dtype), y.to(dtype)

    return Data(split(n_train), split(n_val), split(n_test))


# ====================================================================== mlo side
class Classifier(mlo.Problem):
    """Lower: logistic regression without bias; its weight decay is the upper's variable."""

    def __init__(self, weight_decay: "WeightDecay", data, method: str, options: dict,
                 inner_steps: int, dtype=torch.float32):
        super().__init__("inner", params={"w": torch.zeros(DIM, dtype=dtype)}, data=[data],
                         optimizer=torch.optim.SGD, optimizer_kwargs={"lr": INNER_LR},
                         config=mlo.ProblemConfig(unroll_steps=inner_steps, method=method,
                                                  method_options=options))
        self.weight_decay = weight_decay                     # explicit wiring (Betty: self.outer)

    def training_step(self, batch):
        x, y = batch
        w, lam = self.params["w"], self.weight_decay.params["lam"]   # [D], [D]
        return F.binary_cross_entropy_with_logits(x @ w, y) + 0.5 * (lam * w * w).sum()

    def on_window_start(self):                               # Betty: on_inner_loop_start
        self.set_params({"w": torch.zeros_like(self.params["w"])})


class WeightDecay(mlo.Problem):
    """Upper: validation loss of the classifier; variables: λ, one per feature."""

    def __init__(self, data, dtype=torch.float32):
        super().__init__("outer", params={"lam": torch.ones(DIM, dtype=dtype)}, data=[data],
                         optimizer=torch.optim.SGD,
                         optimizer_kwargs={"lr": OUTER_LR, "momentum": OUTER_MOMENTUM})
        self.classifier: Optional[Classifier] = None         # wired after construction

    def training_step(self, batch):
        x, y = batch
        return F.binary_cross_entropy_with_logits(x @ self.classifier.params["w"], y)

    def after_step(self):                                    # Betty: param_callback
        self.set_params({"lam": self.params["lam"].clamp(min=CLAMP_MIN)})


class Port(NamedTuple):
    engine: mlo.Engine
    outer: WeightDecay
    inner: Classifier
    inner_steps: int


def build_mlo(method: str, data: Data, inner_steps: int = 100, options: Optional[dict] = None,
              dtype=torch.float32) -> Port:
    """The two problems and their engine (``u2l``/``l2u`` as in Betty)."""
    outer = WeightDecay(data.val, dtype)
    inner = Classifier(outer, data.train, method,
                       METHODS[method][0] if options is None else options, inner_steps, dtype)
    outer.classifier = inner
    engine = mlo.Engine([outer, inner], {"u2l": {outer: [inner]}, "l2u": {inner: [outer]}})
    return Port(engine, outer, inner, inner_steps)


def outer_step(port: Port) -> None:
    """One outer step: ``inner_steps`` lower steps (the first one after the hook reset
    ``w`` to 0) and, at the last one, the upper update (then the hook clamps λ)."""
    port.engine.run(port.inner_steps)


# ================================================================= evaluation
@torch.no_grad()
def metrics(w: Tensor, lam: Tensor, data: Data) -> Dict[str, float]:
    """Train objective, validation loss (the upper's), test loss and accuracy of ``w``."""
    w = w.detach().to(data.train[0].dtype)
    (xt, yt), (xv, yv), (xs, ys) = data
    train = F.binary_cross_entropy_with_logits(xt @ w, yt) + 0.5 * (lam.detach() * w * w).sum()
    logits = xs @ w
    return {"train": float(train), "val": float(F.binary_cross_entropy_with_logits(xv @ w, yv)),
            "test": float(F.binary_cross_entropy_with_logits(logits, ys)),
            "acc": float(((logits > 0).to(ys.dtype) == ys).to(torch.float64).mean())}


def exact_hypergradient(w: Tensor, lam: Tensor, data: Data) -> Tensor:
    """Implicit-function-theorem hypergradient at ``(w, λ)`` in closed form (float64)::

        H = X_trᵀ diag(p(1−p)) X_tr / n + diag(λ),  v = X_valᵀ(σ(X_val w) − y_val) / n_val
        dF/dλ = −w ⊙ H⁻¹ v
    """
    w, lam = w.detach().double(), lam.detach().double()
    (xt, yt), (xv, yv) = [(x.double(), y.double()) for x, y in data[:2]]
    p = torch.sigmoid(xt @ w)
    H = xt.T @ (xt * (p * (1 - p))[:, None]) / len(xt) + torch.diag(lam)
    v = xv.T @ (torch.sigmoid(xv @ w) - yv) / len(xv)
    return -w * torch.linalg.solve(H, v)


def capture_first_gradient(optimizer: torch.optim.Optimizer, store: List[Tensor]):
    """Records the gradient the upper's optimizer is about to apply (mlo and Betty alike)."""
    def hook(opt, args, kwargs):
        if not store:
            store.append(torch.cat([p.grad.detach().reshape(-1).clone()
                                    for g in opt.param_groups for p in g["params"]]))
    return optimizer.register_step_pre_hook(hook)


def rel(a: Tensor, b: Tensor) -> float:
    d = float(torch.linalg.vector_norm(b.double()))
    return float(torch.linalg.vector_norm(a.double() - b.double())) / (d or 1.0)


# ================================================================ Betty side
def import_betty():
    """Betty 0.1.1's public API, or ``None`` when it is not installed."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from betty.configs import Config, EngineConfig
            from betty.engine import Engine
            from betty.logging.logger_base import get_logger
            from betty.problems import ImplicitProblem, IterativeProblem
    except ImportError:
        return None
    get_logger().setLevel(logging.WARNING)
    return Config, EngineConfig, Engine, ImplicitProblem, IterativeProblem


class _Vector(nn.Module):
    """A module holding one vector ``w``; ``forward(x) = x @ w`` (``forward() = w``)."""

    def __init__(self, init: Tensor):
        super().__init__()
        self.w = nn.Parameter(init.clone())

    def forward(self, x=None):
        return self.w if x is None else x @ self.w


class BettyPort(NamedTuple):
    engine: object
    outer: object
    inner: object
    inner_steps: int


def build_betty(method: str, data: Data, inner_steps: int = 100, dtype=torch.float32) -> BettyPort:
    """The same problem with Betty 0.1.1 (its hooks, its name injection, its configs)."""
    Config, EngineConfig, Engine, ImplicitProblem, IterativeProblem = import_betty()

    class Outer(ImplicitProblem):
        def training_step(self, batch):
            x, y = batch
            return F.binary_cross_entropy_with_logits(self.inner(x), y)   # injected by name

        def param_callback(self, params):
            for p in params:
                p.data.clamp_(min=CLAMP_MIN)

    def lower_loss(w, lam, batch):
        x, y = batch
        return F.binary_cross_entropy_with_logits(x @ w, y) + 0.5 * (lam * w * w).sum()

    class Inner(ImplicitProblem):
        def training_step(self, batch):
            return lower_loss(self.module.w, self.outer.module.w, batch)

        def on_inner_loop_start(self):
            self.module.w.data.zero_()

    class InnerUnrolled(IterativeProblem):
        # Betty's iterative problems keep the iterates in ``self.params`` (functorch), not
        # in the module, and 0.1.1 never cuts the graph between inner loops: the reset
        # starts from fresh leaves and drops the differentiable optimizer's state.
        def forward(self, x):
            return self.fmodule(self.params, self.buffers, x)

        def training_step(self, batch):
            return lower_loss(self.params[0], self.outer.module.w, batch)

        def on_inner_loop_start(self):
            self.params = tuple(torch.zeros_like(p).requires_grad_() for p in self.params)
            self.optimizer.state = [{} for _ in self.optimizer.state]

    if method == "unrolled":
        up_cfg = Config(first_order=False, retain_graph=True)    # first_order=False: no implicit paths
        lo_cfg, lo_cls = Config(type="darts", unroll_steps=inner_steps, retain_graph=True), InnerUnrolled
    else:
        up_cfg = Config(first_order=True, retain_graph=True)
        lo_cfg, lo_cls = Config(unroll_steps=inner_steps, **METHODS[method][1]), Inner
    lam_mod, w_mod = _Vector(torch.ones(DIM, dtype=dtype)), _Vector(torch.zeros(DIM, dtype=dtype))
    outer = Outer(name="outer", config=up_cfg, module=lam_mod,
                  optimizer=torch.optim.SGD(lam_mod.parameters(), lr=OUTER_LR, momentum=OUTER_MOMENTUM),
                  train_data_loader=[data.val], device="cpu")
    inner = lo_cls(name="inner", config=lo_cfg, module=w_mod,
                   optimizer=torch.optim.SGD(w_mod.parameters(), lr=INNER_LR),
                   train_data_loader=[data.train], device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = Engine(problems=[outer, inner],
                        config=EngineConfig(train_iters=10 ** 9, valid_step=10 ** 9, logger_type="none"),
                        dependencies={"u2l": {outer: [inner]}, "l2u": {inner: [outer]}})
    return BettyPort(engine, outer, inner, inner_steps)


def betty_outer_step(port: BettyPort) -> None:
    """``inner_steps`` iterations of Betty's engine: its hooks reset and clamp."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(port.inner_steps):
            port.engine.global_step += 1
            port.engine.train_step()


def betty_state(port: BettyPort) -> Tuple[Tensor, Tensor]:
    w = port.inner.params[0] if hasattr(port.inner, "fmodule") else port.inner.module.w
    return w.detach(), port.outer.module.w.detach()


# ====================================================================== runs
def train(method: str, data: Data, outer_steps: int, inner_steps: int = 100,
          betty: bool = False, dtype=torch.float32) -> Dict[str, dict]:
    """Trains with mlo (and Betty), interleaved outer step by outer step; returns metrics
    and per-outer-step seconds for each framework."""
    runs: Dict[str, Tuple[Callable[[], None], Callable[[], Tuple[Tensor, Tensor]]]] = {}
    port = build_mlo(method, data, inner_steps, dtype=dtype)
    runs["mlo"] = (lambda: outer_step(port),
                   lambda: (port.inner.params["w"].detach(), port.outer.params["lam"].detach()))
    if betty:
        bport = build_betty(method, data, inner_steps, dtype)
        runs["betty"] = (lambda: betty_outer_step(bport), lambda: betty_state(bport))
    secs: Dict[str, List[float]] = {k: [] for k in runs}
    for _ in range(outer_steps):
        for k, (step, _) in runs.items():
            t0 = time.perf_counter()
            step()
            secs[k].append(time.perf_counter() - t0)
    out = {}
    for k, (_, state) in runs.items():
        w, lam = state()
        out[k] = {**metrics(w, lam, data), "lam": lam.clone(),
                  "ms": 1e3 * statistics.median(secs[k][1:] or secs[k])}
    return out


def first_hypergradients(method: str, seed: int, inner_steps: int = 100,
                         betty: bool = False) -> Dict[str, float]:
    """The first upper gradient of each framework from the same initial state (float64).

    Both take ``inner_steps`` SGD steps from ``w = 0`` on the same data, so the upper
    update sees the same state; also compared with the exact implicit hypergradient at
    mlo's state (for scale: K-step methods approximate it).
    """
    data = make_data(seed, torch.float64)
    port = build_mlo(method, data, inner_steps, dtype=torch.float64)
    got: List[Tensor] = []
    capture_first_gradient(port.outer.optimizer, got)
    states: List[Tensor] = []
    port.outer.optimizer.register_step_pre_hook(
        lambda *a: states.append(port.inner.own_state()["w"].detach().clone()) if not states else None)
    outer_step(port)
    exact = exact_hypergradient(states[0], torch.ones(DIM, dtype=torch.float64), data)
    out = {"mlo_vs_exact": rel(got[0], exact)}
    if betty:
        bport = build_betty(method, data, inner_steps, torch.float64)
        bgot: List[Tensor] = []
        capture_first_gradient(bport.outer.optimizer, bgot)
        betty_outer_step(bport)
        out["betty_vs_exact"] = rel(bgot[0], exact)
        out["mlo_vs_betty"] = rel(got[0], bgot[0])
    return out
