"""Shape-only tracing: run the traced forward pass on ``meta`` tensors.

The tracer needs every activation's shape, never its values, so
:func:`channelcut.pruning.tracing.trace` first runs the model with every op
computed on the ``meta`` device: no arithmetic, no activation memory. That pass
is only kept when it provably saw what a real pass would see:

* any read of a value (``.item()``, ``bool(x)``, ``.tolist()``, data-dependent
  shapes such as ``nonzero``) raises on a meta tensor, so control flow that
  depends on values cannot silently take another branch;
* an in-place op on a real tensor (one made outside the traced ops: a
  parameter, a buffer, an input, a factory result) raises :class:`NeedsValues`,
  since its meta stand-in would be a different object;
* a rule that fails on a meta argument raises instead of becoming a barrier;
* a model that changes its own state in ``forward`` (a cache keyed by device,
  a stored activation) is put back as it was.

When any of these fire, the pass is thrown away and the model is traced again
with real values, which is what a model that needs them gets anyway.

PyTorch's generic meta kernels for many pointwise ops and normalisations are
written in Python and cost more than the real op on a small tensor, so the
ops that dominate vision and transformer models get a direct shape function
(:data:`FAST`) that builds the output the real kernel would build: same shape,
dtype and (contiguous) layout. Everything else runs PyTorch's own meta kernel.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

META = torch.device("meta")


class NeedsValues(Exception):
    """The shape-only pass met something that needs real values."""


def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``obj`` with ``fn`` applied to every tensor in it (through lists, tuples
    and dicts; other containers are left as they are)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    t = type(obj)
    if t is list or t is tuple:
        return t(_map_tensors(o, fn) for o in obj)
    if t is dict:
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return obj


def inputs_to_meta(inputs: Any) -> Any:
    """The model inputs for a shape-only pass: floating tensors become meta
    tensors (activations); integer and boolean ones (token ids, masks) stay."""
    return _map_tensors(inputs, lambda x: x.to(META) if x.is_floating_point() or x.is_complex() else x)


def to_meta(obj: Any, cache: Dict[int, Tuple[torch.Tensor, torch.Tensor]]) -> Any:
    """``obj`` with every real tensor in it replaced by a meta tensor of the
    same shape, dtype and strides (cached per tensor object)."""

    def meta_of(x: torch.Tensor) -> torch.Tensor:
        if x.is_meta:
            return x
        hit = cache.get(id(x))
        if hit is not None and hit[0] is x:
            return hit[1]
        m = x.to(META)
        cache[id(x)] = (x, m)  # holds x, so its id is not reused meanwhile
        return m

    return _map_tensors(obj, meta_of)


def _empty(shape: Any, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=META)


def _plain(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.is_contiguous() and x.is_floating_point()


# A shape function gets the positional and keyword arguments of an
# out-of-place call (:func:`run` answers in-place ones itself), at least one of
# them a meta tensor, others possibly real (parameters: it reads only shapes,
# dtypes and layouts), and returns the meta output, or None to leave the op
# to PyTorch's meta kernel.
Shape = Callable[[tuple, dict], Optional[torch.Tensor]]

# position of the ``inplace`` argument of the functional activations
_INPLACE_AT = {
    "relu": 1, "relu6": 1, "silu": 1, "hardswish": 1, "hardsigmoid": 1, "mish": 1, "selu": 1,
    "hardtanh": 3, "leaky_relu": 2, "elu": 2, "celu": 2, "threshold": 3,
    "dropout": 3, "dropout1d": 3, "dropout2d": 3, "dropout3d": 3, "alpha_dropout": 3,
}


def _same_as_first(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    """Out-of-place norms and pointwise ops: the first argument's shape and dtype."""
    if not args or not _plain(args[0]) or "out" in kwargs:
        return None
    return _empty(args[0].shape, args[0].dtype)


def _broadcast(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    """Out-of-place arithmetic on contiguous float tensors of one dtype (and
    Python numbers), where one tensor already has the result's shape."""
    if "out" in kwargs:
        return None
    tensors: List[torch.Tensor] = []
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, torch.Tensor):
            if not _plain(a):
                return None
            tensors.append(a)
        elif not isinstance(a, (int, float)):
            return None
    if not tensors or any(t.dtype != tensors[0].dtype for t in tensors):
        return None
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) == 1:
        return _empty(tensors[0].shape, tensors[0].dtype)
    out = torch.broadcast_shapes(*shapes)
    if tuple(out) not in shapes:
        return None
    return _empty(out, tensors[0].dtype)


def _cat(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    xs = kwargs.get("tensors", args[0] if args else None)
    dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
    if "out" in kwargs or not isinstance(xs, (list, tuple)) or not xs or not isinstance(dim, int):
        return None
    if not all(_plain(x) for x in xs) or len({(x.dtype, x.dim()) for x in xs}) != 1:
        return None
    d = dim % xs[0].dim()
    rest = {tuple(x.shape[:d]) + tuple(x.shape[d + 1:]) for x in xs}
    if len(rest) != 1:
        return None
    shape = list(xs[0].shape)
    shape[d] = sum(int(x.shape[d]) for x in xs)
    return _empty(shape, xs[0].dtype)


def _adaptive_pool(n: int) -> Shape:
    def shape(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
        x = args[0] if args else None
        size = kwargs.get("output_size", args[1] if len(args) > 1 else None)
        if not _plain(x) or x.dim() not in (n + 1, n + 2):
            return None
        if isinstance(size, int):
            size = (size,) * n
        if not isinstance(size, (tuple, list)) or len(size) != n or not all(isinstance(s, int) for s in size):
            return None
        return _empty(tuple(x.shape[: x.dim() - n]) + tuple(size), x.dtype)

    return shape


def _mean(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    x = args[0] if args else None
    dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
    keep = kwargs.get("keepdim", args[2] if len(args) > 2 else False)
    if not _plain(x) or "out" in kwargs or "dtype" in kwargs or not isinstance(keep, bool):
        return None
    if isinstance(dim, int):
        dim = (dim,)
    if not isinstance(dim, (tuple, list)) or not dim or not all(isinstance(d, int) for d in dim):
        return None
    drop = {d % x.dim() for d in dim}
    if len(drop) != len(dim):
        return None
    shape = [1 if d in drop else s for d, s in enumerate(x.shape) if keep or d not in drop]
    return _empty(shape, x.dtype)


def _sdpa(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    if len(args) < 3 or not all(_plain(a) for a in args[:3]) or args[0].dim() < 2:
        return None
    q, v = args[0], args[2]
    if q.dtype != v.dtype:
        return None
    return _empty(tuple(q.shape[:-1]) + (v.shape[-1],), q.dtype)


def _weighted(args: tuple, kwargs: dict, names: Tuple[str, ...]) -> Optional[Dict[str, Any]]:
    """The arguments of a conv / linear call by name (``names`` in signature
    order), when input and weight are contiguous float tensors of one dtype
    and the bias, if any, is one value per output channel; else None."""
    if len(args) > len(names) or any(k not in names for k in kwargs):
        return None
    a = dict(zip(names, args), **kwargs)
    x, w, b = a.get("input"), a.get("weight"), a.get("bias")
    if not (_plain(x) and _plain(w)) or x.dtype != w.dtype or w.dim() < 1:
        return None
    if b is not None and not (_plain(b) and b.dtype == x.dtype and tuple(b.shape) == (w.shape[0],)):
        return None
    return a


def _conv(n: int) -> Shape:
    """``conv{n}d`` on contiguous float tensors (the real kernel then returns
    a contiguous output): the standard output-size formula."""

    def _tuple(v: Any) -> Optional[Tuple[int, ...]]:
        if isinstance(v, int):
            return (v,) * n
        if isinstance(v, (tuple, list)) and len(v) == n and all(isinstance(i, int) for i in v):
            return tuple(v)
        return None

    def shape(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
        a = _weighted(args, kwargs, ("input", "weight", "bias", "stride", "padding", "dilation", "groups"))
        if a is None:
            return None
        x, w = a["input"], a["weight"]
        if x.dim() not in (n + 1, n + 2) or w.dim() != n + 2:
            return None
        groups = a.get("groups", 1)
        stride, dilation = _tuple(a.get("stride", 1)), _tuple(a.get("dilation", 1))
        pad = a.get("padding", 0)
        if type(groups) is not int or groups < 1 or stride is None or dilation is None:
            return None
        if x.shape[-n - 1] != w.shape[1] * groups or w.shape[0] % groups:
            return None
        kernel = tuple(w.shape[2:])
        span = [d * (k - 1) for d, k in zip(dilation, kernel)]
        if pad == "valid":
            pad = (0,) * n
        elif pad == "same":
            if any(s != 1 for s in stride):
                return None
            pad = None
        else:
            pad = _tuple(pad)
            if pad is None:
                return None
        size = []
        for i in range(n):
            L = int(x.shape[x.dim() - n + i])
            o = L if pad is None else (L + 2 * pad[i] - span[i] - 1) // stride[i] + 1
            if o < 1 or (pad is None and L < 1):
                return None
            size.append(o)
        return _empty(tuple(x.shape[: x.dim() - n - 1]) + (int(w.shape[0]),) + tuple(size), x.dtype)

    return shape


def _linear(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    a = _weighted(args, kwargs, ("input", "weight", "bias"))
    if a is None:
        return None
    x, w = a["input"], a["weight"]
    if x.dim() < 1 or w.dim() != 2 or x.shape[-1] != w.shape[1]:
        return None
    return _empty(tuple(x.shape[:-1]) + (int(w.shape[0]),), x.dtype)


_UNARY = (
    "batch_norm", "layer_norm", "group_norm", "instance_norm", "rms_norm", "relu", "relu6", "hardtanh",
    "gelu", "silu", "sigmoid", "tanh", "hardswish", "hardsigmoid", "mish", "leaky_relu", "elu", "selu",
    "celu", "softplus", "exp", "sqrt", "rsqrt", "erf", "neg", "__neg__",
)
_BINARY = (
    "add", "sub", "mul", "div", "true_divide",
    "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__", "__rtruediv__",
)

FAST: Dict[str, Shape] = {name: _same_as_first for name in _UNARY}
FAST.update({name: _broadcast for name in _BINARY})
FAST.update({
    "cat": _cat, "concat": _cat, "concatenate": _cat,
    "adaptive_avg_pool1d": _adaptive_pool(1), "adaptive_avg_pool2d": _adaptive_pool(2),
    "adaptive_avg_pool3d": _adaptive_pool(3), "mean": _mean,
    "scaled_dot_product_attention": _sdpa,
    "conv1d": _conv(1), "conv2d": _conv(2), "conv3d": _conv(3), "linear": _linear,
})


def is_write(name: str, kwargs: dict) -> bool:
    """Does this op write into its first argument (or an ``out=`` tensor)?"""
    if "out" in kwargs or name in ("__setitem__", "copy_", "set_"):
        return True
    if name.startswith("__i") and name.endswith("__"):
        return True
    return name.endswith("_") and not name.endswith("__") and not name.startswith("_")


def run(
    func: Any, name: str, args: tuple, kwargs: dict, cache: Dict[int, Tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
) -> Any:
    """Compute ``func(*args, **kwargs)``: on meta tensors where an argument is
    one (an activation), for real where none is (constants, parameters,
    indices, masks; ``device`` is the model's own)."""
    if name in METADATA:  # the same answer on a meta tensor
        return func(*args, **kwargs)
    dev = kwargs.get("device")
    on_meta = dev is not None and torch.device(dev).type == "meta"  # device=x.device of an activation
    if not (on_meta or _holds_meta(args) or _holds_meta(kwargs)):
        return func(*args, **kwargs)
    if _is_constant(name, args, kwargs):  # a constant, even when shaped like an activation
        rkwargs = _real_stand_ins(kwargs, device)
        if on_meta:
            rkwargs["device"] = device
        return func(*_real_stand_ins(args, device), **rkwargs)
    at = _INPLACE_AT.get(name)
    inplace = kwargs.get("inplace") is True or (at is not None and len(args) > at and args[at] is True)
    if inplace or is_write(name, kwargs):
        target = kwargs.get("out", args[0] if args else None)
        if isinstance(target, torch.Tensor) and not target.is_meta:
            raise NeedsValues(f"'{name}' writes into a tensor made outside the traced ops")
        if _in_place_keeps_shape(name, inplace, args, kwargs):
            return args[0]  # an in-place pointwise op on a meta tensor: itself
    fast = FAST.get(name)
    if fast is not None:  # (shape functions read shapes only: real arguments need no meta copy)
        out = fast(args, kwargs)
        if out is not None:
            return out
    margs = to_meta(args, cache)
    mkwargs = to_meta(kwargs, cache) if kwargs else kwargs
    out = func(*margs, **mkwargs)
    if _holds_index(out):
        # integer and boolean tensors are indices and masks, whose values the
        # rules read: computed for real, from real inputs only
        raise NeedsValues(f"'{name}' makes an index or mask from an activation")
    return out


# queries of a tensor's metadata: a meta tensor answers them like the real one
METADATA = {"dim", "size", "get:shape", "get:ndim", "numel", "get:dtype"}

# creation ops: their values depend on no tensor's values (``x.new_zeros``,
# ``torch.arange(n, device=x.device)``), so they make real constants; writing an
# activation into one later hands over to a real pass
CREATION = {
    "arange", "range", "zeros", "ones", "full", "empty", "eye", "linspace", "logspace", "tensor", "as_tensor",
    "tril_indices", "triu_indices",
}
# creation ops whose first argument is only a template (shape, dtype, device)
TEMPLATED = {"zeros_like", "ones_like", "full_like", "empty_like", "new_zeros", "new_ones", "new_full", "new_empty",
             "new_tensor"}


def _is_constant(name: str, args: tuple, kwargs: dict) -> bool:
    """A creation op given no activation, except as a template
    (``torch.as_tensor(x)`` of an activation ``x`` is not a constant)."""
    if name in TEMPLATED:
        args = args[1:]
    elif name not in CREATION:
        return False
    return not (_holds_meta(args) or any(_holds_meta(v) for k, v in kwargs.items() if k != "device"))


def _real_stand_ins(obj: Any, device: torch.device) -> Any:
    """``obj`` with meta tensors replaced by empty real tensors like them."""
    return _map_tensors(obj, lambda x: torch.empty(x.shape, dtype=x.dtype, device=device) if x.is_meta else x)


def _holds_index(out: Any) -> bool:
    if isinstance(out, torch.Tensor):
        return not (out.is_floating_point() or out.is_complex())
    if isinstance(out, (list, tuple)):
        return any(_holds_index(o) for o in out)
    return False


def _in_place_keeps_shape(name: str, inplace: bool, args: tuple, kwargs: dict) -> bool:
    """``relu_(x)``, ``F.relu(x, inplace=True)``, ``x.add_(y)``, ``x += y``
    on a meta ``x`` that the other operands broadcast to."""
    if "out" in kwargs or not args or not isinstance(args[0], torch.Tensor) or not args[0].is_meta:
        return False
    if name.startswith("__i") and name.endswith("__"):
        base = "__" + name[3:]
    elif inplace:
        base = name
    else:
        base = name[:-1]
    if base in _UNARY:
        return True
    if base not in _BINARY:
        return False
    x = args[0]
    for a in list(args[1:]) + list(kwargs.values()):
        if isinstance(a, torch.Tensor):
            if a.dtype != x.dtype or torch.broadcast_shapes(a.shape, x.shape) != x.shape:
                return False
        elif not isinstance(a, (int, float)):
            return False
    return x.is_floating_point()


State = List[Tuple[torch.nn.Module, Dict[str, Any], Dict[str, Any], Dict[str, Any], List[Tuple[Any, Any]]]]


def snapshot_state(model: torch.nn.Module) -> State:
    """What :func:`restore_state` needs to undo what a forward pass changes on
    the model: every module's attributes, parameters and buffers, and the
    contents of the lists and dicts it holds (a cache filled in ``forward``)."""
    state = []
    for m in model.modules():
        containers = [(v, list(v) if isinstance(v, list) else dict(v))
                      for v in m.__dict__.values() if type(v) in (list, dict)]
        state.append((m, dict(m.__dict__), dict(m._parameters), dict(m._buffers), containers))
    return state


def _holds_meta(v: Any) -> bool:
    """``v`` is a meta tensor, or a list, tuple or dict that holds one."""
    if isinstance(v, torch.Tensor):
        return v.is_meta
    if isinstance(v, (list, tuple)):
        return any(_holds_meta(o) for o in v)
    if isinstance(v, dict):
        return any(_holds_meta(o) for o in v.values())
    return False


def _same(a: Any, b: Any) -> bool:
    """Same list/dict contents, item by item identity."""
    if isinstance(a, list):
        return len(a) == len(b) and all(x is y for x, y in zip(a, b))
    return a.keys() == b.keys() and all(a[k] is b[k] for k in a)


def restore_state(state: State) -> bool:
    """Undo every change to a module's attributes, parameters, buffers and
    held lists and dicts since :func:`snapshot_state`; True if there was any.

    A model that changes its own state in ``forward`` (a cache keyed by
    device, a stored activation) may behave differently on meta tensors than
    on real ones, so its shape-only pass is not kept."""
    changed = False
    for m, attrs, params, buffers, containers in state:
        for now, before in ((m.__dict__, attrs), (m._parameters, params), (m._buffers, buffers)):
            if now.keys() == before.keys() and all(now[k] is before[k] for k in now):
                continue
            changed = True
            now.clear()
            now.update(before)
        for obj, contents in containers:
            if not _same(obj, contents):
                changed = True
                if isinstance(obj, list):
                    obj[:] = contents
                else:
                    obj.clear()
                    obj.update(contents)
    return changed

