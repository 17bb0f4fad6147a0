"""Data parallelism over ``torch.distributed`` (launched with ``torchrun``).

Every rank holds a full copy of every problem and sees its own shard of every
problem's data. With mean-reduced losses over equal local batches, the loss of the
global batch is the average over ranks of the local losses::

    f(θ, x) = (1/W) Σ_r f_r(θ, x)        (W = world size, f_r on rank r's batch)

so every derivative of ``f`` the engine needs is the average of the local ones —
gradients, Hessian-vector products (``H v = (1/W) Σ_r H_r v``), the mixed term
``∂²_{xθ} f · u`` and finite differences of gradients — *provided the vectors they
act on are the same on every rank*. Note that averaging the final hypergradients
would not do: ``H⁻¹`` of an average is not the average of the ``H_r⁻¹``.

How the engine gets exactly the global-batch quantities (``mlo.engine``,
``mlo.hypergrad``):

* an in-place update's gradients (its own term and the direct cotangents on the
  variables its loss reads) are averaged with one all-reduce (:func:`average`);
* a loss that is differentiated again (an update inside an unrolled window, the
  lower loss of CG / Neumann / finite differences) reads every variable through
  :func:`grad_average`: the identity forward, whose backward averages the incoming
  gradient over ranks. Its backward is itself differentiable (:func:`average`,
  whose adjoint is again the average), so gradients, Hessian-vector products and
  backward passes through unrolled steps all arrive averaged — every vector in
  the hypergradient chain is then the same on every rank, and so is every update.

Collectives run in the same order on every rank because every rank runs the same
program on the same graph; a loss whose graph depends on the data (a branch taken
on one rank only) is not supported — with one exception, DDP's unused parameters:

Unused variables. A variable no rank's loss uses gets no gradient (``None``), so
``torch.optim`` (or a window's twin) skips it — no weight decay, no momentum, no state
— as in one process. A variable used on some ranks only is averaged with zeros from
the others (``torch.nn.parallel.DistributedDataParallel``'s semantics: the gradient
of the global-batch loss when every local batch has the same size) and is stepped on
every rank. In place this holds for any pattern (:func:`average_optional`); a loss
differentiated again reads each problem's variables through one :func:`grad_average`
node, whose backward is a collective — there every rank's loss must read at least one
variable of each problem it reads at all (the own variables: at least one).

Devices. A collective takes its tensors on the devices its backend supports: NCCL only
CUDA tensors, gloo CPU (and CUDA) tensors. Every collective here runs on
:func:`collective_device` of its tensors — a CPU tensor under NCCL is copied to
``cuda:<current device>`` (``cuda:LOCAL_RANK`` after :func:`init_from_env`), reduced or
broadcast there and copied back into the original tensor — so an engine built while
its models are still on the CPU (the parameter broadcast at construction), a checkpoint
save's status flag, or a CPU variable in a CUDA run work under NCCL as under gloo.
Tensors already on a supported device are used in place (no copy).

Setup (what the engine does not do for you): ``torch.distributed.init_process_group``
(``torchrun`` sets the environment), the same seed on every rank for the models'
construction (the engine then broadcasts all parameters and buffers from rank 0
anyway), and sharded data — :func:`shard` for datasets, :func:`shard_batches` to
give each rank its rows of a global batch stream.
"""
from __future__ import annotations

import math
import numbers
import os
from typing import Any, Iterable, Iterator, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["is_distributed", "rank", "world_size", "is_main", "barrier", "init_from_env", "timeout",
           "DEFAULT_TIMEOUT_SECONDS", "enabled", "agree_stop", "main_value", "collective_device", "broadcast_parameters", "average_", "average", "average_optional",
           "grad_average", "reading_views", "shard", "shard_batches"]


# ------------------------------------------------------------------ process group
def is_distributed() -> bool:
    """``torch.distributed`` is available and its default process group initialised."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """The number of processes (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0 (or no process group): the process that logs and writes files."""
    return rank() == 0


def barrier() -> None:
    """``torch.distributed.barrier()`` when distributed; nothing otherwise."""
    if is_distributed() and world_size() > 1:
        dist.barrier()


#: The process group's timeout (seconds) that :func:`init_from_env` sets by default.
DEFAULT_TIMEOUT_SECONDS = 300.0
#: The environment variable that overrides it (seconds, a positive number).
TIMEOUT_ENV = "MLO_DIST_TIMEOUT"


def init_from_env(backend: Optional[str] = None, timeout_seconds: Optional[float] = None) -> bool:
    """Initialises the default process group when launched by ``torchrun``.

    ``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
    ``MASTER_PORT``; without them (a plain ``python script.py``) nothing happens.

    Args:
        backend: ``"gloo"`` (CPU) or ``"nccl"`` (CUDA); default: ``nccl`` when CUDA
            is available, else ``gloo``.
        timeout_seconds: how long a collective may wait for the other ranks before it
            raises (a hung or dead rank then ends the job instead of blocking it).
            Default: the environment variable ``MLO_DIST_TIMEOUT`` when set, else
            :data:`DEFAULT_TIMEOUT_SECONDS` (300 s; torch's own default is 30 minutes).

    Returns:
        Whether a process group is initialised now.

    Raises:
        ValueError: a timeout (argument or ``MLO_DIST_TIMEOUT``) that is not a
            positive finite number of seconds.
    """
    if is_distributed():
        return True
    if "LOCAL_RANK" not in os.environ or not dist.is_available():
        return False
    import datetime

    seconds = timeout(timeout_seconds)
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=seconds))
    return True


def timeout(seconds: Optional[float] = None) -> float:
    """The process-group timeout :func:`init_from_env` uses: ``seconds`` when given,
    else ``$MLO_DIST_TIMEOUT`` when set, else :data:`DEFAULT_TIMEOUT_SECONDS`.

    Raises:
        ValueError: not a positive finite number (naming where it came from).
    """
    if seconds is not None:
        where, value = "init_from_env(timeout_seconds=...)", seconds
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    elif os.environ.get(TIMEOUT_ENV, "").strip():
        where, raw = f"the environment variable {TIMEOUT_ENV}", os.environ[TIMEOUT_ENV].strip()
        try:
            value, ok = float(raw), True
        except ValueError:
            value, ok = raw, False
    else:
        return DEFAULT_TIMEOUT_SECONDS
    if not ok or not math.isfinite(value) or not value > 0:
        raise ValueError(f"{where}: the process group's timeout must be a positive finite number of "
                         f"seconds, got {value!r}")
    return float(value)


def enabled(setting: Any = "auto") -> bool:
    """Whether an engine with ``EngineConfig(distributed=setting)`` runs data-parallel.

    ``"auto"``: when a process group with more than one rank is initialised.
    ``True``: it must be (``RuntimeError`` otherwise). ``False``: never.
    """
    if setting is False:
        return False
    if setting is True:
        if not is_distributed():
            raise RuntimeError("EngineConfig(distributed=True) needs an initialised process group: "
                               "call torch.distributed.init_process_group(...) first (launch with "
                               "torchrun, or mlo.distributed.init_from_env())")
        return True
    return is_distributed() and world_size() > 1


# ------------------------------------------------------------------- collectives
def _backend_kinds(backend: str, device_type: str) -> List[str]:
    """The device types ``backend`` takes tensors of, for a tensor of ``device_type``:
    ``[device_type]`` when it takes those, else its list (``"nccl"`` → ``["cuda"]``).
    A per-device backend string (``"cpu:gloo,cuda:nccl"``) lists its device types."""
    backend = str(backend).lower()
    if ":" in backend:
        kinds = [part.split(":", 1)[0].strip() for part in backend.split(",")]
    else:
        kinds = list(dist.Backend.backend_capability.get(backend, [device_type]))
    return [device_type] if device_type in kinds else kinds


def collective_device(device: Any = "cpu", backend: Optional[str] = None) -> torch.device:
    """The device a tensor on ``device`` must be on for a collective of ``backend``.

    ``device`` itself when the backend takes tensors there (gloo: CPU and CUDA; NCCL:
    CUDA); otherwise the CPU if the backend takes CPU tensors, else CUDA's current
    device (NCCL: a CPU tensor goes to ``cuda:<torch.cuda.current_device()>``, which is
    ``cuda:LOCAL_RANK`` after :func:`init_from_env`).

    Args:
        device: where the tensor is (a ``torch.device`` or a string).
        backend: a backend name (``"nccl"``, ``"gloo"``, ``"cpu:gloo,cuda:nccl"``);
            default: the default process group's.

    Raises:
        RuntimeError: the backend takes neither this device's tensors, nor CUDA nor
            CPU ones.
    """
    device = torch.device(device)
    if backend is None:
        backend = dist.get_backend()
    kinds = _backend_kinds(backend, device.type)
    if device.type in kinds:
        return device
    if "cpu" in kinds:
        return torch.device("cpu")
    if "cuda" in kinds:
        return torch.device("cuda", torch.cuda.current_device())
    raise RuntimeError(f"torch.distributed backend {backend!r} takes {kinds} tensors; a collective "
                       f"cannot use a tensor on {device}")


def _all_reduce_(t: Tensor, op: Any = None) -> Tensor:
    """All-reduce (``op``, default SUM) of ``t``, on :func:`collective_device` and copied
    back: ``t`` holds the result afterwards and is returned."""
    op = dist.ReduceOp.SUM if op is None else op
    dev = collective_device(t.device)
    if dev == t.device:
        dist.all_reduce(t, op=op)
        return t
    moved = t.to(dev)
    dist.all_reduce(moved, op=op)
    return t.copy_(moved)


def _all_reduce_sum_(t: Tensor) -> Tensor:
    """All-reduce (sum) of ``t`` (see :func:`_all_reduce_`)."""
    return _all_reduce_(t, dist.ReduceOp.SUM)


def _flat(tensors: Sequence[Tensor]):
    """Groups ``tensors`` by (dtype, device) and flattens each group into one buffer."""
    groups = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.dtype, t.device), []).append(i)
    return groups


def _all_reduce_mean(tensors: Sequence[Tensor]) -> List[Tensor]:
    """New tensors: the mean over ranks of each of ``tensors`` (one all-reduce per dtype)."""
    out: List[Optional[Tensor]] = [None] * len(tensors)
    W = world_size()
    for idx in _flat(tensors).values():
        buf = torch.cat([tensors[i].detach().reshape(-1) for i in idx])
        _all_reduce_sum_(buf).div_(W)
        offset = 0
        for i in idx:
            n = tensors[i].numel()
            out[i] = buf[offset:offset + n].view_as(tensors[i])
            offset += n
    return out  # type: ignore[return-value]


def average_(tensors: Sequence[Tensor]) -> None:
    """In place: every tensor becomes its mean over ranks (all-reduce SUM / W)."""
    tensors = list(tensors)
    if not tensors or not is_distributed() or world_size() == 1:
        return
    with torch.no_grad():
        for t, m in zip(tensors, _all_reduce_mean(tensors)):
            t.copy_(m)


def agree_stop(stop: bool, signum: Optional[int] = None):
    """``(stop, signum)`` agreed by every rank: one all-reduce MAX of ``[stop, signum or 0]``.

    Every rank leaves a run at the same iteration when any one of them asks to stop,
    and every rank raises for a deferred signal when any one received it (the largest
    signal number). Without a process group: the arguments themselves."""
    if not is_distributed() or world_size() == 1:
        return bool(stop), signum
    flags = torch.tensor([1.0 if stop else 0.0, float(signum or 0)], dtype=torch.float64)
    _all_reduce_(flags, dist.ReduceOp.MAX)
    any_stop, top = flags.tolist()
    return any_stop > 0, (int(top) if top > 0 else None)


def main_value(value: Optional[float]):
    """``(rank 0's value, whether every rank had one)`` on every rank: one all-reduce
    SUM of ``[missing, value on rank 0 else 0]`` (``value=None``: this rank has none).
    Rank 0's value arrives exactly (adding zeros; NaN and ±inf included). Without a
    process group: ``(value, value is not None)``."""
    if not is_distributed() or world_size() == 1:
        return value, value is not None
    mine = 0.0 if value is None or rank() != 0 else float(value)
    buf = torch.tensor([1.0 if value is None else 0.0, mine], dtype=torch.float64)
    _all_reduce_(buf, dist.ReduceOp.SUM)
    missing, v = buf.tolist()
    return (None if missing > 0 else v), missing == 0


class _Average(torch.autograd.Function):
    """``y_r = (1/W) Σ_s x_s`` on every rank ``r``. The adjoint of this map is the
    same map, so the backward is another :class:`_Average` (differentiable again)."""

    @staticmethod
    def forward(ctx, *xs):
        return tuple(_all_reduce_mean(xs))

    @staticmethod
    def backward(ctx, *gs):
        return _Average.apply(*gs)


class _GradAverage(torch.autograd.Function):
    """Identity forward; the backward averages the incoming gradients over ranks
    (through :class:`_Average`, so a gradient taken with ``create_graph=True`` can be
    differentiated again — Hessian-vector products, unrolled windows).

    Unused outputs keep DDP's semantics, as :func:`average_optional`: a tensor the
    local loss did not use counts as zeros in the mean when another rank used it, and
    gets no gradient (``None``) when no rank did. Which ranks used which tensor travels
    in the same all-reduce as the values (one flag per tensor)."""

    @staticmethod
    def forward(ctx, *xs):
        ctx.set_materialize_grads(False)
        ctx.like = [(x.shape, x.dtype, x.device) for x in xs]
        return tuple(x.view_as(x) for x in xs)

    @staticmethod
    def backward(ctx, *gs):
        # (New tensors follow an incoming gradient's device: backward may run where no
        # factory default applies.)
        ref = next((g for g in gs if g is not None), None)

        def zeros(shape, dtype, device):
            if ref is not None and ref.device == device:
                return ref.new_zeros(shape, dtype=dtype)
            return torch.zeros(shape, dtype=dtype, device=device)

        filled = [zeros(*like) if g is None else g for g, like in zip(gs, ctx.like)]
        dt, dev = filled[0].dtype, filled[0].device
        flags = torch.stack([zeros((), dt, dev) if g is None else zeros((), dt, dev) + 1 for g in gs])
        *means, used = _Average.apply(*filled, flags)
        return tuple(m if u > 0 else None for m, u in zip(means, used.detach().tolist()))


def average(tensors: Sequence[Tensor]) -> List[Tensor]:
    """The mean over ranks of each tensor, differentiable (its backward averages the
    incoming gradients). Without a process group: the tensors themselves."""
    tensors = list(tensors)
    if not tensors or not is_distributed() or world_size() == 1:
        return tensors
    if any(t.requires_grad for t in tensors) and torch.is_grad_enabled():
        return list(_Average.apply(*tensors))
    return _all_reduce_mean(tensors)


def average_optional(tensors: Sequence[Optional[Tensor]], like: Sequence[Tensor]) -> List[Optional[Tensor]]:
    """Like :func:`average` (not differentiable) for gradients that may be ``None``
    (unused): ``None`` where no rank had a value, else the mean over ranks with a
    missing value counting as zeros — ``torch.nn.parallel.DistributedDataParallel``'s
    semantics: a parameter unused on every rank keeps no gradient (``torch.optim``
    skips it), one used on some ranks only is averaged with zeros from the others
    (and then stepped on every rank, weight decay and momentum included). Two
    all-reduces (values, then which are used)."""
    if not tensors or not is_distributed() or world_size() == 1:
        return list(tensors)
    filled = [torch.zeros_like(l) if t is None else t.detach() for t, l in zip(tensors, like)]
    used = torch.tensor([t is not None for t in tensors], dtype=torch.float32, device=filled[0].device)
    _all_reduce_sum_(used)
    return [m if u > 0 else None for m, u in zip(_all_reduce_mean(filled), used.tolist())]


def grad_average(tensors: Sequence[Tensor]) -> List[Tensor]:
    """The tensors themselves (identity), whose gradients are averaged over ranks.

    Read the variables of a local loss through this: every derivative of that loss
    with respect to them — first order, a Hessian-vector product, a backward pass
    through unrolled steps — is then the derivative of the global-batch loss.
    Tensors that do not require grad, and no process group, pass through unchanged.
    """
    tensors = list(tensors)
    if (not tensors or not is_distributed() or world_size() == 1 or not torch.is_grad_enabled()
            or not any(t.requires_grad for t in tensors)):
        return tensors
    return list(_GradAverage.apply(*tensors))


def reading_views(resolve, own_state, names):
    """For the engine: ``(resolve', own)`` that hand a loss :func:`grad_average` views
    of the variables it reads — its own (``own_state[name]`` for ``names``) and, through
    ``resolve``, other problems' (one view per read alias, reused on repeated reads)."""
    views = {}

    def viewed(S):
        alias = resolve(S)
        if id(alias) not in views:
            views[id(alias)] = (alias, dict(zip(alias, grad_average(list(alias.values())))))
        return views[id(alias)][1]

    return viewed, dict(zip(names, grad_average([own_state[k] for k in names])))


def broadcast_parameters(problems: Iterable[Any], src: int = 0) -> None:
    """Copies every problem's parameters and buffers from rank ``src`` to all ranks
    (shared tensors once). Nothing without a process group.

    A tensor on a device the backend does not take (a CPU parameter under NCCL: the
    engine built before the models moved to the GPU) is broadcast through a copy on
    :func:`collective_device` and copied back; it stays where it was."""
    if not is_distributed() or world_size() == 1:
        return
    seen, tensors = set(), []
    for P in problems:
        for t in list(P.module.parameters()) + list(P.module.buffers()):
            if id(t) not in seen:
                seen.add(id(t))
                tensors.append(t)
    with torch.no_grad():
        for t in tensors:
            dev = collective_device(t.device)
            if dev == t.device:
                dist.broadcast(t.data, src)
            else:
                moved = t.detach().to(dev)
                dist.broadcast(moved, src)
                t.data.copy_(moved)


# ------------------------------------------------------------------------ data
def shard(items: Any, rank_: Optional[int] = None, world: Optional[int] = None,
          drop_last: bool = False):
    """This rank's part of a dataset, with ``torch.utils.data.DistributedSampler``'s
    semantics (no shuffling): rank ``r`` of ``W`` takes items ``r, r+W, r+2W, ...``.

    Without ``drop_last`` the items are first padded by repeating the first ones up
    to a multiple of ``W`` (every rank gets the same number, as DistributedSampler
    does); with it the tail is dropped. Works for anything indexable with a length:
    a list of batches (each rank then takes every W-th batch), a tensor (its rows),
    a ``TensorDataset``.

    Exact parity with one process needs equal local batches: with mean-reduced
    losses the average of the local means is then the global mean.
    """
    r = rank() if rank_ is None else rank_
    W = world_size() if world is None else world
    n = len(items)
    if W == 1:
        return items
    if drop_last:
        total = (n // W) * W
        idx = list(range(total))
    else:
        total = math.ceil(n / W) * W
        idx = [i % n for i in range(total)]
    mine = idx[r:total:W]
    if isinstance(items, Tensor):
        return items[torch.tensor(mine, dtype=torch.long, device=items.device)]
    if isinstance(items, (list, tuple)):
        return type(items)(items[i] for i in mine)
    return torch.utils.data.Subset(items, mine)


def _rows(batch: Any, r: int, W: int):
    if isinstance(batch, Tensor):
        if batch.dim() == 0 or batch.shape[0] % W:
            raise ValueError(f"shard_batches: a batch of {batch.shape[0] if batch.dim() else 0} rows "
                             f"cannot be split into {W} equal parts; use a global batch size "
                             f"divisible by the world size (or drop_last batches)")
        return batch[r::W]
    if isinstance(batch, (tuple, list)):
        return type(batch)(_rows(b, r, W) for b in batch)
    if isinstance(batch, dict):
        return {k: _rows(v, r, W) for k, v in batch.items()}
    return batch


class shard_batches:
    """A stream of global batches, of which this rank keeps rows ``r, r+W, ...``.

    Every rank iterates the same stream (same seed), so the union of the ranks' local
    batches is exactly the batch one process would see: a run on W ranks is the
    one-process run on the same global batches (up to floating-point summation
    order). Batches are tensors or tuples/lists/dicts of tensors; their first
    dimension must be divisible by W. Re-iterable when ``stream`` is.
    """

    def __init__(self, stream: Iterable, rank_: Optional[int] = None, world: Optional[int] = None):
        self.stream = stream
        self.rank = rank() if rank_ is None else rank_
        self.world = world_size() if world is None else world

    def __iter__(self) -> Iterator:
        for batch in self.stream:
            yield _rows(batch, self.rank, self.world)
