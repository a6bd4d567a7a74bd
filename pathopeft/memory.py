"""Peak resident memory of a code section on Linux, for benchmarks and run reports on CPU.

``torch.cuda.max_memory_allocated`` has no CPU twin, so we use the kernel's high-water mark: writing ``5`` to
``/proc/self/clear_refs`` resets ``VmHWM`` to the current RSS, and ``VmHWM`` after the section minus the RSS
before it is the section's peak extra memory. Memory the process freed earlier but glibc still holds would be
reused without raising RSS (a second run in the same process would read near zero), so :func:`start_peak`
first hands free heap pages back to the OS with ``malloc_trim``. Elsewhere (no procfs) the functions return
-1 / NaN.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math


def rss_kib(field: str = "VmRSS") -> int:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``, …) in KiB, or -1 where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


def _release_free_heap() -> None:
    """glibc's ``malloc_trim(0)``: return freed heap pages to the OS (no-op on other C libraries)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def start_peak() -> int:
    """Reset the high-water mark; returns the current RSS (KiB) to pass to :func:`peak_mib`, or -1."""
    _release_free_heap()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return -1
    return rss_kib("VmRSS")


def peak_mib(start_kib: int) -> float:
    """Peak extra MiB since :func:`start_peak` returned ``start_kib`` (NaN where unsupported)."""
    if start_kib < 0:
        return math.nan
    return (rss_kib("VmHWM") - start_kib) / 1024
