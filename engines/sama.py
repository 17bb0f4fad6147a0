"""SAMA: a finite-difference hypergradient adapted to the lower optimizer.

SAMA (Choe et al., 2023, "Making Scalable Meta Learning Practical") starts from
the implicit-function-theorem formula, replaces the inverse Hessian by the
identity, but keeps the Jacobian of the lower optimizer's update with respect to
the gradient it was given. For a lower problem stepping ``θ ← θ − η r(g)``::

    (dθ*/dx)ᵀ v ≈ −∂²_{xθ} f · u,      u = η · (∂r/∂g) v,
                ≈ −[∇x f(θ + εu, x) − ∇x f(θ − εu, x)] / (2ε),
    ε = alpha / ‖u‖,

a central difference (two forwards, one backward of ``f(θ+εu) − f(θ−εu)``) at
the current iterate ``θ = lower.params``. ``∂r/∂g`` is diagonal:

* Adam / AdamW, with the state the last step left (``m`` = ``exp_avg``,
  ``s`` = ``exp_avg_sq``) and the gradient ``g`` that step fed to the moments::

      D = ∂(m/√s)/∂g = ((1−β1) s − (1−β2) g m) / (√s + ε_adam)³
        = ((1−β1) β2 s_old − β1 (1−β2) g m_old) / (√s + ε_adam)³,
      m_old = (m − (1−β1) g)/β1,   s_old = (s − (1−β2) g²)/β2,

  with ``ε_adam`` folded into the cube and no bias correction, as Betty's
  ``precondition_adam`` (torch's factor ``√(1−β2ᵗ)/(1−β1ᵗ)`` tends to 1). The
  first form is used here: it is the same number without dividing by ``β1``/``β2``
  (``β1 = 0`` or ``β2 = 0`` need no special case). ``u = η_i · D ⊙ v`` with each
  tensor's own group learning rate ``η_i`` (per-group rates are honoured).
* SGD: ``u = v`` — the identity, without ``η``, as Betty's ``precondition_sgd``
  (so a Betty port gives the same numbers). Then SAMA is
  ``finite_difference`` with ``epsilon=alpha``; ``finite_difference`` with
  ``scale_by_lr=True`` is the ``η``-scaled variant.

Choices (each refused case is an error, never a silent zero):

* **Before the lower's first update** an Adam lower has no moments and no last
  gradient, so ``∂r/∂g`` does not exist: ``ValueError`` naming ``lower.label``.
  Betty silently uses zeros there, which gives a hypergradient of exactly 0 —
  indistinguishable from a converged upper. The engine updates an upper only
  after its lowers' steps, so this only fires on e.g. ``engine.gradient()``
  before the first step or right after loading a checkpoint. SGD needs no state
  and works at any time.
* **A tensor without a gradient at the lower's last update** (a parameter that step's
  loss did not use: ``torch.optim`` skipped it, so the step did not depend on a
  gradient for it) while other tensors had one: ``D = 0`` for that tensor (``u_i = 0``).
* **Optimizer types** by class name (``lower.optimizer[i]["type"]``): ``SGD``,
  ``Adam``, ``AdamW``. Anything else — including a subclass under another name,
  whose update may differ — is a ``ValueError`` naming the type (Betty treats
  any class with "adam" in its name as Adam and any other as SGD). ``amsgrad`` and
  ``maximize`` are refused too: the formula is the Jacobian of plain Adam's
  minimizing step.
* **Coupled weight decay** (``Adam(weight_decay=wd)``, not decoupled): torch fed
  ``g + wd·θ_prev`` to the moments, not the applied gradient ``g``; ``θ_prev`` is
  recovered by undoing the last step, ``θ_prev = θ + η/(1−β1ᵗ) · m / (√s/√(1−β2ᵗ) + ε)``
  (exact while the group's ``lr`` is the one that step used; after a scheduler
  changed it, approximate — as is ``η`` itself, the group's current rate, as in
  Betty). AdamW's decoupled decay does not enter the moments.

The perturbed parameters ``θ ± εu`` are new tensors; nothing is edited in place.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .base import Lower, check_bool, check_number, register
from .finite_difference import central_difference

__all__ = ["sama"]

Tensors = Tuple[Tensor, ...]

_TYPES = ("SGD", "Adam", "AdamW")


def _check(*, alpha: float = 1.0, create_graph: bool = False) -> None:
    check_number("sama", "alpha", alpha)
    check_bool("sama", "create_graph", create_graph)


def _who(lower: Lower) -> str:
    return f"{lower.label}: " if lower.label else ""


def _scale(lower: Lower, i: int, opt: Mapping[str, Any]) -> Optional[Tensor]:
    """``η_i · ∂r/∂g`` for tensor ``i`` (elementwise), or ``None`` for the identity."""
    kind = opt.get("type")
    if kind not in _TYPES:
        raise ValueError(f"{_who(lower)}sama supports the lower optimizers {list(_TYPES)} "
                         f"(torch.optim classes, by name), got {kind!r}; use finite_difference, "
                         f"neumann or cg for other optimizers")
    if opt.get("maximize", False):
        raise ValueError(f"{_who(lower)}sama: the lower {kind} has maximize=True; SAMA's update "
                         f"Jacobian assumes a minimizing step")
    if kind == "SGD":
        return None
    if opt.get("amsgrad", False):
        raise ValueError(f"{_who(lower)}sama: the lower {kind} has amsgrad=True; SAMA's update "
                         f"Jacobian is that of plain Adam (use amsgrad=False)")
    state, g = opt.get("state") or {}, opt.get("grad")
    if g is None and any(o.get("grad") is not None for o in lower.optimizer):
        return torch.zeros_like(lower.params[i])      # skipped at the last step: D = 0
    if g is None or "exp_avg" not in state or "exp_avg_sq" not in state:
        raise ValueError(
            f"{_who(lower)}sama needs the state of the lower's last {kind} update (its moments and "
            f"the gradient it applied), and there is none yet: the lower has not been updated by "
            f"the engine since it was built or loaded. Take a lower step first.")
    b1, b2 = (float(b) for b in opt["betas"])
    eps, lr = float(opt["eps"]), float(opt["lr"])
    m, s = state["exp_avg"].detach(), state["exp_avg_sq"].detach()
    with torch.no_grad():
        g = g.detach()
        wd = float(opt.get("weight_decay", 0.0))
        if wd != 0.0 and not opt.get("decoupled_weight_decay", kind == "AdamW"):
            # The moments saw g + wd·θ_prev: undo torch's step to recover θ_prev.
            t = float(state["step"])
            denom = s.sqrt() / math.sqrt(1.0 - b2 ** t) + eps
            prev = lower.params[i].detach() + (lr / (1.0 - b1 ** t)) * m / denom
            g = g + wd * prev
        d = ((1.0 - b1) * s - (1.0 - b2) * g * m) / (s.sqrt() + eps) ** 3
        return lr * d


@register("sama", check=_check, second_order=False, needs=("optimizer",))
def sama(lower: Lower, v: Sequence[Tensor], *, alpha: float = 1.0, create_graph: bool = False) -> Tensors:
    """``(dθ*/dx)ᵀ v ≈ −[∇x f(θ+εu, x) − ∇x f(θ−εu, x)] / (2ε)``, ``u = η D ⊙ v``, ``ε = alpha/‖u‖``.

    Args:
        lower: the lower problem (``params`` = ``θ``, ``inputs`` = ``x``) with
            ``optimizer`` filled (the engine does; see :class:`engines.base.Lower`).
        v: cotangent on ``lower.params``, one tensor per parameter.
        alpha: the norm of the perturbation ``εu`` (Betty's ``darts_adam_alpha``,
            later ``sama_adam_alpha``; default 1.0 as Betty's).
        create_graph: keep the graph of the result (differentiable w.r.t.
            ``params``, ``inputs`` and ``v``; the optimizer state is a constant).

    Returns:
        One tensor per ``lower.inputs``; detached unless ``create_graph``.

    Raises:
        ValueError: no optimizer view, an unsupported optimizer, or an Adam lower
            before its first update (see the module docstring).
    """
    _check(alpha=alpha, create_graph=create_graph)
    v = tuple(v)
    if len(v) != len(lower.params):
        raise ValueError(f"v has {len(v)} tensors, lower.params has {len(lower.params)}")
    if lower.optimizer is None:
        raise ValueError(f"{_who(lower)}sama needs lower.optimizer (the lower optimizer's "
                         f"hyperparameters, state and last gradient); mlo.Engine fills it, a direct "
                         f"call must pass Lower(optimizer=...)")
    if len(lower.optimizer) != len(v):
        raise ValueError(f"lower.optimizer has {len(lower.optimizer)} entries, lower.params has {len(v)} tensors")
    scales = [_scale(lower, i, opt) for i, opt in enumerate(lower.optimizer)]
    u = tuple(t if s is None else s * t for s, t in zip(scales, v))
    return central_difference(lower, u, alpha, 1.0, create_graph, method="sama", option="alpha",
                              symbol="u", advice="(Betty: 1.0)")
