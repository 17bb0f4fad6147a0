"""Differentiable (functional) twins of ``torch.optim`` optimizers.

Unrolled hypergradients take K optimizer steps whose result stays in the autograd
graph. :class:`FunctionalOptimizer` reproduces ``torch.optim.SGD``, ``Adam``, ``AdamW``
and — through the rules of :mod:`mlo.optim_rules` — ``RMSprop``, ``Adagrad``,
``Adamax``, ``NAdam``, ``RAdam``, ``Adadelta`` and ``ASGD`` operation by operation (the
single-tensor, ``foreach=False`` arithmetic of torch 2.x), so the forward trajectory
equals the torch one to rounding, while every update is out of place:

    params_{k+1}, state_{k+1} = U(params_k, grads_k, state_k)

It takes over a torch optimizer's state (:meth:`FunctionalOptimizer.from_torch`) and
hands it back (:meth:`FunctionalOptimizer.state_to_torch`), so torch steps and
differentiable steps can be interleaved seamlessly.

Hyperparameters live in :attr:`FunctionalOptimizer.param_groups` (one dict per torch
param group, without ``"params"``). Any of ``lr``, ``weight_decay``, ``momentum``,
``dampening``, ``betas`` entries or ``eps`` may be replaced by a 0-dim tensor that
requires grad, e.g. ``fopt.param_groups[0]["lr"] = log_lr.exp()``; the returned
parameters are then differentiable in it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .optim_rules import RULES, _Number, _axpy, _sqrt  # noqa: F401  (_sqrt: mlo.optim._sqrt)

__all__ = ["FunctionalOptimizer", "FunctionalSGD", "FunctionalAdam", "FunctionalRule", "functional_optimizer"]


def _copy(t):
    return None if t is None else t.detach().clone(memory_format=torch.preserve_format)


class FunctionalOptimizer:
    """Differentiable twin of one ``torch.optim`` optimizer.

    Build it with :meth:`from_torch`. The state is kept per parameter position (the
    order of ``params`` given to :meth:`from_torch`) in ``self.state``, with torch's own
    keys; after :meth:`step` the state tensors are graph-connected outputs.

    Attributes:
        param_groups: hyperparameter dicts, one per torch param group (editable).
        group_index: for each parameter position, the index of its group.
        state: for each parameter position, a dict of state tensors (torch's keys).
    """

    torch_types: tuple[type, ...] = ()

    def __init__(self, param_groups: list[dict], group_index: list[int], state: list[dict]):
        self.param_groups = param_groups
        self.group_index = group_index
        self.state = state

    @staticmethod
    def _twin(optimizer: torch.optim.Optimizer):
        """The subclass that reproduces ``optimizer``'s class (exactly: not a subclass), or ``None``."""
        for sub in (FunctionalSGD, FunctionalAdam):
            if type(optimizer) in sub.torch_types:
                return sub
        return _RULE_TWINS.get(type(optimizer))

    @staticmethod
    def supported() -> str:
        """The ``torch.optim`` classes with a twin, for messages: ``"SGD, Adam, AdamW, RMSprop, ..."``."""
        return ", ".join(["SGD", "Adam", "AdamW"] + [c.__name__ for c in RULES])

    @staticmethod
    def supports(optimizer: torch.optim.Optimizer) -> bool:
        """Whether :meth:`from_torch` has a differentiable twin for ``optimizer``."""
        return FunctionalOptimizer._twin(optimizer) is not None

    @classmethod
    def from_torch(cls, optimizer: torch.optim.Optimizer, params: list[Tensor]) -> "FunctionalOptimizer":
        """Take over a torch optimizer's hyperparameters and state.

        Args:
            optimizer: an instance of a class listed by :meth:`supported`.
            params: the real parameters (as in ``optimizer.param_groups``) in a fixed
                order; :meth:`step` takes tensors in the same order.

        Returns:
            A :class:`FunctionalSGD`, :class:`FunctionalAdam` or :class:`FunctionalRule`
            subclass holding cloned state.

        Raises:
            TypeError: the optimizer class is not supported.
            ValueError: a parameter is not in the optimizer, is repeated or is
                complex. (``foreach``/``fused``/``capturable``/``differentiable``
                are accepted; sparse gradients are rejected by :meth:`step`.)
        """
        sub = cls._twin(optimizer)
        if sub is None:
            raise TypeError(
                f"FunctionalOptimizer does not support {type(optimizer).__name__}; "
                f"supported (torch.optim): {cls.supported()}")
        tgroups = optimizer.param_groups
        first = tgroups[0]["params"] if len(tgroups) == 1 else ()
        if len(first) == len(params) and all(a is b for a, b in zip(first, params)):
            group_index = [0] * len(params)     # (the usual case; torch rejects repeats in a group)
        else:
            where = {id(p): g for g, group in enumerate(tgroups) for p in group["params"]}
            if len({id(p) for p in params}) != len(params):
                raise ValueError("`params` contains the same tensor more than once")
            group_index = []
            for p in params:
                if id(p) not in where:
                    raise ValueError(f"a parameter of shape {tuple(p.shape)} is not in the optimizer's param_groups")
                group_index.append(where[id(p)])
        if any(p.is_complex() for p in params):
            raise ValueError("complex parameters are not supported")
        groups = [{k: v for k, v in g.items() if k != "params"} for g in tgroups]
        tstate = optimizer.state
        state = [{k: _copy(v) if isinstance(v, Tensor) else v for k, v in tstate[p].items()}
                 if p in tstate else {} for p in params]
        return sub(groups, group_index, state)

    @classmethod
    def fresh(cls, optimizer: torch.optim.Optimizer, n: int) -> "FunctionalOptimizer":
        """A twin with ``optimizer``'s first group's hyperparameters and *empty* state for
        ``n`` tensors of any shape (per-window variables: a new optimizer every window).

        Raises:
            TypeError: the optimizer class is not supported.
        """
        sub = cls._twin(optimizer)
        if sub is None:
            raise TypeError(
                f"FunctionalOptimizer does not support {type(optimizer).__name__}; "
                f"supported (torch.optim): {cls.supported()}")
        group = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
        return sub([group], [0] * n, [{} for _ in range(n)])

    def step(self, params: list[Tensor], grads: list[Tensor | None]) -> list[Tensor]:
        """One optimizer step, out of place.

        Args:
            params: current parameters, in the order given to :meth:`from_torch`.
            grads: their gradients (possibly graph-connected, e.g. from
                ``create_graph=True``). A ``None`` gradient leaves that parameter and
                its state untouched, as torch does.

        Returns:
            New tensors ``params_{k+1}``; inputs are never modified. The internal
            state is replaced by new tensors that stay in the autograd graph.
        """
        if len(params) != len(self.state) or len(grads) != len(self.state):
            raise ValueError(f"expected {len(self.state)} params and grads, got {len(params)} and {len(grads)}")
        out = []
        for i, (p, g) in enumerate(zip(params, grads)):
            if g is None:
                out.append(p)
                continue
            if g.is_sparse:
                raise ValueError("sparse gradients are not supported")
            new_p, self.state[i] = self._update(p, g, dict(self.state[i]), self.param_groups[self.group_index[i]])
            out.append(new_p)
        return out

    def _update(self, p: Tensor, g: Tensor, state: dict, group: dict) -> tuple[Tensor, dict]:
        raise NotImplementedError

    def state_to_torch(self, optimizer: torch.optim.Optimizer, params: list[Tensor]) -> None:
        """Hand the state back: write detached copies into ``optimizer.state[p]``.

        Args:
            optimizer: an optimizer of the same kind (e.g. the one given to
                :meth:`from_torch`). Its hyperparameters are not changed.
            params: the real parameters, in the order given to :meth:`from_torch`.
        """
        if type(optimizer) not in self.torch_types:
            raise TypeError(f"{type(self).__name__} cannot hand state to {type(optimizer).__name__}")
        if len(params) != len(self.state):
            raise ValueError(f"expected {len(self.state)} params, got {len(params)}")
        tstate = optimizer.state
        for p, st in zip(params, self.state):
            if st or p in tstate:       # (no empty entries torch itself would not make)
                tstate[p] = {k: _copy(v) if isinstance(v, Tensor) else v for k, v in st.items() if v is not None}


class FunctionalSGD(FunctionalOptimizer):
    r"""Differentiable ``torch.optim.SGD``.

    With :math:`g \leftarrow -g` if ``maximize``:

    .. math::
        g_t &= \nabla f(\theta_{t-1}) + \lambda \theta_{t-1} \\
        b_t &= g_t \ (t = 1), \qquad b_t = \mu b_{t-1} + (1 - \tau) g_t \ (t > 1) \\
        d_t &= g_t + \mu b_t \ \text{(nesterov)}, \qquad d_t = b_t \ \text{(otherwise; } d_t = g_t \text{ if } \mu = 0) \\
        \theta_t &= \theta_{t-1} - \gamma d_t

    Unlike torch's ``differentiable=True`` SGD, the first buffer ``b_1 = g_1`` keeps its
    graph (torch detaches it), so derivatives through ``g_1`` are exact.
    """

    torch_types = (torch.optim.SGD,)

    def _update(self, p, g, state, group):
        lr, wd, mom = group["lr"], group["weight_decay"], group["momentum"]
        d = -g if group["maximize"] else g
        if not (isinstance(wd, _Number) and wd == 0):
            d = _axpy(d, p, wd)
        if not (isinstance(mom, _Number) and mom == 0):
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = d.clone()
            else:
                buf = _axpy(buf.mul(mom), d, 1 - group["dampening"])
            state["momentum_buffer"] = buf
            d = _axpy(d, buf, mom) if group["nesterov"] else buf
        if isinstance(lr, _Number):
            return p.add(d, alpha=-lr), state
        return p.addcmul(d, lr, value=-1), state


class FunctionalAdam(FunctionalOptimizer):
    r"""Differentiable ``torch.optim.Adam`` / ``AdamW`` (incl. amsgrad, maximize).

    With :math:`g \leftarrow -g` if ``maximize``; weight decay is coupled for Adam
    (:math:`g_t \mathrel{+}= \lambda\theta_{t-1}`) and decoupled for AdamW
    (:math:`\theta_{t-1} \leftarrow (1 - \gamma\lambda)\theta_{t-1}`):

    .. math::
        m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t \quad (\text{as } \mathrm{lerp}(m_{t-1}, g_t, 1-\beta_1)) \\
        v_t &= \beta_2 v_{t-1} + (1-\beta_2) g_t^2, \qquad
        \hat v_t = \max(\hat v_{t-1}, v_t) \text{ (amsgrad) else } v_t \\
        \theta_t &= \theta_{t-1} - \frac{\gamma}{1-\beta_1^t}\,
            \frac{m_t}{\sqrt{\hat v_t}/\sqrt{1-\beta_2^t} + \epsilon}

    ``state["step"]`` stays a float tensor as in torch. Groups with ``capturable`` or
    ``differentiable`` set follow torch's tensor-step arithmetic for those modes;
    ``foreach`` is ignored (torch's multi-tensor path gives identical numbers) and so
    is ``fused`` (the fused CPU kernel agrees to ~1e-16 relative, not bitwise).
    Where :math:`m_t = \hat v_t = 0` (a gradient exactly 0 yet graph-connected), the
    update's derivative is :math:`-\frac{\gamma}{1-\beta_1^t}\,\partial m_t/\epsilon`,
    not NaN: the :math:`\sqrt{\hat v_t}` term is multiplied by :math:`m_t = 0` (``_sqrt``).
    """

    torch_types = (torch.optim.Adam, torch.optim.AdamW)

    def _update(self, p, g, state, group):
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        if "step" not in state:  # torch's lazy initialisation
            fused, fp64 = group.get("fused"), torch.get_default_dtype() == torch.float64
            state["step"] = torch.tensor(0.0, dtype=torch.float64 if fp64 and not fused else torch.float32,
                                         device=p.device if fused or group.get("capturable") else "cpu")
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group["amsgrad"]:
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if not isinstance(state["step"], Tensor):  # old checkpoints store a number
            state["step"] = torch.tensor(float(state["step"]))
        step_t = state["step"] = state["step"] + 1
        d = -g if group["maximize"] else g
        if not (isinstance(wd, _Number) and wd == 0):
            if group.get("decoupled_weight_decay", False):
                p = p.mul(1 - lr * wd)
            else:
                d = _axpy(d, p, wd)
        m = state["exp_avg"] = state["exp_avg"].lerp(d, 1 - beta1)
        if isinstance(beta2, _Number):
            v = state["exp_avg_sq"].mul(beta2).addcmul(d, d, value=1 - beta2)
        else:
            v = state["exp_avg_sq"].lerp(d.square(), 1 - beta2)
        state["exp_avg_sq"] = v
        if group["amsgrad"]:
            v = state["max_exp_avg_sq"] = torch.maximum(state["max_exp_avg_sq"], v)
        if group.get("capturable", False) or group.get("differentiable", False):
            step_size_neg = (lr / (1 - beta1 ** step_t)).neg()
            bc2_sqrt = (1 - beta2 ** step_t).sqrt()
            denom = (_sqrt(v) / (bc2_sqrt * step_size_neg)).add(eps / step_size_neg)
            return p.addcdiv(m, denom), state
        step = step_t.item()
        step_size = lr / (1 - beta1 ** step)
        denom = (_sqrt(v) / (1 - beta2 ** step) ** 0.5).add(eps)
        if isinstance(step_size, _Number):
            return p.addcdiv(m, denom, value=-step_size), state
        return p + (-step_size) * m / denom, state  # addcdiv's kernel order: (value * t1) / t2


class FunctionalRule(FunctionalOptimizer):
    """A twin whose update is a rule of :mod:`mlo.optim_rules` (``RMSprop``, ``Adagrad``,
    ``Adamax``, ``NAdam``, ``RAdam``, ``Adadelta``, ``ASGD``): one subclass per torch
    class, e.g. ``FunctionalRMSprop``, with ``torch_types`` that class and ``rule`` its
    update. Hyperparameters and state keys are torch's; any number hyperparameter
    (``lr``, ``weight_decay``, ``eps``, ``alpha``, ``momentum``, ``betas`` entries,
    ``lr_decay``, ``momentum_decay``, ``rho``, ``lambd``) may be a 0-dim tensor.
    """

    rule = None

    def _update(self, p, g, state, group):
        return self.rule(p, g, state, group)


_RULE_TWINS = {cls: type(f"Functional{cls.__name__}", (FunctionalRule,), {
    "torch_types": (cls,), "rule": staticmethod(fn), "__module__": __name__,
    "__doc__": f"Differentiable ``torch.optim.{cls.__name__}`` (:func:`mlo.optim_rules.{fn.__name__}`)."})
    for cls, fn in RULES.items()}


def functional_optimizer(optimizer: torch.optim.Optimizer, params: list[Tensor]) -> FunctionalOptimizer:
    """Alias of :meth:`FunctionalOptimizer.from_torch`."""
    return FunctionalOptimizer.from_torch(optimizer, params)
