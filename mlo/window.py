"""``WindowProblem``: a lower problem whose variables live for one window.

Some methods adapt variables that exist only for the batch at hand — MetaMAE's
per-sample latents ``Z``, a MAML task's fast weights — rather than parameters kept
from step to step. A :class:`WindowProblem` declares how to create them when its
window opens, from the other problems' *differentiable* outputs::

    class Latent(mlo.WindowProblem):
        def __init__(self, mae, data):
            super().__init__("latent", optimizer_kwargs={"lr": 0.5}, data=data,
                             config=mlo.ProblemConfig(method="unrolled", unroll_steps=1))
            self.mae = mae
        def init_window(self, batch):                    # Z_0 = enc_θ(x): in the graph
            z, mask, ids = self.mae.call("encode", batch)
            return {"z": z}, {"mask": mask, "ids_restore": ids}
        def training_step(self, batch):                  # the support loss of Z
            pred = self.mae.call("decode", self.params["z"], self.outputs["ids_restore"])
            ...

and the problem above reads the window as a whole: ``latent.params["z"]`` (the
adapted ``Z_K``), ``latent.initial["z"]`` (``Z_0``), ``latent.outputs[...]`` (what
``init_window`` returned besides the variables) and ``latent.batch``.

What the engine guarantees (the semantics, tested against plain autograd):

* **Opening.** At the window's first update the engine takes *one* batch from the
  problem's data, evaluates ``init_window(batch)`` with the reads of other problems
  recorded, and starts the iterates from its result: the hypergradient of a problem
  above flows through ``Z_0`` into whatever ``init_window`` read (the encoder).
* **Per-batch shapes.** The variables' names and shapes are whatever
  ``init_window`` returns, window by window (batch sizes may change). Nothing is
  kept between windows and nothing is written back when a window closes.
* **Fresh optimizer state.** Every window starts a new differentiable optimizer
  (the problem's optimizer class and ``optimizer_kwargs``) with empty state
  (momentum buffers, Adam moments start at zero).
* **One batch per window.** All ``unroll_steps`` updates of the window see the batch
  it opened with (``self.batch``), and so do the problems above.
* **The upper sees the whole window.** ``initial`` and the floating-point tensors of
  ``outputs`` that carry gradient are differentiable reads like ``params``: their
  cotangents travel back through ``init_window``'s graph. Other outputs (integer
  indices, masks) are handed over as they are.
* **Order.** ``first_order=True`` takes the inner steps with detached gradients
  (first-order MAML): ``Z_K`` depends on the upper variables only through ``Z_0``.
  Otherwise the steps are differentiated through (second order).

The method must step through a window (``config.method="unrolled"``; an implicit
method has no iterate that outlives the window), the optimizer must have a
differentiable twin (:meth:`mlo.optim.FunctionalOptimizer.supported`: SGD, Adam, AdamW,
RMSprop, Adagrad, Adamax, NAdam, RAdam, Adadelta, ASGD) and at least one problem must sit above.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, Mapping, Optional, Type, Union

import torch
from torch import Tensor, nn

from .config import ProblemConfig
from .problem import Problem
from .optim import FunctionalOptimizer
from .state import Window, current_context

__all__ = ["WindowProblem"]

_INITIAL, _OUTPUT = "initial.", "outputs."


class WindowProblem(Problem):
    """A problem whose variables are created when its window opens (see the module).

    Args:
        name: unique name within the engine.
        optimizer: a ``torch.optim`` class with a differentiable twin (SGD, Adam,
            AdamW, RMSprop, Adagrad, Adamax, NAdam, RAdam, Adadelta, ASGD).
        optimizer_kwargs: its hyperparameters (e.g. ``{"lr": 0.5}``), the same every window.
        data: batches; one is taken per window.
        config: a :class:`ProblemConfig` (``method`` must step through a window).
        first_order: take the inner steps with detached gradients (first-order MAML).

    Subclasses implement :meth:`init_window` and :meth:`training_step`.
    """

    per_window = True

    def __init__(self, name: str, optimizer: Type[torch.optim.Optimizer] = torch.optim.SGD,
                 optimizer_kwargs: Optional[Dict[str, Any]] = None, data: Optional[Iterable] = None,
                 config: Union[ProblemConfig, Dict[str, Any], None] = None, first_order: bool = False):
        if not isinstance(first_order, bool):
            raise TypeError(f"problem {name!r}: first_order must be a bool, got {first_order!r}")
        # torch.optim needs a parameter: a zero-size placeholder holds the
        # hyperparameters (and keeps checkpoints uniform); it is never stepped.
        super().__init__(name, params={"placeholder": torch.zeros(0)}, optimizer=optimizer,
                         optimizer_kwargs=optimizer_kwargs, data=data, config=config)
        self.module = nn.Module()      # no persistent variables
        self._real = []
        self.first_order = first_order

    # ----------------------------------------------------------- to implement
    def init_window(self, batch) -> Union[Mapping[str, Tensor], tuple]:
        """The window's initial variables, computed from ``batch`` and other problems.

        Returns:
            ``{name: tensor}`` — floating-point tensors, usually in the autograd graph
            of what they read (``self.mae.call("encode", x)``) — or a pair
            ``(variables, outputs)`` where ``outputs`` is a dict of anything the losses
            (this problem's and the uppers') need, e.g. a mask and restore indices.
        """
        raise NotImplementedError(f"problem {self.name!r} ({type(self).__name__}) must "
                                  f"implement init_window(batch)")

    # -------------------------------------------------------- the window's view
    @property
    def param_names(self):
        """The current window's variable names (none while no window is open)."""
        return list(self._run.initial)

    @property
    def window_open(self) -> bool:
        """Whether a window (and so its variables) exists now."""
        return self._run.iterates is not None

    def _window(self, what: str) -> None:
        if not self.window_open:
            raise RuntimeError(
                f"problem {self.name!r}: {what} exists only while its window is open (per-window "
                f"variables: from its first update to the moment the problems above consume it)")

    @property
    def batch(self) -> Any:
        """The batch this window opened with (all its steps and the uppers see it)."""
        self._window("the window's batch")
        return self._run.batch

    @property
    def params(self) -> Dict[str, Tensor]:
        """The current iterates ``Z_k`` (for a reader: as its loss must see them)."""
        self._window("params")
        full = self._view()
        return {k: full[k] for k in self.param_names}

    @property
    def initial(self) -> Dict[str, Tensor]:
        """``Z_0``, the variables as :meth:`init_window` returned them."""
        self._window("initial")
        full = self._view()
        return {k: full[_INITIAL + k] for k in self.param_names}

    @property
    def outputs(self) -> Dict[str, Any]:
        """What :meth:`init_window` returned besides the variables."""
        self._window("outputs")
        full = self._view()
        return {k: full.get(_OUTPUT + k, v) for k, v in self._run.outputs.items()}

    def _view(self) -> Dict[str, Tensor]:
        ctx = current_context()
        if ctx is None or ctx.reader is self:
            return self.readable_state()
        return ctx.resolve(self)

    def readable_state(self) -> Dict[str, Tensor]:
        """Every differentiable tensor of the window a reader may use: the iterates,
        ``initial.<name>`` and the graph-connected floating ``outputs.<name>``."""
        st = dict(self.own_state())
        st.update({_INITIAL + k: t for k, t in self._run.initial.items()})
        st.update({_OUTPUT + k: t for k, t in self._run.outputs.items() if _differentiable(t)})
        return st

    def own_state(self) -> Dict[str, Tensor]:
        it = self._run.iterates
        return dict(it) if it is not None else {}

    def __call__(self, *args, **kwargs):
        raise TypeError(f"problem {self.name!r} has per-window variables and no module to call; "
                        f"read them with problem.params[name] (or .initial / .outputs)")

    def call(self, method: str, *args, **kwargs):
        raise TypeError(f"problem {self.name!r} has per-window variables and no module to call")

    def set_params(self, values: Mapping[str, Tensor]) -> None:
        self._window("set_params")
        super().set_params(values)

    # ------------------------------------------------- opened / closed by the engine
    def open_window(self, batch, result) -> Dict[str, Tensor]:
        """Called by the engine with ``init_window(batch)``'s result: validates it and
        starts the window. Returns the initial variables."""
        if isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], Mapping):
            variables, outputs = result
        else:
            variables, outputs = result, {}
        if not isinstance(variables, Mapping) or not variables:
            raise TypeError(f"problem {self.name!r}: init_window must return a non-empty dict "
                            f"{{name: tensor}} (or a pair (variables, outputs)), got "
                            f"{type(variables).__name__}")
        for k, t in variables.items():
            if not isinstance(k, str) or not k.isidentifier():
                raise ValueError(f"problem {self.name!r}: init_window variable name {k!r} must be a "
                                 f"Python identifier")
            if not isinstance(t, Tensor) or not t.is_floating_point():
                raise TypeError(f"problem {self.name!r}: init_window variable {k!r} must be a "
                                f"floating-point tensor, got "
                                f"{t.dtype if isinstance(t, Tensor) else type(t).__name__}")
        bad = [k for k in outputs if not isinstance(k, str)]
        if bad:
            raise TypeError(f"problem {self.name!r}: init_window outputs must have str keys, got {bad}")
        run = self._run
        run.initial, run.outputs, run.batch = dict(variables), dict(outputs), batch
        run.iterates = dict(variables)
        return run.initial

    def close_window(self) -> None:
        """Everything of the window is dropped (the engine calls it when the window
        is consumed or discarded)."""
        run = self._run
        run.iterates, run.initial, run.outputs, run.batch = None, {}, {}, None

    def start_window(self, evaluate) -> None:
        """Called by the engine at the first update of a window: one batch is taken,
        ``init_window`` evaluated on it (its reads recorded in the window, so the steps
        share them) and a fresh differentiable optimizer started."""
        batch = self.next_batch()
        run = self._run
        run.window = win = Window(None)     # open now: the steps share init_window's reads
        init = self.open_window(batch, evaluate(self.init_window, batch))
        win.fopt = FunctionalOptimizer.fresh(self.optimizer, len(init))

    def end_window(self, window: Window) -> None:
        """Nothing to write back: the per-window variables are dropped."""
        self.close_window()

    def drop_window(self) -> None:
        self.close_window()

    def update_batch(self):
        """The window's batch: every update of a window sees the batch it opened with."""
        if self._run.window is None:
            raise RuntimeError(f"problem {self.name!r} has per-window variables and no window is open "
                               f"(they exist from its first update until the problems above consume them)")
        return self._run.batch

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, method={self.config.method!r}, "
                f"unroll_steps={self.config.unroll_steps}, steps={self.step_count}, "
                f"window={'open' if self.window_open else 'closed'})")


def _differentiable(t: Any) -> bool:
    return isinstance(t, Tensor) and t.is_floating_point() and t.requires_grad
