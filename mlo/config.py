"""Per-problem and per-engine settings (plain dataclasses, YAML-friendly)."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
import functools
import math
import numbers
import os
from typing import Any, Callable, Dict, List, Optional, Union

__all__ = ["ProblemConfig", "EngineConfig", "load_problem_configs", "load_yaml", "IMPLICIT_BATCHES"]

#: The values of ``ProblemConfig.implicit_batch``.
IMPLICIT_BATCHES = ("last", "fresh", "window")


@dataclass
class ProblemConfig:
    """Settings of one problem.

    Attributes:
        unroll_steps: steps this problem takes per step of the problems above it
            (Betty's semantics): an upper problem becomes ready once every problem
            directly below it has taken its ``unroll_steps`` steps.
        update_every: the problem updates only on every N-th time it becomes ready.
            This counts readinesses, not iterations: with a lower that unrolls 2
            steps, ``update_every=5`` is one update per 10 iterations. A skipped
            update still ends the unrolled windows below it.
        update_every_iterations: update at most once per block of N engine
            iterations — at the first readiness inside each block ``[jN, (j+1)N)``
            (MLO-MAE's "update the mask network every N iterations"). ``None``: no
            such limit. Combines with ``update_every`` (both must allow it).
        method: how this problem's *best response* is differentiated for the
            problems above it: ``"unrolled"``, ``"neumann"``, ``"cg"``,
            ``"finite_difference"`` (alias ``"darts"``) — any name in
            ``engines.base.available()``.
        method_options: keyword options of that method (e.g. ``{"iterations": 5,
            "alpha": 0.1}`` for Neumann, ``{"first_order": True}`` for unrolled).
        grad_clip: clip the total gradient (own gradient + hypergradient) to this
            global norm before the optimizer step; ``None`` disables it.
        implicit_batch: which of this problem's batches its loss is evaluated on when
            an implicit or finite-difference method (``cg``, ``neumann``,
            ``finite_difference``/``darts``, ``sama``: any method that does not step
            through a window) differentiates its best response for a problem above
            (docs/methods.md#which-batch-an-implicit-method-sees):

            * ``"last"`` (default): the batch of its last update.
            * ``"fresh"``: its data's next batch, as ``peek_batch()`` shows it when the
              hypergradient is computed; every VJP of one hypergradient computation
              (the Hessian-vector products, both sides of a difference, every path)
              sees that one batch, and an update of a problem above *consumes* it
              (after the update, applied or skipped; counted in ``batches_taken``, so
              checkpoints realign past it). A report (``engine.gradient``, the
              monitor) only peeks: it consumes nothing and sees the batch the next
              update will take.
            * ``"window"``: the mean of its loss over the batches of all its applied
              updates since its window last restarted (the steps a problem above
              consumes: ``unroll_steps`` of them, or more while that upper waits for
              another lower); only the current window's batches are kept.

            Meaningless for a window method (``unrolled``), which differentiates
            through the actual steps and their batches: anything but ``"last"`` with
            such a method is a ``ValueError``.
    """

    unroll_steps: int = 1
    update_every: int = 1
    update_every_iterations: Optional[int] = None
    method: str = "unrolled"
    method_options: Dict[str, Any] = field(default_factory=dict)
    grad_clip: Optional[float] = None
    implicit_batch: str = "last"

    def __post_init__(self):
        for name in ("unroll_steps", "update_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"ProblemConfig.{name} must be an integer >= 1, got {v!r}")
        v = self.update_every_iterations
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ValueError(f"ProblemConfig.update_every_iterations must be an integer >= 1 or "
                             f"None, got {v!r}")
        if not isinstance(self.method, str):
            raise ValueError(f"ProblemConfig.method must be a method name, got {self.method!r}")
        if not isinstance(self.method_options, dict):
            raise ValueError("ProblemConfig.method_options must be a dict, got "
                             f"{type(self.method_options).__name__}")
        c = self.grad_clip
        if c is not None and (not isinstance(c, numbers.Real) or isinstance(c, bool)
                              or not math.isfinite(c) or not c > 0):
            raise ValueError(f"ProblemConfig.grad_clip must be a positive finite number or None, "
                             f"got {c!r} ({type(c).__name__})")
        self._check_implicit_batch()

    def _check_implicit_batch(self) -> None:
        b = self.implicit_batch
        if not isinstance(b, str) or b not in IMPLICIT_BATCHES:
            raise ValueError(f"ProblemConfig.implicit_batch must be one of "
                             f"{', '.join(map(repr, IMPLICIT_BATCHES))}, got {b!r} ({type(b).__name__})")
        if b == "last":
            return
        import engines.base as methods

        try:
            window = methods.info(self.method).window
        except KeyError:        # an unknown method: the engine names it when it is built
            return
        if window:
            raise ValueError(f"ProblemConfig.implicit_batch={b!r} with method={self.method!r}: the "
                             f"choice of batch is for implicit and finite-difference methods, which "
                             f"re-evaluate the lower loss at its current iterate; {self.method!r} "
                             f"differentiates through the window's actual steps and their batches. "
                             f"Leave implicit_batch='last' (the default) or pick another method "
                             f"(e.g. 'cg', 'neumann', 'finite_difference')")

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "ProblemConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ProblemConfig field(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


@dataclass
class EngineConfig:
    """Settings of the engine.

    Attributes:
        validate_every: call ``validation`` every N iterations (``None``: never).
        validation: ``fn(engine) -> dict`` of metrics. It runs with every problem's
            module in ``eval()`` mode (each submodule's previous mode is restored
            afterwards); its results are printed, kept in ``engine.history`` and sent
            to the loggers as ``"val/<metric>"``.
        log_every: print losses (and dict extras of ``training_step``) every N
            iterations and send them to the loggers (``None``: no printing; loggers
            then get them every iteration).
        progress: a tqdm bar in ``engine.run`` showing each problem's last loss and
            extras. ``None`` (default): only when stderr is a terminal; ``True``:
            always; ``False``: never.
        loggers: objects with ``log(iteration, metrics: dict)`` (:mod:`mlo.loggers`:
            ``CSVLogger``, ``TensorBoardLogger``).
        early_stopping: ``{"metric": name, "mode": "min" | "max", "patience": k,
            "min_delta": 0.0}`` — stop ``engine.run`` once the validation metric has
            not improved (by more than ``min_delta``) for ``k`` validations in a row;
            the best state (all modules, optimizers, schedulers) is kept in memory and
            restored by ``engine.restore_best()``. Needs ``validation``.
        monitor: ``{"every": N, "reference": (method, options)}`` (optionally
            ``"problems": [names]``): every N updates of each problem with
            hypergradient paths, its hypergradient is recomputed at the same state
            with the reference method on every problem of its paths and compared with
            the one applied; cosine and relative error go to
            ``engine.records[name]["monitor_cosine" / "monitor_rel_error"]`` and the
            loggers. The run is unchanged. Default reference:
            ``("cg", {"max_iter": 100, "tol": 1e-10})``.
        nonfinite: what an update does when its loss, its own gradient or its
            hypergradient holds a NaN or an infinity (checked before every optimizer
            step, in place or inside an unrolled window): ``"raise"`` (default) raises
            ``FloatingPointError`` naming the problem, the iteration and the quantity;
            ``"skip"`` skips that update with a ``RuntimeWarning`` saying the same.
            Either way the parameters and the optimizer state are left untouched.
            ``"ignore"`` checks nothing (a NaN is applied like any number, as in
            Betty or a hand-written loop) and records no gradient norms
            (``records[name]["grad_norm"]`` etc. are ``None``): the check's norms and
            host reads cost a few per cent of an outer step of a 1k-parameter
            problem (docs/benchmarks.md).
        distributed: data parallelism over ``torch.distributed`` (:mod:`mlo.distributed`):
            ``"auto"`` (default) when a process group with more than one rank is
            initialised, ``True`` (it must be), ``False`` (never: each rank runs alone).
            Then parameters are broadcast from rank 0 at construction, gradients and
            hypergradient products are averaged over ranks, and ranks other than 0
            print, log and show progress nothing.
        device: a torch device (``"cuda:0"``, ``"cpu"``) every problem's module and
            every batch are moved to; ``None`` (default): leave them where they are.
            A device this process cannot use (``"cuda"`` on a CPU-only torch or without
            a visible GPU, ``"cuda:3"`` with two GPUs) is a ``ValueError`` naming this
            field and the available devices (``mlo.precision.available_devices()``).
        precision: ``"fp32"`` (default) or ``"bf16"``: every loss runs under
            ``torch.autocast`` in bfloat16 while variables, gradients and hypergradient
            vectors stay float32 (:mod:`mlo.precision`). ``"fp16"`` is rejected (it
            needs a gradient scaler).
        nesting: how a hypergradient treats levels between a problem and its lowest
            levels. ``"betty"`` (default, Betty's convention): each level's best
            response is differentiated with the levels below it held fixed — a
            level's own hypergradient is a constant in the steps of the level above,
            and its lower windows close when it consumes them. ``"exact"``: the total
            derivative through nested unrolled windows — every level below the top
            steps through a window that stays open until the top consumes it, reads
            between those levels are the live iterates, and each middle level's
            steps are differentiated through their own hypergradient. Needs a single
            top problem and a window method (``"unrolled"``) on every other problem;
            memory grows with all the steps of the top's window (docs/design.md#nesting).
        checkpoint_every: write a checkpoint every N iterations (``None``, the default:
            never): ``<checkpoint_path>/ckpt-<iteration>.pt`` (e.g. ``ckpt-000120.pt``),
            atomically (:func:`mlo.checkpoint.save`), at the end of the iteration
            (after logging, validation and callbacks). When an unrolled window is open
            then, the checkpoint waits for the first later iteration end with none
            open (windows are not closed for it, so the run's arithmetic is unchanged
            and every checkpoint resumes bit for bit) and is named after that
            iteration. Under ``torch.distributed`` every rank saves (rank 0 writes).
            The newest is ``mlo.checkpoint.latest(checkpoint_path)``; details in
            :class:`mlo.checkpoint.PeriodicCheckpoints`. Needs ``checkpoint_path``.
        checkpoint_path: the folder of the periodic checkpoints (created on the first
            save; a ``str`` or ``os.PathLike``, not an existing file). Needs
            ``checkpoint_every``.
        checkpoint_keep: how many periodic checkpoints to keep (default 3; ``None``:
            all). Older ones are deleted only after the new one is in place.
        defer_signals: while ``run`` runs in the main thread, Ctrl-C (SIGINT) and
            SIGTERM finish the current iteration and then raise
            :class:`mlo.interrupt.Interrupted` (a ``KeyboardInterrupt``) at the
            iteration boundary, so no update is cut short (default ``True``; a second
            signal stops at once). Only default handlers are replaced.

    Raises:
        ValueError: a field of the wrong type or out of range (checked on construction).
    """

    validate_every: Optional[int] = None
    validation: Optional[Callable[[Any], Dict[str, float]]] = None
    log_every: Optional[int] = None
    nonfinite: str = "raise"
    progress: Optional[bool] = None
    loggers: List[Any] = field(default_factory=list)
    early_stopping: Optional[Dict[str, Any]] = None
    monitor: Optional[Dict[str, Any]] = None
    distributed: Any = "auto"
    device: Optional[str] = None
    precision: str = "fp32"
    nesting: str = "betty"
    checkpoint_every: Optional[int] = None
    checkpoint_path: Optional[Union[str, "os.PathLike[str]"]] = None
    checkpoint_keep: Optional[int] = 3
    defer_signals: bool = True

    def __post_init__(self):
        from .precision import check as _check_precision

        _check_precision(self.precision, self.device)
        if self.distributed not in ("auto", True, False) or isinstance(self.distributed, int) \
                and not isinstance(self.distributed, bool):
            raise ValueError(f"EngineConfig.distributed must be 'auto', True or False, got "
                             f"{self.distributed!r}")
        for name in ("validate_every", "log_every"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"EngineConfig.{name} must be an integer >= 1 or None, got {v!r} "
                                 f"({type(v).__name__})")
        if self.validation is not None and not callable(self.validation):
            raise ValueError(f"EngineConfig.validation must be a callable fn(engine) -> dict of "
                             f"metrics or None, got {type(self.validation).__name__}")
        self._check_checkpoints()
        if not isinstance(self.defer_signals, bool):
            raise ValueError(f"EngineConfig.defer_signals must be True or False, got "
                             f"{self.defer_signals!r} ({type(self.defer_signals).__name__})")
        if self.nesting not in ("betty", "exact"):
            raise ValueError(f"EngineConfig.nesting must be 'betty' or 'exact', got {self.nesting!r}")
        if self.nonfinite not in ("raise", "skip", "ignore"):
            raise ValueError(f"EngineConfig.nonfinite must be 'raise', 'skip' or 'ignore', got "
                             f"{self.nonfinite!r}")
        if self.progress is not None and not isinstance(self.progress, bool):
            raise ValueError(f"EngineConfig.progress must be True, False or None, got {self.progress!r}")
        if not isinstance(self.loggers, (list, tuple)) or not all(
                callable(getattr(x, "log", None)) for x in self.loggers):
            raise ValueError("EngineConfig.loggers must be a list of objects with a "
                             "log(iteration, metrics) method (see mlo.loggers)")
        es = self.early_stopping
        if es is not None:
            if isinstance(es, dict):
                self.early_stopping = es = dict(es)
            if not isinstance(es, dict) or "metric" not in es or set(es) - {"metric", "mode", "patience", "min_delta"}:
                raise ValueError(f"EngineConfig.early_stopping must be a dict with 'metric' and optional "
                                 f"'mode' ('min'/'max'), 'patience' (int >= 1), 'min_delta' (>= 0), got {es!r}")
            es.setdefault("mode", "min")
            es.setdefault("patience", 5)
            es.setdefault("min_delta", 0.0)
            from .callbacks import _check_settings     # (one place for the named errors)
            _check_settings(es["metric"], es["mode"], es["patience"], es["min_delta"])
            if self.validation is None or self.validate_every is None:
                raise ValueError("EngineConfig.early_stopping needs validation=fn and validate_every=N")
        m = self.monitor
        if m is not None:
            if isinstance(m, dict):
                self.monitor = m = dict(m)
            if not isinstance(m, dict) or set(m) - {"every", "reference", "problems"}:
                raise ValueError(f"EngineConfig.monitor must be a dict with 'every' and optional "
                                 f"'reference' (method, options) and 'problems', got {m!r}")
            m.setdefault("every", 1)
            m.setdefault("reference", ("cg", {"max_iter": 100, "tol": 1e-10}))
            e, ref = m["every"], m["reference"]
            if not isinstance(e, int) or isinstance(e, bool) or e < 1:
                raise ValueError(f"EngineConfig.monitor['every'] must be an integer >= 1, got {e!r}")
            if isinstance(ref, str):
                m["reference"] = ref = (ref, {})
            if not (isinstance(ref, (tuple, list)) and len(ref) == 2 and isinstance(ref[0], str)
                    and isinstance(ref[1], dict)):
                raise ValueError(f"EngineConfig.monitor['reference'] must be a method name or "
                                 f"(method, options dict), got {ref!r}")

    def _check_checkpoints(self) -> None:
        """``checkpoint_every`` / ``checkpoint_path`` / ``checkpoint_keep``: types, ranges,
        and that the first two come together."""
        for name in ("checkpoint_every", "checkpoint_keep"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"EngineConfig.{name} must be an integer >= 1 or None, got {v!r} "
                                 f"({type(v).__name__})")
        path = self.checkpoint_path
        if path is not None:
            if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
                raise ValueError(f"EngineConfig.checkpoint_path must be a folder (a non-empty str or "
                                 f"os.PathLike), got {path!r} ({type(path).__name__})")
            if os.path.exists(path) and not os.path.isdir(path):
                raise ValueError(f"EngineConfig.checkpoint_path must be a folder for the "
                                 f"ckpt-<iteration>.pt files, but {os.fspath(path)} is a file")
        if self.checkpoint_every is not None and path is None:
            raise ValueError(f"EngineConfig.checkpoint_every={self.checkpoint_every} needs "
                             f"checkpoint_path (the folder of the ckpt-<iteration>.pt files)")
        if path is not None and self.checkpoint_every is None:
            raise ValueError(f"EngineConfig.checkpoint_path={os.fspath(path)!r} needs checkpoint_every=N "
                             f"(iterations between checkpoints)")


class _DuplicateKey(Exception):
    pass


@functools.lru_cache(maxsize=None)
def _loader():
    """A ``yaml.SafeLoader`` subclass that rejects duplicate mapping keys and reads
    ``1e-3`` as a float (YAML 1.2; PyYAML's 1.1 resolver makes it a string)."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                seen: Dict[Any, int] = {}
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue
                    key = self.construct_object(key_node, deep=True)
                    line = key_node.start_mark.line + 1
                    try:
                        first = seen.get(key)
                    except TypeError:      # unhashable: the base class names it
                        continue
                    if first is not None:
                        raise _DuplicateKey(f"duplicate key {key!r} at line {line} (first at line "
                                            f"{first}); the later one would silently win")
                    seen[key] = line
            return super().construct_mapping(node, deep)

    Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                                 re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
                                 list("-+0123456789"))
    return Loader


def load_yaml(path: "str | os.PathLike[str]") -> Any:
    """Reads a YAML file strictly: the safe loader (no Python objects), ``1e-3`` read as
    a float, and a key repeated in one mapping is a ``ValueError`` naming the file, the
    key and both lines (PyYAML would silently keep the last one)."""
    import yaml

    with open(path, "r", encoding="utf-8") as f:
        try:
            return yaml.load(f, Loader=_loader())
        except _DuplicateKey as e:
            raise ValueError(f"{path}: {e}") from None


def load_problem_configs(path: "str | os.PathLike[str]") -> Dict[str, ProblemConfig]:
    """Reads ``{problem name: {ProblemConfig fields}}`` from a YAML file (safe loader:
    no Python objects; ``1e-3`` is a float).

    Example file::

        pretrain: {unroll_steps: 2, method: neumann, method_options: {iterations: 5, alpha: 0.1}}
        finetune: {method: cg, method_options: {max_iter: 10}}

    Raises:
        ValueError: the file is not such a mapping, a key appears twice in one mapping
            (the message names the file, the key and both lines), or a field is
            unknown/invalid (the message names the problem).
    """
    data = load_yaml(path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of problem name -> config, got {type(data).__name__}")
    out: Dict[str, ProblemConfig] = {}
    for name, fields_ in data.items():
        if not isinstance(fields_, dict):
            raise ValueError(f"{path}: config of problem {name!r} must be a mapping, got {fields_!r}")
        try:
            out[str(name)] = ProblemConfig.from_dict(fields_)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: problem {name!r}: {e}") from None
    return out
