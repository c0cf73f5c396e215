"""The one table of op rules: how output traces follow from input traces.

Every torch function the tracer understands is one entry in ``RULES`` (keyed by
function name; in-place variants share the rule of their base op). Start
reading at :func:`dispatch`. An op with tracked inputs and no rule is a
**barrier** (:func:`barrier`): its inputs are pinned, its outputs are fresh
pinned sources, and the user is warned once. Ops whose tensor inputs are all
untracked (constants, parameters) produce constants, except that data movement
on a parameter keeps track of which parameter entries it shows, so a reshaped
layer-scale or position embedding can still be sliced.

Adding an op means adding one entry here and one case to the op-rule tests.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from .counts import ChannelCount, HeadCount
from .graph import NO_SOURCE, Consumer, Producer, is_tiling
from .model_run import flatten_tensors
from .shape_only import NeedsValues
from .tracing import Tr, Tracer, _TooBig

Rule = Callable[[Tracer, Any, tuple, dict, Any], None]
RULES: Dict[str, Rule] = {}


def rule(*names: str) -> Callable[[Rule], Rule]:
    def deco(fn: Rule) -> Rule:
        for n in names:
            RULES[n] = fn
        return fn

    return deco


def func_name(func: Any) -> str:
    name = getattr(func, "__name__", None) or repr(func)
    if name == "__get__":
        owner = getattr(func, "__self__", None)
        return "get:" + getattr(owner, "__name__", "?")
    return name


def _base_name(name: str) -> str:
    if name.startswith("__i") and name.endswith("__") and name[3:-2] in _INPLACE_DUNDERS:
        return "__" + name[3:-2] + "__"
    if name.endswith("_") and not name.endswith("__") and not name.startswith("_"):
        return name[:-1]
    return name


_INPLACE_DUNDERS = {"add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "and", "or", "xor", "lshift", "rshift", "matmul"}


def _tensor_args(args: Sequence[Any], kwargs: Dict[str, Any]) -> List[torch.Tensor]:
    out: List[torch.Tensor] = []
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple, dict)):
            out.extend(flatten_tensors(a))
    return out


WRITES = {"__setitem__", "index_put", "index_put_", "masked_scatter", "masked_scatter_", "scatter", "scatter_",
          "scatter_add", "scatter_add_", "index_add", "index_add_", "index_copy", "index_copy_", "copy_"}


def dispatch(tr: Tracer, func: Any, args: tuple, kwargs: dict, out: Any, name: str) -> None:
    """Derive the traces of ``out`` by the rule for ``func`` (``name``:
    :func:`func_name` of it)."""
    if name in WRITES:  # in-place writes return None or their target
        tensors = _tensor_args(args, kwargs)
        if any(tr.get(x) is not None for x in tensors):
            (RULES.get(name) or RULES[_base_name(name)])(tr, func, args, kwargs, out)
        return
    outs = flatten_tensors(out) if not isinstance(out, torch.Tensor) else [out]
    if not outs:
        return  # sizes, dtypes, bools, None: nothing to trace
    tensors = _tensor_args(args, kwargs)
    tracked = [x for x in tensors if tr.get(x) is not None]
    if not tracked:
        _untracked(tr, name, func, args, kwargs, out, tensors)
        return
    r = RULES.get(name) or RULES.get(_base_name(name))
    if r is None:
        barrier(tr, name, args, kwargs, out, "no rule for this op")
        return
    try:
        r(tr, func, args, kwargs, out)
    except _TooBig:
        raise
    except _Unsupported as exc:
        barrier(tr, name, args, kwargs, out, str(exc))
    except Exception as exc:  # a rule that cannot handle these arguments
        if tr.shapes_only:  # perhaps it read a meta tensor's values
            raise NeedsValues(f"rule for {name}: {exc}") from exc
        barrier(tr, name, args, kwargs, out, f"rule failed ({type(exc).__name__}: {exc})")
    for y in outs:  # any output a rule forgot is a fresh, safe barrier output
        if tr.get(y) is None and not _is_same_as_input(y, tensors):
            tr.set(y, tr.fresh_pinned(tr.new_op(name), y.dim(), f"output of {name}"))


def _is_same_as_input(y: torch.Tensor, tensors: List[torch.Tensor]) -> bool:
    return any(y is x for x in tensors)


class _Unsupported(Exception):
    pass


def _atoms(tr: Tracer, owner: str, count: int) -> torch.Tensor:
    """``count`` fresh atoms (consecutive ids) as a tensor."""
    r = tr.src.new_atoms(owner, count)
    return torch.arange(r.start, r.stop, dtype=torch.long)


def barrier(tr: Tracer, name: str, args: tuple, kwargs: dict, out: Any, reason: str) -> None:
    """Keep every channel flowing in; outputs become fresh pinned sources."""
    op = tr.new_op(name)
    where = tr.module or "<model>"
    msg = f"op '{name}' in {where}: {reason}"
    tr.graph.barriers.append((name, tr.module, reason))
    tr.pin_all(_tensor_args(args, kwargs), f"flows into unsupported op '{name}' ({where})")
    for y in flatten_tensors(out) if not isinstance(out, torch.Tensor) else [out]:
        tr.set(y, tr.fresh_pinned(op, y.dim(), f"output of unsupported op '{name}' ({where})"))
    tr.warn_once(
        name,
        f"channelcut: {msg}. Treated as a barrier: channels flowing into it are kept, "
        "the model stays correct but prunes less there.",
    )


# ---------------------------------------------------------------------------
# ops on untracked tensors: constants, with parameter provenance
# ---------------------------------------------------------------------------


def _sized_like_channels(tr: Tracer, args, kwargs, out) -> bool:
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
            tr.set(out, Tr.along(torch.tensor(v.base, dtype=torch.long), d, out.dim()))
            return True
    return False


# creation ops whose values do not depend on the position along a dim: a
# channel-sized one can shrink with the channels (arange, linspace... cannot)
UNIFORM_CREATION = {"zeros", "ones", "full", "empty", "rand", "randn", "randint", "normal", "empty_strided"}


def _untracked(tr: Tracer, name: str, func, args, kwargs, out, tensors) -> None:
    if name in UNIFORM_CREATION and _sized_like_channels(tr, args, kwargs, out):
        return
    base = _base_name(name)
    if not isinstance(out, torch.Tensor) or not tensors:
        return
    refs = [tr.param_ref(x) for x in tensors]
    if not any(refs):
        return
    if base == "embedding" and func is not torch.embedding and len(tensors) >= 2 and refs[1] and not tensors[0].is_floating_point():
        # F.embedding(constant ids, weight): rows of the table, all columns
        merged = []
        for pname, idx in refs[1]:
            try:
                merged.append((pname, F.embedding(tensors[0], idx)))
            except Exception as exc:
                if tr.shapes_only:
                    raise NeedsValues(f"embedding of constant ids: {exc}") from exc
                return
        tr.prov[out] = merged
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
            tr.prov[out] = merged
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
        tr.prov[out] = merged
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
                res = _apply_to_ids(func, args, kwargs, {id(tensors[0]): idx}, tr)
            except Exception as exc:
                if tr.shapes_only:
                    raise NeedsValues(f"{name} of a parameter: {exc}") from exc
                return
            if not isinstance(res, torch.Tensor) or tuple(res.shape) != tuple(out.shape):
                return
            merged.append((pname, res))
        tr.prov[out] = merged
    elif base in SAME_SHAPE and refs[0] and tuple(out.shape) == tuple(tensors[0].shape):
        tr.prov[out] = list(refs[0])
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
            tr.prov[out] = merged


# ---------------------------------------------------------------------------
# elementwise ops (with broadcasting)
# ---------------------------------------------------------------------------

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


@rule(*ELEMENTWISE)
def elementwise(tr: Tracer, func, args, kwargs, out) -> None:
    tensors = _tensor_args(args, kwargs)
    target = out if isinstance(out, torch.Tensor) else None
    if target is None:
        raise _Unsupported("elementwise op without a tensor output")
    name = func_name(func)
    _elementwise_into(tr, name, tensors, target)
    if _base_name(name) != name and tensors and tensors[0] is not target:
        tr.set(tensors[0], tr.get(target))  # in-place op that returned a new handle


def _elementwise_into(tr: Tracer, what: str, tensors: List[torch.Tensor], target: torch.Tensor) -> None:
    ndim = target.dim()
    tracked = [(x, tr.get(x)) for x in tensors if tr.get(x) is not None]
    # the output channel dim: the varying dim of tracked operands (aligned right)
    vdims = set()
    for x, t in tracked:
        if t.vdim is not None:
            vdims.add(t.vdim + ndim - x.dim())
    if len(vdims) > 1:  # atoms vary along several dims: combine in full and couple
        full = None
        for x, t in tracked:
            c = t.t.reshape((1,) * (ndim - x.dim()) + tuple(t.t.shape))
            full = c if full is None else tr.union_pairs(full, c)
        shape = torch.broadcast_shapes(*[tuple(t.t.reshape((1,) * (ndim - x.dim()) + tuple(t.t.shape)).shape) for x, t in tracked])
        res = tr.compress(full.expand(shape).contiguous())
        tr.set(target, res)
        vd = res.vdim
        if vd is not None:
            for x in tensors:
                if tr.get(x) is None and x is not target:
                    tr.align_operand(x, ndim, vd, res.ids, what)
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
        rep = tr.src.union_all(full) if full else None
        if rep is None:
            rep = next((a for a in small if a >= 0), NO_SOURCE)
        for a in small:
            tr.need(torch.tensor([rep]), a)
        tr.set(target, Tr.scalar(NO_SOURCE if rep is None else rep, ndim))
        return
    merged = None
    scalars = []
    for x, t in tracked:
        if t.vdim is not None:
            merged = t.ids if merged is None else tr.union_pairs(merged, t.ids)
    assert merged is not None
    for x, t in tracked:
        if t.vdim is None:
            d = vd - (ndim - x.dim())
            if d >= 0 and x.shape[d] == out_shape[vd]:
                merged = tr.union_pairs(merged, t.ids[:1].expand(merged.numel()))  # full size: aligned
            else:
                scalars.append(int(t.ids[0]))
    for s in scalars:
        tr.need(merged, s)
    if merged.numel() != target.shape[vd]:
        raise _Unsupported("broadcast along the channel dim")
    for x in tensors:
        if tr.get(x) is None and x is not target:
            tr.align_operand(x, ndim, vd, merged, what)
    tr.set(target, Tr.along(merged, vd, ndim))


@rule(*SAME_SHAPE)
def same_shape(tr: Tracer, func, args, kwargs, out) -> None:
    x = args[0] if args and isinstance(args[0], torch.Tensor) else None
    if x is None or not isinstance(out, torch.Tensor) or tr.get(x) is None:
        raise _Unsupported("unexpected arguments")
    if tuple(out.shape) != tuple(x.shape):
        raise _Unsupported("shape changed")
    t = tr.get(x)
    tr.set(out, Tr(t.t, t.vdim))


@rule("prelu")
def prelu(tr: Tracer, func, args, kwargs, out) -> None:
    x, w = args[0], args[1] if len(args) > 1 else kwargs["weight"]
    t = tr.get(x)
    tr.set(out, Tr(t.t, t.vdim))
    if w.numel() > 1:
        name = tr.param_name(w)
        ids = tr.ids_along(x, 1)
        if name is None:
            tr.pin_ids(ids, "prelu with a non-parameter weight")
        else:
            tr.record_param_use(name, 0, list(range(w.numel())), ids)


@rule("glu")
def glu(tr: Tracer, func, args, kwargs, out) -> None:
    x = args[0]
    dim = args[1] if len(args) > 1 else kwargs.get("dim", -1)
    dim %= x.dim()
    t = tr.get(x)
    if t.vdim != dim:
        tr.set(out, Tr(t.t, t.vdim))
        return
    ids = t.ids
    half = ids.numel() // 2
    merged = tr.union_pairs(ids[:half], ids[half:])
    tr.set(out, Tr.along(merged, dim, x.dim()))


# ---------------------------------------------------------------------------
# reductions and ops that mix along a dim
# ---------------------------------------------------------------------------

REDUCTIONS = {"sum", "mean", "amax", "amin", "max", "min", "prod", "logsumexp", "all", "any", "argmax",
              "argmin", "nansum", "nanmean", "median", "nanmedian", "count_nonzero", "std", "var",
              "std_mean", "var_mean", "aminmax", "mode"}


def _dims(d: Any, ndim: int) -> Optional[List[int]]:
    if d is None:
        return None
    if isinstance(d, int):
        return [d % ndim] if ndim else []
    return [int(i) % ndim for i in d]


@rule(*REDUCTIONS)
def reduction(tr: Tracer, func, args, kwargs, out) -> None:
    name = _base_name(func_name(func))
    x = args[0]
    rest = list(args[1:])
    if name in ("max", "min") and rest and isinstance(rest[0], torch.Tensor):
        return elementwise(tr, func, args, kwargs, out)
    if "other" in kwargs:
        return elementwise(tr, func, args, kwargs, out)
    dim = kwargs.get("dim", kwargs.get("axis", None))
    keepdim = kwargs.get("keepdim", False)
    if dim is None and rest and (isinstance(rest[0], (int, list, tuple))) and not isinstance(rest[0], bool):
        dim = rest[0]
        if len(rest) > 1 and isinstance(rest[-1], bool) and "keepdim" not in kwargs:
            keepdim = rest[-1] if not (name in ("std", "var", "std_mean", "var_mean") and len(rest) == 2) else False
    dims = _dims(dim, x.dim())
    for y in flatten_tensors(out) if not isinstance(out, torch.Tensor) else [out]:
        _reduce_dims(tr, x, dims, keepdim, y)


@rule("norm")
def norm(tr: Tracer, func, args, kwargs, out) -> None:
    x = args[0]
    dim = kwargs.get("dim", args[2] if len(args) > 2 else None)
    keepdim = kwargs.get("keepdim", args[3] if len(args) > 3 else False)
    _reduce_dims(tr, x, _dims(dim, x.dim()), keepdim, out)


def _reduce_dims(tr: Tracer, x, dims, keepdim, out) -> None:
    t = tr.get(x)
    if dims is None or (t.vdim is not None and t.vdim in dims):
        tr.set(out, Tr.scalar(tr.couple(t.ids), out.dim()))
        return
    vd = t.vdim
    if vd is not None and not keepdim:
        vd -= sum(1 for d in dims if d < vd)
    tr.set(out, Tr.scalar(int(t.ids[0]), out.dim()) if vd is None else Tr.along(t.ids, vd, out.dim()))


MIX_ALONG = {"softmax", "log_softmax", "softmin", "cumsum", "cumprod", "logcumsumexp", "cummax", "cummin",
             "normalize"}


@rule(*MIX_ALONG)
def mix_along(tr: Tracer, func, args, kwargs, out) -> None:
    name = _base_name(func_name(func))
    x = args[0]
    if name == "normalize":
        dim = kwargs.get("dim", args[2] if len(args) > 2 else 1)
    else:
        dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
    t = tr.get(x)
    dims = _dims(dim, x.dim())
    if dims is None or (t.vdim is not None and t.vdim in dims):
        rep = tr.couple(t.ids)
        res = Tr(torch.full_like(t.t, rep), t.vdim)
    else:
        res = Tr(t.t, t.vdim)
    for y in flatten_tensors(out) if not isinstance(out, torch.Tensor) else [out]:
        tr.set(y, Tr(res.t, res.vdim))


# ---------------------------------------------------------------------------
# spatial ops: pooling, resampling (channel dim 1 passes through)
# ---------------------------------------------------------------------------

SPATIAL = {
    "max_pool1d", "max_pool2d", "max_pool3d", "max_pool1d_with_indices", "max_pool2d_with_indices",
    "max_pool3d_with_indices", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d",
    "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d",
    "adaptive_max_pool3d", "adaptive_max_pool1d_with_indices", "adaptive_max_pool2d_with_indices",
    "adaptive_max_pool3d_with_indices", "lp_pool1d", "lp_pool2d", "lp_pool3d", "interpolate", "upsample",
    "upsample_nearest", "upsample_bilinear", "fractional_max_pool2d", "fractional_max_pool3d",
    "_max_pool1d", "_max_pool2d", "_max_pool3d", "_adaptive_max_pool1d", "_adaptive_max_pool2d",
    "_adaptive_max_pool3d", "_fractional_max_pool2d", "_fractional_max_pool3d",
}


@rule(*SPATIAL)
def spatial(tr: Tracer, func, args, kwargs, out) -> None:
    x = args[0] if args else kwargs.get("input")
    t = tr.get(x)
    outs = flatten_tensors(out) if not isinstance(out, torch.Tensor) else [out]
    for y in outs:
        if y.dim() != x.dim():
            raise _Unsupported("pooling changed the number of dims")
        if t.vdim is None or (t.vdim == 1 and x.dim() >= 3) or (x.dim() >= 3 and t.vdim < x.dim() - _spatial_rank(func_name(func), x)):
            tr.set(y, Tr(t.t, t.vdim))
        else:
            tr.set(y, Tr.scalar(tr.couple(t.ids), y.dim()))


def _spatial_rank(name: str, x: torch.Tensor) -> int:
    for k in ("1d", "2d", "3d"):
        if k in name:
            return int(k[0])
    return x.dim() - 2  # interpolate / upsample


@rule("grid_sample")
def grid_sample(tr: Tracer, func, args, kwargs, out) -> None:
    x, grid = args[0], args[1] if len(args) > 1 else kwargs["grid"]
    t = tr.get(x) or Tr.scalar(NO_SOURCE, x.dim())
    if t.vdim not in (None, 1):
        t = Tr.scalar(tr.couple(t.ids), x.dim())
    g = tr.get(grid)
    if g is not None:
        tr.need(t.ids, tr.couple(g.ids))
    tr.set(out, Tr(t.t, t.vdim))


@rule("pad")
def pad(tr: Tracer, func, args, kwargs, out) -> None:
    x = args[0]
    p = args[1] if len(args) > 1 else kwargs["pad"]
    t = tr.get(x)
    padded = {x.dim() - 1 - i // 2 for i, v in enumerate(p) if v != 0}
    if t.vdim is not None and t.vdim in padded:
        tr.pin_ids(t.ids, "padded along the channel dim")
        tr.set(out, tr.fresh_pinned(tr.new_op("pad"), out.dim(), "padded channels"))
        tr.need(t.ids, int(tr.get(out).ids[0]))
        return
    tr.set(out, Tr(t.t, t.vdim))


# ---------------------------------------------------------------------------
# normalisation layers
# ---------------------------------------------------------------------------


def _per_channel(tr: Tracer, x: torch.Tensor, dim: int, params: Sequence[Any], what: str) -> torch.Tensor:
    """Output = input trace; per-channel params aligned with ``dim``."""
    t = tr.get(x)
    if t.vdim is not None and t.vdim != dim % x.dim():
        t = Tr.scalar(tr.couple(t.ids), x.dim())
        tr.set(x, t)
    ids = tr.ids_along(x, dim)
    ids_l: Optional[List[int]] = None
    for p in params:
        if p is None or not isinstance(p, torch.Tensor):
            continue
        name = tr.param_name(p)
        if name is None:
            tr.pin_ids(ids, f"{what} with a non-parameter per-channel tensor")
        elif p.dim() == 1 and p.numel() == ids.numel():
            if ids_l is None:
                ids_l = ids.tolist()
            tr.record_param_use(name, 0, list(range(p.numel())), ids_l)
        else:
            tr.pin_ids(ids, f"{what} parameter {name} has an unexpected shape")
    return ids


def _current_module(tr: Tracer, cls: type) -> Optional[str]:
    """Name of the module running this op, if it is an instance of ``cls``."""
    name = tr.module
    if name is None:
        return None
    try:
        m = tr.model.get_submodule(name)
    except AttributeError:
        return None
    return name if isinstance(m, cls) else None


def _arg(args, kwargs, i, name, default=None):
    if name in kwargs:
        return kwargs[name]
    return args[i] if len(args) > i else default


@rule("batch_norm")
def batch_norm(tr: Tracer, func, args, kwargs, out) -> None:
    x = args[0]
    params = [_arg(args, kwargs, i, n) for i, n in ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias"))]
    ids = _per_channel(tr, x, 1, params, "batch_norm")
    if all(p is None for p in params):
        mod = _current_module(tr, torch.nn.modules.batchnorm._BatchNorm)
        if mod is not None:
            tr.add_module_size((mod, "num_features", ids.tolist(), 1))
    t = tr.get(x)
    tr.set(out, Tr(t.t, t.vdim))


@rule("instance_norm")
def instance_norm(tr: Tracer, func, args, kwargs, out) -> None:
    x = args[0]
    params = [_arg(args, kwargs, i, n) for i, n in ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias"))]
    ids = _per_channel(tr, x, 1, params, "instance_norm")
    if all(p is None for p in params):
        mod = _current_module(tr, torch.nn.modules.instancenorm._InstanceNorm)
        if mod is not None:
            tr.add_module_size((mod, "num_features", ids.tolist(), 1))
    t = tr.get(x)
    tr.set(out, Tr(t.t, t.vdim))


@rule("layer_norm", "rms_norm")
def layer_norm(tr: Tracer, func, args, kwargs, out) -> None:
    x = args[0]
    shape = _arg(args, kwargs, 1, "normalized_shape")
    k = 1 if isinstance(shape, int) else len(shape)
    name = func_name(func)
    w = _arg(args, kwargs, 2, "weight")
    b = _arg(args, kwargs, 3, "bias") if name == "layer_norm" else None
    t = tr.get(x)
    normed = set(range(x.dim() - k, x.dim()))
    if t.vdim is not None and t.vdim in normed:
        # statistics over the channels: every output channel depends on all of them
        rep = tr.couple(t.ids)
        res = Tr(torch.full_like(t.t, rep), t.vdim)
        for p in (w, b):
            if isinstance(p, torch.Tensor):
                pname = tr.param_name(p)
                pd = t.vdim - (x.dim() - k)
                if pname is None or p.shape[pd] != t.ids.numel():
                    tr.pin_ids(res.ids, f"{name} with an unexpected weight")
                else:
                    tr.record_param_use(pname, pd, list(range(p.shape[pd])), res.ids)
        tr.set(out, res)
    else:
        tr.set(out, Tr(t.t, t.vdim))


@rule("group_norm")
def group_norm(tr: Tracer, func, args, kwargs, out) -> None:
    x = args[0]
    g = _arg(args, kwargs, 1, "num_groups")
    w, b = _arg(args, kwargs, 2, "weight"), _arg(args, kwargs, 3, "bias")
    t = tr.get(x)
    if t.vdim is not None and t.vdim != 1:
        t = Tr.scalar(tr.couple(t.ids), x.dim())
    ids = tr.ids_along(x, 1) if t.vdim == 1 else t.ids.expand(x.shape[1]).clone()
    per = x.shape[1] // g
    reps = [tr.couple(ids[i * per:(i + 1) * per]) for i in range(g)]
    new_ids = torch.tensor(reps, dtype=torch.long).repeat_interleave(per)
    mod = _current_module(tr, torch.nn.GroupNorm)
    if mod is not None:
        tr.add_module_size((mod, "num_channels", new_ids.tolist(), 1))
        tr.add_module_size((mod, "num_groups", new_ids.tolist(), per))
    for p in (w, b):
        if isinstance(p, torch.Tensor):
            pname = tr.param_name(p)
            if pname is None:
                tr.pin_ids(new_ids, "group_norm with a non-parameter weight")
            else:
                tr.record_param_use(pname, 0, list(range(p.numel())), new_ids)
    tr.set(out, Tr.along(new_ids, 1, x.dim()) if x.shape[1] > 1 else Tr.scalar(int(new_ids[0]), x.dim()))


@rule("local_response_norm")
def lrn(tr: Tracer, func, args, kwargs, out) -> None:
    x = args[0]
    t = tr.get(x)
    rep = tr.couple(t.ids)
    tr.set(out, Tr(torch.full_like(t.t, rep), t.vdim))


# ---------------------------------------------------------------------------
# producers and consumers: conv, linear, embedding, matmul with a parameter
# ---------------------------------------------------------------------------


@rule("conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "convolution")
def conv(tr: Tracer, func, args, kwargs, out) -> None:
    name = func_name(func)
    transposed = "transpose" in name
    x, w = args[0], _arg(args, kwargs, 1, "weight")
    bias = _arg(args, kwargs, 2, "bias")
    groups = _arg(args, kwargs, 6, "groups", 1)
    if name == "convolution":
        transposed = bool(_arg(args, kwargs, 6, "transposed", False))
        groups = _arg(args, kwargs, 8, "groups", 1)
    wname = tr.param_name(w)
    bname = tr.param_name(bias) if isinstance(bias, torch.Tensor) else None
    in_ids = tr.ids_along(x, 1)
    cin, cout = x.shape[1], out.shape[1]
    module = tr.graph.param_modules.get(wname) if wname else None
    op = tr.new_op(name, preferred=module if module is not None else None)
    if wname is None:
        # a computed weight (e.g. weight standardisation): nothing to slice
        tr.pin_ids(in_ids, f"read by {name} with a computed weight")
        tr.set(out, tr.fresh_pinned(op, out.dim(), f"output of {name} with a computed weight"))
        return
    physical = tr.module == module
    atoms_l: Optional[List[int]] = None
    if groups == 1:
        atoms = _atoms(tr, op, cout)
        atoms_l = atoms.tolist()
        tr.graph.add_consumer(Consumer(op, wname, module, in_ids.tolist(), 0 if transposed else 1, 1, 1, physical, name))
        tr.graph.add_producer(Producer(op, wname, atoms_l, name))
        tr.record_param_use(wname, 1 if transposed else 0, list(range(cout)), atoms_l)
    elif not transposed and w.shape[1] == 1:  # depthwise: channels pass through
        m = cout // cin
        atoms = in_ids.repeat_interleave(m)
        tr.record_param_use(wname, 0, list(range(cout)), atoms)
        tr.graph.depthwise.append((wname, atoms.tolist()))
        if module is None or _current_module(tr, torch.nn.modules.conv._ConvNd) != module:
            # a functional depthwise conv: its group count must follow the channels
            names = _int_attrs_equal(tr, groups)
            if len(names) == 1 and not isinstance(groups, ChannelCount):
                tr.add_module_size((tr.module, names[0], in_ids.tolist(), 1))
            elif not isinstance(groups, ChannelCount):
                tr.pin_ids(in_ids, f"depthwise {name} with a fixed group count ({tr.module or '<model>'})")
    elif not transposed:  # grouped conv: keep groups uniform
        k = cin // groups
        ko = cout // groups
        # position j of every group is coupled with position j of group 0
        # (one vectorised union per side: RegNet has convs of ~50 groups)
        tr.union_pairs(in_ids[:k].expand(groups - 1, k), in_ids[k:].reshape(groups - 1, k))
        atoms = _atoms(tr, op, cout)
        tr.union_pairs(atoms[:ko].expand(groups - 1, ko), atoms[ko:].reshape(groups - 1, ko))
        tr.graph.add_consumer(Consumer(op, wname, module, in_ids.tolist(), 1, groups, 1, False, name))
        tr.graph.add_producer(Producer(op, wname, atoms.tolist(), name))
        tr.record_param_use(wname, 1, list(range(k)), in_ids[:k])
        tr.record_param_use(wname, 0, list(range(cout)), atoms)
    else:
        tr.pin_ids(in_ids, "read by a grouped transposed conv")
        atoms = _atoms(tr, op, cout)
        tr.pin_ids(atoms, "output of a grouped transposed conv")
    if bname is not None:
        tr.record_param_use(bname, 0, list(range(cout)), atoms if atoms_l is None else atoms_l)
    elif isinstance(bias, torch.Tensor):
        _computed_bias(tr, bias, atoms, name)
    tr.set(out, Tr.along(atoms, 1, out.dim()) if cout > 1 else Tr.scalar(int(atoms[0]), out.dim()))


@rule("linear")
def linear(tr: Tracer, func, args, kwargs, out) -> None:
    x, w = args[0], _arg(args, kwargs, 1, "weight")
    bias = _arg(args, kwargs, 2, "bias")
    _linear_like(tr, "linear", x, w, bias, out, weight_in_dim=1)


def _computed_bias(tr: Tracer, bias: torch.Tensor, atoms: torch.Tensor, name: str) -> None:
    """A bias computed from parameters (BEiT's ``cat((q_bias, k_bias, v_bias))``)
    is sliced through its provenance; anything else keeps the outputs."""
    if tr.get(bias) is None and bias.dim() == 1 and bias.shape[0] == atoms.numel() and tr.param_ref(bias):
        tr.align_operand(bias, 1, 0, atoms, f"the bias of {name}")
    else:
        tr.pin_ids(atoms, f"{name} with a computed bias")


def _linear_like(tr: Tracer, name: str, x, w, bias, out, weight_in_dim: int) -> None:
    t = tr.get(x)
    last = x.dim() - 1
    if t.vdim is not None and t.vdim != last:
        # mixes along a dim that carries no channels (e.g. token mixing): pass through
        wn = tr.param_name(w)
        if wn is None and tr.get(w) is not None:
            raise _Unsupported("weight is an activation")
        tr.set(out, Tr(t.t, t.vdim))
        return
    wname = tr.param_name(w)
    bname = tr.param_name(bias) if isinstance(bias, torch.Tensor) else None
    in_ids = tr.ids_along(x, last)
    cout = out.shape[-1] if out.dim() else 1
    module = tr.graph.param_modules.get(wname) if wname else None
    op = tr.new_op(name, preferred=module if module is not None else None)
    if wname is None or tr.get(w) is not None:
        tr.pin_ids(in_ids, f"read by {name} with a computed weight")
        if tr.get(w) is not None:
            tr.pin_all([w], f"used as the weight of {name}")
        tr.set(out, tr.fresh_pinned(op, out.dim(), f"output of {name} with a computed weight"))
        return
    physical = tr.module == module and name == "linear"  # matmul/addmm: read outside a Linear: zero columns
    atoms = _atoms(tr, op, cout)
    atoms_l = atoms.tolist()
    tr.graph.add_consumer(Consumer(op, wname, module, in_ids.tolist(), weight_in_dim, 1, -1, physical, name))
    tr.graph.add_producer(Producer(op, wname, atoms_l, name))
    tr.record_param_use(wname, 1 - weight_in_dim, list(range(cout)), atoms_l)
    if bname is not None:
        tr.record_param_use(bname, 0, list(range(cout)), atoms_l)
    elif isinstance(bias, torch.Tensor):
        _computed_bias(tr, bias, atoms, name)
    tr.set(out, Tr.along(atoms, out.dim() - 1, out.dim()) if cout > 1 else Tr.scalar(int(atoms[0]), out.dim()))


@rule("embedding")
def embedding(tr: Tracer, func, args, kwargs, out) -> None:
    w = args[0] if func is torch.embedding else _arg(args, kwargs, 1, "weight")
    wname = tr.param_name(w)
    d = out.shape[-1]
    module = tr.graph.param_modules.get(wname) if wname else None
    op = tr.new_op("embedding", preferred=module)
    atoms = _atoms(tr, op, d)
    if wname is None:
        tr.pin_ids(atoms, "embedding with a computed table")
    else:
        tr.graph.add_producer(Producer(op, wname, atoms.tolist(), "embedding"))
        tr.record_param_use(wname, 1, list(range(d)), atoms)
    tr.set(out, Tr.along(atoms, out.dim() - 1, out.dim()))


@rule("matmul", "mm", "bmm", "__matmul__", "__rmatmul__")
def matmul(tr: Tracer, func, args, kwargs, out) -> None:
    a, b = args[0], args[1]
    if func_name(func) == "__rmatmul__":
        a, b = b, a
    if tr.get(b) is None and tr.param_name(b) is not None and b.dim() == 2 and a.dim() >= 1:
        return _linear_like(tr, "matmul", a, b, None, out, weight_in_dim=0)
    if a.dim() < 2 or b.dim() < 2:
        raise _Unsupported("matmul with a 1-d operand")
    ta = tr.get(a) or Tr.scalar(NO_SOURCE, a.dim())
    tb = tr.get(b) or Tr.scalar(NO_SOURCE, b.dim())
    nd = out.dim()
    # one operand carries no channel dim (attention weights @ v): the other's
    # channels pass through and need it, like a broadcast gate
    if ta.vdim is None and int(ta.ids[0]) >= 0 and tb.vdim == b.dim() - 1 and b.dim() >= 2:
        tr.need(tb.ids, int(ta.ids[0]))
        tr.set(out, Tr.along(tb.ids, nd - 1, nd))
        return
    if tb.vdim is None and int(tb.ids[0]) >= 0 and ta.vdim == a.dim() - 2 and a.dim() >= 2:
        tr.need(ta.ids, int(tb.ids[0]))
        tr.set(out, Tr.along(ta.ids, nd - 2, nd))
        return
    # contracted dims couple; row dim of a and column dim of b pass through
    ca = ta.t
    if ta.vdim == a.dim() - 1:
        ca = torch.full((1,) * a.dim(), tr.couple(ta.ids), dtype=torch.long)
    cb = tb.t
    if tb.vdim == b.dim() - 2:
        cb = torch.full((1,) * b.dim(), tr.couple(tb.ids), dtype=torch.long)
    ca = ca.reshape((1,) * (nd - ca.dim()) + tuple(ca.shape))
    cb = cb.reshape((1,) * (nd - cb.dim()) + tuple(cb.shape))
    merged = tr.union_pairs(ca, cb)
    res = tr.compress(merged.contiguous())
    tr.set(out, res)


@rule("scaled_dot_product_attention")
def sdpa(tr: Tracer, func, args, kwargs, out) -> None:
    q, k, v = args[0], args[1], args[2]
    mask = _arg(args, kwargs, 3, "attn_mask")
    heads = [tr.get(x) for x in (q, k, v)]
    per_head = all(t is not None and t.vdim == x.dim() - 3 for t, x in zip(heads, (q, k, v)))
    if per_head and heads[1].ids.numel() == heads[2].ids.numel() and heads[0].ids.numel() != heads[1].ids.numel():
        # grouped-query attention (enable_gqa=True): query head h reads
        # key/value head h // (query heads / key-value heads)
        nq, nkv = heads[0].ids.numel(), heads[1].ids.numel()
        if not _arg(args, kwargs, 7, "enable_gqa", False) or nq % nkv:
            raise _Unsupported("query and key/value head counts differ")
        heads = [heads[0]] + [Tr.along(t.ids.repeat_interleave(nq // nkv), t.vdim, t.t.dim()) for t in heads[1:]]
    if per_head and len({t.ids.numel() for t in heads}) == 1:
        # channels vary per head (B, H, N, D): heads are independent; each head's
        # q, k and v are coupled (kept or removed together)
        merged = tr.union_pairs(tr.union_pairs(heads[0].ids, heads[1].ids), heads[2].ids)
        tm = tr.get(mask) if isinstance(mask, torch.Tensor) else None
        if tm is not None:
            tr.need(merged, tr.couple(tm.ids))
        tr.set(out, Tr.along(merged, out.dim() - 3, out.dim()))
        return
    tv = tr.get(v) or Tr.scalar(NO_SOURCE, v.dim())
    if tv.vdim is not None and tv.vdim != v.dim() - 1:
        tv = Tr.scalar(tr.couple(tv.ids), v.dim())
    qk = [tr.get(x).ids for x in (q, k, mask) if isinstance(x, torch.Tensor) and tr.get(x) is not None]
    rep = tr.couple(torch.cat(qk)) if qk else NO_SOURCE
    tr.need(tv.ids, rep)
    if tv.vdim is None:
        ids = tv.ids if int(tv.ids[0]) >= 0 else torch.tensor([rep])
        tr.set(out, Tr.scalar(int(ids[0]), out.dim()))
    else:
        tr.set(out, Tr.along(tv.ids, out.dim() - 1, out.dim()))


# ---------------------------------------------------------------------------
# data movement: view/reshape/permute/index/cat ... computed on id tensors
# ---------------------------------------------------------------------------

MOVEMENT = {
    "reshape", "view", "flatten", "unflatten", "permute", "transpose", "t", "swapaxes", "swapdims", "movedim",
    "moveaxis", "squeeze", "unsqueeze", "expand", "expand_as", "repeat", "tile", "__getitem__", "narrow",
    "select", "index_select", "cat", "concat", "concatenate", "stack", "hstack", "vstack", "dstack", "split",
    "chunk", "tensor_split", "unbind", "split_with_sizes", "flip", "fliplr", "flipud", "roll", "rot90",
    "take_along_dim", "gather", "view_as", "reshape_as", "broadcast_to", "unfold", "get:T", "get:mT", "get:H", "get:mH", "ravel",
    "atleast_1d", "atleast_2d", "atleast_3d", "diagonal", "masked_select", "repeat_interleave", "as_strided",
    "split_copy", "unsafe_split", "unsafe_chunk", "movedim_copy", "narrow_copy",
}

# ops whose output ids are exactly a permutation of dims: cheap on compressed traces
PERMUTING = {"permute", "transpose", "t", "swapaxes", "swapdims", "movedim", "moveaxis", "get:T", "get:mT"}


@rule(*MOVEMENT)
def movement(tr: Tracer, func, args, kwargs, out) -> None:
    name = _base_name(func_name(func))
    tensors = _tensor_args(args, kwargs)
    src = [x for x in tensors if tr.get(x) is not None]
    outs = flatten_tensors(out) if not isinstance(out, torch.Tensor) else [out]
    if name in ("contiguous", "clone", "detach"):
        return same_shape(tr, func, args, kwargs, out)
    if name in ("gather", "take_along_dim", "index_select", "masked_select") and tr.get(args[0]) is None:
        raise _Unsupported("indexing with a tracked index")
    if name in ("chunk", "split", "unsafe_chunk", "unsafe_split") and _chunk_fast(tr, name, args, kwargs, outs):
        return
    if name in ("split", "split_with_sizes", "unsafe_split") and _split_sections_fast(tr, name, args, kwargs, outs):
        return
    if name in ("cat", "concat", "concatenate") and len(outs) == 1 and _cat_fast(tr, name, args, kwargs, outs[0]):
        return
    fast = _fast_movement(tr, name, func, args, kwargs, outs)
    if fast:
        return
    res = _apply_to_ids(func, args, kwargs, {}, tr)
    res_list = flatten_tensors(res) if not isinstance(res, torch.Tensor) else [res]
    if len(res_list) != len(outs):
        raise _Unsupported("unexpected outputs")
    for x in src:  # a fixed-size mask/index laid along the channel dim
        t = tr.get(x)
        if t.vdim is not None and any(
            tr.get(u) is None and u.dim() == x.dim() and u.shape[t.vdim] == x.shape[t.vdim] > 1 for u in tensors
        ):
            tr.pin_ids(t.ids, f"'{name}' with a fixed-size tensor along the channel dim ({tr.module or '<model>'})")
    in_groups = [_groups(tr, tr.get(x)) for x in src]
    for y, r in zip(outs, res_list):
        ctr = tr.compress(r)
        if not _preserves_channels(tr, in_groups, ctr):
            for x in src:
                tr.pin_ids(tr.get(x).ids, f"'{name}' selects or reorders channels ({tr.module or '<model>'})")
            tr.pin_ids(ctr.ids, f"'{name}' selects or reorders channels ({tr.module or '<model>'})")
        tr.set(y, ctr)


def _groups(tr: Tracer, t: Tr) -> List[int]:
    if t.vdim is None:
        return []
    find = tr.src.find
    return [find(a) if a >= 0 else -1 for a in t.ids.tolist()]


def _preserves_channels(tr: Tracer, in_groups: List[List[int]], out: Tr) -> bool:
    if out.vdim is None:
        return all(len(set(g)) <= 1 for g in in_groups)
    og = _groups(tr, out)
    nonempty = [g for g in in_groups if g]
    if not nonempty:
        return True
    if is_tiling(og, [g for grp in nonempty for g in grp]):
        return True
    return all(is_tiling(og, g) for g in nonempty)


def _apply_to_ids(func, args, kwargs, subst: Dict[int, torch.Tensor], tr: Tracer):
    def conv(a):
        if isinstance(a, torch.Tensor) and not (a.dtype in (torch.long, torch.int, torch.bool) and tr.get(a) is None and id(a) not in subst and not _is_data(a, tr)):
            if id(a) in subst:
                return subst[id(a)]
            return tr.materialize(a)
        if isinstance(a, (list, tuple)):
            return type(a)(conv(b) for b in a) if not hasattr(a, "_fields") else type(a)(*[conv(b) for b in a])
        return a

    cargs = tuple(conv(a) for a in args)
    ckw = {k: conv(v) for k, v in kwargs.items()}
    return func(*cargs, **ckw)


def _is_data(a: torch.Tensor, tr: Tracer) -> bool:
    """Integer tensors that carry traced channels (data); other integer tensors,
    buffers included, are indices and are passed through unchanged."""
    return tr.get(a) is not None


def _fast_movement(tr: Tracer, name: str, func, args, kwargs, outs) -> bool:
    """Shortcuts on compressed traces for the common cheap cases."""
    if len(outs) != 1:
        return False
    x = args[0] if args and isinstance(args[0], torch.Tensor) else None
    y = outs[0]
    if x is None or tr.get(x) is None:
        return False
    t = tr.get(x)
    if t.vdim is None and name not in ("cat", "concat", "concatenate", "stack"):
        tr.set(y, Tr.scalar(int(t.ids[0]), y.dim()))
        return True
    if name in PERMUTING:
        res = _apply_to_ids(func, (t.t,) + tuple(args[1:]), kwargs, {}, tr)
        if res.dim() == y.dim():
            vd = [d for d in range(res.dim()) if res.shape[d] > 1]
            tr.set(y, Tr(res.contiguous(), vd[0] if vd else None))
            return True
        return False
    if name in ("reshape", "view", "flatten", "unflatten", "view_as", "reshape_as", "squeeze", "unsqueeze", "ravel"):
        return _reshape_fast(tr, t, x, y, _requested_shape(tr, name, x, args, kwargs), name)
    if name in ("expand", "expand_as", "broadcast_to"):
        vd = t.vdim + y.dim() - x.dim()
        if x.shape[t.vdim] != y.shape[vd]:
            return False
        req = _requested_shape(tr, name, x, args, kwargs)
        size = req[vd] if req is not None and len(req) == y.dim() else -1
        if not (size == -1 or isinstance(size, ChannelCount) and _follows(tr, size, t.ids)):
            tr.pin_ids(t.ids, f"'{name}' to a hard-coded channel count ({tr.module or '<model>'})")
        tr.set(y, Tr.along(t.ids, vd, y.dim()))
        return True
    if name == "__getitem__":
        return _getitem_fast(tr, t, x, args[1], y)
    return False


def _cat_fast(tr: Tracer, name: str, args, kwargs, y: torch.Tensor) -> bool:
    """cat along the channel dim concatenates traces; along another dim it
    aligns (unions) the inputs' channels position by position."""
    xs = args[0] if args else kwargs.get("tensors")
    dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
    if not isinstance(xs, (list, tuple)) or not xs or not isinstance(dim, int):
        return False
    nd = y.dim()
    dim %= nd
    trs = [tr.get(x) for x in xs]
    vds = {t.vdim for t in trs if t is not None and t.vdim is not None}
    if len(vds) > 1:
        return False
    vd = next(iter(vds)) if vds else None
    if vd is None or vd == dim:
        parts = []
        for x, t in zip(xs, trs):
            n = x.shape[dim] if x.dim() == nd else 0
            if t is None:
                parts.append(torch.full((n,), NO_SOURCE, dtype=torch.long))
            elif t.vdim is None:
                parts.append(t.ids[:1].expand(n))
            else:
                parts.append(t.ids)
        ids = torch.cat(parts)
        if vd is None and bool((ids == ids[0]).all()):
            tr.set(y, Tr.scalar(int(ids[0]), nd))
        else:
            tr.set(y, Tr.along(ids, dim, nd))
        return True
    if any(t is not None and t.vdim is None for t in trs):
        return False
    merged = None
    for t in trs:
        if t is not None:
            merged = t.ids if merged is None else tr.union_pairs(merged, t.ids)
    for x, t in zip(xs, trs):
        if t is None and x.dim() == nd:
            tr.align_operand(x, nd, vd, merged, name)
    tr.set(y, Tr.along(merged, vd, nd))
    return True


def _requested_shape(tr: Tracer, name: str, x: torch.Tensor, args, kwargs) -> Optional[List[Any]]:
    """The shape arguments of reshape/view/unflatten as the model wrote them
    (ints, -1, or channel-carrying :class:`ChannelCount`), aligned to output dims."""
    if name in ("view_as", "reshape_as", "expand_as"):
        other = _arg(args, kwargs, 1, "other")
        if not isinstance(other, torch.Tensor):
            return None
        t = tr.get(other)
        base = tuple(t.ids.tolist()) if t is not None and t.vdim is not None else None
        return [ChannelCount(v, base) if t is not None and d == t.vdim else int(v) for d, v in enumerate(other.shape)]
    if name in ("reshape", "view", "expand", "broadcast_to"):
        shape = kwargs.get("shape", kwargs.get("size"))
        if shape is None:
            rest = list(args[1:])
            shape = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
        if any(isinstance(v, torch.dtype) for v in shape):
            return None
        return list(shape)
    if name == "unflatten":
        dim = _arg(args, kwargs, 1, "dim")
        sizes = list(_arg(args, kwargs, 2, "sizes"))
        dim %= x.dim()
        return [None] * dim + sizes + [None] * (x.dim() - dim - 1)
    return None


def _reshape_fast(tr: Tracer, t: Tr, x: torch.Tensor, y: torch.Tensor, requested: Optional[List[Any]] = None, name: str = "reshape") -> bool:
    """Map the channel dim through a reshape by matching groups of dims.

    The output dims that receive the channel dim must include exactly one
    *adaptive* dim (written as -1 or computed from the channel count), which
    then carries the channels; other dims of that group (e.g. the literal
    ``groups`` of a channel shuffle) keep their size, so channels are coupled
    across them. With no adaptive dim the size is hard-coded: keep them all.
    """
    s_in, s_out = list(x.shape), list(y.shape)
    i = j = 0
    groups = []  # (in dims, out dims)
    while i < len(s_in) or j < len(s_out):
        gi, gj = [], []
        pi = pj = 1
        if i < len(s_in):
            gi.append(i); pi *= s_in[i]; i += 1
        if j < len(s_out):
            gj.append(j); pj *= s_out[j]; j += 1
        while pi != pj:
            if pi < pj and i < len(s_in):
                gi.append(i); pi *= s_in[i]; i += 1
            elif pj < pi and j < len(s_out):
                gj.append(j); pj *= s_out[j]; j += 1
            else:
                return False
        # absorb trailing size-1 dims
        while i < len(s_in) and s_in[i] == 1 and (j >= len(s_out) or s_out[j] != 1):
            gi.append(i); i += 1
        while j < len(s_out) and s_out[j] == 1 and (i >= len(s_in) or s_in[i] != 1):
            gj.append(j); j += 1
        groups.append((gi, gj))
    for gi, gj in groups:
        if t.vdim not in gi:
            continue
        if requested is not None and len(requested) == len(s_out):
            adaptive = [d for d in gj if isinstance(requested[d], ChannelCount) or (requested[d] == -1 and not isinstance(requested[d], bool))]
        else:
            adaptive = [d for d in gj if s_out[d] != 1]
            if not adaptive:
                adaptive = gj[:1]
        attr_update = None
        if not adaptive and requested is not None and len(requested) == len(s_out):
            heads = [d for d in gj if isinstance(requested[d], HeadCount)]
            if len(heads) == 1:
                # (..., self.num_heads, self.head_dim): whole heads go, and
                # the head count is rewritten when pruning
                adaptive = heads
                attr_update = (requested[heads[0]].module, requested[heads[0]].attr)
            else:
                # a literal size may be a module attribute (Conv1D.nf, ...): if
                # exactly one dim matches exactly one int attribute, that dim
                # follows the channels and the attribute is rewritten when pruning
                cands = [(d, names) for d in gj for names in [_int_attrs_equal(tr, requested[d])] if len(names) == 1]
                if len(cands) == 1:
                    adaptive = [cands[0][0]]
                    attr_update = (tr.module, cands[0][1][0])
        if len(adaptive) != 1:
            where = tr.module or "<model>"
            why = "a hard-coded size" if not adaptive else "several sizes computed from the channel count"
            tr.pin_ids(t.ids, f"'{name}' with {why} for the channel dim ({where})")
            return False
        a = adaptive[0]
        if attr_update is None and requested is not None and len(requested) == len(s_out):
            sz = requested[a]
            if isinstance(sz, int) and not isinstance(sz, ChannelCount) and sz == -1 and len(gj) > 1:
                # view(..., -1, self.head_size) in a module that counts its
                # heads (BERT's num_attention_heads): keep the count true
                heads = _head_count_attrs(tr, s_out[a])
                if len(heads) == 1:
                    attr_update = (tr.module, heads[0])
            if isinstance(sz, ChannelCount) and sz.base is not None and len(sz.base) != sz:
                retry = _split_heads_of(tr, t, gj, requested)
                if retry is not None:
                    # reshape(B, N, 3, self.num_heads, C // self.num_heads):
                    # the head size is computed from the stream's width C, so
                    # whole heads go and the stream keeps as many channels as
                    # each of q, k and v
                    return _reshape_fast(tr, t, x, y, retry, name)
        shape_in = [s_in[d] for d in gi]
        ids_shape = [1] * len(gi)
        ids_shape[gi.index(t.vdim)] = t.ids.numel()
        block = t.ids.reshape(ids_shape).expand(shape_in).reshape([s_out[d] for d in gj])
        k = gj.index(a)
        if block.dim() > 1:
            rows = block.movedim(k, 0).reshape(block.shape[k], -1)
            if rows.shape[1] > 1 and not bool((rows == rows[:, :1]).all()):
                reps = [tr.couple(r) for r in rows]
                ids = torch.tensor(reps, dtype=torch.long)
            else:
                ids = rows[:, 0].clone()
        else:
            ids = block.clone()
        size = requested[a] if requested is not None and len(requested) == len(s_out) else None
        if isinstance(size, ChannelCount) and not _follows(tr, size, ids):
            where = tr.module or "<model>"
            tr.pin_ids(t.ids, f"'{name}' with a size computed from another tensor's channel count ({where})")
            base = [a for a in (size.base or ()) if a >= 0]
            if base:
                # its count must not change: decided in resolve, since a stream
                # coupled into one group later (e.g. by LayerNorm) is kept or
                # dropped whole anyway
                tr.graph.fixed_counts.append((base, f"its channel count sizes a '{name}' elsewhere ({where})"))
        if attr_update is not None:
            tr.add_module_size((attr_update[0], attr_update[1], ids.tolist(), 1))
        if ids.numel() == 1:
            tr.set(y, Tr.scalar(int(ids[0]), y.dim()))
        else:
            tr.set(y, Tr.along(ids, a, y.dim()))
        return True
    return False


def _split_heads_of(tr: Tracer, t: Tr, gj: List[int], requested: List[Any]) -> Optional[List[Any]]:
    """For a channel split ``(..., heads, C // heads)`` whose head count is a
    module attribute (:class:`HeadCount`) and whose head size is computed from
    another tensor's ``C`` channels: couple every C-block of the split
    channels with those C channels position by position (their counts stay
    equal) and return the sizes with the head size as a plain int, so that
    the heads dim is the one that shrinks. None when they do not fit."""
    heads = [d for d in gj if isinstance(requested[d], HeadCount)]
    sized = [d for d in gj if isinstance(requested[d], ChannelCount)]
    if len(heads) != 1 or len(sized) != 1:
        return None
    base = [a for a in (requested[sized[0]].base or ())]
    n = t.ids.numel()
    if not base or min(base) < 0 or n % len(base):
        return None
    blocks = n // len(base)
    tr.union_pairs(torch.tensor(base, dtype=torch.long).expand(blocks, len(base)), t.ids.reshape(blocks, len(base)))
    retry = list(requested)
    retry[sized[0]] = int(retry[sized[0]])
    return retry


def _head_count_attrs(tr: Tracer, value: int) -> List[str]:
    """Head-count attributes (:class:`HeadCount`) of the running module equal to ``value``."""
    m = _current_module_object(tr)
    if m is None:
        return []
    return [k for k, v in vars(m).items() if isinstance(v, HeadCount) and v == value]


def _int_attrs_equal(tr: Tracer, value: Any) -> List[str]:
    """Plain int attributes of the running module equal to ``value``."""
    if not isinstance(value, int) or isinstance(value, (bool, ChannelCount)) or value <= 1:
        return []
    m = _current_module_object(tr)
    if m is None:
        return []
    return [k for k, v in vars(m).items() if type(v) is int and v == value and not k.startswith("_")]


def _follows(tr: Tracer, size: ChannelCount, ids: torch.Tensor) -> bool:
    """Will ``size`` (read from some tensor's channel dim) still equal the
    number of channels ``ids`` after pruning? True when it was read from the
    same channels, or (same length) once the two are coupled."""
    if size.base is None:
        return False
    find = tr.src.find
    base_groups = {find(a) for a in size.base if a >= 0}
    own = {find(a) for a in ids.tolist() if a >= 0}
    if base_groups == own and len(size.base) % max(ids.numel(), 1) == 0:
        return True
    if len(size.base) == ids.numel():
        tr.union_pairs(torch.tensor(size.base, dtype=torch.long), ids)
        return True
    return False


def _getitem_fast(tr: Tracer, t: Tr, x: torch.Tensor, idx: Any, y: torch.Tensor) -> bool:
    if not isinstance(idx, tuple):
        idx = (idx,)
    if any(isinstance(i, (torch.Tensor, list)) or i is Ellipsis and False for i in idx):
        return False
    # expand Ellipsis
    n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
    full: List[Any] = []
    for i in idx:
        if i is Ellipsis:
            full.extend([slice(None)] * (x.dim() - n_real))
        else:
            full.append(i)
    d = 0
    out_dim = 0
    vd_out = None
    for i in full:
        if i is None:
            out_dim += 1
            continue
        if isinstance(i, bool):
            return False
        if d == t.vdim:
            if not (isinstance(i, slice) and i == slice(None)) and not (
                isinstance(i, slice) and range(*i.indices(x.shape[d])) == range(x.shape[d])
            ):
                return False  # touches the channel dim: generic path decides
            vd_out = out_dim
        if isinstance(i, int):
            d += 1
            continue
        if not isinstance(i, slice):
            return False
        d += 1
        out_dim += 1
    if vd_out is None:
        vd_out = out_dim + (t.vdim - d)
    if not (0 <= vd_out < y.dim()) or y.shape[vd_out] != x.shape[t.vdim]:
        return False
    tr.set(y, Tr.along(t.ids, vd_out, y.dim()))
    return True


@rule("__setitem__", "index_put", "masked_scatter", "scatter", "scatter_add", "index_add", "index_copy", "copy")
def write_into(tr: Tracer, func, args, kwargs, out) -> None:
    """In-place writes into a tensor: keep every channel involved."""
    name = func_name(func)
    tr.pin_all(_tensor_args(args, kwargs), f"written in place by '{name}'")
    dst = args[0]
    if isinstance(dst, torch.Tensor) and tr.get(dst) is None:
        tr.set(dst, tr.fresh_pinned(tr.new_op(name), dst.dim(), f"written by '{name}'"))


@rule("get:shape", "size", "dim", "numel", "get:device", "get:dtype", "get:is_cuda", "get:requires_grad",
      "get:grad_fn", "get:ndim", "item", "tolist", "stride", "is_contiguous", "data_ptr", "element_size",
      "get:grad", "__len__", "__bool__", "__format__", "__repr__", "get:layout", "nelement")
def metadata(tr: Tracer, func, args, kwargs, out) -> None:
    """Ops that only read metadata."""
    return None


@rule("new_zeros", "new_ones", "new_empty", "new_full", "new_tensor", "empty_like_strided")
def creation(tr: Tracer, func, args, kwargs, out) -> None:
    """New tensors that only borrow dtype/device from their input: constants,
    unless their size follows a channel count."""
    if _sized_like_channels(tr, args[1:], kwargs, out):
        return
    for y in flatten_tensors(out) if not isinstance(out, torch.Tensor) else [out]:
        tr.set(y, Tr.scalar(NO_SOURCE, y.dim()))


@rule("einsum")
def einsum(tr: Tracer, func, args, kwargs, out) -> None:
    """einsum without ellipsis: contracted letters couple, kept letters pass."""
    eq = args[0]
    ops = list(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) else list(args[1:])
    if not isinstance(eq, str) or "..." in eq or not isinstance(out, torch.Tensor):
        raise _Unsupported("einsum with ellipsis or operand lists")
    eq = eq.replace(" ", "")
    if "->" in eq:
        lhs, rhs = eq.split("->")
    else:
        lhs = eq
        letters = lhs.replace(",", "")
        rhs = "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    specs = lhs.split(",")
    if len(specs) != len(ops):
        raise _Unsupported("einsum operand count")
    merged = torch.full((1,) * len(rhs), NO_SOURCE, dtype=torch.long)
    for spec_, x in zip(specs, ops):
        t = tr.get(x)
        if t is None:
            continue
        if t.vdim is None or spec_[t.vdim] not in rhs:
            c = torch.full((1,) * len(rhs), tr.couple(t.ids), dtype=torch.long)
        else:
            shape = [1] * len(rhs)
            shape[rhs.index(spec_[t.vdim])] = t.ids.numel()
            c = t.ids.reshape(shape)
        merged = tr.union_pairs(merged, c)
    tr.set(out, tr.compress(merged.contiguous()))


@rule("channel_shuffle", "native_channel_shuffle")
def channel_shuffle(tr: Tracer, func, args, kwargs, out) -> None:
    """Output channel ``i*g + j`` is input channel ``j*(C/g) + i``; channels
    at the same place in each group are coupled so ``C`` stays divisible."""
    x = args[0]
    g = int(_arg(args, kwargs, 1, "groups"))
    ids = tr.ids_along(x, 1)
    per = ids.numel() // g
    blocks = ids.reshape(g, per)
    reps = torch.tensor([tr.couple(blocks[:, i]) for i in range(per)], dtype=torch.long)
    new = reps.repeat_interleave(g)
    tr.set(out, Tr.along(new, 1, out.dim()) if per > 1 else Tr.scalar(int(reps[0]), out.dim()))


@rule("pixel_shuffle")
def pixel_shuffle(tr: Tracer, func, args, kwargs, out) -> None:
    """Each block of r*r input channels becomes one output channel."""
    x = args[0]
    r = int(_arg(args, kwargs, 1, "upscale_factor"))
    ids = tr.ids_along(x, -3).reshape(-1, r * r)
    reps = torch.tensor([tr.couple(row) for row in ids], dtype=torch.long)
    tr.set(out, Tr.along(reps, out.dim() - 3, out.dim()) if reps.numel() > 1 else Tr.scalar(int(reps[0]), out.dim()))


@rule("pixel_unshuffle")
def pixel_unshuffle(tr: Tracer, func, args, kwargs, out) -> None:
    x = args[0]
    r = int(_arg(args, kwargs, 1, "downscale_factor"))
    ids = tr.ids_along(x, -3).repeat_interleave(r * r)
    tr.set(out, Tr.along(ids, out.dim() - 3, out.dim()))


@rule("unfold")
def unfold(tr: Tracer, func, args, kwargs, out) -> None:
    """``F.unfold`` (im2col): channel ``c`` becomes rows ``c*k .. c*k+k-1``;
    ``Tensor.unfold`` (sliding windows on one dim) is data movement."""
    if func is not F.unfold:
        return movement(tr, func, args, kwargs, out)
    x = args[0]
    ids = tr.ids_along(x, 1)
    k = out.shape[1] // max(ids.numel(), 1)
    tr.set(out, Tr.along(ids.repeat_interleave(k), 1, out.dim()))


@rule("addmm")
def addmm(tr: Tracer, func, args, kwargs, out) -> None:
    """``addmm(bias, x, W)`` = ``bias + x @ W``: with a parameter ``W`` of shape
    (in, out) this is a linear layer (e.g. GPT-2's Conv1D)."""
    bias, x, w = args[0], args[1], args[2]
    beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
    if tr.get(w) is None and tr.param_name(w) is not None and tr.get(bias) is None and beta == 1 and alpha == 1:
        return _linear_like(tr, "addmm", x, w, bias, out, weight_in_dim=0)
    raise _Unsupported("addmm with an activation weight or scaled terms")



def _chunk_fast(tr: Tracer, name: str, args, kwargs, outs) -> bool:
    """``chunk(n)`` (or ``split(C // n)``) along the channel dim into equal
    parts: position j of every part is coupled, so after pruning all parts
    keep the same count and the op still splits at the right places."""
    x = args[0]
    t = tr.get(x)
    dim = _arg(args, kwargs, 2, "dim", 0)
    if t is None or t.vdim is None or not isinstance(dim, int) or dim % x.dim() != t.vdim:
        return False
    c = x.shape[t.vdim]
    if name in ("chunk", "unsafe_chunk"):
        n = _arg(args, kwargs, 1, "chunks")
        if not isinstance(n, int) or c % n:
            return False
    attr, total = None, False
    if name not in ("chunk", "unsafe_chunk"):
        size = _arg(args, kwargs, 1, "split_size_or_sections", _arg(args, kwargs, 1, "split_size"))
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0 or c % size:
            return False
        if not isinstance(size, ChannelCount):
            # split(self.split_size) (GPT-2): the attribute is rewritten to
            # the kept count of each (equal) part
            names = _int_attrs_equal(tr, size)
            if len(names) > 1:
                names = [k for k in names if "split" in k]
            if not names and c // size > 1:
                # split(self.expand_chs // 2) (CSPNet): the attribute holds the
                # whole width; it is rewritten to the kept total
                names, total = _int_attrs_equal(tr, c), True
            if len(names) != 1:
                return False
            attr = names[0]
        elif not _follows_part(tr, size, t.ids, c // size):
            return False
        n = c // size
    if len(outs) != n:
        return False
    parts = t.ids.reshape(n, c // n)
    merged = parts[0]
    for q in range(1, n):
        merged = tr.union_pairs(merged, parts[q])
    if attr is not None:
        # (the total: every part keeps the same count)
        tr.add_module_size((tr.module, attr, merged.tolist() * (n if total else 1), 1))
    for y in outs:
        tr.set(y, Tr.along(merged, t.vdim, y.dim()) if merged.numel() > 1 else Tr.scalar(int(merged[0]), y.dim()))
    return True


def _split_sections_fast(tr: Tracer, name: str, args, kwargs, outs) -> bool:
    """``split([a, b, c])`` along the channel dim with sizes the module holds:
    the whole list as one attribute (MixNet's ``self.splits``: rewritten to the
    kept counts), or each size as an int attribute (``[self.key_dim,
    self.key_dim, self.val_dim]``: sections of one attribute are coupled
    position by position so they stay equal; the attribute is rewritten).
    Sections of any other literal size keep their channels."""
    x = args[0]
    t = tr.get(x)
    dim = _arg(args, kwargs, 2, "dim", 0)
    if t is None or t.vdim is None or not isinstance(dim, int) or dim % x.dim() != t.vdim:
        return False
    sections = _arg(args, kwargs, 1, "split_size_or_sections", _arg(args, kwargs, 1, "split_sizes"))
    if not isinstance(sections, (list, tuple)) or len(sections) < 2 or len(sections) != len(outs):
        return False
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in sections):
        return False
    if sum(sections) != x.shape[t.vdim]:
        return False
    parts, start = [], 0
    for v in sections:
        parts.append(t.ids[start:start + v])
        start += v
    module = _current_module_object(tr)
    whole = [] if module is None else [
        k for k, v in vars(module).items()
        if not k.startswith("_") and isinstance(v, (list, tuple)) and len(v) == len(sections)
        and all(type(a) is int and a == b for a, b in zip(v, sections))
    ]
    where = tr.module or "<model>"
    if len(whole) == 1:
        is_tuple = isinstance(getattr(module, whole[0]), tuple)
        tr.couple_attribute_uses(tr.module, whole[0], t.ids.tolist())
        tr.graph.module_lists.append((tr.module, whole[0], [p.tolist() for p in parts], is_tuple))
    else:
        followed = False
        for i, v in enumerate(sections):
            names = [v.attr] if isinstance(v, HeadCount) else _int_attrs_equal(tr, v)
            if len(names) == 1:  # (add_module_size couples sections of one attribute)
                tr.add_module_size((tr.module, names[0], parts[i].tolist(), 1))
                followed = True
            else:
                tr.pin_ids(parts[i], f"'{name}' with a hard-coded section size ({where})")
        if not followed:
            return False
    for y, p in zip(outs, parts):
        tr.set(y, Tr.along(p, t.vdim, y.dim()) if p.numel() > 1 else Tr.scalar(int(p[0]), y.dim()))
    return True


def _current_module_object(tr: Tracer) -> Optional[torch.nn.Module]:
    if tr.module is None:
        return None
    try:
        return tr.model.get_submodule(tr.module)
    except AttributeError:
        return None


def _follows_part(tr: Tracer, size: ChannelCount, ids: torch.Tensor, n: int) -> bool:
    """``size`` was computed from these very channels (e.g. ``C // 2``)."""
    if size.base is None or len(size.base) != ids.numel():
        return False
    find = tr.src.find
    return [find(a) for a in size.base if a >= 0] == [find(a) for a in ids.tolist() if a >= 0]
