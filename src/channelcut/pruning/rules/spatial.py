"""Spatial ops: pooling, resampling, padding, grid sampling.

They work on the trailing spatial dims of a ``(N, C, *spatial)`` tensor, so
the channel dim (and any dim before the spatial ones) passes through; a
channel dim among the spatial dims is coupled away.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..graph import NO_SOURCE
from ..recorder import CompactTrace, Recorder
from ..shape_only import Shape, empty, plain
from .registry import OpCall, Unsupported, rule

# pooling over 1, 2 or 3 trailing dims (adaptive average pooling is
# registered with its shape function)
POOL_1D = ("max_pool1d", "max_pool1d_with_indices", "avg_pool1d", "adaptive_max_pool1d",
           "adaptive_max_pool1d_with_indices", "lp_pool1d", "_max_pool1d", "_adaptive_max_pool1d")
POOL_2D = ("max_pool2d", "max_pool2d_with_indices", "avg_pool2d", "adaptive_max_pool2d",
           "adaptive_max_pool2d_with_indices", "lp_pool2d", "fractional_max_pool2d", "_max_pool2d",
           "_adaptive_max_pool2d", "_fractional_max_pool2d")
POOL_3D = ("max_pool3d", "max_pool3d_with_indices", "avg_pool3d", "adaptive_max_pool3d",
           "adaptive_max_pool3d_with_indices", "lp_pool3d", "fractional_max_pool3d", "_max_pool3d",
           "_adaptive_max_pool3d", "_fractional_max_pool3d")
# resampling every dim after the first two
RESAMPLE = ("interpolate", "upsample", "upsample_nearest", "upsample_bilinear")


def adaptive_pool_shape(n: int) -> Shape:
    """Shape function of ``adaptive_avg_pool{n}d``."""

    def shape(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
        x = args[0] if args else None
        size = kwargs.get("output_size", args[1] if len(args) > 1 else None)
        if not plain(x) or x.dim() not in (n + 1, n + 2):
            return None
        if isinstance(size, int):
            size = (size,) * n
        if not isinstance(size, (tuple, list)) or len(size) != n or not all(isinstance(s, int) for s in size):
            return None
        return empty(tuple(x.shape[: x.dim() - n]) + tuple(size), x.dtype)

    return shape


def _spatial(rec: Recorder, call: OpCall, rank: Optional[int]) -> None:
    """An op over the last ``rank`` dims (None: all but the first two)."""
    x = call.args[0] if call.args else call.kwargs.get("input")
    t = rec.get(x)
    if rank is None:
        rank = x.dim() - 2
    for y in call.outs:
        if y.dim() != x.dim():
            raise Unsupported("pooling changed the number of dims")
        if t.vdim is None or (t.vdim == 1 and x.dim() >= 3) or (x.dim() >= 3 and t.vdim < x.dim() - rank):
            rec.set(y, CompactTrace(t.atoms, t.vdim))
        else:
            rec.set(y, CompactTrace.scalar(rec.couple(t.ids), y.dim()))


@rule("adaptive_avg_pool1d", shape=adaptive_pool_shape(1))
@rule(*POOL_1D)
def pool1d(rec: Recorder, call: OpCall) -> None:
    _spatial(rec, call, 1)


@rule("adaptive_avg_pool2d", shape=adaptive_pool_shape(2))
@rule(*POOL_2D)
def pool2d(rec: Recorder, call: OpCall) -> None:
    _spatial(rec, call, 2)


@rule("adaptive_avg_pool3d", shape=adaptive_pool_shape(3))
@rule(*POOL_3D)
def pool3d(rec: Recorder, call: OpCall) -> None:
    _spatial(rec, call, 3)


@rule(*RESAMPLE)
def resample(rec: Recorder, call: OpCall) -> None:
    _spatial(rec, call, None)


@rule("grid_sample")
def grid_sample(rec: Recorder, call: OpCall) -> None:
    """Channels pass through; each needs the sampling grid."""
    args, kwargs = call.args, call.kwargs
    x, grid = args[0], args[1] if len(args) > 1 else kwargs["grid"]
    t = rec.get(x) or CompactTrace.scalar(NO_SOURCE, x.dim())
    if t.vdim not in (None, 1):
        t = CompactTrace.scalar(rec.couple(t.ids), x.dim())
    g = rec.get(grid)
    if g is not None:
        rec.need(t.ids, rec.couple(g.ids))
    rec.set(call.out, CompactTrace(t.atoms, t.vdim))


@rule("pad")
def pad(rec: Recorder, call: OpCall) -> None:
    """Padding the channel dim adds channels of its own: keep them all."""
    args, kwargs, out = call.args, call.kwargs, call.out
    x = args[0]
    p = args[1] if len(args) > 1 else kwargs["pad"]
    t = rec.get(x)
    padded = {x.dim() - 1 - i // 2 for i, v in enumerate(p) if v != 0}
    if t.vdim is not None and t.vdim in padded:
        rec.pin_ids(t.ids, "padded along the channel dim")
        rec.set(out, rec.fresh_pinned(rec.new_op("pad"), out.dim(), "padded channels"))
        rec.need(t.ids, int(rec.get(out).ids[0]))
        return
    rec.set(out, CompactTrace(t.atoms, t.vdim))
