"""In-place writes into a tensor (``x[i] = v``, ``scatter_``, ``copy_``, ...):
the tracer cannot follow a channel through a write, so every channel
involved is kept.
"""

from __future__ import annotations

import torch

from ..recorder import Recorder
from .registry import OpCall, rule

# the names they are called by (in-place variants use the rule of their base op)
WRITES = {"__setitem__", "index_put", "index_put_", "masked_scatter", "masked_scatter_", "scatter", "scatter_",
          "scatter_add", "scatter_add_", "index_add", "index_add_", "index_copy", "index_copy_", "copy_"}


@rule("__setitem__", "index_put", "masked_scatter", "scatter", "scatter_add", "index_add", "index_copy", "copy")
def write_into(rec: Recorder, call: OpCall) -> None:
    """In-place writes into a tensor: keep every channel involved."""
    name = call.name
    rec.pin_all(call.tensors, f"written in place by '{name}'")
    dst = call.args[0]
    if isinstance(dst, torch.Tensor) and rec.get(dst) is None:
        rec.set(dst, rec.fresh_pinned(rec.new_op(name), dst.dim(), f"written by '{name}'"))
