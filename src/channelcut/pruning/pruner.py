"""Apply a :class:`PruningSpec` to a model in place. Start at :func:`prune_model`.

Parameters are sliced one at a time, in place: each old tensor is freed as
its slice is made, so the memory an export needs beyond the model is about
one layer's weights. Every change is recorded in a :class:`Rollback` (for a
sliced tensor, only the values it removed), so a failure (or a failed
verification) restores the model exactly: same parameter objects, same
values, same attributes, no hooks.

Consumers that read a subset of their input become Subselect layers
(``subselect.py``: an ``nn.Conv2d`` becomes a ``SubselectConv2d``, ...) that
narrow (a view) or gather (a copy) the input before running the layer;
parameter names and the state_dict layout stay those of the original model,
and the model stays scriptable and exportable.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..errors import ExportError
from .attention import fix_multihead_attention
from .mock import zero_input_channels
from .spec import MaskEntry, PruningSpec, Subselection
from .subselect import install_subselection


class Rollback:
    """Undo log for an in-place export."""

    def __init__(self) -> None:
        self.data: List[Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]] = []
        self.attrs: List[Tuple[nn.Module, str, Any]] = []
        self.hooks: List[Any] = []
        self.undos: List[Callable[[], None]] = []  # e.g. class swaps of Subselect layers
        self.shrinks: List[Callable[[], None]] = []  # rebuild a sliced tensor from what it removed

    def set_data(self, t: torch.Tensor, new: torch.Tensor) -> None:
        self.data.append((t, t.data, t.grad if isinstance(t, nn.Parameter) else None))
        t.data = new
        if isinstance(t, nn.Parameter):
            t.grad = None

    def set_attr(self, m: nn.Module, name: str, value: Any) -> None:
        self.attrs.append((m, name, getattr(m, name)))
        setattr(m, name, value)

    def undo(self) -> None:
        for fn in reversed(self.undos):
            fn()
        for h in reversed(self.hooks):
            h.remove()
        for m, name, value in reversed(self.attrs):
            setattr(m, name, value)
        for t, data, grad in reversed(self.data):
            t.data = data
            if isinstance(t, nn.Parameter):
                t.grad = grad
        for rebuild in reversed(self.shrinks):
            rebuild()
        self.shrinks.clear()
        self.data.clear()
        self.attrs.clear()
        self.hooks.clear()
        self.undos.clear()


class _Modules:
    """Name -> submodule of one model, walked once (``get_submodule`` per
    parameter name costs more than the slicing on a large model)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.by_name: Dict[str, nn.Module] = dict(model.named_modules(remove_duplicate=False))

    def module(self, name: str) -> nn.Module:
        m = self.by_name.get(name)
        return m if m is not None else (self.model.get_submodule(name) if name else self.model)

    def tensor(self, name: str) -> torch.Tensor:
        mod_name, _, attr = name.rpartition(".")
        t = getattr(self.module(mod_name), attr)
        if not isinstance(t, torch.Tensor):
            raise ExportError(f"{name!r} is not a tensor on the model any more")
        return t


def shrink(t: torch.Tensor, dims: Dict[int, List[int]], delta: Optional[List[float]], zeros: List[MaskEntry],
           rb: Rollback, index: Optional[Dict[Any, torch.Tensor]] = None) -> None:
    """Slice tensor ``t`` in place: add ``delta`` (a folded constant), keep
    ``dims[d]`` (indices in their new order) along each dim ``d``, zero the
    ``zeros`` columns. Only what it removes is kept, in ``rb``, to rebuild
    the old tensor bit for bit."""
    index = {} if index is None else index

    def idx(values: List[int], device: torch.device) -> torch.Tensor:
        key = (tuple(values), device)
        i = index.get(key)
        if i is None:
            i = index[key] = torch.tensor(values, dtype=torch.long, device=device)
        return i

    old_grad = t.grad if isinstance(t, nn.Parameter) else None
    old_bias = t.data if delta is not None else None  # one small vector
    steps: List[Tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (dim, size, kept, removed at, values)
    cleared: List[Tuple[int, Optional[torch.Tensor], torch.Tensor]] = []  # zeroed columns: (dim, index, values)
    with torch.no_grad():
        cur = t.data
        if delta is not None:
            cur = cur + torch.tensor(delta, dtype=cur.dtype, device=cur.device)
        for dim, kept in sorted(dims.items()):
            n = cur.shape[dim]
            keep = set(kept)
            gone = idx([i for i in range(n) if i not in keep], cur.device)
            kept_i = idx(kept, cur.device)
            steps.append((dim, n, kept_i, gone, cur.index_select(dim, gone)))
            cur = cur.index_select(dim, kept_i)
        for entry in zeros:
            if entry.groups == 1:
                at = idx(entry.channels, cur.device)
                cleared.append((entry.weight_dim, at, cur.index_select(entry.weight_dim, at)))
            else:  # a grouped conv's weight is small: keep it whole
                cleared.append((-1, None, cur.clone()))
            zero_input_channels(cur, entry)
        t.data = cur.contiguous()
    if isinstance(t, nn.Parameter):
        t.grad = None

    def rebuild() -> None:
        with torch.no_grad():
            cur = t.data
            for dim, at, values in reversed(cleared):
                if dim < 0:
                    cur = values
                else:
                    cur.index_copy_(dim, at, values)
            for dim, n, kept_i, gone, values in reversed(steps):
                shape = list(cur.shape)
                shape[dim] = n
                full = cur.new_empty(shape)
                full.index_copy_(dim, kept_i, cur)
                if gone.numel():
                    full.index_copy_(dim, gone, values)
                cur = full
            t.data = old_bias if old_bias is not None else cur
        if isinstance(t, nn.Parameter):
            t.grad = old_grad

    rb.shrinks.append(rebuild)


def _fix_attributes(m: nn.Module, rb: Rollback) -> None:
    """Update the attributes that describe a module's shapes."""
    if isinstance(m, nn.modules.conv._ConvNd):
        w = m.weight
        g = m.groups
        if not m.transposed and g > 1 and g == m.in_channels and w.shape[1] == 1:
            mult = m.out_channels // m.in_channels
            new_out = w.shape[0]
            new_in = new_out // mult
            rb.set_attr(m, "groups", new_in)
            rb.set_attr(m, "in_channels", new_in)
            rb.set_attr(m, "out_channels", new_out)
        elif m.transposed:
            rb.set_attr(m, "in_channels", w.shape[0])
            rb.set_attr(m, "out_channels", w.shape[1] * g)
        else:
            rb.set_attr(m, "in_channels", w.shape[1] * g)
            rb.set_attr(m, "out_channels", w.shape[0])
    elif isinstance(m, nn.Linear):
        rb.set_attr(m, "in_features", m.weight.shape[1])
        rb.set_attr(m, "out_features", m.weight.shape[0])
    elif isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
        t = m.weight if m.weight is not None else m.running_mean
        if t is not None:
            rb.set_attr(m, "num_features", t.shape[0])
    elif isinstance(m, nn.GroupNorm):
        if m.weight is not None:
            c = m.weight.shape[0]
            rb.set_attr(m, "num_groups", m.num_groups * c // m.num_channels)
            rb.set_attr(m, "num_channels", c)
    elif isinstance(m, nn.LayerNorm):
        if m.weight is not None:
            rb.set_attr(m, "normalized_shape", tuple(m.weight.shape))
    elif isinstance(m, nn.Embedding):
        rb.set_attr(m, "embedding_dim", m.weight.shape[1])
    elif isinstance(m, nn.PReLU):
        rb.set_attr(m, "num_parameters", m.weight.numel())


def prune_model(model: nn.Module, spec: PruningSpec) -> Rollback:
    """Apply ``spec`` to ``model`` in place; return the undo log.

    Raises :class:`ExportError` (with the model restored) if anything fails.
    """
    rb = Rollback()
    try:
        mods = _Modules(model)
        deltas = {f.bias: f.delta for f in spec.folds}
        zeros: Dict[str, List[MaskEntry]] = {}
        for entry in spec.zeros:
            zeros.setdefault(entry.param, []).append(entry)
        names = list(dict.fromkeys([*deltas, *spec.slices, *zeros]))
        before = {name: tuple(mods.tensor(name).shape) for name in names}
        touched = {}
        index: Dict[Any, torch.Tensor] = {}  # BN params share their kept lists
        for name in names:
            shrink(mods.tensor(name), spec.slices.get(name, {}), deltas.get(name), zeros.get(name, []), rb, index)
            mod_name = name.rpartition(".")[0]
            touched[mod_name] = mods.module(mod_name)
        for m in touched.values():
            _fix_attributes(m, rb)
        for mod_name, m in mods.by_name.items():
            # an attention layer whose projections changed (out_proj is a child)
            if isinstance(m, nn.MultiheadAttention) and any(
                n == mod_name or n == f"{mod_name}.out_proj" for n in touched
            ):
                fix_multihead_attention(m, rb.set_attr)
        for mod_name, attrs in spec.attributes.items():
            m = mods.module(mod_name)
            for attr, value in attrs.items():
                rb.set_attr(m, attr, value)
        installed: Dict[str, Subselection] = {}
        for sub in spec.subselections:
            m = mods.module(sub.module)
            prev = installed.get(sub.module)
            if prev is not None:
                if (prev.indices, prev.activation_dim, prev.contiguous) != (sub.indices, sub.activation_dim, sub.contiguous):
                    raise ExportError(f"module {sub.module!r} would need two different input subsets")
                continue
            installed[sub.module] = sub
            rb.undos.append(install_subselection(m, sub.activation_dim, sub.indices, sub.contiguous, sub.input_channels))
        record = AppliedSpec(spec, before)
        history = _APPLIED.setdefault(model, [])
        history.append(record)
        rb.undos.insert(0, lambda: history.remove(record) if record in history else None)
    except Exception as exc:
        rb.undo()
        raise ExportError(f"pruning failed and the model was restored: {exc}") from exc
    return rb


@dataclass(eq=False)
class AppliedSpec:
    """One :func:`prune_model` call on a model: the spec and, for every tensor
    it changed, that tensor's shape before."""

    spec: PruningSpec
    shapes_before: Dict[str, Tuple[int, ...]]


# model -> the specs applied to it, in order (weak: never keeps a model alive,
# puts nothing on the model). Read by :func:`applied_specs` (channelcut.save).
_APPLIED: "weakref.WeakKeyDictionary[nn.Module, List[AppliedSpec]]" = weakref.WeakKeyDictionary()


def applied_specs(model: nn.Module) -> List[AppliedSpec]:
    """The specs :func:`prune_model` applied to ``model`` that are not undone,
    oldest first (empty for a model it never pruned, or a copy of one)."""
    return list(_APPLIED.get(model, ()))
