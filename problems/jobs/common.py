"""What the runnable jobs share: bad input as one ``error:`` line, YAML input, run folders.

A job reports invalid input (a missing file, a preset with unknown keys, ...) by raising
:class:`UsageError`; its ``main`` prints ``error: <message>`` on stderr and exits with
code 2. Presets and ``--set`` values are YAML without anchors or aliases
(:func:`read_yaml`, :func:`parse_yaml_value`): nested aliases can expand a few hundred
bytes into billions of values, so they are refused before anything is built.
:func:`claim_out` is the check every job makes before writing into ``--out``: a folder
that cannot be written is named before any work, and one that already holds a run is
never overwritten silently.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, List, Optional, Sequence

import yaml

import mlo.checkpoint
import mlo.config
from mlo.config import load_yaml

__all__ = ["UsageError", "one_line", "read_yaml", "parse_yaml_value", "refuse_aliases", "MAX_YAML_BYTES",
           "CHECKPOINTS", "existing_run", "check_writable", "claim_out"]

CHECKPOINTS = "checkpoints"   # the folder of --checkpoint-every's checkpoints under --out
MAX_YAML_BYTES = 1 << 20      # a preset or config larger than this is refused unread


class UsageError(Exception):
    """Bad input: reported as one ``error: ...`` line, exit code 2."""


def one_line(e: BaseException, limit: Optional[int] = 400) -> str:
    """The message of ``e`` on one line (whitespace runs collapsed), cut at ``limit``
    characters (``None``: never cut)."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if limit is None or len(text) <= limit else text[:limit] + " ..."


def refuse_aliases(text: str, where: str) -> None:
    """Raises :class:`UsageError` when the YAML ``text`` has an anchor (``&name``) or an
    alias (``*name``). Only parses events — linear in the text, nothing is expanded — so a
    "billion laughs" document is refused in microseconds; the message names ``where`` and
    the line, never the values. Malformed YAML raises ``yaml.YAMLError``."""
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        alias = isinstance(event, yaml.AliasEvent)
        if alias or getattr(event, "anchor", None) is not None:
            what = "alias *" if alias else "anchor &"
            name = str(event.anchor)[:40]
            raise UsageError(f"{where}: line {event.start_mark.line + 1}: YAML {what}{name}: anchors and "
                             f"aliases are not accepted (they can expand a few bytes into billions of "
                             f"values); write the values out")


def read_yaml(path: Path, what: str, limit: Optional[int] = 400) -> Any:
    """``mlo.config.load_yaml(path)`` (strict: duplicate keys named, ``1e-3`` a float)
    after :func:`refuse_aliases` on its text; an unreadable, oversized (above
    :data:`MAX_YAML_BYTES`) or invalid file is a :class:`UsageError` starting with
    ``what`` (e.g. ``"preset"``)."""
    try:
        size = path.stat().st_size
        if size > MAX_YAML_BYTES:
            raise UsageError(f"{what} {path} is {size} bytes; a {what} is at most {MAX_YAML_BYTES} bytes")
        refuse_aliases(path.read_text(encoding="utf-8"), f"{what} {path}")
        return load_yaml(path)
    except OSError as e:
        raise UsageError(f"cannot read {what} {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"{what} {path} is not UTF-8 text (byte {e.start})") from None
    except ValueError as e:
        raise UsageError(f"{what} {one_line(e, limit)}") from None
    except yaml.YAMLError as e:
        raise UsageError(f"{what} {path} is not valid YAML: {one_line(e, limit)}") from None


def parse_yaml_value(text: str, where: str) -> Any:
    """One command-line value (``--set KEY=VALUE``'s VALUE) read as YAML the way presets
    are (safe loader, ``1e-3`` a float, duplicate keys refused, no anchors or aliases);
    a :class:`UsageError` starting with ``where`` when it is not valid YAML."""
    try:
        refuse_aliases(text, where)
        return yaml.load(text, Loader=mlo.config._loader())
    except yaml.YAMLError as e:
        raise UsageError(f"{where}: the value is not valid YAML ({one_line(e, 200)})") from None
    except Exception as e:   # a duplicate key in a mapping value
        if isinstance(e, UsageError):
            raise
        raise UsageError(f"{where}: {one_line(e, 200)}") from None


def existing_run(out: Path, run_files: Sequence[str]) -> List[str]:
    """What makes ``out`` a run folder: those of ``run_files`` it holds, then its newest
    periodic checkpoint as ``checkpoints/ckpt-<iteration>.pt`` (``[]``: none, or no folder)."""
    found = [f for f in run_files if (out / f).is_file()]
    periodic = mlo.checkpoint.list_checkpoints(out / CHECKPOINTS) if (out / CHECKPOINTS).is_dir() else []
    return found + [f"{CHECKPOINTS}/{Path(p).name}" for _, p in periodic[-1:]]


def check_writable(out: Path, flag: str = "--out") -> None:
    """Raises :class:`UsageError` unless the folder ``out`` exists and is writable, or can
    be created: its nearest existing ancestor is a writable folder. Nothing is created."""
    if out.exists():
        if not out.is_dir():
            raise UsageError(f"{flag} {out} is a file, not a folder")
        if not os.access(out, os.W_OK | os.X_OK):
            raise UsageError(f"{flag} {out}: the folder is not writable")
        return
    parent = out.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{flag} {out}: the folder cannot be created, {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {out}: the folder cannot be created, {parent} is not writable")


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
        UsageError: ``out`` is a file or cannot be written (:func:`check_writable`), or
            holds a run and neither ``overwrite`` nor a ``resume`` from it was given.
    """
    check_writable(out)
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
