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
"""
from __future__ import annotations

import csv
import os
from typing import Dict, List, Optional

__all__ = ["Logger", "CSVLogger", "TensorBoardLogger"]

try:
    from typing import Protocol
except ImportError:  # pragma: no cover
    Protocol = object


class Logger(Protocol):
    def log(self, iteration: int, metrics: Dict[str, float]) -> None:  # pragma: no cover
        ...


class CSVLogger:
    """One row per ``log`` call: ``iteration`` then one column per metric key (empty
    where a row has no value). A key never seen before widens the file: it is
    rewritten with the new header (keys appear a few times per run, not per row).

    Args:
        path: the CSV file (created with its directory; an existing file is replaced).
    """

    def __init__(self, path: "str | os.PathLike[str]"):
        self.path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self.columns: List[str] = []
        self._rows: List[Dict[str, float]] = []
        self._file = open(self.path, "w", newline="", encoding="utf-8")
        self._writer = csv.writer(self._file)

    def log(self, iteration: int, metrics: Dict[str, float]) -> None:
        new = [k for k in metrics if k not in self.columns]
        row = {"iteration": iteration, **metrics}
        self._rows.append(row)
        if new or not self.columns:
            self.columns += new
            self._file.close()
            self._file = open(self.path, "w", newline="", encoding="utf-8")
            self._writer = csv.writer(self._file)
            self._writer.writerow(["iteration"] + self.columns)
            for r in self._rows:
                self._writer.writerow([r.get(c, "") for c in ["iteration"] + self.columns])
        else:
            self._writer.writerow([row.get(c, "") for c in ["iteration"] + self.columns])
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TensorBoardLogger:
    """Scalars through ``torch.utils.tensorboard.SummaryWriter`` (step = iteration).

    Raises:
        ImportError: tensorboard is not installed (``pip install tensorboard``).
    """

    def __init__(self, logdir: "str | os.PathLike[str]", writer: Optional[object] = None):
        if writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError(f"mlo.loggers.TensorBoardLogger needs the tensorboard package "
                                  f"(pip install tensorboard): {e}") from None
            writer = SummaryWriter(os.fspath(logdir))
        self.writer = writer

    def log(self, iteration: int, metrics: Dict[str, float]) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, iteration)

    def close(self) -> None:
        self.writer.close()
