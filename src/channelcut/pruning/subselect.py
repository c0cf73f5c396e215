"""Subselect layers: a consumer that reads only some channels of its input.

Start at :func:`install_subselection`. It swaps the class of a pruned module
(an ``nn.Conv2d`` becomes a :class:`SubselectConv2d`, an ``nn.Linear`` a
:class:`SubselectLinear`, ...) for a subclass whose ``forward`` first narrows
(contiguous channels: a view, exported as ``Slice``) or gathers (any other
channels: ``index_select``, exported as ``Gather``) its input, then runs the
original layer. Nothing else about the module changes:

- parameter and buffer names stay those of the original model (the gather
  index is a plain tensor attribute, moved along by ``model.to(...)``), so the ``state_dict`` of a pruned model
  has the keys of the original one;
- the module still is an instance of its original class (``isinstance`` holds);
- the built-in subclasses are plain ``nn.Module`` code that ``torch.jit.script``,
  ``torch.jit.trace``, ``torch.export``, ONNX export and ``torch.compile`` all
  understand, and they pickle (``torch.save(model)``) like any module.

Modules of other classes (a user's conv subclass with its own ``forward``) get
a generic subclass made on the fly: it narrows the *first* argument of
``forward`` and then calls the class's own ``forward``. It traces, exports and
compiles, and pickles by rebuilding itself from the original class, but
TorchScript can not compile it (its ``forward`` takes ``*args``).

>>> import torch
>>> from torch import nn
>>> conv = nn.Conv2d(4, 2, 1)
>>> with torch.no_grad():
...     conv.weight.data = conv.weight.data[:, [0, 2]]
>>> undo = install_subselection(conv, dim=1, indices=[0, 2])
>>> conv
SubselectConv2d(4, 2, kernel_size=(1, 1), stride=(1, 1), subselect=gather 2 of dim 1: [0, 2])
>>> conv(torch.rand(1, 4, 3, 3)).shape
torch.Size([1, 2, 3, 3])
>>> undo(); type(conv).__name__
'Conv2d'
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn

from .attention import PrunedMultiheadAttention
from .model_run import long_tensor

__all__ = [
    "SubselectMixin",
    "SubselectConv1d",
    "SubselectConv2d",
    "SubselectConv3d",
    "SubselectLinear",
    "install_subselection",
    "is_subselect",
    "subselect_class",
    "subselection_of",
]

# names of the attributes a Subselect layer adds to its module


class SubselectMixin:
    """What every Subselect layer shares: the selection and its description.

    Attributes (set by :func:`install_subselection`):
        subselect_dim: the input dimension that holds channels.
        subselect_contiguous: True when the kept channels are one range
            (``narrow``, a view), False for a gather (``index_select``, a copy).
        subselect_start, subselect_length: the range, when contiguous.
        subselect_input_channels: channels of the (physical) input.
        subselect_indices: the kept channels (a list of ints).
        subselect_index: the same as a ``long`` tensor on the parameters'
            device (not a buffer: it is not part of the state_dict).
    """

    # (no class-level annotations: TorchScript would read them as attribute types)

    def _apply(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        # ``model.to(device)`` & co.: the index follows the parameters' device.
        # (It is a plain tensor attribute, not a buffer: channelcut's tracer
        # reads integer buffers as data, and it must stay out of state_dict.)
        result = super()._apply(fn, *args, **kwargs)  # type: ignore[misc]
        device = next((t.device for t in self.parameters(recurse=False)), self.subselect_index.device)  # type: ignore[attr-defined]
        self.subselect_index = torch.tensor(self.subselect_indices, dtype=torch.long, device=device)
        return result

    def subselect(self, x: torch.Tensor) -> torch.Tensor:
        """The channels of ``x`` this layer reads."""
        if self.subselect_contiguous:
            return x.narrow(self.subselect_dim, self.subselect_start, self.subselect_length)
        last = x.dim() - 1
        if last >= 2 and self.subselect_dim in (-1, last) and x.is_contiguous():
            # gathering along the last dim of a 3-D+ tensor (a Linear's tokens,
            # a channels-last activation) is 3-18x faster as columns of the
            # 2-D view than as index_select on the last dim
            shape = x.shape
            y = x.reshape(-1, shape[last]).index_select(1, self.subselect_index)
            return y.reshape(list(shape[:last]) + [y.shape[1]])
        return x.index_select(self.subselect_dim, self.subselect_index)

    def subselect_repr(self) -> str:
        if self.subselect_contiguous:
            end = self.subselect_start + self.subselect_length
            return f"subselect=narrow dim {self.subselect_dim}: [{self.subselect_start}:{end}] of {self.subselect_input_channels}"
        idx = self.subselect_indices
        shown = ", ".join(str(i) for i in idx[:8]) + (", ..." if len(idx) > 8 else "")
        return f"subselect=gather {len(idx)} of dim {self.subselect_dim}: [{shown}]"

    def extra_repr(self) -> str:
        base = super().extra_repr()  # type: ignore[misc]
        return f"{base}, {self.subselect_repr()}" if base else self.subselect_repr()


# -- the built-in, scriptable layers --------------------------------------------
# TorchScript compiles ``forward`` of the instance's class and every method it
# calls; it does not support ``super()``, so each class calls the functional
# form of its base layer itself.


class SubselectConv1d(SubselectMixin, nn.Conv1d):
    """``nn.Conv1d`` that reads a subset of its input channels."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.subselect(input), self.weight, self.bias)


class SubselectConv2d(SubselectMixin, nn.Conv2d):
    """``nn.Conv2d`` that reads a subset of its input channels."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.subselect(input), self.weight, self.bias)


class SubselectConv3d(SubselectMixin, nn.Conv3d):
    """``nn.Conv3d`` that reads a subset of its input channels."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.subselect(input), self.weight, self.bias)


class SubselectLinear(SubselectMixin, nn.Linear):
    """``nn.Linear`` that reads a subset of its input features."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.linear(self.subselect(input), self.weight, self.bias)


_BUILTIN: Dict[Type[nn.Module], Type[nn.Module]] = {
    nn.Conv1d: SubselectConv1d,
    nn.Conv2d: SubselectConv2d,
    nn.Conv3d: SubselectConv3d,
    nn.Linear: SubselectLinear,
}
_DYNAMIC: Dict[Type[nn.Module], Type[nn.Module]] = {}


def _rebuild(base: Type[nn.Module], state: Dict[str, Any]) -> nn.Module:
    """Unpickle a module of a generic Subselect class (see :func:`subselect_class`)."""
    obj = base.__new__(base)
    obj.__class__ = subselect_class(base)
    obj.__setstate__(state)
    return obj


def _generic_reduce(self: nn.Module, protocol: int) -> Any:
    return (_rebuild, (type(self).subselect_base, self.__getstate__()))  # type: ignore[attr-defined]


def _narrowing_forward(cls: Type[nn.Module]) -> Callable[..., Any]:
    """``forward`` that narrows the first argument, then runs ``cls.forward``."""
    original: Callable[..., Any] = cls.forward

    def forward(self: nn.Module, input: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return original(self, self.subselect(input), *args, **kwargs)  # type: ignore[attr-defined]

    forward.__doc__ = f"Narrow the input's channels, then run ``{cls.__qualname__}.forward``."
    return forward


def subselect_class(cls: Type[nn.Module]) -> Type[nn.Module]:
    """The Subselect class for modules of class ``cls`` (made once, then cached).

    ``nn.Conv1d/2d/3d`` and ``nn.Linear`` map to the scriptable classes of this
    module. Any other class ``C`` (a subclass of those, or a user's layer) gets
    ``Subselect<C>(SubselectMixin, C)``: ``C`` subclasses that keep their
    base's ``forward`` get the base's scriptable ``forward``; others narrow the
    first argument of ``forward`` and call ``C.forward``.
    """
    if issubclass(cls, SubselectMixin):
        return cls
    if cls in _BUILTIN:
        return _BUILTIN[cls]
    made = _DYNAMIC.get(cls)
    if made is not None:
        return made
    body: Dict[str, Any] = {"subselect_base": cls, "__module__": cls.__module__, "__reduce_ex__": _generic_reduce}
    for base, sub in _BUILTIN.items():
        if issubclass(cls, base) and cls.forward is base.forward:
            body["forward"] = sub.forward
            break
    else:
        body["forward"] = _narrowing_forward(cls)
    made = type(f"Subselect{cls.__name__}", (SubselectMixin, cls), body)
    made.__doc__ = f"``{cls.__qualname__}`` that reads a subset of its input channels."
    _DYNAMIC[cls] = made
    return made


def is_subselect(module: nn.Module) -> bool:
    """True if ``module`` reads a subset of its input (has a Subselect class)."""
    return isinstance(module, SubselectMixin)


def subselection_of(module: nn.Module) -> Optional[Dict[str, Any]]:
    """``{"dim", "indices", "input_channels"}`` of a Subselect module, else None."""
    if not isinstance(module, SubselectMixin):
        return None
    if module.subselect_contiguous:
        indices = list(range(module.subselect_start, module.subselect_start + module.subselect_length))
    else:
        indices = list(module.subselect_indices)
    return {
        "dim": int(module.subselect_dim),
        "indices": indices,
        "input_channels": int(module.subselect_input_channels),
        "contiguous": bool(module.subselect_contiguous),
    }


def install_subselection(
    module: nn.Module,
    dim: int,
    indices: Sequence[int],
    contiguous: Optional[bool] = None,
    input_channels: Optional[int] = None,
) -> Callable[[], None]:
    """Make ``module`` read only channels ``indices`` of dim ``dim`` of its input.

    Swaps the module's class for :func:`subselect_class` of it and adds the
    selection attributes (plain attributes: the state_dict is unchanged). ``contiguous``
    (default: whether ``indices`` is one ascending range) chooses ``narrow``
    over ``index_select``. Returns a function that undoes all of it.

    A module that already reads a subset (a model pruned twice) reads the
    subset ``indices`` of that subset afterwards: ``indices`` count the
    channels its layer sees, the composed selection those of its input.

    Raises ValueError for an empty or negative index list.
    """
    idx = [int(i) for i in indices]
    if not idx:
        raise ValueError(f"a subselection needs at least one channel (module {type(module).__name__})")
    if min(idx) < 0:
        raise ValueError(f"channel indices must be >= 0, got {min(idx)}")
    if isinstance(module, SubselectMixin):
        return _compose(module, int(dim), idx, contiguous)
    is_range = idx == list(range(idx[0], idx[0] + len(idx)))
    if contiguous is None:
        contiguous = is_range
    elif contiguous and not is_range:
        raise ValueError("contiguous=True needs indices that form one ascending range")
    old_cls = type(module)
    new_cls = subselect_class(old_cls)
    device = next((t.device for t in module.parameters(recurse=False)), torch.device("cpu"))
    values = {
        "subselect_dim": int(dim),
        "subselect_start": idx[0],
        "subselect_length": len(idx),
        "subselect_input_channels": int(input_channels if input_channels is not None else max(idx) + 1),
        "subselect_contiguous": bool(contiguous),
        "subselect_indices": idx,
        "subselect_index": long_tensor(idx, device),
    }
    for name in values:
        if name in module.__dict__:
            raise TypeError(f"{old_cls.__name__} already has an attribute {name!r}")
    module.__dict__.update(values)
    module.__class__ = new_cls

    def undo() -> None:
        module.__class__ = old_cls
        for name in values:
            module.__dict__.pop(name, None)

    return undo


def _compose(module: nn.Module, dim: int, indices: List[int], contiguous: Optional[bool]) -> Callable[[], None]:
    """Narrow an existing selection further (see :func:`install_subselection`)."""
    old_indices: List[int] = list(module.subselect_indices)  # type: ignore[attr-defined]
    if dim != module.subselect_dim:  # type: ignore[attr-defined]
        raise ValueError(f"{type(module).__name__} selects along dim {module.subselect_dim}, cannot also select along dim {dim}")  # type: ignore[attr-defined]
    if max(indices) >= len(old_indices):
        raise ValueError(f"channel {max(indices)} is out of range: the layer sees {len(old_indices)} channels")
    idx = [old_indices[i] for i in indices]
    is_range = idx == list(range(idx[0], idx[0] + len(idx)))
    keep_view = is_range if contiguous is None else (bool(contiguous) and is_range)
    names = ("subselect_start", "subselect_length", "subselect_contiguous", "subselect_indices", "subselect_index")
    saved = {name: module.__dict__[name] for name in names}
    module.__dict__.update(
        subselect_start=idx[0],
        subselect_length=len(idx),
        subselect_contiguous=keep_view,
        subselect_indices=idx,
        subselect_index=torch.tensor(idx, dtype=torch.long, device=saved["subselect_index"].device),
    )

    def undo() -> None:
        module.__dict__.update(saved)

    return undo


# -- attention ------------------------------------------------------------------


class SubselectMultiheadAttention(SubselectMixin, PrunedMultiheadAttention):
    """A pruned ``nn.MultiheadAttention`` that reads a subset of the channels
    of its query, key and value (the same subset: they share the projection's
    input columns)."""

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: Optional[torch.Tensor] = None,
        need_weights: bool = True,
        attn_mask: Optional[torch.Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        same_kv = key is value
        same_qk = query is key
        query = self.subselect(query)
        if same_qk and same_kv:
            key = query
            value = query
        else:
            key = self.subselect(key)
            value = key if same_kv else self.subselect(value)
        return self.run_attention(query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal)


_BUILTIN[nn.MultiheadAttention] = SubselectMultiheadAttention
_BUILTIN[PrunedMultiheadAttention] = SubselectMultiheadAttention
