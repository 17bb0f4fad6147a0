"""Loggers for ``EngineConfig(loggers=[...])``: anything with ``log(iteration, metrics)``.

The protocol is one method (``close()`` is optional)::

    class MyLogger:
        def log(self, iteration: int, metrics: dict) -> None: ...

The engine calls ``log`` with flat ``{key: float}`` dicts: ``"<problem>/loss"`` and
``"<problem>/<extra>"`` (the extras of a ``training_step`` that returns a dict) every
``log_every`` iterations (every iteration when it is ``None``) for the problems that
updated since the last call; ``"val/<metric>"`` after each validation;
``"<problem>/monitor_cosine"`` and ``"<problem>/monitor_rel_error"`` from the
hypergradient monitor.

A logger can also be fed by hand (e.g. from an ``engine.run`` callback that builds its
own rows): ``CSVLogger(path, columns=[...])`` writes a table with a fixed header, and
:meth:`TensorBoardLogger.if_installed` gives ``None`` instead of an ``ImportError`` when
tensorboard is missing.
"""
from __future__ import annotations

import csv
import os
from typing import Callable, Dict, List, Optional, Sequence

__all__ = ["Logger", "CSVLogger", "TensorBoardLogger", "read_csv_log", "csv_log_parts", "csv_header"]

try:
    from typing import Protocol
except ImportError:  # pragma: no cover
    Protocol = object


class Logger(Protocol):
    def log(self, iteration: int, metrics: Dict[str, float]) -> None:  # pragma: no cover
        ...


class CSVLogger:
    """One row per ``log`` call, append-only: ``iteration`` then one column per metric
    key (empty where a row has no value).

    Rows already written are never rewritten. When a key appears that the current file
    has no column for (e.g. ``val/acc`` after the first validation), the logger closes
    that file and starts the next *part* — ``metrics.2.csv``, ``metrics.3.csv``, ... next
    to ``metrics.csv`` (the number before the suffix; a path without a suffix gets
    ``.2``, ``.3``) — whose header holds every column so far, in order of first
    appearance, then the new ones. Each part is a complete CSV file; its header is a
    superset of the previous part's. Keys appear a few times per run (the first update of
    each problem, the first validation), so a run has a few parts. :func:`read_csv_log`
    reads them back as one table; :func:`csv_log_parts` lists them.

    Memory is bounded: no row is kept (only the current columns and the open file), and
    each row is flushed when written. A failed write (a full disk) can cost the row being
    written, never an earlier one.

    Args:
        path: the first part (created with its directory).
        append: ``False`` (default): start a new log — an existing file at ``path`` and its
            later parts (``metrics.2.csv``, ...) are deleted first, so that
            :func:`read_csv_log` never mixes in an older run's parts. ``True``: continue an
            existing log (e.g. a resumed run): rows are appended to its last part, whose
            header (read from the file, not its rows) gives the current columns.
        columns: a fixed table instead: the header ``iteration`` + ``columns`` is written
            when the file is created, every row has exactly these columns (``""`` where
            a row has no value) and there is a single part. A metric outside ``columns``
            is a ``ValueError``. With ``append=True`` an existing file must have exactly
            this header (``ValueError`` otherwise; :func:`csv_header` reads it); a
            missing or empty file is started afresh.
    """

    def __init__(self, path: "str | os.PathLike[str]", append: bool = False,
                 columns: Optional[Sequence[str]] = None):
        self.path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        #: Every column of the current part but ``iteration``, in order.
        self.columns: List[str] = []
        #: The file rows are written to now (``path`` or one of its later parts).
        self.current_path = self.path
        self._part = 1              # current_path is part number _part
        self._header = False        # whether the current part has its header yet
        self.fixed = columns is not None
        if self.fixed:
            self._open_fixed(list(columns), append)
            return
        parts = csv_log_parts(self.path)
        if append and parts:
            self._part, self.current_path = len(parts), parts[-1]
            with open(self.current_path, newline="", encoding="utf-8") as f:
                header = next(csv.reader(f), None)
            if header:
                self.columns, self._header = header[1:], True
                self._open("a")
            else:       # an empty last part: its header comes with the first row
                self._open("w")
        else:
            for p in reversed(parts):
                os.remove(p)
            self._open("w")

    def _open(self, mode: str) -> None:
        self._file = open(self.current_path, mode, newline="", encoding="utf-8")
        self._writer = csv.writer(self._file)

    def _open_fixed(self, columns: List[str], append: bool) -> None:
        """``columns=``: opens ``path`` with the header ``iteration`` + ``columns``."""
        if "iteration" in columns or len(set(columns)) != len(columns):
            raise ValueError(f"CSVLogger(columns=...): the columns must be distinct and must not "
                             f"include 'iteration' (always the first), got {columns}")
        header = ["iteration"] + columns
        found = csv_header(self.path) if append else None
        if found is not None and found != header:
            raise ValueError(f"CSVLogger: cannot append to {self.path}: its header {found} is not "
                             f"the columns {header}")
        self.columns, self._header = columns, True
        self._open("a" if found is not None else "w")
        if found is None:
            self._writer.writerow(header)
            self._file.flush()

    def log(self, iteration: int, metrics: Dict[str, float]) -> None:
        """Appends one row; a new key starts the next part (the class docstring)."""
        known = set(self.columns)
        new = [k for k in metrics if k not in known and k != "iteration"]
        if new and self.fixed:
            raise ValueError(f"CSVLogger({self.path}): metric(s) {new} have no column; "
                             f"columns: {self.columns}")
        if new or not self._header:
            if self._header:                         # the current part is complete: next one
                nxt = _part_path(self.path, self._part + 1)
                f = open(nxt, "w", newline="", encoding="utf-8")   # on failure: still on this part
                self._file.close()
                self._file, self._writer = f, csv.writer(f)
                self._part, self.current_path, self._header = self._part + 1, nxt, False
            self._writer.writerow(["iteration"] + self.columns + new)
            self.columns = self.columns + new
            self._header = True
        self._writer.writerow([iteration] + [metrics.get(c, "") for c in self.columns])
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _part_path(path: str, n: int) -> str:
    """Part ``n`` (1-based) of the CSV log ``path``: ``metrics.csv``, ``metrics.2.csv``, ..."""
    if n == 1:
        return path
    root, ext = os.path.splitext(path)
    return f"{root}.{n}{ext}"


def csv_log_parts(path: "str | os.PathLike[str]") -> List[str]:
    """The files of the :class:`CSVLogger` log ``path`` in order: ``path`` itself, then
    ``metrics.2.csv``, ``metrics.3.csv``, ... up to the first number that does not exist
    (``[]`` when ``path`` does not)."""
    path = os.fspath(path)
    parts, n = [], 1
    while os.path.isfile(_part_path(path, n)):
        parts.append(_part_path(path, n))
        n += 1
    return parts


def csv_header(path: "str | os.PathLike[str]") -> Optional[List[str]]:
    """The first row of the CSV file ``path`` (``None``: no such file, or an empty one)."""
    try:
        with open(os.fspath(path), newline="", encoding="utf-8") as f:
            return next(csv.reader(f), None)
    except FileNotFoundError:
        return None


def read_csv_log(path: "str | os.PathLike[str]") -> List[Dict[str, str]]:
    """Every row of a :class:`CSVLogger` log, all its parts merged, in the order written.

    Returns:
        one dict per row, as ``csv.DictReader`` gives for a single file: the keys are
        every column of the log (``iteration`` first, then the metrics in order of first
        appearance — the last part's header), the values strings, ``""`` where a row has
        no value (including columns that appeared only in a later part).

    Raises:
        FileNotFoundError: no file at ``path``.
    """
    parts = csv_log_parts(path)
    if not parts:
        raise FileNotFoundError(f"no CSV log at {os.fspath(path)}")
    headers, rows = [], []
    for part in parts:
        with open(part, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, None) or []
            headers.append(header)
            rows.extend(dict(zip(header, r)) for r in reader)
    columns: List[str] = []
    for header in headers:
        columns += [c for c in header if c not in columns]
    return [{c: r.get(c, "") for c in columns} for r in rows]


class TensorBoardLogger:
    """Scalars through ``torch.utils.tensorboard.SummaryWriter`` (step = iteration).

    Args:
        logdir: the writer's folder (unused when ``writer`` is given).
        writer: an object with ``add_scalar(tag, value, step)`` and ``close()``.
        tag: maps a metric key to its TensorBoard tag (default: the key itself), e.g.
            ``lambda k: k.replace("_", "/", 1)`` groups ``loss_pretrain`` under ``loss/``.

    Raises:
        ImportError: tensorboard is not installed (``pip install tensorboard``).
    """

    def __init__(self, logdir: "str | os.PathLike[str]", writer: Optional[object] = None,
                 tag: Optional[Callable[[str], str]] = None):
        if writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError(f"mlo.loggers.TensorBoardLogger needs the tensorboard package "
                                  f"(pip install tensorboard): {e}") from None
            writer = SummaryWriter(os.fspath(logdir))
        self.writer = writer
        self.tag = tag

    @classmethod
    def if_installed(cls, logdir: "str | os.PathLike[str]",
                     tag: Optional[Callable[[str], str]] = None) -> "Optional[TensorBoardLogger]":
        """A logger into ``logdir``, or ``None`` when tensorboard is not installed (then
        nothing is created)."""
        try:
            return cls(logdir, tag=tag)
        except ImportError:
            return None

    def log(self, iteration: int, metrics: Dict[str, float]) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k if self.tag is None else self.tag(k), v, iteration)

    def close(self) -> None:
        self.writer.close()
