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

import torch
import torch.nn.functional as F

from ..recorder import Recorder
from ..shape_only import NeedsValues
from .creation import UNIFORM_CREATION, sized_like_channels
from .elementwise import ELEMENTWISE, SAME_SHAPE
from .movement import MOVEMENT, apply_to_ids
from .registry import OpCall


def untracked(rec: Recorder, call: OpCall) -> None:
    """A call none of whose tensors is traced (see module docstring)."""
    name, func, args, kwargs, out, tensors = call.name, call.func, call.args, call.kwargs, call.out, call.tensors
    if name in UNIFORM_CREATION and sized_like_channels(rec, args, kwargs, out):
        return
    base = call.base
    if not isinstance(out, torch.Tensor) or not tensors:
        return
    refs = [rec.param_ref(x) for x in tensors]
    if not any(refs):
        return
    if base == "embedding" and func is not torch.embedding and len(tensors) >= 2 and refs[1] and not tensors[0].is_floating_point():
        # F.embedding(constant ids, weight): rows of the table, all columns
        merged = []
        for pname, idx in refs[1]:
            try:
                merged.append((pname, F.embedding(tensors[0], idx)))
            except Exception as exc:
                if rec.shapes_only:
                    raise NeedsValues(f"embedding of constant ids: {exc}") from exc
                return
        rec.param_provenance[out] = merged
        return
    if base in ("cat", "concat", "concatenate") and len(tensors) > 1 and all(refs):
        # torch.cat((q_bias, k_bias, v_bias)): each part follows its parameter
        # (index -1 where an entry comes from another one)
        dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
        if not isinstance(dim, int) or out.dim() == 0:
            return
        dim %= out.dim()
        merged = []
        offset = 0
        for x, r in zip(tensors, refs):
            if x.dim() != out.dim():
                return
            for pname, idx in r:
                full = torch.full(tuple(out.shape), -1, dtype=torch.long)
                full.narrow(dim, offset, x.shape[dim]).copy_(idx)
                merged.append((pname, full))
            offset += x.shape[dim]
        if offset == out.shape[dim]:
            rec.param_provenance[out] = merged
        return
    if base == "linear" and len(tensors) >= 2 and not refs[0] and refs[1] and len(refs[1]) == 1 and out.dim() >= 1:
        # a linear layer applied to a constant (Swin V2's continuous position
        # bias MLP on its coordinate table): output column o is computed from
        # weight row o (and bias o) alone, so it follows that row
        (pname, widx), = refs[1]
        if widx.dim() != 2:
            return
        rows = widx[:, 0].reshape((1,) * (out.dim() - 1) + (-1,)).expand(out.shape)
        merged = [(pname, rows.clone())]
        if len(tensors) >= 3 and refs[2] and len(refs[2]) == 1 and refs[2][0][1].dim() == 1:
            bname, bidx = refs[2][0]
            merged.append((bname, bidx.reshape((1,) * (out.dim() - 1) + (-1,)).expand(out.shape).clone()))
        rec.param_provenance[out] = merged
        return
    if base in MOVEMENT or name in ("get:T", "get:mT", "get:data"):
        # (an integer index buffer, e.g. Swin's relative_position_index, is an
        # index into the moved parameter, not data of its own)
        data = [r for r, x in zip(refs, tensors) if r and (x is tensors[0] or x.is_floating_point())]
        if len(data) != 1 or not refs[0]:
            return
        merged = []
        for pname, idx in refs[0]:
            try:
                res = apply_to_ids(func, args, kwargs, {id(tensors[0]): idx}, rec)
            except Exception as exc:
                if rec.shapes_only:
                    raise NeedsValues(f"{name} of a parameter: {exc}") from exc
                return
            if not isinstance(res, torch.Tensor) or tuple(res.shape) != tuple(out.shape):
                return
            merged.append((pname, res))
        rec.param_provenance[out] = merged
    elif base in SAME_SHAPE and refs[0] and tuple(out.shape) == tuple(tensors[0].shape):
        rec.param_provenance[out] = list(refs[0])
    elif base in ELEMENTWISE:
        # position-wise arithmetic of parameters (e.g. FrozenBatchNorm's
        # w * (rv + eps).rsqrt()): every operand of the output's shape, or a
        # single number; the result is sliced like each of them
        merged = []
        for x, r in zip(tensors, refs):
            if r and tuple(x.shape) == tuple(out.shape):
                merged.extend(r)
            elif x.numel() != 1:
                return
        if merged:
            rec.param_provenance[out] = merged
