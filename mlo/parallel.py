"""Data parallelism as a strategy: one process, or ranks of ``torch.distributed``.

The engine holds one of these (``EngineConfig(distributed=...)``, chosen by
:func:`data_parallelism`) and asks it everything that differs between the two;
nothing else in the update path checks whether it runs distributed.

Under :class:`DataParallel` every rank holds the same variables and a different
shard of each batch. The mean over ranks of a local gradient is the global batch's
gradient, so: an in-place update averages its gradients (:meth:`average_gradients`);
a loss evaluated inside an unrolled window reads every variable through
``grad_average`` views (:meth:`reading_views`), so its gradient and every derivative
of that gradient are the global batch's; an implicit or finite-difference method's
lower loss averages every derivative the same way (:meth:`lower_inputs`). The
collectives themselves are in :mod:`mlo.distributed`.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, Optional, Sequence, Tuple

from torch import Tensor

from . import distributed as _dist
from .graph import GraphError

__all__ = ["SingleProcess", "DataParallel", "data_parallelism"]

Resolve = Callable[[Any], Dict[str, Tensor]]


class SingleProcess:
    """One process: every hook is the identity."""

    enabled = False

    def start(self, problems: Iterable[Any]) -> None:
        """Nothing to synchronise."""

    def is_main(self) -> bool:
        """This process prints, logs and shows progress."""
        return True

    def average_gradients(self, grads: Sequence[Optional[Tensor]],
                          like: Sequence[Tensor]) -> Sequence[Optional[Tensor]]:
        return grads

    def average_loss(self, loss: Tensor) -> Tensor:
        return loss

    def reading_views(self, resolve: Resolve, own: Dict[str, Tensor],
                      names: Sequence[str]) -> Tuple[Resolve, Optional[Dict[str, Tensor]]]:
        return resolve, None

    def lower_inputs(self, params: Tuple[Tensor, ...], inputs: Tuple[Tensor, ...]):
        return params, inputs

    def agree_stop(self, stop: bool, signum: Optional[int] = None) -> Tuple[bool, Optional[int]]:
        """Whether ``run`` leaves after this iteration, and the deferred signal to raise
        (``None``: none): here this process's own ``(stop, signum)``."""
        return bool(stop), signum

    def main_value(self, value: Optional[float]) -> Tuple[Optional[float], bool]:
        """The main process's ``value`` and whether every process had one (``None``:
        it could not be read): here ``(value, value is not None)``."""
        return value, value is not None


class DataParallel(SingleProcess):
    """Ranks of the default ``torch.distributed`` process group (see the module)."""

    enabled = True

    def start(self, problems: Iterable[Any]) -> None:
        """The same start on every rank: rank 0's parameters and buffers broadcast
        (through copies on the group's device when the modules are elsewhere).

        Raises:
            GraphError: a problem with per-window variables (``WindowProblem``), which
                data parallelism does not support yet (checked before any collective,
                so every rank raises).
        """
        problems = list(problems)
        _refuse_per_window(problems)
        _dist.broadcast_parameters(problems)

    def is_main(self) -> bool:
        return _dist.is_main()

    def average_gradients(self, grads, like):
        """The mean over ranks (``None`` where no rank has a gradient)."""
        return _dist.average_optional(grads, like)

    def average_loss(self, loss: Tensor) -> Tensor:
        return _dist.average([loss.detach()])[0]

    def reading_views(self, resolve, own, names):
        return _dist.reading_views(resolve, own, names)

    def lower_inputs(self, params, inputs):
        """Identity views whose derivatives (gradients, HVPs, mixed terms) are averaged."""
        return tuple(_dist.grad_average(params)), tuple(_dist.grad_average(inputs))

    def agree_stop(self, stop, signum=None):
        """The decision of all ranks (one all-reduce MAX of two numbers): every rank
        stops when one asks to, and raises for a signal when one received it (the
        largest signal number over ranks)."""
        return _dist.agree_stop(stop, signum)

    def main_value(self, value):
        """Rank 0's ``value`` on every rank, and whether every rank had one (one
        all-reduce of two numbers)."""
        return _dist.main_value(value)


def _refuse_per_window(problems: Sequence[Any]) -> None:
    """A named refusal of per-window variables under data parallelism: each rank would
    adapt its own latents for its own rows, and nothing averages them, so the replicas
    drift apart silently (measured: rank 1's parameters 45 % from rank 0's)."""
    for P in problems:
        if getattr(P, "per_window", False):
            raise GraphError(
                f"problem {P.name!r} has per-window variables (WindowProblem): they are not yet "
                f"supported with data parallelism over {_dist.world_size()} ranks (each rank would "
                f"adapt them for its own rows only and the replicas would diverge); run this graph "
                f"in one process (without torchrun)")


def data_parallelism(setting: Any = "auto") -> SingleProcess:
    """The strategy for ``EngineConfig.distributed`` (see :func:`mlo.distributed.enabled`)."""
    return DataParallel() if _dist.enabled(setting) else SingleProcess()
