"""Apply a :class:`PruningSpec` to a model in place. Start at :func:`prune_model`.

Parameters are sliced one at a time, in place: each old tensor is freed as
its slice is made, so the memory an export needs beyond the model is about
one layer's weights. Every change is recorded in a :class:`Rollback` (for a
sliced tensor, only the values it removed; large ones in a file-backed map,
``spill.py``), so a failure (or a failed
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
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..errors import ExportError
from . import spill
from .attention import fix_multihead_attention
from .mock import zero_input_channels
from .model_run import long_tensor
from .rmsnorm import rescaled_weight
from .spec import MaskEntry, NormRescale, PruningSpec, Subselection
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

    def holders(self) -> Dict[int, List[str]]:
        """Tensor identity -> the names of the modules holding it as a
        parameter or buffer (several for a tied weight)."""
        out: Dict[int, List[str]] = {}
        for mod_name, m in self.by_name.items():
            for table in (m._parameters, m._buffers):
                for t in table.values():
                    if t is not None and mod_name not in out.setdefault(id(t), []):
                        out[id(t)].append(mod_name)
        return out

    def tensor(self, name: str) -> torch.Tensor:
        mod_name, _, attr = name.rpartition(".")
        t = getattr(self.module(mod_name), attr)
        if not isinstance(t, torch.Tensor):
            raise ExportError(f"{name!r} is not a tensor on the model any more")
        return t


IndexCache = Dict[Tuple[Any, ...], torch.Tensor]  # (indices, device), or ("gone", id(kept), size)


def _index(values: List[int], device: torch.device, cache: IndexCache) -> torch.Tensor:
    key = (tuple(values), device)
    i = cache.get(key)
    if i is None:
        i = cache[key] = long_tensor(values, device)
    return i


def sliced(t: torch.Tensor, dims: Dict[int, List[int]], delta: Optional[List[float]] = None,
           zeros: Sequence[MaskEntry] = (), index: Optional[IndexCache] = None,
           on_slice: Optional[Callable[[int, torch.Tensor, torch.Tensor], None]] = None,
           rescale: Optional[NormRescale] = None) -> torch.Tensor:
    """What tensor ``t`` of the unpruned model becomes: ``delta`` added (a
    folded constant), ``dims[d]`` kept (indices in their new order) along each
    dim ``d``, the ``zeros`` columns zeroed, an RMS norm's weight rescaled
    (``rescale``). ``t`` itself is not changed; the
    result is a new contiguous tensor (or ``t`` when nothing applies). The one
    definition of a pruned tensor: the in-place pruner and the streaming
    checkpoint writer both use it. ``on_slice(dim, before, kept)`` sees each
    slicing step."""
    index = {} if index is None else index
    cur = t
    with torch.no_grad():
        if delta is not None:
            cur = cur + torch.tensor(delta, dtype=cur.dtype, device=cur.device)
        for dim, kept in sorted(dims.items()):
            kept_i = _index(kept, cur.device, index)
            if on_slice is not None:
                on_slice(dim, cur, kept_i)
            cur = cur.index_select(dim, kept_i)
        for entry in zeros:
            if cur is t and entry.groups == 1 and entry.channels:  # one pass: a copy with the columns zeroed
                cur = cur.index_fill(entry.weight_dim, _index(entry.channels, cur.device, index), 0)
                continue
            if cur is t:
                cur = cur.clone()
            zero_input_channels(cur, entry)
        if rescale is not None:
            cur = rescaled_weight(cur, rescale.factor, rescale.plus_one)
    return cur if cur is t else cur.contiguous()


def shrink(t: torch.Tensor, dims: Dict[int, List[int]], delta: Optional[List[float]], zeros: List[MaskEntry],
           rb: Rollback, index: Optional[IndexCache] = None, rescale: Optional[NormRescale] = None) -> None:
    """Replace tensor ``t``'s data by :func:`sliced` (the old data is freed
    as the slice is made); ``rb`` keeps only what was removed, to rebuild it
    bit for bit."""
    index = {} if index is None else index
    old_grad = t.grad if isinstance(t, nn.Parameter) else None
    old: Optional[torch.Tensor] = t.data
    steps: List[Tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (dim, size, kept, gone, values)
    cleared: List[Tuple[int, Optional[torch.Tensor], torch.Tensor]] = []  # zeroed columns: (dim, index, values)

    def record(dim: int, before: torch.Tensor, kept_i: torch.Tensor) -> None:
        n = before.shape[dim]
        key = ("gone", id(kept_i), n)  # kept_i lives in the index cache: its id is stable
        gone = index.get(key)
        if gone is None:
            if kept_i.device.type == "meta":  # no values to compute with
                keep = set(dims[dim])
                gone = _index([i for i in range(n) if i not in keep], before.device, index)
            else:
                is_gone = torch.ones(n, dtype=torch.bool, device=kept_i.device)
                is_gone[kept_i] = False
                gone = is_gone.nonzero().flatten()
            index[key] = gone
        steps.append((dim, n, kept_i, gone, spill.keep(before.index_select(dim, gone))))

    if delta is not None or rescale is not None or not dims:
        # a bias or a norm's weight (small), or zero columns only: the old tensor stays whole
        t.data = sliced(old, dims, delta, zeros, index, rescale=rescale)
    else:
        new = sliced(old, dims, None, (), index, on_slice=record)
        with torch.no_grad():
            for e in zeros:
                if e.groups == 1:
                    at = _index(e.channels, new.device, index)
                    cleared.append((e.weight_dim, at, new.index_select(e.weight_dim, at)))
                else:  # a grouped conv's weight: small, kept whole
                    cleared.append((0, None, new.clone()))
                zero_input_channels(new, e)
        t.data = new
        old = None
    if isinstance(t, nn.Parameter):
        t.grad = None

    def rebuild() -> None:
        with torch.no_grad():
            if old is not None:
                t.data = old
            else:
                cur = t.data
                for dim, at, values in reversed(cleared):
                    if at is None:
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
                t.data = cur
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
    elif isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
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
        rescales = {r.weight: r for r in spec.rescales if r.weight is not None}
        names = list(dict.fromkeys([*deltas, *spec.slices, *zeros, *rescales]))
        before = {name: tuple(mods.tensor(name).shape) for name in names}
        touched = {}
        index: IndexCache = {}  # BN params share their kept lists
        holders = mods.holders()
        for name in names:
            held = mods.tensor(name)
            shrink(held, spec.slices.get(name, {}), deltas.get(name), zeros.get(name, []), rb, index, rescales.get(name))
            for mod_name in holders.get(id(held), [name.rpartition(".")[0]]):  # a tied weight: all its modules
                touched[mod_name] = mods.module(mod_name)
        for m in touched.values():
            _fix_attributes(m, rb)
        for mod_name, m in mods.by_name.items():
            # an attention layer whose projections changed (out_proj is a child)
            if isinstance(m, nn.MultiheadAttention) and any(
                n == mod_name or n == f"{mod_name}.out_proj" for n in touched
            ):
                fix_multihead_attention(m, rb.set_attr)
        for r in spec.rescales:  # an RMS norm over fewer channels: its eps
            rb.set_attr(mods.module(r.module or ""), r.eps_attr, r.eps)
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
