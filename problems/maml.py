"""MAML on sinusoid regression (Finn et al., 2017) as an mlo graph, and the same run
written with torchopt and with higher for comparison.

The tasks: ``y = A sin(x − φ)`` with amplitude ``A ~ U[0.1, 5]``, phase ``φ ~ U[0, π]`` and
inputs ``x ~ U[−5, 5]``; a task has ``K`` support points (the inner loss) and ``query``
points (the meta-loss). The model is a 1-40-40-1 ReLU MLP. Everything is drawn up front
from one seed (:func:`sample_tasks`, :func:`meta_batches`), so every implementation sees
the same tasks in the same order.

The graph (:func:`maml_engine`) has one meta problem and one per-task problem for each
slot of the meta-batch::

    meta  (MetaLearner: the MLP's parameters θ, meta optimizer Adam)
      │ u2l: each task's window starts from θ     ▲ l2u: meta's loss reads the adapted weights
      ▼                                           │
    task0 … task{B−1}  (FastWeights: θ' = θ − α∇L_support, ``inner_steps`` SGD steps)

One outer step is ``inner_steps`` engine iterations: every task takes its inner steps
on its support set, then the meta problem's loss — the mean query loss at the adapted
weights — is differentiated through the steps into ``θ`` (second order, or first order
with ``first_order=True``) and Adam steps ``θ``. Each window takes the task problem's next
batch, so slot ``b`` of outer step ``s`` sees task ``batches[s][b]``.

:class:`FastWeights` is reusable for any MAML-style graph: fast weights of another
problem's module, initialised from that problem's current parameters when the window
opens. :func:`run_mlo`, :func:`run_torchopt` and :func:`run_higher` run the same
meta-training and return the same record (meta-losses, final parameters, seconds);
torchopt and higher are optional (imported only there).
"""
from __future__ import annotations

import copy
import math
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

import mlo

__all__ = ["sample_tasks", "meta_batches", "mlp", "FastWeights", "MetaLearner", "maml_engine",
           "run_mlo", "run_torchopt", "run_higher", "adapted_loss", "PEERS"]

Task = Tuple[Tensor, Tensor, Tensor, Tensor]       # (x_support, y_support, x_query, y_query)

AMPLITUDE, PHASE, X_RANGE = (0.1, 5.0), (0.0, math.pi), (-5.0, 5.0)


# ---------------------------------------------------------------------- tasks and model
def sample_tasks(n: int, shots: int, query: Optional[int] = None, seed: int = 0,
                 dtype: torch.dtype = torch.float64) -> List[Task]:
    """``n`` sinusoid tasks drawn from ``seed``: each ``(x_s, y_s, x_q, y_q)`` with ``shots``
    support and ``query`` (default ``shots``) query points, every tensor ``[points, 1]``."""
    if n < 1 or shots < 1:
        raise ValueError(f"sample_tasks: n and shots must be >= 1, got n={n}, shots={shots}")
    query = shots if query is None else query
    if query < 1:
        raise ValueError(f"sample_tasks: query must be >= 1, got {query}")
    g = torch.Generator().manual_seed(seed)

    def uniform(shape, lo_hi):
        lo, hi = lo_hi
        return lo + (hi - lo) * torch.rand(shape, generator=g, dtype=dtype)

    amp, phase = uniform((n, 1, 1), AMPLITUDE), uniform((n, 1, 1), PHASE)
    x = uniform((n, shots + query, 1), X_RANGE)
    y = amp * torch.sin(x - phase)
    return [(x[i, :shots], y[i, :shots], x[i, shots:], y[i, shots:]) for i in range(n)]


def meta_batches(tasks: Sequence[Task], meta_batch: int) -> List[List[Task]]:
    """``tasks`` cut into consecutive meta-batches of ``meta_batch`` (one per outer step)."""
    if meta_batch < 1 or len(tasks) < meta_batch or len(tasks) % meta_batch:
        raise ValueError(f"meta_batches: {len(tasks)} tasks do not split into meta-batches of "
                         f"{meta_batch}")
    return [list(tasks[i:i + meta_batch]) for i in range(0, len(tasks), meta_batch)]


def mlp(hidden: Sequence[int] = (40, 40), seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    """The 1-40-40-1 ReLU regressor (torch's default initialisation under ``seed``)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        sizes, layers = [1, *hidden], []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        return nn.Sequential(*layers, nn.Linear(sizes[-1], 1)).to(dtype)


# ---------------------------------------------------------------------- the mlo problems
def _identifier(name: str) -> str:
    """A parameter path (``"0.weight"``) as a window variable name (``"p_0__weight"``)."""
    return "p_" + name.replace(".", "__")


class FastWeights(mlo.WindowProblem):
    """A task's fast weights: ``source``'s module parameters, copied *differentiably* when
    the window opens (so the meta-gradient reaches ``source``) and adapted by this
    problem's optimizer on the support half of the window's batch.

    Args:
        name: the problem's name.
        source: the problem whose module and parameters the fast weights start from (it
            must declare ``u2l {source: [this]}``, and read this problem back with l2u).
        data: the tasks this problem adapts to, one per window: ``(x_s, y_s, x_q, y_q)``.
        lr: the inner learning rate (any other ``optimizer_kwargs`` via ``optimizer_kwargs``).
        steps: inner steps per window (``unroll_steps``).
        first_order: inner gradients taken as constants (first-order MAML).
        loss: ``loss(prediction, target)``; mean squared error by default.
        optimizer, optimizer_kwargs: the inner optimizer (SGD by default).

    The problem above reads :meth:`query_loss` (or :meth:`predict`) at the adapted weights.
    """

    def __init__(self, name: str, source: mlo.Problem, data, lr: float = 0.01, steps: int = 1,
                 first_order: bool = False, loss: Callable[[Tensor, Tensor], Tensor] = F.mse_loss,
                 optimizer=torch.optim.SGD, optimizer_kwargs: Optional[Dict] = None):
        if not isinstance(source, mlo.Problem) or isinstance(source, mlo.WindowProblem):
            raise TypeError(f"problem {name!r}: source must be an mlo.Problem with a module, got "
                            f"{type(source).__name__}")
        names = source.param_names
        if len({_identifier(n) for n in names}) != len(names):
            raise ValueError(f"problem {name!r}: the parameter names of {source.name!r} ({names}) "
                             f"collide once '.' is replaced by '__'; rename them")
        super().__init__(name, optimizer=optimizer, optimizer_kwargs={"lr": lr, **(optimizer_kwargs or {})},
                         data=data, config=mlo.ProblemConfig(method="unrolled", unroll_steps=steps),
                         first_order=first_order)
        self.source, self.loss = source, loss
        self._paths = {_identifier(n): n for n in names}

    def init_window(self, batch) -> Dict[str, Tensor]:
        """``θ'_0 = θ``: the source's current parameters, in the autograd graph."""
        return {_identifier(k): v for k, v in self.source.params.items()}

    def fast_weights(self) -> Dict[str, Tensor]:
        """The current fast weights under the source module's parameter names."""
        return {self._paths[k]: v for k, v in self.params.items()}

    def predict(self, x: Tensor) -> Tensor:
        """The source module run at the fast weights."""
        return functional_call(self.source.module, self.fast_weights(), (x,))

    def training_step(self, batch) -> Tensor:
        xs, ys = batch[0], batch[1]
        return self.loss(self.predict(xs), ys)

    def query_loss(self) -> Tensor:
        """The loss on the query half of the window's task at the adapted weights."""
        xq, yq = self.batch[2], self.batch[3]
        return self.loss(self.predict(xq), yq)


class MetaLearner(mlo.Problem):
    """The meta-parameters: ``module``'s parameters; the loss is the mean
    :meth:`FastWeights.query_loss` of :attr:`tasks` (the problems below it)."""

    def __init__(self, module: nn.Module, optimizer=torch.optim.Adam, lr: float = 1e-3,
                 name: str = "meta", optimizer_kwargs: Optional[Dict] = None):
        super().__init__(name, module=module, optimizer=optimizer,
                         optimizer_kwargs={"lr": lr, **(optimizer_kwargs or {})})
        self.tasks: List[FastWeights] = []

    def training_step(self, batch) -> Tensor:
        if not self.tasks:
            raise RuntimeError(f"problem {self.name!r}: no task problems (set .tasks)")
        return torch.stack([t.query_loss() for t in self.tasks]).mean()


def maml_engine(model: nn.Module, batches: Sequence[Sequence[Task]], inner_lr: float = 0.01,
                inner_steps: int = 1, meta_lr: float = 1e-3, first_order: bool = False,
                meta_optimizer=torch.optim.Adam) -> Tuple[mlo.Engine, MetaLearner]:
    """The MAML graph over ``batches`` (``[outer step][slot]`` tasks): ``model`` is trained
    in place. Run ``engine.run(inner_steps * len(batches))`` for all outer steps."""
    meta = MetaLearner(model, optimizer=meta_optimizer, lr=meta_lr)
    meta.tasks = [FastWeights(f"task{b}", meta, [step[b] for step in batches], lr=inner_lr,
                              steps=inner_steps, first_order=first_order)
                  for b in range(len(batches[0]))]
    deps = {"u2l": {meta: meta.tasks}, "l2u": {t: [meta] for t in meta.tasks}}
    return mlo.Engine(meta.tasks + [meta], deps, mlo.EngineConfig(progress=False)), meta


# ---------------------------------------------------------------------- runs to compare
def _record(losses: List[float], model: nn.Module, seconds: float) -> Dict:
    return {"meta_loss": losses, "params": {k: v.detach().clone() for k, v in model.named_parameters()},
            "seconds_per_step": seconds / max(len(losses), 1)}


def run_mlo(model: nn.Module, batches, inner_lr: float, inner_steps: int, meta_lr: float,
            first_order: bool = False) -> Dict:
    """Meta-trains a copy of ``model`` with :func:`maml_engine`: ``{"meta_loss": [per outer
    step], "params": {name: final}, "seconds_per_step"}``."""
    net = copy.deepcopy(model)
    engine, meta = maml_engine(net, batches, inner_lr, inner_steps, meta_lr, first_order)
    losses, t0 = [], time.perf_counter()
    for _ in batches:
        engine.run(inner_steps)
        losses.append(float(meta.last_loss))
    return _record(losses, net, time.perf_counter() - t0)


def run_higher(model: nn.Module, batches, inner_lr: float, inner_steps: int, meta_lr: float) -> Dict:
    """The same second-order MAML with higher (``innerloop_ctx`` around torch's SGD)."""
    import higher

    net = copy.deepcopy(model)
    meta_opt = torch.optim.Adam(net.parameters(), lr=meta_lr)
    losses, t0 = [], time.perf_counter()
    for step in batches:
        meta_opt.zero_grad()
        total = 0.0
        for xs, ys, xq, yq in step:
            inner = torch.optim.SGD(net.parameters(), lr=inner_lr)
            with higher.innerloop_ctx(net, inner, copy_initial_weights=False) as (fnet, diffopt):
                for _ in range(inner_steps):
                    diffopt.step(F.mse_loss(fnet(xs), ys))
                q = F.mse_loss(fnet(xq), yq) / len(step)
                q.backward()
                total += float(q.detach())
        meta_opt.step()
        losses.append(total)
    return _record(losses, net, time.perf_counter() - t0)


def run_torchopt(model: nn.Module, batches, inner_lr: float, inner_steps: int, meta_lr: float) -> Dict:
    """The same second-order MAML with torchopt (``MetaSGD`` on the module, its state
    saved and restored around each task)."""
    import torchopt

    net = copy.deepcopy(model)
    meta_opt = torch.optim.Adam(net.parameters(), lr=meta_lr)
    inner = torchopt.MetaSGD(net, lr=inner_lr)
    losses, t0 = [], time.perf_counter()
    for step in batches:
        meta_opt.zero_grad()
        net_state, opt_state = torchopt.extract_state_dict(net), torchopt.extract_state_dict(inner)
        total = 0.0
        for xs, ys, xq, yq in step:
            for _ in range(inner_steps):
                inner.step(F.mse_loss(net(xs), ys))
            q = F.mse_loss(net(xq), yq) / len(step)
            q.backward()
            total += float(q.detach())
            torchopt.recover_state_dict(net, net_state)
            torchopt.recover_state_dict(inner, opt_state)
        meta_opt.step()
        losses.append(total)
    return _record(losses, net, time.perf_counter() - t0)


PEERS = {"torchopt": run_torchopt, "higher": run_higher}


def adapted_loss(model: nn.Module, tasks: Sequence[Task], inner_lr: float, inner_steps: int) -> float:
    """Mean query MSE over ``tasks`` after ``inner_steps`` plain SGD steps from ``model``'s
    parameters (the held-out evaluation; the same function for every implementation)."""
    names = [n for n, _ in model.named_parameters()]
    total = 0.0
    for xs, ys, xq, yq in tasks:
        w = [p.detach() for p in model.parameters()]
        for _ in range(inner_steps):
            w = [t.requires_grad_() for t in w]
            loss = F.mse_loss(functional_call(model, dict(zip(names, w)), (xs,)), ys)
            w = [t.detach() - inner_lr * g for t, g in zip(w, torch.autograd.grad(loss, w))]
        with torch.no_grad():
            total += float(F.mse_loss(functional_call(model, dict(zip(names, w)), (xq,)), yq))
    return total / len(tasks)
