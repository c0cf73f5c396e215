"""Undo values kept outside the process's anonymous memory.

An export keeps what it changes so that it can restore the model bit for bit
(the columns the verification reference zeroes, the values slicing removes).
For a model that fills most of the machine's memory (an 8B-parameter LLM in
bfloat16 on a 24 GB machine) those values are a sizeable fraction of the
weights. :func:`keep` moves a large CPU tensor into a file-backed shared
memory map in the temporary directory, unlinked at once: the kernel can write
its pages to disk instead of running out of memory, and the file is gone when
the tensor is freed. Small tensors, tensors on an accelerator, and every
tensor while the machine has plenty of memory available (at least
:data:`SPILL_BELOW_AVAILABLE` of its total: writing pages to a file costs
about as much as a forward pass of a small model) stay as they are.

>>> import torch
>>> v = torch.arange(6.0).reshape(2, 3)
>>> kept = keep(v, threshold=0, available=0.0)
>>> torch.equal(kept, v), kept.data_ptr() != v.data_ptr()
(True, True)
>>> keep(v) is v   # below the default threshold
True
>>> keep(v, threshold=0, available=0.9) is v   # plenty of memory: no file
True
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import List, Optional

import torch

#: tensors of at least this many bytes are kept in a file-backed map (an 8B
#: model's undo slices are a few MiB each, and gigabytes together)
SPILL_BYTES = 2**20

#: ... but only while the memory available is below this fraction of the
#: machine's total (1.0 or more: always; 0: never)
SPILL_BELOW_AVAILABLE = 0.5


def available_fraction() -> float:
    """MemAvailable / MemTotal from ``/proc/meminfo`` (0.0 where it can not
    be read: spill, the safe side)."""
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        total = float(info["MemTotal"].split()[0])
        return float(info["MemAvailable"].split()[0]) / total if total else 0.0
    except (OSError, KeyError, ValueError):
        return 0.0


#: :func:`keep` reads ``/proc/meminfo`` again only after this many bytes
#: were kept in memory, or this many seconds passed, since it last did (a
#: read costs as much as copying a MiB, and an export keeps hundreds of tensors)
REREAD_BYTES = 64 << 20
REREAD_SECONDS = 0.5

_last_read: List[float] = [0.0, float("inf"), 0.0]  # [fraction read, bytes kept since, when]


def _available_now(nbytes: int) -> float:
    """:func:`available_fraction`, read again once :data:`REREAD_BYTES` were
    kept or :data:`REREAD_SECONDS` passed since the last read."""
    now = time.monotonic()
    if _last_read[1] >= REREAD_BYTES or now - _last_read[2] > REREAD_SECONDS:
        _last_read[:] = [available_fraction(), 0.0, now]
    _last_read[1] += nbytes
    return _last_read[0]


def keep(values: torch.Tensor, threshold: Optional[int] = None, available: Optional[float] = None) -> torch.Tensor:
    """``values``, or an equal tensor backed by an unlinked temporary file
    (``threshold``: bytes, default :data:`SPILL_BYTES`; ``available``: the
    fraction of memory available, read from the system when None)."""
    nbytes = values.numel() * values.element_size()
    limit = SPILL_BYTES if threshold is None else threshold
    if values.device.type != "cpu" or nbytes < max(limit, 1) or os.name != "posix":
        return values
    if SPILL_BELOW_AVAILABLE < 1.0:
        if (_available_now(nbytes) if available is None else available) >= SPILL_BELOW_AVAILABLE:
            return values
    fd, path = tempfile.mkstemp(prefix="channelcut-undo-")
    try:
        os.close(fd)
        mapped = torch.from_file(path, shared=True, size=values.numel(), dtype=values.dtype)
    except (RuntimeError, OSError):  # no room or no mmap here: keep it in memory
        return values
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
    mapped = mapped.view(values.shape)
    mapped.copy_(values)
    return mapped
