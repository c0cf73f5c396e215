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
that builds the output the real kernel would build: same shape, dtype and
(contiguous) layout. Shape functions are registered with the op's rule
(``rules.rule(..., shape=...)``): the generic ones are here
(:func:`same_as_first`, :func:`broadcast`), the others next to their rule.
Everything else runs PyTorch's own meta kernel.

Start at :func:`run`. What it needs to know about an op comes from the op's
entry in the rule table (``rules.facts``), passed in as ``facts``: its shape
function, the position of its ``inplace`` argument, whether it creates a
constant, and whether a meta tensor answers it like a real one.
"""

from __future__ import annotations

from collections import OrderedDict
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


def empty(shape: Any, dtype: torch.dtype) -> torch.Tensor:
    """The meta output of a shape function."""
    return torch.empty(shape, dtype=dtype, device=META)


def plain(x: Any) -> bool:
    """A contiguous floating tensor: what shape functions know the layout of."""
    return isinstance(x, torch.Tensor) and x.is_contiguous() and x.is_floating_point()


# A shape function gets the positional and keyword arguments of an
# out-of-place call (:func:`run` answers in-place ones itself), at least one of
# them a meta tensor, others possibly real (parameters: it reads only shapes,
# dtypes and layouts), and returns the meta output, or None to leave the op
# to PyTorch's meta kernel.
Shape = Callable[[tuple, dict], Optional[torch.Tensor]]


def same_as_first(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    """Out-of-place norms and pointwise ops: the first argument's shape and dtype."""
    if not args or not plain(args[0]) or "out" in kwargs:
        return None
    return empty(args[0].shape, args[0].dtype)


def broadcast(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    """Out-of-place arithmetic on contiguous float tensors of one dtype (and
    Python numbers), where one tensor already has the result's shape."""
    if "out" in kwargs:
        return None
    tensors: List[torch.Tensor] = []
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, torch.Tensor):
            if not plain(a):
                return None
            tensors.append(a)
        elif not isinstance(a, (int, float)):
            return None
    if not tensors or any(t.dtype != tensors[0].dtype for t in tensors):
        return None
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) == 1:
        return empty(tensors[0].shape, tensors[0].dtype)
    out = torch.broadcast_shapes(*shapes)
    if tuple(out) not in shapes:
        return None
    return empty(out, tensors[0].dtype)


def is_write(name: str, kwargs: dict) -> bool:
    """Does this op write into its first argument (or an ``out=`` tensor)?"""
    if "out" in kwargs or name in ("__setitem__", "copy_", "set_"):
        return True
    if name.startswith("__i") and name.endswith("__"):
        return True
    return name.endswith("_") and not name.endswith("__") and not name.startswith("_")


def run(
    func: Any, name: str, args: tuple, kwargs: dict, cache: Dict[int, Tuple[torch.Tensor, torch.Tensor]],
    device: torch.device, facts: Callable[[str], Any],
) -> Any:
    """Compute ``func(*args, **kwargs)``: on meta tensors where an argument is
    one (an activation), for real where none is (constants, parameters,
    indices, masks; ``device`` is the model's own). ``facts(name)`` is the
    op's entry in the rule table, or None (see the module docstring)."""
    entry = facts(name)
    if entry is not None and entry.same_on_meta:  # the same answer on a meta tensor
        return func(*args, **kwargs)
    dev = kwargs.get("device")
    on_meta = dev is not None and torch.device(dev).type == "meta"  # device=x.device of an activation
    if not (on_meta or _holds_meta(args) or _holds_meta(kwargs)):
        return func(*args, **kwargs)
    if _is_constant(entry, args, kwargs):  # a constant, even when shaped like an activation
        rkwargs = _real_stand_ins(kwargs, device)
        if on_meta:
            rkwargs["device"] = device
        return func(*_real_stand_ins(args, device), **rkwargs)
    at = entry.inplace_arg if entry is not None else None
    inplace = kwargs.get("inplace") is True or (at is not None and len(args) > at and args[at] is True)
    if inplace or is_write(name, kwargs):
        target = kwargs.get("out", args[0] if args else None)
        if isinstance(target, torch.Tensor) and not target.is_meta:
            raise NeedsValues(f"'{name}' writes into a tensor made outside the traced ops")
        if _in_place_keeps_shape(name, inplace, args, kwargs, facts):
            return args[0]  # an in-place pointwise op on a meta tensor: itself
    fast = entry.shape if entry is not None else None
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


def _is_constant(entry: Any, args: tuple, kwargs: dict) -> bool:
    """A creation op given no activation, except as a template
    (``torch.as_tensor(x)`` of an activation ``x`` is not a constant).
    ``entry.creates``: "constant" for ops whose values depend on no tensor's
    values (``torch.arange(n, device=x.device)``), "template" for those whose
    first argument only lends shape, dtype and device (``x.new_zeros``)."""
    creates = entry.creates if entry is not None else None
    if creates == "template":
        args = args[1:]
    elif creates != "constant":
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


def _in_place_keeps_shape(name: str, inplace: bool, args: tuple, kwargs: dict, facts: Callable[[str], Any]) -> bool:
    """``relu_(x)``, ``F.relu(x, inplace=True)``, ``x.add_(y)``, ``x += y``
    on a meta ``x`` that the other operands broadcast to: an op whose
    out-of-place form has the shape function :func:`same_as_first`, or
    :func:`broadcast` with the other operands no bigger than ``x``."""
    if "out" in kwargs or not args or not isinstance(args[0], torch.Tensor) or not args[0].is_meta:
        return False
    if name.startswith("__i") and name.endswith("__"):
        base = "__" + name[3:]
    elif inplace:
        base = name
    else:
        base = name[:-1]
    base_entry = facts(base)
    shape = base_entry.shape if base_entry is not None else None
    if shape is same_as_first:
        return True
    if shape is not broadcast:
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
    contents of the lists and dicts it holds (a cache filled in ``forward``;
    the hook tables, ordered dicts: a hook the model installs on its first
    call, as Hugging Face's output capturing does, would otherwise stay and be
    installed again by the real pass)."""
    state = []
    for m in model.modules():
        containers = [(v, None if not v else list(v) if isinstance(v, list) else type(v)(v))  # None: was empty
                      for v in m.__dict__.values() if type(v) in (list, dict, OrderedDict)]
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
            if contents is None:
                if obj:
                    changed = True
                    obj.clear()
                continue
            if not _same(obj, contents):
                changed = True
                if isinstance(obj, list):
                    obj[:] = contents
                else:
                    obj.clear()
                    obj.update(contents)
    return changed

