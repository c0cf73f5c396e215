"""Ops that make new tensors or read only metadata: ``x.new_zeros``,
``torch.zeros``, ``torch.arange``, ``x.size()``, ``x.dtype``, ...

A new tensor is a constant (no channels), unless its size was read off a
channel dim (a :class:`~channelcut.pruning.counts.ChannelCount`): then it
follows those channels, so it shrinks with them.
"""

from __future__ import annotations

from typing import Any, List

import torch

from ..counts import ChannelCount
from ..graph import NO_SOURCE
from ..recorder import CompactTrace, Recorder
from .registry import OpCall, declare, rule

# creation ops whose values do not depend on the position along a dim: a
# channel-sized one can shrink with the channels (arange, linspace... cannot)
UNIFORM_CREATION = {"zeros", "ones", "full", "empty", "rand", "randn", "randint", "normal", "empty_strided"}

# creation ops whose values depend on no tensor's values (``torch.arange(n,
# device=x.device)``): the shape-only pass makes them real constants; writing
# an activation into one later hands over to a real pass
declare("arange", "range", "zeros", "ones", "full", "empty", "eye", "linspace", "logspace", "tensor", "as_tensor",
        "tril_indices", "triu_indices", creates="constant")


def sized_like_channels(rec: Recorder, args, kwargs, out) -> bool:
    """A new tensor whose size was computed from a channel count (e.g.
    ``torch.zeros(b, x.size(1))``, ``y.new_ones(y.shape)``) follows those
    channels: give it their trace so it shrinks with them."""
    sizes: List[Any] = []
    for a in list(args) + [kwargs.get("size")]:
        if isinstance(a, (list, tuple)):
            sizes.extend(a)
        elif isinstance(a, int):
            sizes.append(a)
    if not isinstance(out, torch.Tensor) or not any(isinstance(v, ChannelCount) for v in sizes):
        return False
    sizes = [v for v in sizes if isinstance(v, int) and not isinstance(v, bool)]
    if len(sizes) != out.dim():
        sizes = sizes[-out.dim():] if out.dim() and len(sizes) > out.dim() else sizes
    if len(sizes) != out.dim():
        return False
    for d, v in enumerate(sizes):
        if isinstance(v, ChannelCount) and v.base is not None and len(v.base) == out.shape[d] and out.shape[d] > 1:
            rec.set(out, CompactTrace.along(torch.tensor(v.base, dtype=torch.long), d, out.dim()))
            return True
    return False



@rule("new_zeros", "new_ones", "new_empty", "new_full", "new_tensor", creates="template")
@rule("empty_like_strided")
def creation(rec: Recorder, call: OpCall) -> None:
    """New tensors that only borrow dtype/device from their input: constants,
    unless their size follows a channel count."""
    if sized_like_channels(rec, call.args[1:], call.kwargs, call.out):
        return
    for y in call.outs:
        rec.set(y, CompactTrace.scalar(NO_SOURCE, y.dim()))


@rule("dim", "size", "get:shape", "get:ndim", "numel", "get:dtype", same_on_meta=True)
@rule("get:device", "get:is_cuda", "get:requires_grad", "get:grad_fn", "item", "tolist", "stride",
      "is_contiguous", "data_ptr", "element_size", "get:grad", "__len__", "__bool__", "__format__", "__repr__",
      "get:layout", "nelement")
def metadata(rec: Recorder, call: OpCall) -> None:
    """Ops that only read metadata (``same_on_meta``: a meta tensor answers
    them like the real one)."""
    return None
