"""The process's memory as Linux reports it, for the benchmarks that measure
export memory: :func:`status_kb` reads a field of ``/proc/self/status``
(``VmRSS``: resident now, ``VmHWM``: its peak), :func:`reset_peak` sets the
peak back to the current resident set (``/proc/self/clear_refs``)."""

from __future__ import annotations


def status_kb(field: str) -> int:
    """A ``/proc/self/status`` field, in kB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_peak() -> int:
    """Reset the peak resident set (VmHWM) to the current one; return it (kB).
    Raises OSError where the kernel does not allow it."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status_kb("VmRSS")
