"""In-place writes into a tensor (``x[i] = v``, ``scatter_``, ``copy_``, ...):
the tracer cannot follow a channel through a write, so every channel
involved is kept; except ``index_add``/``index_copy`` along a dim that is
not the channel dim (tokens scattered back after expert dispatch), where
channel ``c`` lands in channel ``c``.
"""

from __future__ import annotations

import torch

from ..recorder import CompactTrace, Recorder
from .registry import OpCall, rule

# the names they are called by (in-place variants use the rule of their base op)
WRITES = {"__setitem__", "index_put", "index_put_", "masked_scatter", "masked_scatter_", "scatter", "scatter_",
          "scatter_add", "scatter_add_", "index_add", "index_add_", "index_copy", "index_copy_", "copy_"}


@rule("__setitem__", "index_put", "masked_scatter", "scatter", "scatter_add", "copy")
def write_into(rec: Recorder, call: OpCall) -> None:
    """In-place writes into a tensor: keep every channel involved."""
    name = call.name
    rec.pin_all(call.tensors, f"written in place by '{name}'")
    dst = call.args[0]
    if isinstance(dst, torch.Tensor) and rec.get(dst) is None:
        rec.set(dst, rec.fresh_pinned(rec.new_op(name), dst.dim(), f"written by '{name}'"))


@rule("index_add", "index_copy")
def index_add(rec: Recorder, call: OpCall) -> None:
    """``out.index_add_(dim, index, src)`` (and ``index_copy``) along a dim
    that is not the channel dim, with an untraced index: channel ``c`` of
    ``src`` lands in channel ``c`` of ``out``, so they are unioned position by
    position (scattering routed tokens back, as an add does). Anything else
    keeps every channel involved (:func:`write_into`)."""
    dst, dim, index, src = call.args[0], call.arg(1, "dim"), call.arg(2, "index"), call.arg(3, "source")
    td = rec.get(dst)
    ts = rec.get(src) if isinstance(src, torch.Tensor) else None
    ok = (isinstance(dim, int) and isinstance(index, torch.Tensor) and rec.get(index) is None and ts is not None
          and ts.vdim is not None and dst.dim() == src.dim())
    if ok:
        dim %= dst.dim()
        ok = ts.vdim != dim and (td is None or td.vdim == ts.vdim) and dst.shape[ts.vdim] == src.shape[ts.vdim]
    if not ok or (td is None and rec.param_name(dst) is not None):
        write_into(rec, call)
        return
    merged = ts.ids if td is None else rec.union_pairs(td.ids, ts.ids)
    trace = CompactTrace.along(merged, ts.vdim, dst.dim())
    rec.set(dst, trace)
    if isinstance(call.out, torch.Tensor) and call.out is not dst:
        rec.set(call.out, trace)
