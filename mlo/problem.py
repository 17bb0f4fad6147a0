"""``Problem``: one node of a bilevel / multilevel optimization graph.

A problem is declarative: its variables, its loss, its optimizer, its data, its
config. Problems that read each other are passed in explicitly (constructor
arguments of *your* subclass); the dependency structure is declared once, to the
:class:`mlo.Engine`, which owns scheduling and hypergradients.

Example::

    class Lower(mlo.Problem):
        def __init__(self, upper, **kw):
            super().__init__("lower", module=nn.Linear(d, 1), **kw)
            self.upper = upper                     # explicit wiring
        def training_step(self, batch):
            x, y = batch
            wd = self.upper.params["log_wd"].exp()  # the upper's *current* variables
            w = self.params["weight"]
            return F.mse_loss(self(x).squeeze(-1), y) + (wd * w.pow(2)).sum()
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Type, Union

import torch
from torch import Tensor, nn

from .config import ProblemConfig
from .fastpath import Slots
from engines.base import grad_mode

from .optim import FunctionalOptimizer
from .state import ProblemRun, Window, current_context

__all__ = ["Problem"]


class _Variables(nn.Module):
    """Holds a problem's explicit tensors as parameters (no forward)."""

    def __init__(self, tensors: Mapping[str, Tensor]):
        super().__init__()
        for k, t in tensors.items():
            if not isinstance(k, str) or not k.isidentifier():
                raise ValueError(f"variable name {k!r} must be a Python identifier")
            if not isinstance(t, Tensor):
                raise TypeError(f"variable {k!r} must be a tensor, got {type(t).__name__}")
            if not t.is_floating_point():
                raise TypeError(f"variable {k!r} must be a floating-point tensor, got {t.dtype}")
            self.register_parameter(k, t if isinstance(t, nn.Parameter) else nn.Parameter(t.detach().clone()))

    def forward(self, *args, **kwargs):
        raise TypeError("this problem holds explicit tensors and has no module to call; "
                        "read its variables with problem.params[name]")


def _new_iterate(value: Tensor, old: Tensor) -> Tensor:
    """A window's iterate replaced by ``set_params``: a value built from the iterates
    keeps its graph; a constant (a reset) starts a new leaf — the paths through the
    earlier steps are cut there, and the later steps differentiate from it."""
    value = value.to(dtype=old.dtype, device=old.device)
    return value if value.requires_grad else value.detach().clone().requires_grad_()


class Problem:
    """A node of the problem graph.

    Args:
        name: unique name within the engine.
        module: an ``nn.Module`` whose trainable parameters are this problem's
            variables. Calling the problem (``problem(x)``) runs this module with the
            problem's *current* state — its parameters, or its differentiable
            iterates while an unrolled hypergradient is being built.
        params: instead of (not with) ``module``, a dict of explicit tensors.
        optimizer: a ``torch.optim.Optimizer`` class (default SGD).
        optimizer_kwargs: its keyword arguments (e.g. ``{"lr": 0.1}``), the defaults of
            every parameter group.
        param_groups: optional parameter groups by *name*, e.g. MAE's "no weight decay
            on biases and norms": ``[{"params": ["blocks.0.norm1.weight", ...],
            "weight_decay": 0.0}]``. Each dict lists parameter names (as in
            ``module.named_parameters()``, or the keys of ``params``) and overrides
            ``optimizer_kwargs`` for them; parameters listed nowhere form a last group
            with the defaults.
        scheduler: optional ``torch.optim.lr_scheduler`` class, stepped after every
            update of this problem.
        scheduler_kwargs: its keyword arguments.
        data: any iterable of batches; re-iterated when exhausted. A single-use
            iterator (a generator) cannot be re-iterated: once spent, the next batch
            raises ``RuntimeError`` (use a list, a DataLoader or an endless
            iterator). ``None`` feeds ``batch=None`` (for losses that need no data).
        config: a :class:`ProblemConfig` (or a dict of its fields).

    Subclasses implement :meth:`training_step`.
    """

    def __init__(self, name: str, module: Optional[nn.Module] = None,
                 params: Optional[Mapping[str, Tensor]] = None,
                 optimizer: Type[torch.optim.Optimizer] = torch.optim.SGD,
                 optimizer_kwargs: Optional[Dict[str, Any]] = None,
                 param_groups: Optional[Sequence[Mapping[str, Any]]] = None,
                 scheduler: Optional[type] = None,
                 scheduler_kwargs: Optional[Dict[str, Any]] = None,
                 data: Optional[Iterable] = None,
                 config: Union[ProblemConfig, Dict[str, Any], None] = None):
        if not isinstance(name, str) or not name:
            raise ValueError(f"problem name must be a non-empty string, got {name!r}")
        self.name = name
        if (module is None) == (params is None):
            raise ValueError(f"problem {name!r}: give exactly one of `module` or `params`")
        if module is not None and not isinstance(module, nn.Module):
            raise TypeError(f"problem {name!r}: `module` must be an nn.Module, got {type(module).__name__}")
        self.module = module if module is not None else _Variables(params)
        self._names = [n for n, p in self.module.named_parameters() if p.requires_grad]
        self._real = [p for _, p in self.module.named_parameters() if p.requires_grad]
        # Tied weights or shared submodules (one tensor under two names): Slots then
        # substitutes each distinct slot once (mlo.fastpath.distinct_slots).
        self._tied = len(list(self.module.named_parameters(remove_duplicate=False))) != \
            len(list(self.module.named_parameters())) or \
            len(list(self.module.named_buffers(remove_duplicate=False))) != len(list(self.module.named_buffers()))
        if not self._real:
            raise ValueError(f"problem {name!r} has no trainable parameters")
        self._slots = Slots(self.module, self._names, self._real, self._tied)
        if isinstance(optimizer, torch.optim.Optimizer) or not (
                isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer)):
            raise TypeError(f"problem {name!r}: `optimizer` must be a torch.optim.Optimizer "
                            f"class (e.g. torch.optim.Adam), got {optimizer!r}")
        okw = dict(optimizer_kwargs or {})
        groups = self._groups(param_groups) if param_groups is not None else self._real
        try:
            self.optimizer = optimizer(groups, **okw)
        except (TypeError, ValueError) as e:
            raise type(e)(f"problem {name!r}: {optimizer.__name__}(**optimizer_kwargs): {e}") from None
        self.scheduler = scheduler(self.optimizer, **(scheduler_kwargs or {})) if scheduler else None
        if isinstance(config, dict):
            config = ProblemConfig.from_dict(config)
        self.config = config or ProblemConfig()
        if not isinstance(self.config, ProblemConfig):
            raise TypeError(f"problem {name!r}: config must be a ProblemConfig or dict")
        if data is not None and not hasattr(data, "__iter__"):
            raise TypeError(f"problem {name!r}: `data` must be an iterable of batches (a list, "
                            f"a DataLoader, a generator function's result...) or None, got "
                            f"{type(data).__name__}")
        self.data = data
        self._iter = None
        self._taken = None      # (batch,): the batch next_batch returned last
        # The run state (iterates, counters, last batch) is the engine's: bind() hands
        # this problem a view of it. Until then, a private one (no engine yet).
        self._run = ProblemRun()

    def _groups(self, param_groups: Sequence[Mapping[str, Any]]) -> List[Dict[str, Any]]:
        """``torch.optim`` param groups from groups of parameter names."""
        by_name = dict(zip(self._names, self._real))
        taken: Dict[str, int] = {}
        groups = []
        for i, g in enumerate(param_groups):
            if not isinstance(g, Mapping) or "params" not in g:
                raise ValueError(f"problem {self.name!r}: param_groups[{i}] must be a dict with "
                                 f"a 'params' list of parameter names, got {g!r}")
            names = g["params"]
            if isinstance(names, str) or not all(isinstance(n, str) for n in names):
                raise ValueError(f"problem {self.name!r}: param_groups[{i}]['params'] must be a "
                                 f"list of parameter names, got {names!r}")
            for n in names:
                if n not in by_name:
                    raise ValueError(f"problem {self.name!r}: param_groups[{i}] names unknown "
                                     f"parameter {n!r}; trainable parameters: {self.param_names}")
                if n in taken:
                    raise ValueError(f"problem {self.name!r}: parameter {n!r} is in param_groups"
                                     f"[{taken[n]}] and param_groups[{i}]")
                taken[n] = i
            groups.append({**{k: v for k, v in g.items() if k != "params"},
                           "params": [by_name[n] for n in names]})
        rest = [p for n, p in by_name.items() if n not in taken]
        if rest:
            groups.append({"params": rest})
        return [g for g in groups if g["params"]]

    # -------------------------------------------------------------- the loss
    def training_step(self, batch) -> Union[Tensor, Dict[str, Tensor]]:
        """The problem's loss on ``batch``: a scalar tensor or a dict with ``"loss"``."""
        raise NotImplementedError(f"problem {self.name!r} ({type(self).__name__}) must "
                                  f"implement training_step(batch)")

    def optimizer_hyperparameters(self) -> Optional[Dict[str, Any]]:
        """Optional: optimizer hyperparameters computed from other problems' variables.

        Called before each of this problem's steps. Override to make e.g. the learning
        rate an upper problem's variable::

            def optimizer_hyperparameters(self):
                return {"lr": self.upper.params["log_lr"].exp()}

        Returns ``{name: value}`` with names of the optimizer's hyperparameters. A value
        that is not a ``list`` — a number, a 0-dim tensor, a tuple such as ``betas`` —
        is written into every parameter group. A ``list`` gives one value per
        parameter group, in the order of ``self.optimizer.param_groups`` (the groups
        of ``param_groups=`` in their order, then the group of the parameters listed
        nowhere, if any); keys not returned keep each group's own setting. E.g. per-group
        betas, and a learnable scale of each group's base learning rate::

            BASE = (0.2, 0.1)                       # the groups' lrs in param_groups=
            def optimizer_hyperparameters(self):
                u = self.upper.params
                return {"betas": [(u["b1"][0], u["b2"][0]), (u["b1"][1], u["b2"][1])],
                        "lr": [u["log_scale"].exp() * base for base in BASE]}

        Inside unrolled windows the values stay tensors, so the upper problem gets
        the hypergradient through them; otherwise they are applied as floats.

        Raises (at the step that applies them):
            KeyError: a name the optimizer does not have.
            ValueError: a list whose length is not the number of parameter groups, or
                an entry of the wrong form for the key (``betas`` takes a pair); the
                message names the problem and the key.
        """
        return None

    def solve(self, batch) -> Mapping[str, Tensor]:
        """Optional: this problem's best response from your own solver, instead of
        optimizer steps (a closed form, a linear solve, L-BFGS run to convergence).

        Not overridden by default. When a problem overrides it, each of its updates calls
        ``solve(batch)`` (with the batch the update takes) instead of an optimizer step;
        the returned tensors become its variables, as constants (no autograd graph),
        written like :meth:`set_params`. The update counts as one for the schedule, and
        ``engine.records[name]["loss"]`` is ``training_step(batch)`` at the solution.
        The problems above differentiate through the solution implicitly, so this
        problem's ``config.method`` must work at the current iterate — ``"cg"``,
        ``"neumann"``, ``"finite_difference"`` or ``"darts"`` (they evaluate
        ``training_step`` on this batch at the solution): ``"unrolled"`` or
        ``"sama"`` is a ``GraphError`` at construction (there are no steps to
        differentiate through). Its ``optimizer`` is then not stepped (its learning rate
        is still what ``finite_difference``'s ``scale_by_lr`` reads), and neither are a
        scheduler, ``grad_clip`` or ``optimizer_hyperparameters()``.

        Inside, read other problems as usual (``self.upper.params[...]``): the values
        are detached (no graph), as is ``self.params`` (the current values, e.g. a warm
        start). Autograd stays enabled, for a solver that needs gradients. Ridge
        regression in closed form::

            def solve(self, batch):
                X, y = batch
                lam = self.upper.params["log_lam"].exp()
                eye = torch.eye(X.shape[1], dtype=X.dtype)
                return {"w": torch.linalg.solve(X.T @ X + lam * eye, X.T @ y)}

        Returns:
            ``{variable name: tensor}`` with exactly this problem's variable names, and
            their shapes and dtypes.

        Raises (at the update):
            TypeError: not a mapping, or a value that is not a tensor or has another dtype.
            KeyError: missing or unknown names. ValueError: a wrong shape.
        """
        raise NotImplementedError(f"problem {self.name!r} does not define solve(batch)")

    # ---------------------------------------------------------------- hooks
    def on_window_start(self) -> None:
        """Hook (no-op by default): runs before the first update of each inner loop.

        That is this problem's very first update, and its first update after a problem
        directly above it became ready — i.e. after the problems above consumed its
        steps (Betty's ``on_inner_loop_start``). With ``method="unrolled"`` the previous
        window has been closed and the new one opens at this update, from the state the
        hook leaves. Typical use: reset the lower before each inner loop::

            def on_window_start(self):
                self.set_params({"w": torch.zeros_like(self.params["w"])})
        """

    def after_step(self) -> None:
        """Hook (no-op by default): runs after each of this problem's applied updates
        (not after an update skipped by ``EngineConfig(nonfinite="skip")``).

        Inside an open unrolled window ``self.params`` is the new differentiable
        iterate; replace it with :meth:`set_params` (e.g. a projection, Betty's
        ``param_callback``)::

            def after_step(self):
                self.set_params({"lam": self.params["lam"].clamp(min=1e-8)})

        The problems above see the result: unrolled windows differentiate through it
        (``clamp`` has a derivative; a constant cuts the path), implicit methods
        evaluate at it.
        """

    def set_params(self, values: Mapping[str, Tensor]) -> None:
        """Replaces some of this problem's variables — the way for hooks to edit them.

        With no unrolled window open on this problem, the values become its parameters'
        new storage (the parameter objects stay; a lower's open window that read the old
        values keeps what it read — its later steps see the new ones). Inside an open window
        they *replace the current iterate* as given — keep the autograd graph (build
        them from ``self.params[...]``) to differentiate through the edit, or give
        constants to cut it (a reset). Editing ``self.params[k]`` in place instead
        would corrupt a window's graph or be lost when it closes.

        Args:
            values: ``{variable name: tensor}`` of the variables' shapes.

        Raises:
            KeyError: an unknown variable name. ValueError: a wrong shape.
            RuntimeError: called while a loss is being evaluated.
        """
        if current_context() is not None:
            raise RuntimeError(f"problem {self.name!r}: set_params inside a loss; call it from a "
                               f"hook (on_window_start, after_step) or between engine.run calls")
        own = self.own_state()
        for k, v in values.items():
            if k not in own:
                raise KeyError(f"problem {self.name!r} has no variable {k!r} (its variables: "
                               f"{self.param_names})")
            if tuple(v.shape) != tuple(own[k].shape):
                raise ValueError(f"problem {self.name!r}: set_params({k!r}) got shape "
                                 f"{tuple(v.shape)}, the variable has {tuple(own[k].shape)}")
        it = self._run.iterates
        if it is not None:      # inside a window: a new iterate
            self._run.iterates = {k: (_new_iterate(values[k], t) if k in values else t) for k, t in it.items()}
            return
        with torch.no_grad():
            for k, v in values.items():
                # New storage, not an in-place copy: a lower's open window may have read
                # (and saved for its backward) the old values, which stay what it read.
                own[k].data = v.detach().to(dtype=own[k].dtype, device=own[k].device).clone()
        self._run.edits += 1        # readers' shared aliases of the old values are stale

    # ------------------------------------------------------------ the state
    #: Whether the variables exist per window only (:class:`mlo.WindowProblem`).
    per_window = False

    @property
    def param_names(self) -> List[str]:
        """The variables' names (``module.named_parameters()`` order, trainable ones)."""
        return self._names

    def bind(self, run: ProblemRun) -> None:
        """Called by :class:`mlo.Engine`: the engine-owned run state this problem reads
        (a problem belongs to one engine at a time)."""
        self._run = run

    @property
    def step_count(self) -> int:
        """Updates taken (read-only; the engine's ``state``)."""
        return self._run.step_count

    @property
    def ready_count(self) -> int:
        """Times it became ready: updates plus skipped updates (read-only)."""
        return self._run.ready_count

    @property
    def last_loss(self) -> Optional[Tensor]:
        """The loss of the last update, detached (read-only)."""
        return self._run.last_loss

    @property
    def last_batch(self) -> Any:
        """The batch of the last loss evaluation; implicit methods re-evaluate it (with
        ``config.implicit_batch="last"``, the default)."""
        return self._run.last_batch

    @last_batch.setter
    def last_batch(self, batch: Any) -> None:
        # (Comparisons evaluate several engines at one batch: set it on purpose.)
        self._run.last_batch = batch

    @property
    def window_batches(self) -> tuple:
        """With ``config.implicit_batch="window"``: the batches of this problem's applied
        updates in its current window, oldest first (implicit methods average its loss
        over them); ``()`` otherwise (read-only)."""
        return tuple(self._run.window_batches)

    @property
    def variables(self) -> tuple:
        """The module's trainable parameters (the real tensors, in ``param_names`` order)."""
        return tuple(self._real)

    def readable_state(self) -> Dict[str, Tensor]:
        """Everything another problem's loss may read of this one (its variables)."""
        return self.own_state()

    def own_state(self) -> Dict[str, Tensor]:
        """This problem's current state, without any reader's aliasing."""
        it = self._run.iterates
        if it is not None:
            return it
        return dict(zip(self.param_names, self._real))

    @property
    def params(self) -> Dict[str, Tensor]:
        """The variables as the running loss must see them (name -> tensor)."""
        ctx = current_context()
        if ctx is None:
            return self.own_state()
        if ctx.reader is self:
            return ctx.own if ctx.own is not None else self.own_state()
        return ctx.resolve(self)

    def _runs_on_own_parameters(self) -> bool:
        """Whether the current state is the module's own parameters (no window open, no
        reader's aliasing): then the module runs directly, without ``functional_call``."""
        ctx = current_context()
        return self._run.iterates is None and (ctx is None or (ctx.reader is self and ctx.own is None))

    def __call__(self, *args, **kwargs):
        """Runs ``module`` with the problem's current state (as ``functional_call`` does)."""
        if self._runs_on_own_parameters():
            return self.module(*args, **kwargs)
        return self._slots.run(self.module, self.params, args, kwargs)

    def call(self, method: str, *args, **kwargs):
        """Runs ``module.<method>(*args, **kwargs)`` with the problem's current state.

        Like ``problem(x)`` but for any method of the module, e.g. the encoder
        features of an MAE that another problem's loss reads::

            feats = self.pretrain.call("features", x, pool="cls")   # [N, D]

        Inside a loss evaluated by the engine this is differentiable in (and
        recorded as a read of) the problem's variables, exactly like ``problem(x)``.

        Raises:
            AttributeError: the module has no callable attribute ``method`` (the
                message names the problem and the module class).
        """
        fn = getattr(self.module, method, None) if isinstance(method, str) else None
        if not callable(fn):
            raise AttributeError(
                f"problem {self.name!r}: its module ({type(self.module).__name__}) has no method "
                f"{method!r} to call")
        if self._runs_on_own_parameters():
            return fn(*args, **kwargs)
        return self._slots.run(fn, self.params, args, kwargs, method=method)

    # ------------------------------------------------- windows (called by the engine)
    #: Whether the first-order steps of a window take the gradient as a constant
    #: (first-order MAML; :class:`mlo.WindowProblem` option).
    first_order = False

    def start_window(self, evaluate: Callable[[Callable[[Any], Any], Any], Any]) -> None:
        """Called by the engine at the first update of a window: the iterates start
        from the parameters and the differentiable twin from ``torch.optim``'s state.
        (``evaluate(fn, batch)`` runs ``fn`` as the engine evaluates this problem's
        losses; a :class:`mlo.WindowProblem` uses it for ``init_window``.)"""
        run = self._run
        run.window = Window(FunctionalOptimizer.from_torch(self.optimizer, list(self.variables)))
        run.iterates = dict(zip(self.param_names, self.variables))

    def end_window(self, window: Window) -> None:
        """Called by the engine when the window is consumed: the last iterates are
        written into the parameters and the twin's state handed back to ``torch.optim``."""
        with grad_mode(False):
            for p, k in zip(self.variables, self.param_names):
                p.copy_(self._run.iterates[k])
        window.fopt.state_to_torch(self.optimizer, list(self.variables))
        self._run.iterates = None

    def drop_window(self) -> None:
        """Called by the engine for a window in which nothing stepped: the parameters
        are the state again."""
        self._run.iterates = None

    def update_batch(self):
        """The batch the engine's next update of this problem takes (the next one)."""
        return self.next_batch()

    # ------------------------------------------------------------- the data
    def peek_batch(self):
        """The batch :meth:`next_batch` will return next, without consuming it."""
        if "_peeked" not in self.__dict__:
            self._peeked = self._fetch()
        return self._peeked

    def next_batch(self):
        """The next batch of ``data`` (``None`` without data), consumed."""
        batch = self.__dict__.pop("_peeked") if "_peeked" in self.__dict__ else self._fetch()
        self._taken = (batch,)
        self._run.batches_taken += 1
        return batch

    def begin_taking(self) -> None:
        """Called by the engine before an update: :meth:`return_taken` can then put
        back the batch the update takes, if the update fails."""
        self._taken = None

    def return_taken(self) -> None:
        """Called by the engine when an update fails: the batch it took becomes the
        next one again (its retry sees the same data)."""
        taken, self._taken = self._taken, None
        if taken is not None and "_peeked" not in self.__dict__:
            self._peeked = taken[0]
            self._run.batches_taken -= 1

    def skip_batches(self, n: int) -> None:
        """Starts the data over and consumes ``n`` batches: after a checkpoint is loaded
        into a fresh engine, a deterministic data stream is where it was when saved
        (``mlo.checkpoint.load(..., realign_data=True)``). With
        ``config.implicit_batch="window"`` the last of them that the current window's
        steps took (``RunState.load_counters`` counts them) become its window's batches
        again: each of those steps took the next batch of this stream."""
        self.__dict__.pop("_peeked", None)
        self._iter = None
        keep = self._run.window_recover if self.config.implicit_batch == "window" else 0
        recent: List[Any] = []
        for i in range(n):
            batch = self._fetch()
            if n - i <= keep:
                recent.append(batch)
        if keep:
            self._run.window_batches = recent
        self._taken = None

    def _fetch(self):
        if self.data is None:
            return None
        if self._iter is None:
            self._iter = iter(self.data)
        try:
            return next(self._iter)
        except StopIteration:
            pass
        if isinstance(self.data, Iterator):   # iter() of a spent iterator is itself
            raise RuntimeError(
                f"problem {self.name!r}: its data is a single-use iterator "
                f"({type(self.data).__name__}) and has no batches left; it cannot be restarted. "
                f"Pass a re-iterable (a list, a DataLoader) or an endless iterator "
                f"(itertools.cycle(...), a generator with `while True`)")
        self._iter = iter(self.data)
        try:
            return next(self._iter)
        except StopIteration:
            raise RuntimeError(f"problem {self.name!r}: its data yielded no batches") from None

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, method={self.config.method!r}, "
                f"unroll_steps={self.config.unroll_steps}, steps={self.step_count})")
