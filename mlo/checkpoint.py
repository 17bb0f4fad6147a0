"""Checkpoints of a whole engine: every problem's variables, buffers, optimizer,
scheduler, counters, and the RNG state.

Written atomically (a temporary file in the same directory, fsync, then
``os.replace``), so an interrupted save never leaves a truncated checkpoint; loaded
with ``torch.load(weights_only=True)`` — no arbitrary code runs on load.

Saving has no effect on the running engine. Inside an open unrolled window the
checkpoint holds the window's current iterates and the differentiable optimizer's
state, but not its autograd graph, which cannot be saved: a run resumed from it
starts a new window at that point, so the next hypergradient of the problems above
differentiates through the remaining steps only — exactly like
:meth:`mlo.Engine.close_windows` at that iteration. Both :func:`save` and
:func:`load` warn when that happens; save when no window is open (e.g. after an
iteration in which the problems above the unrolled ones updated) for a resume that
reproduces the uninterrupted run bit for bit. Data iterators are not saved: a
resumed problem starts its data from the beginning (skip ``P.step_count`` batches
of a re-iterable to realign it).

Integrity. The file holds a SHA-256 checksum over its payload (every tensor's
dtype, shape and bytes and every other value, in a fixed order), verified at load.
:func:`load` is transactional: it validates everything first — that the file is a
readable checkpoint, its format version, the problem names, each problem's
variable names, shapes and dtypes, its optimizer class and parameter groups, the
counters, the checksum — and only then changes the engine; on any error
(:class:`CheckpointError`, a ``ValueError``) the engine is exactly as before.
Temporary files ``.mlo-ckpt-<pid>-*`` left by a killed save are removed by the
next save in that folder.

Periodic checkpoints. ``EngineConfig(checkpoint_every=N, checkpoint_path=DIR,
checkpoint_keep=k)`` makes the engine write ``DIR/ckpt-<iteration>.pt`` (the
iteration zero-padded to six digits, e.g. ``ckpt-000120.pt``) at the end of every
N-th iteration — at the first later iteration end with no unrolled window open
when one is open then (:class:`PeriodicCheckpoints`), so that every periodic
checkpoint resumes bit for bit — and keep the newest k. Find the newest with
:func:`latest` (``mlo.checkpoint.latest(DIR)``: the highest iteration, not the
newest modification time) or list them with :func:`list_checkpoints`.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import re
import tempfile
import warnings
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor

__all__ = ["save", "load", "CheckpointError", "UnreadableCheckpointError", "PeriodicCheckpoints",
           "checkpoint_name", "list_checkpoints", "latest"]

_FORMAT = 2
_READS = (1, 2)        # format 1: the same layout, without checksum and optimizer classes
_PREFIX = ".mlo-ckpt-"
_WRITING: set = set()  # temporary files this process is writing right now
PathLike = Union[str, "os.PathLike[str]"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into this engine; the engine was not changed."""


class UnreadableCheckpointError(CheckpointError, pickle.UnpicklingError):
    """The file is not a readable mlo checkpoint (empty, truncated, text, refused by
    ``weights_only``...). Also a ``pickle.UnpicklingError``, like torch's own error."""


def _detached(st: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v.detach().clone() if isinstance(v, Tensor) else v for k, v in st.items() if v is not None}


def _cls_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _same_class(saved: str, cls: type) -> bool:
    """The saved class name denotes ``cls`` (the same class name, wherever its module now is)."""
    return saved == _cls_name(cls) or saved.rsplit(".", 1)[-1] == cls.__qualname__.rsplit(".", 1)[-1]


def _problem_blob(engine, P) -> Dict[str, Any]:
    """``P``'s module and optimizer state dicts; inside an open window, its iterates
    and the differentiable twin's state instead of the (stale) real ones."""
    module, optim = P.module.state_dict(), P.optimizer.state_dict()
    win = engine.window(P.name)
    if win is not None:
        state_now = P.own_state()
        it = {id(p): state_now[k].detach().clone() for k, p in zip(P.param_names, P.variables)}
        for k, p in P.module.named_parameters(remove_duplicate=False):   # tied names too
            if id(p) in it:
                module[k] = it[id(p)]
        index = {id(p): i for i, p in enumerate(p for g in P.optimizer.param_groups for p in g["params"])}
        state = dict(optim["state"])
        for p, st in zip(P.variables, win.fopt.state):
            state[index[id(p)]] = _detached(st)
        optim = {**optim, "state": state}
    return {"module": module, "optimizer": optim, "optimizer_class": _cls_name(type(P.optimizer)),
            "scheduler": P.scheduler.state_dict() if P.scheduler is not None else None,
            "scheduler_class": _cls_name(type(P.scheduler)) if P.scheduler is not None else None,
            "step_count": P.step_count, "ready_count": P.ready_count,
            "batches_taken": engine.state[P.name].batches_taken}


def _digest(blob: Any) -> str:
    """SHA-256 over a checkpoint's payload: every tensor's dtype, shape and bytes and
    every other value's type and repr, walking dicts (in their order) and sequences."""
    h = hashlib.sha256()

    def walk(x):
        if isinstance(x, Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}|".encode())
            if t.numel():
                h.update(t.reshape(-1).view(torch.uint8).numpy().data)
        elif isinstance(x, dict):
            h.update(b"{%d|" % len(x))
            for k, v in x.items():
                walk(k)
                walk(v)
        elif isinstance(x, (list, tuple)):
            h.update(b"[%d|" % len(x))
            for v in x:
                walk(v)
        else:
            h.update(f"{type(x).__name__}:{x!r}|".encode())

    walk(blob)
    return h.hexdigest()


def _warn_open(open_windows: Dict[str, int], where: str) -> None:
    if open_windows:
        desc = ", ".join(f"{n!r} ({k} step(s) in)" for n, k in sorted(open_windows.items()))
        warnings.warn(
            f"{where} inside open unrolled window(s) of {desc}: the autograd graph of those "
            f"steps is not saved, so a resumed run truncates there (the next hypergradient "
            f"differentiates only through the steps after the resume). Save when no window "
            f"is open for an exact resume", RuntimeWarning, stacklevel=3)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except Exception:      # no permission to signal it, or no such call: assume it lives
        return True
    return True


def _remove_stale(directory: str) -> None:
    """Removes temporary files of saves that were killed (their process is gone)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for f in names:
        if not f.startswith(_PREFIX):
            continue
        full = os.path.join(directory, f)
        if full in _WRITING:
            continue
        pid = f[len(_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue      # another live process is saving in this folder
        try:
            os.unlink(full)
        except OSError:
            pass


def save(engine, path: PathLike) -> None:
    """Saves ``engine`` to ``path`` atomically, without changing the running engine.

    Warns (``RuntimeWarning``) when an unrolled window is open (module docstring).
    Removes temporary files of earlier saves in that folder whose process is gone.

    Data parallel (``torch.distributed`` initialised with more than one rank): call it
    on every rank. Only rank 0 writes (every rank holds the same state); all ranks
    then wait for the file, and an error on rank 0 is raised on every rank (one
    all-reduce of a flag on :func:`mlo.distributed.collective_device`: CUDA under NCCL,
    CPU under gloo). Load with
    :func:`load` on every rank (the file must be visible to all of them).
    """
    from . import distributed as _dist

    if not (_dist.is_distributed() and _dist.world_size() > 1):
        return _save(engine, path)
    error = None
    if _dist.rank() == 0:
        try:
            _save(engine, path)
        except BaseException as e:   # re-raised below, after telling the other ranks
            error = e
    # On the process group's device (NCCL takes no CPU tensor: cuda:LOCAL_RANK there).
    failed = torch.tensor([0.0 if error is None else 1.0], device=_dist.collective_device("cpu"))
    torch.distributed.all_reduce(failed)      # also the barrier: the file exists after this
    if error is not None:
        raise error
    if failed.item():
        raise RuntimeError(f"checkpoint save to {os.fspath(path)} failed on rank 0")


def _save(engine, path: PathLike) -> None:
    open_windows = engine.open_windows()
    _warn_open(open_windows, "checkpoint saved")
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    counters = engine.state.counters()
    blob: Dict[str, Any] = {"format": _FORMAT, "iteration": counters["iteration"],
                            "since": {n: c["since"] for n, c in counters["problems"].items()},
                            "last_block": {n: c["last_block"] for n, c in counters["problems"].items()
                                           if c["last_block"] is not None},
                            "records": {n: dict(r) for n, r in engine.records.items()},
                            "open_windows": open_windows,
                            "rng": {"cpu": torch.get_rng_state(), "cuda": cuda},
                            "problems": {n: _problem_blob(engine, P) for n, P in engine.problems.items()}}
    if counters["resume"]:     # saved inside an interrupted iteration (mlo.Engine.step)
        blob["resume"] = counters["resume"]
    blob["checksum"] = {"sha256": _digest(blob)}
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    _remove_stale(directory)
    fd, tmp = tempfile.mkstemp(prefix=f"{_PREFIX}{os.getpid()}-", dir=directory)
    _WRITING.add(tmp)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(blob, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    finally:
        _WRITING.discard(tmp)


def _reason(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    if len(msg) > 160:
        msg = msg[:157] + "..."
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def _read(path: str) -> Dict[str, Any]:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except Exception as e:   # empty, truncated, text, corrupt zip, refused by weights_only
        raise UnreadableCheckpointError(f"not a readable mlo checkpoint: {path} ({_reason(e)})") from None
    if not isinstance(blob, dict) or "format" not in blob or "problems" not in blob:
        raise CheckpointError(f"{path}: not an mlo checkpoint (format {_FORMAT}): a "
                              f"{type(blob).__name__} without 'format' and 'problems'")
    if blob["format"] not in _READS:
        raise CheckpointError(f"{path}: not an mlo checkpoint (format {_FORMAT}): checkpoint "
                              f"format {blob['format']!r}, this mlo reads formats {list(_READS)}")
    return blob


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _check_problem(engine, name: str, st: Any, errors: List[str]) -> None:
    P = engine.problems[name]
    pre = f"problem {name!r}"
    if not isinstance(st, dict):
        errors.append(f"{pre}: entry is a {type(st).__name__}, not a dict")
        return
    missing = [k for k in ("module", "optimizer", "step_count", "ready_count") if k not in st]
    if missing:
        errors.append(f"{pre}: entry has no {missing}")
        return
    for k in ("step_count", "ready_count", "batches_taken"):
        if k in st and not _is_int(st[k]):
            errors.append(f"{pre}: {k!r} is {st[k]!r}, not an integer >= 0")
    have, saved = P.module.state_dict(), st["module"]
    if not isinstance(saved, dict):
        errors.append(f"{pre}: 'module' is a {type(saved).__name__}, not a state dict")
        return
    gone, extra = sorted(set(have) - set(saved)), sorted(set(saved) - set(have))
    if gone or extra:
        errors.append(f"{pre}: variables differ (missing from the checkpoint: {gone}, not in the "
                      f"engine: {extra})")
    for k in have:
        a, b = have[k], saved.get(k)
        if isinstance(a, Tensor) and k in saved:
            if not isinstance(b, Tensor):
                errors.append(f"{pre}: {k!r} is a {type(b).__name__} in the checkpoint, a tensor here")
            elif a.shape != b.shape:
                errors.append(f"{pre}: {k!r} has shape {list(b.shape)} in the checkpoint, "
                              f"{list(a.shape)} in the engine")
            elif a.dtype != b.dtype:
                errors.append(f"{pre}: {k!r} has dtype {b.dtype} in the checkpoint, {a.dtype} in the engine")
    opt = st["optimizer"]
    mine = type(P.optimizer)
    cls = st.get("optimizer_class")
    if cls is not None and not _same_class(cls, mine):
        errors.append(f"{pre}: the checkpoint's optimizer is {cls}, the engine's is {_cls_name(mine)}")
    elif not isinstance(opt, dict) or not isinstance(opt.get("state"), dict) \
            or not isinstance(opt.get("param_groups"), list):
        errors.append(f"{pre}: 'optimizer' is not an optimizer state dict")
    else:
        groups = P.optimizer.param_groups
        if len(opt["param_groups"]) != len(groups):
            errors.append(f"{pre}: the checkpoint's optimizer has {len(opt['param_groups'])} "
                          f"parameter group(s), the engine's {len(groups)}")
        else:
            for i, (sg, g) in enumerate(zip(opt["param_groups"], groups)):
                if not isinstance(sg, dict) or len(sg.get("params", ())) != len(g["params"]):
                    errors.append(f"{pre}: optimizer parameter group {i} has "
                                  f"{len(sg.get('params', ())) if isinstance(sg, dict) else '?'} "
                                  f"parameter(s) in the checkpoint, {len(g['params'])} in the engine")
                elif set(sg) != set(g):
                    errors.append(f"{pre}: optimizer parameter group {i} has settings "
                                  f"{sorted(sg)} in the checkpoint, {sorted(g)} in the engine "
                                  f"({mine.__name__}): was the optimizer class changed?")
    sched, scls = st.get("scheduler"), st.get("scheduler_class")
    if P.scheduler is not None and sched is not None:
        if not isinstance(sched, dict):
            errors.append(f"{pre}: 'scheduler' is not a scheduler state dict")
        elif scls is not None and not _same_class(scls, type(P.scheduler)):
            errors.append(f"{pre}: the checkpoint's scheduler is {scls}, the engine's is "
                          f"{_cls_name(type(P.scheduler))}")
    for k in ("step_count", "ready_count"):
        if not _is_int(st[k]):
            errors.append(f"{pre}: {k} is {st[k]!r}, not an integer >= 0")


def _validate(engine, blob: Dict[str, Any], path: str) -> None:
    """Raises :class:`CheckpointError` listing every mismatch; changes nothing."""
    if not isinstance(blob["problems"], dict):
        raise CheckpointError(f"{path}: 'problems' is a {type(blob['problems']).__name__}, not a dict")
    saved, have = set(blob["problems"]), set(engine.problems)
    if saved != have:
        raise CheckpointError(f"{path}: checkpoint has problems {sorted(saved)}, engine has "
                              f"{sorted(have)} (missing: {sorted(have - saved)}, extra: {sorted(saved - have)})")
    errors: List[str] = []
    for k in ("iteration", "since"):
        if k not in blob:
            errors.append(f"no {k!r} entry")
    if "iteration" in blob and not _is_int(blob["iteration"]):
        errors.append(f"'iteration' is {blob['iteration']!r}, not an integer >= 0")
    if "resume" in blob and not _is_int(blob["resume"]):
        errors.append(f"'resume' is {blob['resume']!r}, not an integer >= 0")
    since = blob.get("since", {})
    if not isinstance(since, dict) or not all(
            n in have and isinstance(c, dict) and set(c) <= set(engine.graph.lowers(n))
            and all(_is_int(v) for v in c.values()) for n, c in since.items()):
        errors.append(f"'since' does not match the engine's graph (got {since!r})")
    lb = blob.get("last_block")
    if lb is not None and not (isinstance(lb, dict) and all(n in have and isinstance(v, int)
                                                             for n, v in lb.items())):
        errors.append(f"'last_block' is not {{problem: int}} (got {lb!r})")
    rec = blob.get("records")
    if rec is not None and not (isinstance(rec, dict) and all(n in have and isinstance(r, dict)
                                                               for n, r in rec.items())):
        errors.append("'records' is not {problem: dict}")
    rng = blob.get("rng")
    if rng is not None and not (isinstance(rng, dict) and isinstance(rng.get("cpu"), Tensor)
                                and rng["cpu"].dtype == torch.uint8
                                and rng["cpu"].shape == torch.get_rng_state().shape):
        errors.append("'rng' does not hold a CPU generator state")
    for name in engine.problems:
        _check_problem(engine, name, blob["problems"][name], errors)
    if errors:
        raise CheckpointError(f"{path}: does not fit this engine (nothing was loaded): " + "; ".join(errors))
    stored = blob.get("checksum")
    if stored is None and blob["format"] >= 2:
        raise CheckpointError(f"{path}: checkpoint has no checksum (format {blob['format']} always "
                              f"stores one): it was altered")
    if stored is not None:
        body = {k: v for k, v in blob.items() if k != "checksum"}
        got = _digest(body)
        want = stored.get("sha256") if isinstance(stored, dict) else None
        if got != want:
            raise CheckpointError(f"{path}: checksum mismatch (stored sha256 {str(want)[:16]}..., "
                                  f"payload {got[:16]}...): the file is corrupt or was altered; "
                                  f"nothing was loaded")


# Group keys a scheduler drives: with a scheduler, the configured value is compared
# through "initial_lr" (the rate the schedule starts from) instead.
_SCHEDULED = ("lr", "momentum", "betas")


def _same_setting(a: Any, b: Any) -> bool:
    """Whether two parameter-group values are equal (tensors by value, ``1 == 1.0``)."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        try:
            return torch.equal(torch.as_tensor(a).detach().cpu().double(),
                               torch.as_tensor(b).detach().cpu().double())
        except (TypeError, RuntimeError, ValueError):
            return False
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    try:
        return bool(a == b)
    except (TypeError, ValueError, RuntimeError):
        return False


def _replaced_settings(engine, blob: Dict[str, Any]) -> List[str]:
    """``"problem 'lo' group 0: lr 0.1 -> 0.05"`` for every parameter-group setting
    that loading ``blob`` changes: the engine's value, then the checkpoint's. Not
    compared: ``params``; the keys a problem learns (``optimizer_hyperparameters``,
    recomputed before its next step; a problem that overrides it and has not stepped
    yet is skipped); with a scheduler, ``lr``/``momentum``/``betas`` (``initial_lr``
    is)."""
    from .problem import Problem
    out = []
    for name, P in engine.problems.items():
        learned = engine.state.learned_hp.get(name)
        if learned is None and type(P).optimizer_hyperparameters is not Problem.optimizer_hyperparameters:
            continue                 # it learns some keys; which, its first step will say
        skip = set(learned or ()) | {"params"} | (set(_SCHEDULED) if P.scheduler is not None else set())
        saved = blob["problems"][name]["optimizer"]["param_groups"]
        for i, (sg, g) in enumerate(zip(saved, P.optimizer.param_groups)):
            changes = [f"{k} {g[k]!r} -> {sg[k]!r}" for k in g
                       if k not in skip and k in sg and not _same_setting(g[k], sg[k])]
            if changes:
                out.append(f"problem {name!r} group {i}: {', '.join(changes)}")
    return out


def load(engine, path: PathLike, realign_data: bool = False) -> None:
    """Restores ``engine`` (built with the same problems) from ``path``.

    Validates everything before changing anything (module docstring): on any error
    the engine is exactly as before. Also restores the global RNG state (CPU, and
    CUDA when saved and available). Warns (``RuntimeWarning``) when the checkpoint
    was saved inside an open window.

    Optimizer settings come from the checkpoint. Like torch's
    ``optimizer.load_state_dict``, which it calls, loading restores every parameter
    group's hyperparameters (``lr``, ``momentum``, ``betas``, ``weight_decay``, ...)
    as they were saved, replacing those the engine was built with: resuming continues
    the saved run. When a saved value differs from the engine's, one
    ``RuntimeWarning`` lists each (problem, group, key, the engine's value and the
    checkpoint's); to run on with the engine's values, set them again after loading
    (``for g in P.optimizer.param_groups: g["lr"] = ...``). Not compared: values a
    problem learns (``optimizer_hyperparameters``, recomputed before its next step)
    and, under a scheduler, ``lr``/``momentum``/``betas`` (the schedule's state is
    restored too; its ``initial_lr`` is compared).

    Args:
        realign_data: also start every problem's data over and consume the batches it
            had consumed when saved (:meth:`mlo.Problem.skip_batches`), before the RNG
            state is restored — for data that is re-iterable in the same order or a
            fresh deterministic stream (e.g. seeded generators of its own): the resumed
            run then sees the batches the uninterrupted one saw.

    Raises:
        UnreadableCheckpointError: ``not a readable mlo checkpoint: PATH (reason)`` —
            empty, truncated or text file, or refused by ``weights_only``.
        CheckpointError: not an mlo checkpoint, another format version, other problem
            names, variable names, shapes or dtypes, another optimizer class, missing
            counters, or a checksum mismatch (a corrupt file). Both are ``ValueError``.
        FileNotFoundError: no such file.
    """
    path = os.fspath(path)
    blob = _read(path)
    _validate(engine, blob, path)
    replaced = _replaced_settings(engine, blob)
    # ---- apply (validated: nothing below is expected to fail)
    engine.close_windows()
    for name, P in engine.problems.items():
        st = blob["problems"][name]
        P.module.load_state_dict(st["module"])
        P.optimizer.load_state_dict(st["optimizer"])
        if P.scheduler is not None and st.get("scheduler") is not None:
            P.scheduler.load_state_dict(st["scheduler"])
    last_block = blob.get("last_block") or {}
    engine.state.load_counters({
        "iteration": blob["iteration"], "resume": blob.get("resume", 0),
        "problems": {n: {"step_count": st["step_count"], "ready_count": st["ready_count"],
                         "since": blob["since"].get(n, {}), "last_block": last_block.get(n),
                         "batches_taken": st.get("batches_taken", st["step_count"])}
                     for n, st in blob["problems"].items()}})
    for name, rec in (blob.get("records") or {}).items():
        engine.records[name] = dict(rec)
    if realign_data:
        for name, P in engine.problems.items():
            P.skip_batches(engine.state[name].batches_taken)
    rng = blob.get("rng")
    if rng is not None:
        torch.set_rng_state(rng["cpu"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    _warn_open(blob.get("open_windows") or {}, f"{path}: checkpoint was saved")
    if replaced:
        warnings.warn(f"{path}: loading replaced optimizer settings the engine was built with by "
                      f"the checkpoint's (engine -> checkpoint; torch's optimizer.load_state_dict "
                      f"restores parameter groups, so the resumed run continues with the saved "
                      f"ones): {'; '.join(replaced)}. To run on with the engine's values, set them "
                      f"again after loading (for g in P.optimizer.param_groups: g[key] = value)",
                      RuntimeWarning, stacklevel=2)


# ------------------------------------------------------------ periodic checkpoints
_PERIODIC = re.compile(r"^ckpt-(\d+)\.pt$")


def checkpoint_name(iteration: int) -> str:
    """The file name of the periodic checkpoint of ``iteration``: ``ckpt-000120.pt``
    (six digits at least; iterations past 999 999 take more, and :func:`latest` orders
    by the number, not the name)."""
    return f"ckpt-{int(iteration):06d}.pt"


def list_checkpoints(directory: PathLike) -> List[Tuple[int, str]]:
    """``[(iteration, path), ...]`` of the periodic checkpoints (``ckpt-<iteration>.pt``)
    in ``directory``, oldest (lowest iteration) first; ``[]`` when the directory does
    not exist. Temporary files of saves in progress are not listed."""
    directory = os.fspath(directory)
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    found = []
    for f in names:
        m = _PERIODIC.match(f)
        if m:
            found.append((int(m.group(1)), os.path.join(directory, f)))
    return sorted(found)


def latest(directory: PathLike) -> Optional[str]:
    """The path of the newest periodic checkpoint in ``directory`` — the highest
    iteration — or ``None`` when there is none. Resume with
    ``mlo.checkpoint.load(engine, mlo.checkpoint.latest(DIR))``."""
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


class PeriodicCheckpoints:
    """The writer behind ``EngineConfig(checkpoint_every=N, checkpoint_path=DIR,
    checkpoint_keep=k)``; the engine calls :meth:`after_iteration` at the end of every
    iteration (after logging, validation and the ``after_iteration`` callbacks).

    * **When.** A checkpoint is due at the end of every iteration that is a multiple of
      N (``engine.iteration % N == 0``). It is written then if no unrolled window is
      open; otherwise it waits for the first later iteration end with none open (the
      iteration in which the problems above the unrolled ones consume their windows)
      and is named after *that* iteration. Windows are not closed for it: closing a
      window truncates the hypergradient (it would change the run's arithmetic), and a
      checkpoint saved inside one cannot resume bit for bit (:func:`save`). So every
      periodic checkpoint resumes exactly the run that wrote it. Saving changes nothing
      in the running engine. If a due checkpoint has waited N iterations (windows are
      always open at iteration ends, e.g. a lower whose upper never becomes ready), one
      ``RuntimeWarning`` says so. A checkpoint still waiting when ``run`` returns is
      not written: save the final state yourself (after ``engine.close_windows()`` if
      you accept the truncation).
    * **Atomic, keeps the last k.** Each file is written by :func:`save` (temporary
      file, fsync, ``os.replace``). Only after it is in place are older periodic
      checkpoints deleted, the newest ``k`` (by iteration) kept; with ``k=None`` none
      is deleted. Files of a *higher* iteration than the one just written (left by an
      earlier run past the point this one was resumed from) are left alone; this run
      overwrites them when it gets there. A failed save raises (``OSError``,
      ``RuntimeError``...) out of ``engine.step()`` after the iteration is complete
      (``engine.iteration`` counts it) and deletes nothing: the previous checkpoints
      are intact. The next attempt is at the next multiple of N.
    * **Data parallel.** Every rank calls :func:`save` at the same iteration (the
      schedule and the windows are the same on every rank); rank 0 writes and, after
      every rank has seen the file written, deletes the old ones.

    What a checkpoint does not hold (data iterators, early-stopping state, validation
    history) is listed in this module's docstring.

    Args:
        directory: the folder of the ``ckpt-<iteration>.pt`` files (created on the
            first save).
        every: N, iterations between checkpoints (>= 1).
        keep: how many to keep (>= 1), or ``None`` for all.
    """

    def __init__(self, directory: PathLike, every: int, keep: Optional[int] = 3):
        self.directory = os.fspath(directory)
        self.every = every
        self.keep = keep
        #: The iteration at which the checkpoint now waiting for a window-free
        #: iteration end became due, or ``None``.
        self.pending_since: Optional[int] = None
        #: The path of the last periodic checkpoint this writer saved, or ``None``.
        self.last_path: Optional[str] = None
        self._warned = False

    def after_iteration(self, engine) -> Optional[str]:
        """Writes the checkpoint when due and no window is open; returns its path (else
        ``None``)."""
        it = engine.iteration
        if self.pending_since is None and it % self.every == 0:
            self.pending_since = it
        if self.pending_since is None:
            return None
        open_windows = engine.open_windows()
        if open_windows:
            if not self._warned and it - self.pending_since >= self.every:
                self._warned = True
                desc = ", ".join(f"{n!r}" for n in sorted(open_windows))
                warnings.warn(
                    f"EngineConfig(checkpoint_every={self.every}): the checkpoint due at iteration "
                    f"{self.pending_since} is still waiting at iteration {it}: unrolled window(s) of "
                    f"{desc} are open at every iteration end, and a checkpoint is only written "
                    f"when none is (mlo.checkpoint.PeriodicCheckpoints)", RuntimeWarning, stacklevel=4)
            return None
        return self.write(engine)

    def write(self, engine) -> str:
        """Saves ``engine`` to ``<directory>/ckpt-<iteration>.pt`` now, then deletes
        the periodic checkpoints beyond the newest ``keep``; returns the path."""
        from . import distributed as _dist

        self.pending_since = None        # a failed save is retried at the next multiple
        path = os.path.join(self.directory, checkpoint_name(engine.iteration))
        save(engine, path)               # raises on failure: nothing is deleted then
        self.last_path = path
        if self.keep is not None and _dist.is_main():
            self._prune(engine.iteration)
        return path

    def _prune(self, current: int) -> None:
        older = [p for i, p in list_checkpoints(self.directory) if i <= current]
        for p in older[:-self.keep]:
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
            except OSError as e:     # the new checkpoint is written: do not fail the run
                warnings.warn(f"EngineConfig(checkpoint_keep={self.keep}): could not delete the old "
                              f"checkpoint {p} ({_reason(e)})", RuntimeWarning, stacklevel=4)
