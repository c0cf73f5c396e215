"""Ops none of whose tensors carry channels: their outputs are constants.

Except that some constants are made from parameters alone, and can still be
sliced: a layer scale reshaped for broadcasting, a position embedding, a
relative-position bias table gathered by an index, BEiT's concatenated q/k/v
bias, FrozenBatchNorm's folded scale. For these the tracer keeps their
**provenance** (``Recorder.param_provenance``: which parameter entries each
element shows), so when such a tensor meets an activation it is sliced like
the activation's channels (``Recorder.align_operand``). Start at
:func:`untracked`.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F

from ..recorder import ParamRefs, Recorder
from ..shape_only import NeedsValues
from .creation import UNIFORM_CREATION, sized_like_channels
from .elementwise import ELEMENTWISE, SAME_SHAPE
from .movement import CONCATENATING, MOVEMENT, apply_to_ids
from .registry import OpCall


def untracked(rec: Recorder, call: OpCall) -> None:
    """A call none of whose tensors is traced (see module docstring)."""
    name, out, tensors = call.name, call.out, call.tensors
    if name in UNIFORM_CREATION and sized_like_channels(rec, call.args, call.kwargs, out):
        return
    if not isinstance(out, torch.Tensor) or not tensors:
        return
    refs = [rec.param_ref(x) for x in tensors]
    if not any(refs):
        return
    base = call.base
    provenance: Optional[ParamRefs] = None
    if base == "embedding" and call.func is not torch.embedding and len(tensors) >= 2 and refs[1] and not tensors[0].is_floating_point():
        provenance = _embedding_rows(rec, tensors[0], refs[1])
    elif base in CONCATENATING and len(tensors) > 1 and all(refs):
        provenance = _concatenated(call, refs)
    elif base == "linear" and len(tensors) >= 2 and not refs[0] and refs[1] and len(refs[1]) == 1 and out.dim() >= 1:
        provenance = _linear_of_constant(out, tensors, refs)
    elif base in MOVEMENT or name in ("get:T", "get:mT", "get:data"):
        provenance = _moved(rec, call, refs)
    elif base in SAME_SHAPE and refs[0] and tuple(out.shape) == tuple(tensors[0].shape):
        provenance = list(refs[0])
    elif base in ELEMENTWISE:
        provenance = _arithmetic(out, tensors, refs)
    if provenance is not None:
        rec.param_provenance[out] = provenance


def _embedding_rows(rec: Recorder, ids: torch.Tensor, table: ParamRefs) -> Optional[ParamRefs]:
    """``F.embedding(constant ids, weight)``: rows of the table, all columns."""
    merged = []
    for pname, idx in table:
        try:
            merged.append((pname, F.embedding(ids, idx)))
        except Exception as exc:
            if rec.shapes_only:
                raise NeedsValues(f"embedding of constant ids: {exc}") from exc
            return None
    return merged


def _concatenated(call: OpCall, refs: List[ParamRefs]) -> Optional[ParamRefs]:
    """``torch.cat((q_bias, k_bias, v_bias))``: each part follows its
    parameter (index -1 where an entry comes from another one)."""
    out, tensors = call.out, call.tensors
    dim = call.arg(1, "dim", 0)
    if not isinstance(dim, int) or out.dim() == 0:
        return None
    dim %= out.dim()
    merged = []
    offset = 0
    for x, r in zip(tensors, refs):
        if x.dim() != out.dim():
            return None
        for pname, idx in r:
            full = torch.full(tuple(out.shape), -1, dtype=torch.long)
            full.narrow(dim, offset, x.shape[dim]).copy_(idx)
            merged.append((pname, full))
        offset += x.shape[dim]
    return merged if offset == out.shape[dim] else None


def _linear_of_constant(out: torch.Tensor, tensors: List[torch.Tensor], refs: List[ParamRefs]) -> Optional[ParamRefs]:
    """A linear layer applied to a constant (Swin V2's continuous position
    bias MLP on its coordinate table): output column o is computed from
    weight row o (and bias o) alone, so it follows that row."""
    (pname, widx), = refs[1]
    if widx.dim() != 2:
        return None
    rows = widx[:, 0].reshape((1,) * (out.dim() - 1) + (-1,)).expand(out.shape)
    merged = [(pname, rows.clone())]
    if len(tensors) >= 3 and refs[2] and len(refs[2]) == 1 and refs[2][0][1].dim() == 1:
        bname, bidx = refs[2][0]
        merged.append((bname, bidx.reshape((1,) * (out.dim() - 1) + (-1,)).expand(out.shape).clone()))
    return merged


def _moved(rec: Recorder, call: OpCall, refs: List[ParamRefs]) -> Optional[ParamRefs]:
    """Data movement of one parameter: the op applied to its entries' indices
    (an integer index buffer, e.g. Swin's relative_position_index, is an
    index into the moved parameter, not data of its own)."""
    out, tensors = call.out, call.tensors
    data = [r for r, x in zip(refs, tensors) if r and (x is tensors[0] or x.is_floating_point())]
    if len(data) != 1 or not refs[0]:
        return None
    merged = []
    for pname, idx in refs[0]:
        try:
            res = apply_to_ids(call.func, call.args, call.kwargs, {id(tensors[0]): idx}, rec)
        except Exception as exc:
            if rec.shapes_only:
                raise NeedsValues(f"{call.name} of a parameter: {exc}") from exc
            return None
        if not isinstance(res, torch.Tensor) or tuple(res.shape) != tuple(out.shape):
            return None
        merged.append((pname, res))
    return merged


def _arithmetic(out: torch.Tensor, tensors: List[torch.Tensor], refs: List[ParamRefs]) -> Optional[ParamRefs]:
    """Position-wise arithmetic of parameters (e.g. FrozenBatchNorm's
    ``w * (rv + eps).rsqrt()``): every operand of the output's shape, or a
    single number; the result is sliced like each of them."""
    merged = []
    for x, r in zip(tensors, refs):
        if r and tuple(x.shape) == tuple(out.shape):
            merged.extend(r)
        elif x.numel() != 1:
            return None
    return merged or None
