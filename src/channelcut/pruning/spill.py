"""Undo values kept outside the process's anonymous memory.

An export keeps what it changes so that it can restore the model bit for bit
(the columns the verification reference zeroes, the values slicing removes).
For a model that fills most of the machine's memory (an 8B-parameter LLM in
bfloat16 on a 24 GB machine) those values are a sizeable fraction of the
weights. :func:`keep` moves a large CPU tensor into a file-backed shared
memory map in the temporary directory, unlinked at once: the kernel can write
its pages to disk instead of running out of memory, and the file is gone when
the tensor is freed. Small tensors, and tensors on an accelerator, stay as
they are.

>>> import torch
>>> v = torch.arange(6.0).reshape(2, 3)
>>> kept = keep(v, threshold=0)
>>> torch.equal(kept, v), kept.data_ptr() != v.data_ptr()
(True, True)
>>> keep(v) is v   # below the default threshold
True
"""

from __future__ import annotations

import os
import tempfile
from typing import Optional

import torch

#: tensors of at least this many bytes are kept in a file-backed map (an 8B
#: model's undo slices are a few MiB each, and gigabytes together)
SPILL_BYTES = 2**20


def keep(values: torch.Tensor, threshold: Optional[int] = None) -> torch.Tensor:
    """``values``, or an equal tensor backed by an unlinked temporary file
    (``threshold``: bytes, default :data:`SPILL_BYTES`)."""
    nbytes = values.numel() * values.element_size()
    limit = SPILL_BYTES if threshold is None else threshold
    if values.device.type != "cpu" or nbytes < max(limit, 1) or os.name != "posix":
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
