"""A plain update's in-place SGD step without ``torch.optim``'s per-call machinery.

``torch.optim.SGD.step()`` wraps its arithmetic in a profiler range, grad-mode and
hook handling, group re-collection and dispatch to a foreach/fused variant (~12 µs
a call for two tensors on the CPU, as much as the arithmetic of a 1k-parameter
problem). The engine steps every plain update, so for ``torch.optim.SGD`` it runs
the arithmetic of torch's single-tensor SGD directly, operation for operation —
the same values bit for bit and the same ``optimizer.state`` (momentum buffers).

It does so only where that is exactly what ``step()`` would do: an instance of
``torch.optim.SGD`` itself whose ``step`` is not wrapped on the instance (an LR
scheduler or a user patch wraps it there; torch's own class-level profiling wrapper
only opens a profiler range), no step hooks (its own or global), CPU tensors (where torch
picks the single-tensor variant), plain-number hyperparameters, no ``foreach``,
``fused`` or ``differentiable``, no AMP grad scaler. Otherwise
:func:`sgd_step` returns ``False`` and the engine calls ``optimizer.step()``.

(torch keeps its hooks in private attributes; when a torch version does not have
them, nothing is taken for granted and ``step()`` is called.)
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor
from torch.optim import optimizer as _torch_optimizer

from engines.base import grad_mode

__all__ = ["sgd_step"]


def _no_hooks(opt: torch.optim.Optimizer) -> bool:
    pre = getattr(opt, "_optimizer_step_pre_hooks", None)
    post = getattr(opt, "_optimizer_step_post_hooks", None)
    gpre = getattr(_torch_optimizer, "_global_optimizer_pre_hooks", None)
    gpost = getattr(_torch_optimizer, "_global_optimizer_post_hooks", None)
    return pre is not None and post is not None and gpre is not None and gpost is not None \
        and not (pre or post or gpre or gpost)


def sgd_step(opt: torch.optim.Optimizer, params: Sequence[Tensor], grads: Sequence[Optional[Tensor]]) -> bool:
    """``params[i] ← SGD step with gradient grads[i]`` in place, exactly as
    ``opt.step()`` with ``params[i].grad = grads[i]`` would; ``False`` (nothing done)
    when that cannot be guaranteed (see the module docstring). A ``None`` gradient
    leaves its parameter and its momentum buffer untouched, as ``step()`` skips a
    parameter whose ``.grad`` is ``None`` (no weight decay, no momentum step)."""
    if type(opt) is not torch.optim.SGD or "step" in opt.__dict__ or not _no_hooks(opt) \
            or getattr(opt, "grad_scale", None) is not None or getattr(opt, "found_inf", None) is not None:
        return False
    groups = opt.param_groups
    if len(groups) == 1 and len(groups[0]["params"]) == len(params) and \
            all(a is b for a, b in zip(groups[0]["params"], params)):
        plan = [(groups[0], params, grads)]          # (the usual case: one group, in order)
    else:
        by_id = {id(p): g for p, g in zip(params, grads)}
        plan, n = [], 0
        for group in groups:
            gs = []
            for p in group["params"]:
                if id(p) in by_id:
                    n += 1
                elif p.grad is not None:
                    return False          # (a gradient set by hand: step() would use it)
                gs.append(by_id.get(id(p)))      # (None: not passed, or no gradient: skipped)
            plan.append((group, group["params"], gs))
        if n != len(by_id):
            return False                  # a tensor not in the optimizer: let torch say so
    for group, ps, gs in plan:
        if group.get("foreach") or group.get("fused") or group.get("differentiable") or isinstance(group["lr"], Tensor) \
                or isinstance(group["weight_decay"], Tensor) or isinstance(group["momentum"], Tensor) \
                or isinstance(group["dampening"], Tensor):
            return False
        for p, g in zip(ps, gs):
            if g is not None and (not p.is_cpu or g.is_sparse or p.is_complex()):
                return False
    with grad_mode(False):              # (a `with torch.no_grad()` costs twice as much)
        for group, ps, gs in plan:        # torch.optim.sgd._single_tensor_sgd, in order
            lr, wd, momentum, maximize = group["lr"], group["weight_decay"], group["momentum"], group["maximize"]
            for p, g in zip(ps, gs):
                if g is None:
                    continue
                grad = -g if maximize else g
                if wd != 0:
                    grad = grad.add(p, alpha=wd)
                if momentum != 0:
                    state = opt.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = grad.detach().clone()
                    else:
                        buf.mul_(momentum).add_(grad, alpha=1 - group["dampening"])
                    grad = grad.add(buf, alpha=momentum) if group["nesterov"] else buf
                p.add_(grad, alpha=-lr)
    return True
