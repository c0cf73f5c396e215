"""Elementwise ops: arithmetic, comparisons, activations, dropout (with
broadcasting), and same-shape ops that only read their first tensor.

Operands' channels are unioned position by position; a smaller operand that
is broadcast along the channels (a mask, a per-sample scale) is "needed" by
every channel it feeds; an untracked operand sized along the channels is a
parameter slice (:meth:`~channelcut.pruning.recorder.Recorder.align_operand`).
"""

from __future__ import annotations

from typing import List

import torch

from ..graph import NO_SOURCE
from ..recorder import CompactTrace, Recorder
from ..shape_only import broadcast, same_as_first
from .registry import OpCall, Unsupported, rule

ELEMENTWISE = {
    # arithmetic
    "add", "sub", "subtract", "mul", "multiply", "div", "divide", "true_divide", "floor_divide",
    "remainder", "fmod", "pow", "float_power", "neg", "negative", "abs", "absolute", "sign", "sgn",
    "reciprocal", "sqrt", "rsqrt", "square", "exp", "exp2", "expm1", "log", "log2", "log10", "log1p",
    "sin", "cos", "tan", "asin", "acos", "atan", "atan2", "sinh", "cosh", "tanh", "asinh", "acosh",
    "atanh", "erf", "erfc", "erfinv", "sigmoid", "logit", "clamp", "clip", "clamp_min", "clamp_max",
    "floor", "ceil", "round", "trunc", "frac", "maximum", "minimum", "fmax", "fmin", "lerp", "addcmul",
    "addcdiv", "where", "masked_fill", "nan_to_num", "hypot", "xlogy", "copysign", "heaviside",
    "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__", "__rtruediv__",
    "__div__", "__rdiv__", "__floordiv__", "__rfloordiv__", "__mod__", "__rmod__", "__pow__", "__rpow__",
    "__neg__", "__pos__", "__abs__", "rsub",
    # comparisons / logic
    "eq", "ne", "lt", "le", "gt", "ge", "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__",
    "logical_and", "logical_or", "logical_not", "logical_xor", "bitwise_and", "bitwise_or", "bitwise_not",
    "__and__", "__or__", "__xor__", "__invert__", "isnan", "isinf", "isfinite", "signbit",
    # activations
    "relu", "relu6", "leaky_relu", "elu", "selu", "celu", "gelu", "silu", "mish", "hardswish",
    "hardsigmoid", "hardtanh", "softplus", "softsign", "tanhshrink", "threshold", "log_sigmoid",
    "hardshrink", "softshrink", "rrelu", "sigmoid_", "erf_",
    # dropout family (per-element or per-channel masks)
    "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
    "feature_dropout",
}

# same-shape ops that only read their first tensor argument
SAME_SHAPE = {
    "to", "type", "type_as", "float", "double", "half", "bfloat16", "int", "long", "bool", "cpu", "cuda",
    "contiguous", "clone", "detach", "requires_grad", "get:data", "zeros_like", "ones_like", "empty_like",
    "full_like", "rand_like", "randn_like", "fill", "zero", "normal", "uniform", "bernoulli",
    "positive", "resolve_conj", "resolve_neg", "__deepcopy__", "pin_memory",
}


# the most common ones get a direct shape function for the shape-only pass;
# ``inplace_arg``: where the functional form takes its ``inplace`` flag
_SHAPED_INPLACE_1 = ("relu", "relu6", "silu", "hardswish", "hardsigmoid", "mish", "selu")
_SHAPED_INPLACE_2 = ("leaky_relu", "elu", "celu")
_SHAPED_UNARY = ("gelu", "sigmoid", "tanh", "softplus", "exp", "sqrt", "rsqrt", "erf", "neg", "__neg__")
_INPLACE_3 = ("threshold", "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout")
_SHAPED_BINARY = (
    "add", "sub", "mul", "div", "true_divide",
    "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__", "__rtruediv__",
)
_OTHERS = ELEMENTWISE.difference(
    _SHAPED_INPLACE_1, _SHAPED_INPLACE_2, ("hardtanh",), _SHAPED_UNARY, _INPLACE_3, _SHAPED_BINARY)


def _aligned_operand(rec: Recorder, x: torch.Tensor, target: torch.Tensor) -> bool:
    """An untracked operand that is sliced with the output's channels: any
    but the output itself, unless the op writes into a parameter or buffer in
    place (``self.running.add_(y.mean((0, 2, 3)))``): then that is."""
    return rec.get(x) is None and (x is not target or rec.param_name(x) is not None)


@rule(*_SHAPED_INPLACE_1, shape=same_as_first, inplace_arg=1)
@rule(*_SHAPED_INPLACE_2, shape=same_as_first, inplace_arg=2)
@rule("hardtanh", shape=same_as_first, inplace_arg=3)
@rule(*_SHAPED_UNARY, shape=same_as_first)
@rule(*_INPLACE_3, inplace_arg=3)
@rule(*_SHAPED_BINARY, shape=broadcast)
@rule(*_OTHERS)
def elementwise(rec: Recorder, call: OpCall) -> None:
    """Position-wise ops on broadcast operands (see :func:`elementwise_into`)."""
    tensors = call.tensors
    target = call.out if isinstance(call.out, torch.Tensor) else None
    if target is None and call.base == "where" and len(call.args) == 1:
        return nonzero(rec, call)  # torch.where(cond): the indices of its nonzeros
    if target is None:
        raise Unsupported("elementwise op without a tensor output")
    elementwise_into(rec, call.name, tensors, target)
    if call.inplace and tensors and tensors[0] is not target:
        rec.set(tensors[0], rec.get(target))  # in-place op that returned a new handle


def elementwise_into(rec: Recorder, what: str, tensors: List[torch.Tensor], target: torch.Tensor) -> None:
    """The trace of ``target``, computed position-wise from ``tensors``
    broadcast together (``what`` names the op in pin reasons)."""
    ndim = target.dim()
    tracked = [(x, rec.get(x)) for x in tensors if rec.get(x) is not None]
    # the output channel dim: the varying dim of tracked operands (aligned right)
    vdims = set()
    for x, t in tracked:
        if t.vdim is not None:
            vdims.add(t.vdim + ndim - x.dim())
    if len(vdims) > 1:  # atoms vary along several dims: combine in full and couple
        full = None
        for x, t in tracked:
            c = t.atoms.reshape((1,) * (ndim - x.dim()) + tuple(t.atoms.shape))
            full = c if full is None else rec.union_pairs(full, c)
        shape = torch.broadcast_shapes(*[tuple(t.atoms.reshape((1,) * (ndim - x.dim()) + tuple(t.atoms.shape)).shape) for x, t in tracked])
        res = rec.compress(full.expand(shape).contiguous())
        rec.set(target, res)
        vd = res.vdim
        if vd is not None:
            for x in tensors:
                if _aligned_operand(rec, x, target):
                    rec.align_operand(x, ndim, vd, res.ids, what)
        return
    vd = next(iter(vdims)) if vdims else None
    out_shape = tuple(target.shape)

    def broadcasts(x: torch.Tensor) -> bool:
        """True when ``x`` is smaller than the output along some dim (a mask,
        a per-sample scale): it is read whole by every output element."""
        lead = ndim - x.dim()
        if any(s != 1 for s in out_shape[:lead]):
            return True
        return any(x.shape[i] != out_shape[lead + i] for i in range(x.dim()))

    if vd is None:
        # no channel structure: operands of the output's full shape are aligned
        # with it (co-present); smaller, broadcast operands are only needed
        full = [int(t.ids[0]) for x, t in tracked if not broadcasts(x)]
        small = [int(t.ids[0]) for x, t in tracked if broadcasts(x)]
        rep = rec.sources.union_all(full) if full else None
        if rep is None:
            rep = next((a for a in small if a >= 0), NO_SOURCE)
        for a in small:
            rec.need(torch.tensor([rep]), a)
        rec.set(target, CompactTrace.scalar(NO_SOURCE if rep is None else rep, ndim))
        return
    merged = None
    scalars = []
    for _x, t in tracked:
        if t.vdim is not None:
            merged = t.ids if merged is None else rec.union_pairs(merged, t.ids)
    assert merged is not None
    for x, t in tracked:
        if t.vdim is None:
            d = vd - (ndim - x.dim())
            if d >= 0 and x.shape[d] == out_shape[vd]:
                merged = rec.union_pairs(merged, t.ids[:1].expand(merged.numel()))  # full size: aligned
            else:
                scalars.append(int(t.ids[0]))
    for s in scalars:
        rec.need(merged, s)
    if merged.numel() != target.shape[vd]:
        raise Unsupported("broadcast along the channel dim")
    for x in tensors:
        if _aligned_operand(rec, x, target):
            rec.align_operand(x, ndim, vd, merged, what)
    rec.set(target, CompactTrace.along(merged, vd, ndim))


@rule("zeros_like", "ones_like", "full_like", "empty_like", creates="template")
@rule(*(SAME_SHAPE - {"zeros_like", "ones_like", "full_like", "empty_like"}))
def same_shape(rec: Recorder, call: OpCall) -> None:
    """The output has the input's shape and channels (a cast, a copy, a
    tensor made like it)."""
    args, out = call.args, call.out
    x = args[0] if args and isinstance(args[0], torch.Tensor) else None
    if x is None or not isinstance(out, torch.Tensor) or rec.get(x) is None:
        raise Unsupported("unexpected arguments")
    if tuple(out.shape) != tuple(x.shape):
        raise Unsupported("shape changed")
    t = rec.get(x)
    rec.set(out, CompactTrace(t.atoms, t.vdim))


@rule("prelu")
def prelu(rec: Recorder, call: OpCall) -> None:
    """Channels pass through; a per-channel weight is sliced with them."""
    args, kwargs, out = call.args, call.kwargs, call.out
    x, w = args[0], args[1] if len(args) > 1 else kwargs["weight"]
    t = rec.get(x)
    rec.set(out, CompactTrace(t.atoms, t.vdim))
    if w.numel() > 1:
        name = rec.param_name(w)
        ids = rec.ids_along(x, 1)
        if name is None:
            rec.pin_ids(ids, "prelu with a non-parameter weight")
        else:
            rec.record_param_use(name, 0, list(range(w.numel())), ids)


@rule("glu")
def glu(rec: Recorder, call: OpCall) -> None:
    """``a * sigmoid(b)`` of the two halves along ``dim``: channel ``i`` of
    each half is coupled with channel ``i`` of the other."""
    args, kwargs, out = call.args, call.kwargs, call.out
    x = args[0]
    dim = args[1] if len(args) > 1 else kwargs.get("dim", -1)
    dim %= x.dim()
    t = rec.get(x)
    if t.vdim != dim:
        rec.set(out, CompactTrace(t.atoms, t.vdim))
        return
    ids = t.ids
    half = ids.numel() // 2
    merged = rec.union_pairs(ids[:half], ids[half:])
    rec.set(out, CompactTrace.along(merged, dim, x.dim()))


@rule("nonzero", "argwhere", "nonzero_static")
def nonzero(rec: Recorder, call: OpCall) -> None:
    """``nonzero`` / ``argwhere`` / ``torch.where(cond)``: the positions of
    the nonzero elements. They hold positions, not channels, and stay
    untraced (``x[token_idx]`` then uses their values); when ``cond`` varies
    along a channel dim those positions count its channels, which are pinned."""
    t = rec.get(call.args[0])
    if t is not None and t.vdim is not None:
        rec.pin_ids(t.ids, f"'{call.name}' returns positions along the channel dim ({rec.module or '<model>'})")
    for y in call.outs:
        rec.leave_untraced(y)
