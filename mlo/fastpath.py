"""Fast paths: exact shortcuts around three pieces of torch machinery, behind one switch.

The engine does three small things on every update whose plain form goes through
general-purpose torch machinery. Each has a fast variant here that computes the same
values bit for bit, and is taken only where that is guaranteed:

- :func:`sgd_step` — an in-place ``torch.optim.SGD`` step without ``optimizer.step()``
  (plain path: ``p.grad = g; optimizer.step()``, done by the caller);
- :class:`Slots` — running a module with other tensors in place of its parameters
  without ``torch.func.functional_call`` (plain path: ``functional_call``);
- :func:`norms` — an update's loss and gradient norms with the fewest reductions and
  host reads (plain path: each tensor's norm read on its own, in ``mlo.guard``).

The fast variants are cheaper per call (the measurements are in
``docs/benchmarks.md``, "Engine v2 overhead"); they never change a result.

The switch. :func:`enabled` / :func:`set_enabled` and the context manager
:func:`disabled` turn all three off or on together, for the whole process (not per
thread); the environment variable ``MLO_FAST_PATHS=0`` turns them off from the start
(read once, at import). With the switch off the SGD step is always ``torch.optim``'s,
the module call is always ``functional_call`` and the norms take one simple code path;
``tests/test_fastpath.py`` runs full engines both ways and compares every parameter,
optimizer state and recorded norm with ``torch.equal``.

Torch internals. Two of the fast paths must look at torch-private attributes (the
optimizer's step hooks, a module's parameter dictionary); all such reads go through
:func:`_torch_private`, which names each attribute and why, and returns ``None`` when a
torch version lacks it — the fast path is then not taken, so a future torch can make
us slower but not wrong. (:func:`_no_step_hooks`, run on every SGD step, reads the four
hook tables with that function's check written out.)

Per-call cost. These run on every update, so their checks are written with as few
Python calls as they can be (loops rather than ``all``/``any`` over generators, which
cost a call per element; ``benchmarks/call_count.py`` counts them).
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.utils import parametrize
from torch.optim import optimizer as _torch_optimizer

from engines.base import grad_mode

__all__ = ["enabled", "set_enabled", "disabled", "sgd_step", "Slots", "distinct_slots", "norms", "combine_norms"]


# ===================================================================== the switch
_OFF, _ON = ("0", "false", "no", "off"), ("1", "true", "yes", "on", "")


def _from_environment() -> bool:
    """The switch's initial state: ``MLO_FAST_PATHS`` (unset: on)."""
    raw = os.environ.get("MLO_FAST_PATHS", "1")
    value = raw.strip().lower()
    if value in _OFF:
        return False
    if value in _ON:
        return True
    raise ValueError(f"environment variable MLO_FAST_PATHS={raw!r}: expected 0 (fast paths off) or 1 (on)")


_enabled = _from_environment()


def enabled() -> bool:
    """Whether the fast paths are on."""
    return _enabled


def set_enabled(on: bool) -> bool:
    """Turns all fast paths on or off (process-wide); returns the previous setting."""
    global _enabled
    if not isinstance(on, bool):
        raise TypeError(f"mlo.fastpath.set_enabled expects True or False, got {on!r}")
    before, _enabled = _enabled, on
    return before


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """``with mlo.fastpath.disabled():`` — the plain paths inside, the previous setting after."""
    before = set_enabled(False)
    try:
        yield
    finally:
        set_enabled(before)


# ===================================================================== torch internals
# Every torch-private attribute a fast path reads, and why. Each is read only here.
_PRIVATE = {
    # torch.optim.Optimizer instances: the step hooks registered on this optimizer
    # (register_step_pre_hook / register_step_post_hook). step() runs them; the in-place
    # SGD step would not, so it is taken only when both are empty.
    "_optimizer_step_pre_hooks": dict,
    "_optimizer_step_post_hooks": dict,
    # the module torch.optim.optimizer: hooks registered for every optimizer
    # (register_optimizer_step_pre_hook / ..._post_hook); same reason.
    "_global_optimizer_pre_hooks": dict,
    "_global_optimizer_post_hooks": dict,
    # torch.nn.Module instances: the dictionary behind a module's parameter attributes.
    # functional_call substitutes a tensor by assigning its entry; Slots assigns the
    # same entry directly.
    "_parameters": dict,
}


def _torch_private(obj: Any, name: str) -> Optional[dict]:
    """``obj.<name>`` for one of the torch-private attributes listed in ``_PRIVATE``;
    ``None`` when this torch has no such attribute or it is not what we expect (the
    caller then takes the plain path)."""
    value = getattr(obj, name, None)
    return value if isinstance(value, _PRIVATE[name]) else None


def _no_step_hooks(opt: torch.optim.Optimizer) -> bool:
    """Whether no step hook (the optimizer's or a global one) is registered; ``False``
    when torch's hook tables cannot be read (:func:`_torch_private`'s check, inlined:
    this runs on every SGD step)."""
    for owner, name in ((opt, "_optimizer_step_pre_hooks"), (opt, "_optimizer_step_post_hooks"),
                        (_torch_optimizer, "_global_optimizer_pre_hooks"),
                        (_torch_optimizer, "_global_optimizer_post_hooks")):
        table = getattr(owner, name, None)
        if not isinstance(table, _PRIVATE[name]) or table:
            return False
    return True


# ===================================================================== 1. the SGD step
def _sgd_plan(opt: torch.optim.SGD, params: Sequence[Tensor], grads: Sequence[Optional[Tensor]]):
    """``[(group, params, grads)]`` in the optimizer's order, or ``None`` when ``step()``
    would see something else (a tensor not in the optimizer, a hand-set ``.grad``)."""
    groups = opt.param_groups
    if len(groups) == 1 and len(groups[0]["params"]) == len(params):
        for a, b in zip(groups[0]["params"], params):
            if a is not b:
                break
        else:
            return [(groups[0], params, grads)]      # (the usual case: one group, in order)
    by_id = {id(p): g for p, g in zip(params, grads)}
    plan, n = [], 0
    for group in groups:
        gs = []
        for p in group["params"]:
            if id(p) in by_id:
                n += 1
            elif p.grad is not None:
                return None                  # (a gradient set by hand: step() would use it)
            gs.append(by_id.get(id(p)))      # (None: not passed, or no gradient: skipped)
        plan.append((group, group["params"], gs))
    return plan if n == len(by_id) else None  # (a tensor not in the optimizer: let torch say so)


def _single_tensor_case(plan) -> bool:
    """Whether ``step()`` would run torch's single-tensor SGD on plain-number settings."""
    for group, ps, gs in plan:
        if group.get("foreach") or group.get("fused") or group.get("differentiable") or \
                isinstance(group["lr"], Tensor) or isinstance(group["weight_decay"], Tensor) or \
                isinstance(group["momentum"], Tensor) or isinstance(group["dampening"], Tensor):
            return False
        for p, g in zip(ps, gs):
            if g is not None and (not p.is_cpu or g.is_sparse or p.dtype.is_complex):
                return False
    return True


def sgd_step(opt: torch.optim.Optimizer, params: Sequence[Tensor], grads: Sequence[Optional[Tensor]]) -> bool:
    """``params[i] ← SGD step with gradient grads[i]`` in place, exactly as ``opt.step()``
    with ``params[i].grad = grads[i]`` would do it; ``False`` (nothing done) where that is
    not guaranteed — the caller then takes the plain path (``.grad`` + ``opt.step()``).

    Taken when: the switch is on; ``opt`` is a ``torch.optim.SGD`` itself (not a subclass)
    whose ``step`` is not replaced on the instance (an LR scheduler or a user wraps it
    there); no step hooks, its own or global (:func:`_no_step_hooks`); no AMP grad scale
    (``grad_scale``/``found_inf``); every tensor passed belongs to the optimizer and every
    parameter not passed has no ``.grad``; every group has no ``foreach``, ``fused`` or
    ``differentiable`` and plain-number ``lr``, ``weight_decay``, ``momentum``,
    ``dampening``; every parameter with a gradient is a real CPU tensor with a dense one.

    Why it equals ``step()``: under those conditions ``step()`` calls
    ``torch.optim.sgd._single_tensor_sgd`` (foreach is chosen only for accelerator
    tensors), and the loop below is that function's operations, in its order, on the same
    tensors, writing the momentum buffers to the same ``opt.state`` entries. The rest of
    ``step()`` — a profiler range, the (empty) hooks, grad mode off, collecting the groups
    — changes no value. A ``None`` gradient leaves its parameter and its momentum buffer
    untouched, as ``step()`` skips a parameter whose ``.grad`` is ``None``.
    """
    if not _enabled or type(opt) is not torch.optim.SGD or "step" in opt.__dict__ or not _no_step_hooks(opt) \
            or getattr(opt, "grad_scale", None) is not None or getattr(opt, "found_inf", None) is not None:
        return False
    plan = _sgd_plan(opt, params, grads)
    if plan is None or not _single_tensor_case(plan):
        return False
    with grad_mode(False):              # (cheaper than `with torch.no_grad()`)
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


# ===================================================================== 2. the module call
class _Method(nn.Module):
    """Runs ``module.<method>`` as ``forward``, so ``functional_call`` can run any method."""

    def __init__(self, module: nn.Module, method: str):
        super().__init__()
        self.m = module
        self.method = method

    def forward(self, *args, **kwargs):
        return getattr(self.m, self.method)(*args, **kwargs)


def _resolve(module: nn.Module, names: Sequence[str], tensors: Sequence[Tensor]):
    """``[(owner's parameter dict, leaf name, tensor)]`` per name, or ``None`` when a name
    is not a plain parameter slot holding its tensor."""
    slots = []
    for name, t in zip(names, tensors):
        owner = module
        *path, leaf = name.split(".")
        for part in path:
            owner = getattr(owner, part, None)
            if not isinstance(owner, nn.Module):
                return None
        table = _torch_private(owner, "_parameters")
        if table is None or table.get(leaf) is not t:
            return None
        slots.append((table, leaf, t))
    return slots


def distinct_slots(module: nn.Module, names: Sequence[str], tensors: Sequence[Tensor]) -> List[Tuple[str, str]]:
    """``[(slot path, name)]``: every parameter slot of ``module`` that holds one of
    ``tensors``, each slot once, with the name (in ``names``) of the tensor it holds.

    A slot is one entry of one module object's parameters. A submodule reachable under
    two paths (``nn.Sequential(proj, act, proj)``, or ``self.a = self.b = lin``) has its
    slots once, under its first path (``named_modules`` lists each module object once);
    one tensor assigned to two modules (tied weights) is in two slots, both listed, both
    mapped to that tensor's name. A name whose tensor no slot holds is kept as its own
    path (``functional_call`` then reports what it makes of it)."""
    name_of = {id(t): n for n, t in zip(names, tensors)}
    out, found = [], set()
    for path, mod in module.named_modules():
        for leaf, p in mod.named_parameters(recurse=False, remove_duplicate=False):
            name = name_of.get(id(p))
            if name is not None:
                out.append((f"{path}.{leaf}" if path else leaf, name))
                found.add(name)
    return out + [(n, n) for n in names if n not in found]


class Slots:
    """Runs ``module`` with other tensors in its parameter slots ``names`` (which hold
    ``tensors`` when the ``Slots`` is made); ``tied``: some tensor has two names (tied
    weights, or a submodule reachable under two paths).

    Every path substitutes each *slot* exactly once and restores it exactly once: the
    slots are found once, by :func:`distinct_slots` — a shared submodule's slots once, a
    tied tensor's every slot (each given the value of that tensor's name). Calling
    ``functional_call(..., tie_weights=True)`` instead would assign a shared submodule's
    slot once per path and restore it in the wrong order, leaving a substituted tensor in
    the module after the call.

    The fast path is taken when: the switch is on; the module has no tied weights and no
    ``torch.nn.utils.parametrize`` anywhere; every slot resolved, when the ``Slots`` was
    made, to an entry ``owner._parameters[leaf]`` holding the given tensor; and on this
    call every such entry still holds it (not edited since, not already swapped by an
    enclosing call). It assigns ``state[name]`` into each entry, runs, and restores the
    originals in ``finally``.

    Why it equals ``functional_call``: for such a module ``functional_call`` (torch's
    ``_reparametrize_module``) makes exactly this substitution — it assigns the same
    ``_parameters`` entries for the duration of the call and puts the originals back —
    and with no tied names, no parametrization and only parameter names given it does
    nothing else that a forward can see. Otherwise, and with the switch off, the call
    goes through ``functional_call`` itself, given one entry per distinct slot and
    ``tie_weights=False`` (the ties are already spelled out by the slots).
    """

    def __init__(self, module: nn.Module, names: Sequence[str], tensors: Sequence[Tensor], tied: bool):
        self.module, self.names, self.tied = module, list(names), tied
        self._pairs = distinct_slots(module, self.names, tensors)
        self._slots: Optional[List[Tuple[Dict[str, Any], str, Tensor]]] = None
        if not tied and not any(parametrize.is_parametrized(m) for m in module.modules()):
            by_name = dict(zip(self.names, tensors))
            self._slots = _resolve(module, [p for p, _ in self._pairs], [by_name[n] for _, n in self._pairs])

    def _by_slot(self, state: Mapping[str, Tensor], prefix: str = "") -> Dict[str, Tensor]:
        """``{slot path: state[name]}`` for ``functional_call``, one entry per distinct slot
        (a name missing from ``state``: its slots keep the module's own tensor, as
        ``functional_call`` leaves a name it is not given)."""
        return {prefix + path: state[name] for path, name in self._pairs if name in state}

    def run(self, fn: Callable, state: Mapping[str, Tensor], args: tuple, kwargs: dict,
            method: Optional[str] = None):
        """``fn(*args, **kwargs)`` with ``state[name]`` in each parameter slot; ``fn`` is
        the module or, with ``method``, its bound method of that name."""
        slots = self._slots
        if _enabled and slots is not None and _holding(slots):
            try:
                for (d, leaf, _), (_, name) in zip(slots, self._pairs):
                    d[leaf] = state[name]
                return fn(*args, **kwargs)
            finally:
                for d, leaf, t in slots:
                    d[leaf] = t
        if method is None:
            return functional_call(self.module, self._by_slot(state), args, kwargs, tie_weights=False)
        # functional_call runs forward only: a wrapper whose forward is the method
        return functional_call(_Method(self.module, method), self._by_slot(state, "m."),
                               args, kwargs, strict=False, tie_weights=False)


def _holding(slots: List[Tuple[Dict[str, Any], str, Tensor]]) -> bool:
    """Whether every slot still holds its tensor (not edited since, not swapped by an
    enclosing call)."""
    for d, leaf, t in slots:
        if d.get(leaf) is not t:
            return False
    return True


# ===================================================================== 3. the norms
def combine_norms(part: Sequence[float]) -> float:
    """The norm of a group from its tensors' norms, in double precision (inf when one is
    infinite, nan when one is nan). Both norm paths combine with it."""
    try:
        return math.sqrt(math.fsum([x * x for x in part]))
    except (OverflowError, ValueError):    # (fsum of inf and nan, or of -inf and inf)
        return math.nan if any(map(math.isnan, part)) else math.inf


def _read_each(ts: Sequence[Optional[Tensor]]) -> float:
    """A group's norm, each tensor's norm read on its own (``None`` is zeros: skipped)."""
    norm = torch.linalg.vector_norm
    return combine_norms([norm(t.detach() if t.requires_grad else t).item() for t in ts if t is not None])


def norms(loss: Tensor, groups: Sequence[Sequence[Optional[Tensor]]]) -> Optional[List[float]]:
    """``[loss, ‖group 0‖, ‖group 1‖, ...]`` as floats, or ``None`` with the switch off
    (the caller then reads every tensor's norm on its own: ``mlo.guard.update_norms``).

    ``groups`` is ``[total]`` or ``[total, own, hyper]`` (an update with paths). The plain
    path takes each group's tensors' norms (each in its own dtype, ``None`` skipped),
    reads each with ``.item()`` and combines them with :func:`combine_norms`. The fast
    variants, all taken with the switch on:

    - on the CPU, one group: that very computation, without the bookkeeping below;
    - on the CPU, the top of a hypergradient (no own gradient at all, and every total
      entry is the hypergradient's tensor or ``None``): the total's norm once, reused as
      the hypergradient's — the same tensors, and where the total has ``None`` the
      hypergradient holds zeros (the engine's ``combine_gradients`` makes it so), whose norm
      adds exactly 0 — and 0.0 for the own part (the plain path's empty combination);
    - otherwise: every distinct tensor normed once (a tensor in two groups — the total
      ``h`` where the own part is ``None`` — is the same tensor, so the same norm); on the
      CPU each norm read with ``.item()``, elsewhere all stacked and read at once (one
      host synchronisation; ``tolist`` and ``.item()`` give the same Python floats, and a
      norm widened to float64 to stack with others keeps its value exactly).

    Each variant feeds :func:`combine_norms` the same numbers in the same order, so the
    result is the plain path's bit for bit.
    """
    if not _enabled:
        return None
    cpu = loss.device.type == "cpu"
    n = len(groups)
    if cpu and n == 1:                     # the common update: its own gradient only
        return [loss.item(), _read_each(groups[0])]
    if cpu and n == 3 and _top_of_hypergradient(groups):
        h = _read_each(groups[0])          # the top of a hypergradient: total = hyper
        return [loss.item(), h, 0.0, h]
    return _distinct(loss, groups, cpu)


def _top_of_hypergradient(groups: Sequence[Sequence[Optional[Tensor]]]) -> bool:
    """Whether ``[total, own, hyper]`` has no own gradient at all and every total entry
    is the hypergradient's tensor or ``None``."""
    total, own, hyper = groups
    for o in own:
        if o is not None:
            return False
    for t, h in zip(total, hyper):
        if t is not h and t is not None:
            return False
    return True


def _distinct(loss: Tensor, groups: Sequence[Sequence[Optional[Tensor]]], cpu: bool) -> List[float]:
    """The general fast variant of :func:`norms`: each distinct tensor normed once."""
    norm = torch.linalg.vector_norm
    ns = [loss.detach()]
    at: Dict[int, int] = {}
    idx: List[int] = []          # per entry of the groups: its norm's index in ns (-1: zeros)
    for g in groups:
        for t in g:
            if t is None:
                idx.append(-1)
                continue
            j = at.get(id(t))
            if j is None:
                j = at[id(t)] = len(ns)
                ns.append(norm(t.detach() if t.requires_grad else t))
            idx.append(j)
    if cpu:
        flat = [n.item() for n in ns]
    else:
        dt, dev = ns[0].dtype, ns[0].device
        if any(n.dtype != dt or n.device != dev for n in ns):
            ns = [n.double().to(dev) for n in ns]
        flat = torch.stack(ns).tolist()
    out, i = [flat[0]], 0
    for g in groups:
        out.append(combine_norms([flat[j] for j in idx[i:i + len(g)] if j >= 0]))
        i += len(g)
    return out
