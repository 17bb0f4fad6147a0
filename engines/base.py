"""Contracts shared by every hypergradient method.

A lower problem ``θ*(x) = argmin_θ f(θ, x)`` reads some upper variables ``x``.
Every method in this package computes the same thing — the vector-Jacobian
product of the lower problem's best response::

    vjp(v) = (dθ*/dx)ᵀ v

for a cotangent ``v`` on the lower parameters. A multilevel hypergradient is a
sum over paths of such products (``mlo.engine`` chains them); a bilevel
hypergradient is ``∂F/∂x + vjp(∂F/∂θ)``.

Methods are plain functions ``method(lower, v, **options) -> tuple[Tensor, ...]``
(one tensor per input; ``None`` for an input the result does not depend on when the
caller sets ``Lower.unused_as_none``) registered by name. They know nothing about
``mlo`` or ``problems``: a :class:`Lower` is tensors and one callable.

The method contract. Registration (:func:`register`) declares everything a caller
needs to know about a method — callers never test a method's name:

* ``window=False`` — *implicit at the current state*: the method evaluates
  ``lower.loss_fn`` at ``lower.params`` (implicit function theorem, finite
  differences, SAMA). The lower problem steps with its ``torch.optim`` optimizer.
* ``window=True`` — *steps through a differentiable window*: the caller takes the
  lower problem's optimizer steps out of place, keeps them in the autograd graph and
  hands the last iterate as ``lower.outputs`` (unrolled differentiation).
* ``second_order`` — whether the method differentiates gradients of the lower loss
  (callers then pick double-differentiable kernels).
* ``plain_backward`` — for window methods: whether, with the given options, the VJP
  is exactly reverse mode through the steps (callers may then fuse it into the upper's
  backward pass, or differentiate nested windows as one graph).
* ``needs`` — optional extra information the caller must fill in :class:`Lower`;
  today ``"optimizer"``: the lower optimizer's per-variable hyperparameters, state
  and last applied gradient (:attr:`Lower.optimizer`).

A new method is one module in this package (it is discovered and imported by
:func:`get`) whose function is decorated with :func:`register`.
"""
from __future__ import annotations

import inspect
import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

__all__ = ["Lower", "Method", "MethodInfo", "register", "get", "info", "available", "check_options",
           "zeros_like_all", "no_inputs_reached", "fill_unreached", "detach_all", "grad_mode",
           "check_bool", "check_number", "check_int"]

Tensors = Tuple[Tensor, ...]


@dataclass
class Lower:
    """Everything a hypergradient method may use about one lower problem.

    Attributes:
        params: ``θ``, the current lower iterate. Leaf tensors with
            ``requires_grad=True`` (implicit and finite-difference methods
            differentiate ``loss_fn`` at these values).
        inputs: ``x``, the upper variables the lower loss reads. Leaf tensors
            with ``requires_grad=True``; the result has one tensor per input.
        loss_fn: ``f(params, inputs) -> scalar``, the lower loss evaluated
            functionally (it closes over the lower problem's current batch).
        outputs: for unrolled methods only, ``θ_K`` — the lower iterate still
            connected by the autograd graph to ``inputs`` through the K
            differentiable optimizer steps taken since the window opened.
        lr: the inner learning rate ``η`` (finite differences may scale by it):
            a float, or one float per tensor of ``params`` (per-group rates).
        label: who this lower is, for warnings (e.g. ``"problem 'inner'"``).
        compute_dtype: the floating dtype the loss computes in when lower than the
            variables' (autocast: ``torch.bfloat16`` under ``EngineConfig(precision="bf16")``);
            ``None``: the variables' own dtype. Finite differences warn when their
            perturbation is below what it resolves.
        optimizer: for methods registered with ``needs=("optimizer",)``: the lower
            optimizer as the last update left it, one read-only mapping per tensor of
            ``params`` with its group's hyperparameters (``"lr"``, ``"betas"``,
            ``"eps"``, ...), its state under ``"state"`` (torch's keys, e.g.
            ``"exp_avg"``, ``"exp_avg_sq"``, ``"step"``), the last gradient applied
            under ``"grad"`` (``None`` before the first update) and the optimizer's
            class name under ``"type"`` (e.g. ``"Adam"``).
        unused_as_none: ``True``: the result has ``None`` instead of zeros for an input
            it does not depend on structurally — autograd finds no path from the input
            to the result: the lower loss never reads it; a window's steps never read
            it; every input of a ``first_order`` unroll; for the implicit methods also
            an input read only in a term without ``params`` (the finite differences
            reach such an input through ``f(θ+εv) − f(θ−εv)`` and give zeros). A caller that keeps ``torch.optim``'s "no
            gradient" semantics sets it (``mlo.Engine`` does: a variable that no path
            reaches gets no hypergradient, so no weight decay or momentum step is
            applied to it when it has no gradient of its own either). Built-in methods
            honour it; a method that cannot tell may return zeros. Default ``False``:
            one tensor per input, zeros where unused.
        diagnostics: a dict the method fills with what it measured about its own run
            (plain numbers, already on the host), or ``None``: the caller does not ask.
            ``cg`` writes ``cg_iterations`` and ``cg_residual`` (the final relative
            residual ``‖r‖/‖v‖``), ``neumann`` writes ``neumann_last_term``
            (``‖(I − αH)^K α v‖ / ‖α v‖``). ``mlo`` hands them to the lower's
            ``engine.records``. A method that measures nothing leaves it alone.
        solve_index: which solve of this lower this is, for methods whose host-side
            checks are amortised (``neumann``'s growth check, ``cg``'s final-residual
            report: on indices below 10 and every 100th). ``mlo`` passes the lower's
            step count (deterministic, and the same in a resumed run); ``None``: the
            solves are counted per ``label`` in the process.
    """

    params: Tensors
    inputs: Tensors
    loss_fn: Callable[[Tensors, Tensors], Tensor]
    outputs: Optional[Tensors] = None
    lr: Union[float, Sequence[float]] = 1.0
    label: str = ""
    optimizer: Optional[Sequence[Mapping[str, Any]]] = None
    compute_dtype: Optional[torch.dtype] = None
    unused_as_none: bool = False
    diagnostics: Optional[Dict[str, Any]] = None
    solve_index: Optional[int] = None


def check_bool(method: str, name: str, value: Any) -> None:
    """``value`` must be ``True`` or ``False`` (a string such as ``"false"`` is not)."""
    if not isinstance(value, bool):
        raise ValueError(f"{method}: {name} must be a bool (True or False), got {value!r} "
                         f"({type(value).__name__})")


def check_number(method: str, name: str, value: Any, *, low: float = 0.0, open_low: bool = True) -> None:
    """``value`` must be a finite real number (not a bool) ``> low`` (``>= low`` unless ``open_low``)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) \
        and (value > low if open_low else value >= low)
    if not ok:
        bound = f"> {low:g}" if open_low else f">= {low:g}"
        kind = "" if isinstance(value, numbers.Real) and not isinstance(value, bool) else \
            f" ({type(value).__name__})"
        raise ValueError(f"{method}: {name} must be a number {bound}, got {value!r}{kind}"
                         + (" (not finite)" if isinstance(value, float) and not math.isfinite(value) else ""))


def check_int(method: str, name: str, value: Any, *, low: int = 0, none: bool = False) -> None:
    """``value`` must be an integer (not a bool) ``>= low`` (or ``None`` when ``none``)."""
    if none and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{method}: {name} must be an integer >= {low}{' or None' if none else ''}, "
                         f"got {value!r}")


Method = Callable[..., Tensors]
NEEDS = ("optimizer",)


@dataclass(frozen=True)
class MethodInfo:
    """One registry entry: the function and what it declares (see the module docstring)."""

    name: str
    fn: Method
    check: Optional[Callable[..., None]] = None
    second_order: bool = True
    window: bool = False
    needs: Tuple[str, ...] = ()
    plain_backward: Optional[Callable[..., bool]] = None

    def is_plain_backward(self, options: Mapping[str, Any]) -> bool:
        """Whether, with ``options``, the method's VJP is exactly one reverse-mode pass
        through ``lower.outputs`` — so a caller may fuse it into the upper's backward."""
        return self.plain_backward is not None and bool(self.plain_backward(**dict(options)))


_REGISTRY: Dict[str, MethodInfo] = {}


def register(name: str, check: Optional[Callable[..., None]] = None, *, second_order: bool = True,
             window: bool = False, needs: Sequence[str] = (),
             plain_backward: Optional[Callable[..., bool]] = None):
    """Decorator registering ``fn`` as hypergradient method ``name``.

    Args:
        name: the registry name.
        check: optional ``check(**options)`` raising ``ValueError`` for invalid
            option *values* (names are checked against ``fn``'s signature).
        second_order: whether the method differentiates through gradients of the
            lower loss (Hessian-vector products, backward through unrolled steps).
            Callers then evaluate the loss with double-differentiable kernels
            (e.g. the math path of scaled-dot-product attention).
        window: the method differentiates through the lower problem's steps
            (``lower.outputs``), which the caller must take out of place; otherwise
            it works at the current iterate (``lower.params`` and ``lower.loss_fn``).
        needs: extra fields of :class:`Lower` the caller must fill (``"optimizer"``).
        plain_backward: for window methods, ``plain_backward(**options) -> bool``: whether
            with those options the VJP is exactly reverse mode through ``lower.outputs``
            (then a caller may run it inside the upper's own backward pass).
    """
    needs = tuple(needs)
    bad = [n for n in needs if n not in NEEDS]
    if bad:
        raise ValueError(f"register({name!r}): unknown need(s) {bad}; known: {list(NEEDS)}")

    def deco(fn: Method) -> Method:
        if name in _REGISTRY:
            raise ValueError(f"hypergradient method {name!r} is already registered")
        _REGISTRY[name] = MethodInfo(name, fn, check, bool(second_order), bool(window), needs,
                                     plain_backward)
        return fn

    return deco


def info(name: str) -> MethodInfo:
    """The registry entry of method ``name`` (clear error listing the choices)."""
    _load_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(
            f"unknown hypergradient method {name!r}; available: {sorted(_REGISTRY)}"
        ) from None


def get(name: str) -> Method:
    """Returns the method registered as ``name`` (clear error listing the choices)."""
    return info(name).fn


def check_options(name: str, options: Mapping[str, Any]) -> None:
    """Validates ``options`` for method ``name`` without running it.

    Raises:
        KeyError: unknown method.
        TypeError: an option the method does not take (the message lists those it takes).
        ValueError: an option value the method's validator rejects.
    """
    fn = get(name)
    params = inspect.signature(fn).parameters
    takes = [k for k, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(takes))
    if unknown:
        raise TypeError(f"method {name!r} has no option(s) {unknown}; its options: {takes}")
    check = info(name).check
    if check is not None:
        check(**options)


def available() -> Tuple[str, ...]:
    """Names of all registered methods."""
    _load_builtin()
    return tuple(sorted(_REGISTRY))


def zeros_like_all(ts: Sequence[Tensor]) -> Tensors:
    return tuple(torch.zeros_like(t) for t in ts)


def no_inputs_reached(lower: Lower) -> Tuple[Optional[Tensor], ...]:
    """A method's result when no input reaches it: ``None`` per input under
    ``lower.unused_as_none``, else zeros."""
    if lower.unused_as_none:
        return (None,) * len(lower.inputs)
    return zeros_like_all(lower.inputs)


def fill_unreached(lower: Lower, grads: Sequence[Optional[Tensor]]) -> Tuple[Optional[Tensor], ...]:
    """``autograd.grad(..., lower.inputs, allow_unused=True)``'s result as a method returns
    it: ``None`` entries kept under ``lower.unused_as_none``, else zeros."""
    if lower.unused_as_none:
        return tuple(grads)
    return tuple(torch.zeros_like(x) if g is None else g for g, x in zip(grads, lower.inputs))


class grad_mode:
    """``with grad_mode(on):`` — grad mode ``on`` inside, as ``torch.enable_grad()`` /
    ``torch.no_grad()``, at a fraction of their cost on the hot path (nothing is
    switched when it already is ``on``: the engine's case for ``True``)."""

    __slots__ = ("on", "prev")

    def __init__(self, on: bool):
        self.on = on

    def __enter__(self) -> None:
        self.prev = torch.is_grad_enabled()
        if self.prev != self.on:
            torch.set_grad_enabled(self.on)

    def __exit__(self, *exc) -> bool:
        if self.prev != self.on:
            torch.set_grad_enabled(self.prev)
        return False


def detach_all(ts: Sequence[Tensor]) -> Tensors:
    """The tensors without autograd history (those that have none, and ``None`` entries,
    are returned as they are: a ``detach`` is an operator call each, on the hot path of
    every method)."""
    return tuple(t.detach() if t is not None and t.requires_grad else t for t in ts)


_LOADED = False


def _load_builtin() -> None:
    # Importing the modules runs their @register decorators.
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    import importlib
    import pkgutil
    from pathlib import Path

    # Every module of this package (a new method is a new file: no list to edit).
    for m in sorted(pkgutil.iter_modules([str(Path(__file__).parent)]), key=lambda m: m.name):
        if m.name not in ("base", "solvers") and not m.name.startswith("_"):
            importlib.import_module(f"{__package__}.{m.name}")
