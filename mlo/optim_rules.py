"""The arithmetic of the differentiable optimizer twins (:mod:`mlo.optim`).

Each rule reproduces one ``torch.optim`` class's single-tensor (``foreach=False``)
update operation by operation, out of place::

    new_param, state = rule(param, grad, state, group)

``state`` is the parameter's state dict with torch's own keys (filled lazily as torch
does, its scalar tensors — ``step``, NAdam's ``mu_product``, ASGD's ``eta``/``mu`` — in
torch's dtype), ``group`` the hyperparameters of its param group. :data:`RULES` maps a
torch class to its rule; :class:`mlo.optim.FunctionalOptimizer` turns each into a twin.
Where torch updates a tensor in place the rule makes a new one with the same op and
operand order, so with number hyperparameters the results are bitwise torch's.
Hyperparameters may be 0-dim tensors (learnable); they enter the same ops
(``addcmul(y, a)`` for ``add(y, alpha=a)``, ``addcdiv(v * t1, t2)`` for
``addcdiv(t1, t2, value=v)``, float64 for what torch computes in Python floats).
Where torch takes ``sqrt`` of a moment that is exactly 0 (a graph-connected gradient
element that is 0), :func:`_sqrt`'s derivative there is 0, not inf, so hypergradients
stay finite. ``capturable`` groups (CUDA) follow the non-capturable arithmetic (equal
to rounding); NAdam's ``differentiable`` branch is reproduced (its op order differs).
"""
from __future__ import annotations

from typing import Callable, Dict

import torch
from torch import Tensor

__all__ = ["RULES"]

_Number = (int, float)
#: torch class -> ``rule(param, grad, state, group) -> (new_param, state)``.
RULES: Dict[type, Callable] = {}


def _axpy(x: Tensor, y: Tensor, a) -> Tensor:
    """``x + a * y`` with torch's rounding (``add(alpha=)`` for numbers, ``addcmul`` for tensors)."""
    return x.add(y, alpha=a) if isinstance(a, _Number) else x.addcmul(y, a)


def _sqrt(v: Tensor) -> Tensor:
    """``v.sqrt()`` for ``v >= 0``, bitwise, whose derivative at ``v == 0`` is 0, not inf.

    An element whose gradient is exactly 0 but graph-connected (e.g. a softmax key
    bias) has ``v = m = 0``: autograd's ``∂sqrt(v) = 1/(2·0) = inf`` meets the
    ``∂denom`` factor ``m = 0`` and ``inf·0`` turns every upstream derivative into NaN.
    The derivative of ``m/(sqrt(v)+eps)`` there is ``∂m/eps`` — the sqrt
    term contributes nothing — so take 0 for it. The inner ``where`` keeps ``sqrt``
    away from 0 so no inf is ever formed; derivatives of every order stay finite.
    (``v == 0`` and not ``v > 0``: a NaN ``v`` stays NaN, as in torch.)
    """
    zero = v == 0
    return torch.where(zero, 0.0, torch.where(zero, 1.0, v).sqrt())


def _nonzero(x) -> bool:
    """Whether a hyperparameter takes part (a tensor always does: its derivative counts)."""
    return not (isinstance(x, _Number) and x == 0)


def _ema_sq(v: Tensor, g: Tensor, a) -> Tensor:
    """torch's ``v.mul_(a).addcmul_(g, g, value=1 - a)``, also for a tensor ``a``."""
    if isinstance(a, _Number):
        return v.mul(a).addcmul(g, g, value=1 - a)
    return v.mul(a).addcmul((1 - a) * g, g)        # the kernel's (value * t1) * t2


def _addcdiv(x: Tensor, t1: Tensor, t2: Tensor, value) -> Tensor:
    """``x.addcdiv(t1, t2, value=value)``, also for a tensor ``value`` (same rounding)."""
    if isinstance(value, _Number):
        return x.addcdiv(t1, t2, value=value)
    return x.addcdiv(value * t1, t2)               # the kernel's (value * t1) / t2


def _number(t: Tensor):
    """torch's ``_get_value``: a Python float, or float64 if the scalar is graph-connected."""
    return t.double() if t.requires_grad else t.item()


def _scalar_dtype(group: dict):
    """torch's ``_get_scalar_dtype`` (float32 for fused kernels)."""
    fp64 = torch.get_default_dtype() == torch.float64
    return torch.float64 if fp64 and not group.get("fused") else torch.float32


def _step(state: dict, group: dict, p: Tensor, *init: str, on_device: bool = False, **scalars: float):
    """Lazy state (``step`` 0, ``scalars`` in the scalar dtype, zeros for ``init``) as
    torch creates it, then ``step += 1``; returns the new step as a Python float.
    Scalars live on the CPU unless fused/capturable (or ``on_device``: ASGD)."""
    if "step" not in state:
        dt = _scalar_dtype(group)
        dev = p.device if on_device or group.get("fused") or group.get("capturable") else "cpu"
        state["step"] = torch.tensor(0.0, dtype=dt, device=dev)
        for k, v in scalars.items():
            state[k] = torch.tensor(v, dtype=dt, device=dev)
        for k in init:
            state[k] = torch.zeros_like(p, memory_format=torch.preserve_format)
    elif not isinstance(state["step"], Tensor):     # old checkpoints store a number
        state["step"] = torch.tensor(float(state["step"]), dtype=_scalar_dtype(group))
    state["step"] = state["step"] + 1
    return state["step"].item()


def _grad(p: Tensor, g: Tensor, group: dict, decoupled: bool = False):
    """Sign (``maximize``) and weight decay: coupled into the gradient, or decoupled
    into the parameter (``p * (1 - lr * wd)``); returns ``(p, g)``."""
    wd = group["weight_decay"]
    g = -g if group["maximize"] else g
    if _nonzero(wd):
        if decoupled:
            p = p.mul(1 - group["lr"] * wd)
        else:
            g = _axpy(g, p, wd)
    return p, g


def _rule(cls):
    def register(fn):
        RULES[cls] = fn
        return fn
    return register


@_rule(torch.optim.RMSprop)
def rmsprop(p, g, state, group):
    """``torch.optim.RMSprop`` (``centered``, ``momentum``)."""
    lr, alpha, mom = group["lr"], group["alpha"], group["momentum"]
    use_mom = not isinstance(mom, _Number) or mom > 0
    _step(state, group, p, "square_avg", *(("momentum_buffer",) if use_mom else ()),
          *(("grad_avg",) if group["centered"] else ()))
    p, g = _grad(p, g, group)
    sq = state["square_avg"] = _ema_sq(state["square_avg"], g, alpha)
    if group["centered"]:
        ga = state["grad_avg"] = state["grad_avg"].lerp(g, 1 - alpha)
        avg = _sqrt(sq.addcmul(ga, ga, value=-1))
    else:
        avg = _sqrt(sq)
    avg = avg.add(group["eps"])
    if use_mom:
        buf = state.get("momentum_buffer")
        buf = torch.zeros_like(p) if buf is None else buf
        buf = state["momentum_buffer"] = buf.mul(mom).addcdiv(g, avg)
        return _axpy(p, buf, -lr), state
    return _addcdiv(p, g, avg, -lr), state


@_rule(torch.optim.Adagrad)
def adagrad(p, g, state, group):
    """``torch.optim.Adagrad`` (``lr_decay``, ``initial_accumulator_value``)."""
    if "step" not in state:     # (torch creates it in __init__; a fresh twin here)
        state["sum"] = torch.full_like(p, group["initial_accumulator_value"], memory_format=torch.preserve_format)
    step = _step(state, group, p)
    p, g = _grad(p, g, group)
    clr = group["lr"] / (1 + (step - 1) * group["lr_decay"])
    s = state["sum"] = state["sum"].addcmul(g, g, value=1)
    return _addcdiv(p, g, _sqrt(s).add(group["eps"]), -clr), state


@_rule(torch.optim.Adamax)
def adamax(p, g, state, group):
    """``torch.optim.Adamax``."""
    beta1, beta2 = group["betas"]
    step = _step(state, group, p, "exp_avg", "exp_inf")
    p, g = _grad(p, g, group)
    m = state["exp_avg"] = state["exp_avg"].lerp(g, 1 - beta1)
    u = state["exp_inf"] = torch.maximum(state["exp_inf"].mul(beta2), g.abs().add(group["eps"]))
    clr = group["lr"] / (1 - beta1 ** step)
    return _addcdiv(p, m, u, -clr), state


@_rule(torch.optim.NAdam)
def nadam(p, g, state, group):
    """``torch.optim.NAdam`` (``momentum_decay``, ``decoupled_weight_decay``, ``differentiable``)."""
    lr, (beta1, beta2), md = group["lr"], group["betas"], group["momentum_decay"]
    step = _step(state, group, p, "exp_avg", "exp_avg_sq", mu_product=1.0)
    bc2 = 1 - beta2 ** step
    p, g = _grad(p, g, group, group.get("decoupled_weight_decay", False))
    mu = beta1 * (1.0 - 0.5 * (0.96 ** (step * md)))
    mu_next = beta1 * (1.0 - 0.5 * (0.96 ** ((step + 1) * md)))
    mp = state["mu_product"]
    mp = state["mu_product"] = (mp * mu).to(mp.dtype)
    m = state["exp_avg"] = state["exp_avg"].lerp(g, 1 - beta1)
    v = state["exp_avg_sq"] = _ema_sq(state["exp_avg_sq"], g, beta2)
    denom = _sqrt(v.div(bc2)).add(group["eps"])
    if group.get("differentiable"):    # torch's op order for differentiable=True
        mp_next = mp * mu_next
        p = p.addcdiv(g * (-lr * (1.0 - mu) / (1.0 - mp)), denom)
        return p.addcdiv(m * (-lr * mu_next / (1.0 - mp_next)), denom), state
    mpv = _number(mp)
    mp_next = mpv * mu_next
    p = _addcdiv(p, g, denom, -lr * (1.0 - mu) / (1.0 - mpv))
    return _addcdiv(p, m, denom, (-lr * mu_next) / (1.0 - mp_next)), state


@_rule(torch.optim.RAdam)
def radam(p, g, state, group):
    """``torch.optim.RAdam`` (``decoupled_weight_decay``)."""
    lr, (beta1, beta2) = group["lr"], group["betas"]
    step = _step(state, group, p, "exp_avg", "exp_avg_sq")
    p, g = _grad(p, g, group, group.get("decoupled_weight_decay", False))
    m = state["exp_avg"] = state["exp_avg"].lerp(g, 1 - beta1)
    v = state["exp_avg_sq"] = _ema_sq(state["exp_avg_sq"], g, beta2)
    bc1, bc2 = 1 - beta1 ** step, 1 - beta2 ** step
    m_hat = m / bc1
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * step * (beta2 ** step) / bc2
    if rho_t > 5.0:
        rect = ((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5
        adaptive = (bc2 ** 0.5) / _sqrt(v).add(group["eps"])
        return p.add(m_hat * lr * adaptive * rect, alpha=-1.0), state
    return p.add(m_hat * lr, alpha=-1.0), state


@_rule(torch.optim.Adadelta)
def adadelta(p, g, state, group):
    """``torch.optim.Adadelta``."""
    rho, eps = group["rho"], group["eps"]
    _step(state, group, p, "square_avg", "acc_delta")
    p, g = _grad(p, g, group)
    sq = state["square_avg"] = _ema_sq(state["square_avg"], g, rho)
    delta = state["acc_delta"].add(eps).sqrt().div(sq.add(eps).sqrt()).mul(g)
    state["acc_delta"] = _ema_sq(state["acc_delta"], delta, rho)
    return _axpy(p, delta, -group["lr"]), state


@_rule(torch.optim.ASGD)
def asgd(p, g, state, group):
    """``torch.optim.ASGD``. The step uses the state's ``eta``, which torch recomputes from
    ``lr`` after every step (rounded to its scalar dtype): a learnable ``lr`` acts from the
    second step of a window that took over torch's state (from the first on fresh state)."""
    lr, lambd, alpha = group["lr"], group["lambd"], group["alpha"]
    if "step" not in state:
        dt = _scalar_dtype(group)
        state["eta"] = lr.to(p.device, dt) if isinstance(lr, Tensor) else torch.as_tensor(lr, dtype=dt, device=p.device)
        state["mu"] = torch.ones((), dtype=dt, device=p.device)
    step = _step(state, group, p, "ax", on_device=True)
    p, g = _grad(p, g, group)
    eta = _number(state["eta"])
    p = _axpy(p.mul(1 - lambd * eta), g, -eta)
    mu = state["mu"]
    state["ax"] = state["ax"].add(p.sub(state["ax"]).mul(mu)) if mu.item() != 1 else p
    new_eta = lr / ((1 + lambd * lr * step) ** alpha)
    new_eta = new_eta if isinstance(new_eta, Tensor) else torch.as_tensor(new_eta)   # (default dtype)
    state["eta"] = new_eta.to(state["eta"].device, state["eta"].dtype)
    state["mu"] = torch.as_tensor(1 / max(1, step - group["t0"])).to(mu.device, mu.dtype)
    return p, state
