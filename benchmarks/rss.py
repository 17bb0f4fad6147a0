"""Peak resident memory of a block of work, for the benchmarks (Linux).

CPU tensors come from malloc, and torch has no CPU allocator statistics, so the
resident set is what we can see. :func:`reset_peak` resets the high-water mark
(``/proc/self/clear_refs`` ← 5, Linux ≥ 4.0) and returns the resident set at that
moment; :func:`peak_mb` reads ``VmHWM`` afterwards. Where the reset is refused,
``ru_maxrss`` (not resettable: the process's peak so far) is the fallback.
"""
from __future__ import annotations

import re
import resource
from typing import Tuple

__all__ = ["status_mb", "reset_peak", "peak_mb"]

HWM = "VmHWM after clear_refs"


def status_mb(key: str) -> float:
    """A ``/proc/self/status`` field (``VmRSS``, ``VmHWM``) in MB."""
    with open("/proc/self/status") as fh:
        return int(re.search(rf"{key}:\s+(\d+)", fh.read()).group(1)) / 1024


def reset_peak() -> Tuple[float, str]:
    """Resets the high-water mark; returns ``(resident MB now, how the peak is measured)``."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return status_mb("VmRSS"), HWM
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "ru_maxrss"


def peak_mb(how: str) -> float:
    """The peak since :func:`reset_peak` (measured as it said)."""
    return status_mb("VmHWM") if how == HWM else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
