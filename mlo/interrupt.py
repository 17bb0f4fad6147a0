"""Ctrl-C and SIGTERM during ``engine.run``: finish the iteration, then stop cleanly.

A signal that lands inside an update could leave it half-applied (a parameter
written, its optimizer state not). While :meth:`mlo.Engine.run` runs in the main
thread, SIGINT and SIGTERM are therefore *deferred*: the handler only notes the
signal, the current iteration finishes, and ``run`` then raises :class:`Interrupted`
(a ``KeyboardInterrupt``) at the iteration boundary — the engine is exactly as after
that many uninterrupted iterations, ready to be saved (``mlo.checkpoint.save``) and
resumed bit for bit. A second signal while the first is pending is not deferred:
it raises ``KeyboardInterrupt`` at once (the way out of a hung iteration), and the
engine then rolls the interrupted iteration back to a resumable state
(see :meth:`mlo.Engine.step`).

Handlers are installed only in the main thread and only over the default ones
(Python's ``default_int_handler`` for SIGINT, ``SIG_DFL`` for SIGTERM): a program
with its own handlers keeps them. ``EngineConfig(defer_signals=False)`` turns this off.
"""
from __future__ import annotations

import signal
import threading
from typing import Dict, Optional

__all__ = ["Interrupted", "deferred_signals", "exit_code"]

_NAMES = {signal.SIGINT: "SIGINT (Ctrl-C)", signal.SIGTERM: "SIGTERM"}


class Interrupted(KeyboardInterrupt):
    """``engine.run`` stopped at an iteration boundary because of a signal.

    Attributes:
        signum: the signal (``signal.SIGINT`` or ``signal.SIGTERM``).
        iteration: the iterations completed (the engine's state is exactly that).
    """

    def __init__(self, signum: int, iteration: int):
        self.signum, self.iteration = signum, iteration
        super().__init__(f"{_NAMES.get(signum, signum)} received: run stopped after iteration "
                         f"{iteration}, which finished (no update was cut short)")

    @property
    def exit_code(self) -> int:
        """The shell's convention: 128 + the signal number (130 for SIGINT, 143 for SIGTERM)."""
        return exit_code(self.signum)


def exit_code(signum: int) -> int:
    """128 + ``signum``."""
    return 128 + int(signum)


class deferred_signals:
    """``with deferred_signals() as d:`` — SIGINT/SIGTERM only set ``d.signum`` inside
    (the first one; a second one raises ``KeyboardInterrupt``); the previous handlers
    are restored on exit. Does nothing outside the main thread or when disabled."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.signum: Optional[int] = None
        self._saved: Dict[int, object] = {}

    def _handler(self, signum, frame):
        if self.signum is not None:      # the second signal: do not wait any longer
            raise KeyboardInterrupt(f"{_NAMES.get(signum, signum)} received twice: stopping now")
        self.signum = signum

    def __enter__(self) -> "deferred_signals":
        if not self.enabled or threading.current_thread() is not threading.main_thread():
            return self
        defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
        for sig, default in defaults.items():
            try:
                current = signal.getsignal(sig)
            except (ValueError, OSError):      # (a platform without this signal)
                continue
            if current is default:
                self._saved[sig] = current
                signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> bool:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)
        self._saved.clear()
        return False
