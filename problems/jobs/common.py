"""What the runnable jobs share: bad input as one ``error:`` line, and run folders.

A job reports invalid input (a missing file, a preset with unknown keys, ...) by raising
:class:`UsageError`; its ``main`` prints ``error: <message>`` on stderr and exits with
code 2. :func:`claim_out` is the check every job makes before writing into ``--out``: a
folder that already holds a run is never overwritten silently.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional, Sequence

import yaml

import mlo.checkpoint
from mlo.config import load_yaml

__all__ = ["UsageError", "one_line", "read_yaml", "CHECKPOINTS", "existing_run", "claim_out"]

CHECKPOINTS = "checkpoints"   # the folder of --checkpoint-every's checkpoints under --out


class UsageError(Exception):
    """Bad input: reported as one ``error: ...`` line, exit code 2."""


def one_line(e: BaseException, limit: Optional[int] = 400) -> str:
    """The message of ``e`` on one line (whitespace runs collapsed), cut at ``limit``
    characters (``None``: never cut)."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if limit is None or len(text) <= limit else text[:limit] + " ..."


def read_yaml(path: Path, what: str, limit: Optional[int] = 400) -> Any:
    """``mlo.config.load_yaml(path)`` (strict: duplicate keys named, ``1e-3`` a float);
    an unreadable or invalid file is a :class:`UsageError` starting with ``what``
    (e.g. ``"preset"``)."""
    try:
        return load_yaml(path)
    except OSError as e:
        raise UsageError(f"cannot read {what} {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise UsageError(f"{what} {one_line(e, limit)}") from None
    except yaml.YAMLError as e:
        raise UsageError(f"{what} {path} is not valid YAML: {one_line(e, limit)}") from None


def existing_run(out: Path, run_files: Sequence[str]) -> List[str]:
    """What makes ``out`` a run folder: those of ``run_files`` it holds, then its newest
    periodic checkpoint as ``checkpoints/ckpt-<iteration>.pt`` (``[]``: none, or no folder)."""
    found = [f for f in run_files if (out / f).is_file()]
    periodic = mlo.checkpoint.list_checkpoints(out / CHECKPOINTS) if (out / CHECKPOINTS).is_dir() else []
    return found + [f"{CHECKPOINTS}/{Path(p).name}" for _, p in periodic[-1:]]


def claim_out(out: Path, run_files: Sequence[str], overwrite: bool, resume: Optional[Path] = None,
              resume_file: Optional[str] = None, delete: bool = True) -> None:
    """Refuses an ``out`` that holds a run (:func:`existing_run`) unless ``overwrite``
    (then its ``run_files`` and periodic checkpoints are deleted) or ``resume`` names a
    checkpoint in ``out`` or ``out/checkpoints`` (which continues that run there).

    Args:
        out: the ``--out`` folder (it need not exist).
        run_files: the files a run writes into ``out`` that mark it as a run.
        overwrite: ``--overwrite`` was given.
        resume: the ``--resume`` checkpoint, if any (never deleted).
        resume_file: for jobs that can resume: the checkpoint the error message suggests
            continuing from (e.g. ``"checkpoint.pt"``); ``None``: no such hint.
        delete: whether this process deletes the old run (``False`` on ranks other than 0).

    Raises:
        UsageError: ``out`` is a file, or holds a run and neither ``overwrite`` nor a
            ``resume`` from it was given.
    """
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    found = existing_run(out, run_files)
    if not found:
        return
    folders = {out.resolve(), (out / CHECKPOINTS).resolve()}
    resuming_here = resume is not None and resume.resolve().parent in folders
    if not overwrite:
        if resuming_here:
            return
        hint = (f"pass --out DIR for a new folder, --overwrite to replace it, or --resume "
                f"{out / resume_file} to continue it" if resume_file else
                "pass --out DIR for a new folder or --overwrite to replace it")
        raise UsageError(f"--out {out} already holds a run ({', '.join(found)}); {hint}")
    if not delete:
        return
    keep = resume.resolve() if resume is not None else None
    old = [out / f for f in run_files] + [Path(p) for _, p in mlo.checkpoint.list_checkpoints(out / CHECKPOINTS)]
    for f in old:
        if f.is_file() and f.resolve() != keep:
            f.unlink()
