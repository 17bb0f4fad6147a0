"""Chaining best-response VJPs along hypergradient paths.

For a problem ``U`` with loss ``F_U`` the engine computes::

    ∇_U F_U = ∂F_U/∂λ_U + Σ_{paths U -> ... -> U} J_{1}ᵀ J_{2}ᵀ ... J_{m}ᵀ ∂F_U/∂θ_m

where ``J_i`` is the best-response Jacobian of the i-th problem on the path with
respect to the variables of the problem before it (docs/design.md#paths).
Each ``J_iᵀ v`` is computed by that problem's own method (``config.method``), so
implicit methods can sit at a middle level and methods can differ per problem.

Instead of walking each path separately, vectors are accumulated per problem and
pushed once: first down the hierarchy through ``l2u`` reads, then up through ``u2l``
reads — exactly the paths of :class:`mlo.graph.Graph`. :func:`path_contribution`
walks one path alone, for per-path breakdowns. Pushing the sum once equals the sum
of the paths only for VJPs that are linear in the vector: unrolled (reverse mode),
Neumann, and CG run to convergence. Central finite differences (a step size scaled
by ``‖v‖``) and truncated CG are not linear in ``v``: for them the per-path terms
sum to the total only approximately (docs/methods.md#per-path-breakdown gives the measured gap).

Everything here works on a :class:`HypergradView` — the few things of an engine a
hypergradient needs — and never on the engine itself.

A *cotangent* is ``(state, vec)``: a vector ``vec`` on a problem's state tensors
``state`` (its iterates at the time they were read; ``None`` when that unrolled
window was truncated).

Implicit and finite-difference VJPs re-evaluate the lower loss (once for the
Hessian-vector products, twice for central differences), on the batches its
``ProblemConfig.implicit_batch`` names — its last batch, its data's next batch, or
the mean over its current window's batches (:func:`implicit_batches`;
docs/methods.md#which-batch-an-implicit-method-sees). Those evaluations are
not training steps and leave no trace: every problem's module buffers (e.g.
BatchNorm's ``running_mean``/``running_var``/``num_batches_tracked``, updated in
place by a forward in training mode) and the global RNG state are restored
afterwards (:func:`mlo.isolation.no_side_effects`), so buffers and random streams after N
iterations are those of the N training steps whatever the method.
"""
from __future__ import annotations

import dataclasses
import warnings
from collections import defaultdict
from typing import Any, Callable, Dict, List, Mapping, Optional, Protocol, Sequence, Set, Tuple, Union

import torch
from torch import Tensor

import engines.base as eb

from . import nonfinite
from .distributed import grad_average
from .isolation import no_side_effects, rng_state, set_rng_state
from .precision import compute_dtype
from .second_order import naming_second_order_errors, second_order_kernels
from .state import ReadContext, reading

__all__ = ["HypergradView", "hypergradient", "combine_gradients", "path_contribution", "best_response_vjp",
           "implicit_batches", "take_fresh_batches", "second_order_kernels", "naming_second_order_errors"]


class HypergradView(Protocol):
    """What the hypergradient layer reads of a running engine (the updater provides it).

    Attributes:
        problems: ``{name: Problem}``; graph: the :class:`mlo.graph.Graph`.
        data_parallel: whether losses are averaged over ``torch.distributed`` ranks.
        precision: ``EngineConfig.precision`` (the dtype implicit methods compute in).
    """

    problems: Mapping[str, Any]
    graph: Any
    data_parallel: bool
    precision: str

    def window(self, name: str) -> Any:
        """Problem ``name``'s open window (its reads this window), or ``None``."""

    def windowed(self, name: str) -> bool:
        """Whether problem ``name`` steps through windows."""

    def inner_lr(self, name: str) -> Union[float, tuple]:
        """Problem ``name``'s learning rate(s)."""

    def optimizer_view(self, name: str) -> List[Mapping[str, Any]]:
        """Problem ``name``'s optimizer as its last update left it."""

    def loss(self, P: Any, batch: Any) -> Tensor:
        """``P``'s scalar loss on ``batch``, as the engine evaluates it."""

    #: Whether non-finite results are traced to their origin (``nonfinite != "ignore"``).
    check_nonfinite: bool

    #: The origin traces of the current gradient's implicit best responses, run by the
    #: guard only when the update is non-finite (one host read less per best response
    #: on the good path; :mod:`mlo.nonfinite`).
    traces: List[Callable[[], None]]

    def note_method(self, name: str, diagnostics: Dict[str, Any]) -> None:
        """What problem ``name``'s method measured about its run
        (``engines.base.Lower.diagnostics``, e.g. ``{"cg_iterations": 7,
        "cg_residual": 3e-11}``), for its records."""


def _run_method(method, name: str, P, lower, v, opts):
    """Runs a best-response method; a missing higher derivative becomes an error
    that names the problem and the way out."""
    with naming_second_order_errors([name], [P.config.method]):
        return method(lower, v, **opts)


def _note_method(view, name: str, diagnostics: Dict[str, Any], override) -> None:
    """Hands what ``name``'s method reported (``Lower.diagnostics``) to the view's
    ``note_method``; nothing when the method reported nothing, or for an ``override``
    (a reference method is not the problem's own)."""
    if diagnostics and override is None:
        view.note_method(name, diagnostics)


Cot = Tuple[Optional[Dict[str, Tensor]], Dict[str, Tensor]]
Override = Optional[Tuple[str, Dict]]


def _add(acc: Dict[str, Tensor], vec: Dict[str, Tensor]) -> None:
    for k, t in vec.items():
        acc[k] = acc[k] + t if k in acc else t


def best_response_vjp(view: HypergradView, name: str, cots: Sequence[Cot], sources: Set[str],
                      override: Override = None) -> List[Tuple[str, Optional[Dict[str, Tensor]], Dict[str, Tensor]]]:
    """``J_{name, S}ᵀ v`` for every source ``S`` in ``sources`` that ``name`` reads.

    ``override = (method, options)`` replaces ``name``'s configured method; a window
    method's open window is then evaluated at its current iterate like any lower.

    Returns ``[(source, source_state, vec), ...]``.
    """
    P = view.problems[name]
    readable = sources & view.graph.reads[name]
    cots = [c for c in cots if c[1]]       # (a vector on no variable: a path reaching none)
    if not readable or not cots:
        return []
    method_name, opts = override if override is not None else (P.config.method, P.config.method_options)
    entry = eb.info(method_name)
    method = entry.fn
    opts = dict(opts)
    if entry.window and view.windowed(name):
        return _window_vjp(view, name, P, method, opts, cots, readable, override)
    return _implicit_vjp(view, name, P, entry, method_name, opts, cots, readable, override)


def _window_vjp(view: HypergradView, name: str, P, method, opts, cots: Sequence[Cot], readable: Set[str],
                override: Override) -> List[Tuple[str, Optional[Dict[str, Tensor]], Dict[str, Tensor]]]:
    """Unrolled: reverse mode from the iterates the cotangents sit on to the aliases
    this problem's steps read in its current window (none: the window has closed)."""
    win = view.window(name)
    if win is None:
        return []
    outs: Dict[int, Tuple[Tensor, Tensor]] = {}
    for state, vec in cots:
        if state is None:
            continue
        for k, t in state.items():
            if k in vec:
                key = id(t)
                outs[key] = (t, outs[key][1] + vec[k]) if key in outs else (t, vec[k])
    reads = [r for r in win.reads if r.source in readable]
    pairs = [(r, k, a) for r in reads for k, a in r.alias.items() if a.requires_grad]
    outs = {k: v for k, v in outs.items() if v[0].requires_grad}
    if not outs or not pairs:
        return []
    diagnostics: Dict[str, Any] = {}
    lower = eb.Lower(params=(), inputs=tuple(a for _, _, a in pairs), loss_fn=_no_loss,
                     outputs=tuple(t for t, _ in outs.values()), unused_as_none=True,
                     diagnostics=diagnostics)
    grads = _run_method(method, name, P, lower, tuple(v for _, v in outs.values()), opts)
    _note_method(view, name, diagnostics, override)
    result: Dict[int, Tuple[object, Dict[str, Tensor]]] = {}
    for (r, k, _), g in zip(pairs, grads):
        if g is not None:       # (None: the window's steps never reached this variable)
            result.setdefault(id(r), (r, {}))[1][k] = g
    return [(r.source, r.src_state, vec) for r, vec in result.values()]


def _implicit_vjp(view: HypergradView, name: str, P, entry, method_name: str, opts, cots: Sequence[Cot],
                  readable: Set[str], override: Override
                  ) -> List[Tuple[str, Optional[Dict[str, Tensor]], Dict[str, Tensor]]]:
    """Implicit / finite difference: the method evaluated at the current iterate, on the
    batches ``P.config.implicit_batch`` names (:func:`implicit_batches`), with every
    derivative of the loss averaged over ranks under data parallelism; a non-finite
    result is traced to its origin (:mod:`mlo.nonfinite`)."""
    method = entry.fn
    v: Dict[str, Tensor] = {}
    for _, vec in cots:
        _add(v, vec)
    names = P.param_names
    own = P.own_state()
    params = tuple(own[k].detach().requires_grad_() for k in names)
    vv = tuple(v[k] if k in v else torch.zeros_like(own[k]) for k in names)
    srcs = sorted(readable)
    src_states = {s: view.problems[s].own_state() for s in srcs}
    layout = [(s, k) for s in srcs for k in src_states[s]]
    inputs = tuple(src_states[s][k].detach().requires_grad_() for s, k in layout)
    batch, batches = implicit_batches(P)
    rng = rng_state()
    second = entry.second_order or bool(opts.get("create_graph"))
    data_parallel = view.data_parallel
    # one batch, or implicit_batch="window": the mean over the window's batches
    evaluate = (lambda: view.loss(P, batch)) if batches is None else (lambda: _mean_loss(view, P, batches))

    def loss_fn(ps, xs):
        if data_parallel:
            # Every derivative of the local loss w.r.t. ps and xs (gradients,
            # Hessian-vector products, mixed terms) is averaged over ranks: that of
            # the global-batch loss (mlo.distributed).
            ps, xs = tuple(grad_average(ps)), tuple(grad_average(xs))
        given: Dict[str, Dict[str, Tensor]] = defaultdict(dict)
        for (s, k), x in zip(layout, xs):
            given[s][k] = x

        def resolve(other):
            if other.name in given:
                return given[other.name]
            return {k: t.detach() for k, t in other.own_state().items()}

        # Same randomness (dropout, random masks) in every evaluation: HVPs and
        # finite differences need one deterministic function.
        set_rng_state(rng)
        ctx = reading(ReadContext(P, resolve, own=dict(zip(names, ps))))
        if second:
            with second_order_kernels(True), ctx:
                return evaluate()
        with ctx:
            return evaluate()


    lower = eb.Lower(params=params, inputs=inputs, loss_fn=loss_fn, lr=view.inner_lr(name),
                     label=f"problem {name!r}", compute_dtype=compute_dtype(view.precision),
                     optimizer=view.optimizer_view(name) if "optimizer" in entry.needs else None,
                     unused_as_none=True, diagnostics={}, solve_index=P.step_count)
    with no_side_effects(view.problems.values(), rng):
        grads = _run_method(method, name, P, lower, vv, opts)
    _note_method(view, name, lower.diagnostics, override)
    out: Dict[str, Dict[str, Tensor]] = defaultdict(dict)
    for (s, k), g in zip(layout, grads):
        if g is not None:           # (None: the best response does not depend on it)
            out[s][k] = g
    if view.check_nonfinite:    # traced only when the guard finds the update non-finite
        view.traces.append(lambda: _trace(view, name, P, entry, method_name, lower, vv, opts, grads,
                                          {s: out[s] for s in srcs}, loss_fn, params, rng))
    return [(s, src_states[s], out[s]) for s in srcs]


def _trace(view: HypergradView, name: str, P, entry, method_name: str, lower, vv, opts, grads,
           out: Dict[str, Dict[str, Tensor]], loss_fn, params, rng) -> None:
    """A best response's part in a non-finite update (:mod:`mlo.nonfinite`): nothing
    when its vectors ``grads`` are finite; otherwise it notes itself — or what the
    levels below it noted — as the origin, replaying the method with a recording loss
    to say which evaluation went non-finite. Run by the guard, in the order the best
    responses ran, before the optimizer step (the state is still the one they saw)."""
    if nonfinite.all_finite(grads):
        nonfinite.forget(view.problems, name, list(out))
        return

    def replay(recording):          # the method once more, its loss recording
        again = dataclasses.replace(lower, loss_fn=recording, diagnostics={})
        with no_side_effects(view.problems.values(), rng), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _run_method(entry.fn, name, P, again, vv, opts)
    nonfinite.found(view.problems, view.graph, name, method_name, vv, out,
                    lambda: nonfinite.replay_description(loss_fn, params, vv, replay,
                                                         entry.second_order, method_name))


def implicit_batches(P) -> Tuple[Any, Optional[List[Any]]]:
    """``(batch, batches)``: what an implicit or finite-difference method evaluates
    ``P``'s loss on (``ProblemConfig.implicit_batch``; docs/methods.md#which-batch-an-implicit-method-sees).

    * ``"last"``: ``P.last_batch`` — before ``P``'s first evaluation (``engine.gradient``
      before its first step) its next batch, left in place for that step.
    * ``"fresh"``: its next batch, peeked: it stays the next one until an update of a
      problem above consumes it (:func:`take_fresh_batches`), so every VJP of one
      hypergradient computation — and a report or the monitor's reference before the
      update — sees the same batch.
    * ``"window"``: ``batches`` = the current window's batches (the loss is their
      mean); an empty window (no applied update in it yet) falls back to ``"last"``.

    ``batches`` is ``None`` unless the loss is a mean over several batches.
    """
    mode = P.config.implicit_batch
    if mode == "fresh":
        return P.peek_batch(), None
    if mode == "window":
        batches = P.window_batches
        if len(batches) > 1:
            return None, list(batches)
        if batches:
            return batches[0], None
    batch = P.last_batch
    if batch is None and P.data is not None:
        # Never evaluated yet (engine.gradient before its first step): its next batch,
        # left in place for its first training step (the run is unchanged).
        batch = P.peek_batch()
    return batch, None


def _mean_loss(view: HypergradView, P, batches: Sequence[Any]) -> Tensor:
    """The mean of ``P``'s loss over ``batches``, in order (under one read context and
    one starting RNG state: one deterministic function of the variables)."""
    total = view.loss(P, batches[0])
    for b in batches[1:]:
        total = total + view.loss(P, b)
    return total / len(batches)


def take_fresh_batches(view: HypergradView, U: str) -> None:
    """After an update of ``U`` that computed its hypergradient (applied or skipped for
    non-finite values; not one that raised, whose retry must see the same batches):
    every problem on ``U``'s paths with ``implicit_batch="fresh"`` and an implicit
    method consumes the batch its VJPs evaluated (:func:`implicit_batches`), one per
    update of ``U``, counted in its ``batches_taken``."""
    for name in view.graph.path_nodes(U):
        P = view.problems[name]
        if P.config.implicit_batch == "fresh" and not view.windowed(name):
            P.next_batch()


def _no_loss(params, inputs):  # pragma: no cover - unrolled never evaluates the loss
    raise RuntimeError("the unrolled method does not evaluate the lower loss")


def hypergradient(view: HypergradView, U: str, direct: Sequence[Tuple[str, Cot]],
                  override: Override = None) -> Dict[str, Tensor]:
    """Sum over all paths of ``U``. ``direct`` holds ``(source, (state, ∂F_U/∂source))``
    for the reads of ``U``'s loss. Returns a vector on ``U``'s variables; a variable
    that no path reaches — structurally: no read of it on the path affects the lower
    iterates, the methods report it with ``Lower.unused_as_none`` — is absent (no
    hypergradient, not zeros)."""
    g = view.graph
    nodes = g.path_nodes(U)
    down: Dict[str, List[Cot]] = defaultdict(list)
    up: Dict[str, List[Cot]] = defaultdict(list)
    total: Dict[str, Tensor] = {}
    for src, cot in direct:
        if src in nodes:
            down[src].append(cot)
    allowed = nodes | {U}
    for name in reversed(g.order):            # down phase: uppers first
        if name in nodes and down[name]:
            for src, st, vec in best_response_vjp(view, name, down[name], allowed, override):
                if src == U:
                    _add(total, vec)
                elif g.is_below(src, name):
                    down[src].append((st, vec))
                else:
                    up[src].append((st, vec))
    for name in g.order:                      # up phase: lowers first, u2l reads only
        if name in nodes and up[name]:
            above = {s for s in allowed if g.is_below(name, s)}
            for src, st, vec in best_response_vjp(view, name, up[name], above, override):
                if src == U:
                    _add(total, vec)
                else:
                    up[src].append((st, vec))
    return total


def path_contribution(view: HypergradView, path: Sequence[str],
                      direct: Sequence[Tuple[str, Cot]], override: Override = None) -> Dict[str, Tensor]:
    """The term of one path ``(U, n1, ..., nm, U)`` alone."""
    cots = [cot for src, cot in direct if src == path[-2]]
    for i in range(len(path) - 2, 0, -1):
        prev = path[i - 1]
        res = best_response_vjp(view, path[i], cots, {prev}, override)
        cots = [(st, vec) for src, st, vec in res if src == prev]
    total: Dict[str, Tensor] = {}
    for _, vec in cots:
        _add(total, vec)
    return total


def combine_gradients(names: Sequence[str], like: Sequence[Tensor], own: Sequence[Optional[Tensor]],
                      hyper: Dict[str, Tensor]) -> Tuple[Dict[str, Optional[Tensor]], Dict[str, Tensor],
                                                         List[Optional[Tensor]]]:
    """An update's gradient from its own part and its hypergradient, per variable.

    Args:
        names: the variables' names; ``like``: their tensors (dtype, shape).
        own: ``∂F/∂λ`` per variable, ``None`` where the loss does not read it.
        hyper: the hypergradient by name (a variable no path reaches is absent).

    Returns:
        ``(own, hyper, total)``: the records — ``own`` keeps ``None`` for zeros (no
        tensor is made for them), ``hyper`` is detached, zeros where absent (a report,
        ``engine.last_hypergradient``) — and the total to step with, ``own + hyper``
        (``hyper`` itself, not ``0 + hyper``, where the own part is zero; it keeps any
        graph ``hyper`` has), ``None`` where both are absent: the variable has no
        gradient and ``torch.optim`` (or the window's twin) skips it — no weight decay,
        no momentum, no state update — as it skips a parameter whose ``.grad`` is ``None``.
    """
    own_d: Dict[str, Optional[Tensor]] = {}
    hyper_d: Dict[str, Tensor] = {}
    total: List[Optional[Tensor]] = []
    for k, t, x in zip(names, like, own):
        own_d[k] = x if x is None or not x.requires_grad else x.detach()
        h = hyper.get(k)
        if h is None:
            hyper_d[k] = torch.zeros_like(t)
            total.append(x)
            continue
        h = h.to(t.dtype)
        hyper_d[k] = h.detach() if h.requires_grad else h
        total.append(h if x is None else x + h)
    return own_d, hyper_d, total
