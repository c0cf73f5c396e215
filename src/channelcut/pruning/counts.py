"""Counts that remember what they count: ints the tracer hands to the model.

Two kinds, both plain ``int`` subclasses that the model computes with as usual:

- :class:`ChannelCount`: a size read off a tensor's channel dim;
- :class:`HeadCount`: a module's head-count attribute (``num_heads``, ...).

While tracing, ``x.shape`` / ``x.size(d)`` of a tensor whose dim ``d`` carries
channels returns a :class:`ChannelCount` for that dim. Arithmetic keeps the mark,
so ``c // groups`` is still a channel-carrying size. When the model reshapes
with it, the tracer knows the size will follow the pruned channel count; a
plain literal (``x.view(b, 512 * 7 * 7)``) tells it the size is hard-coded and
those channels must be kept. ``int(s)`` drops the mark (conservative).

Each ChannelCount remembers the channel trace it was read from (``base``), so a
reshape can check that the size it is given follows *this* tensor's channels;
combining two channel sizes forgets the base (``None``).

>>> c = ChannelCount(64, base=(1, 2))
>>> isinstance(c // 4, ChannelCount), isinstance(4 * c + 1, ChannelCount), (c // 4) == 16
(True, True, True)
>>> (c // 4).base, (c * c).base
((1, 2), None)
>>> isinstance(int(c), ChannelCount)
False

While tracing, the plain int attributes of the model's own modules are
:class:`StoredInt` objects, and comparing a channel count with one (``assert
x.shape[1] == self.channels``, either way round) calls :data:`on_compare` (set
by the tracer): that attribute counts those channels and is rewritten with
them.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Optional, Tuple

#: while tracing (the model's own code only): called with a ChannelCount and
#: the module attribute (:class:`StoredInt`) it was found equal to by ``==``
#: or ``!=``
on_compare: Optional[Callable[["ChannelCount", "StoredInt"], None]] = None
#: while tracing (the model's own code only): called with a :class:`StoredInt`
#: that the model computes with (arithmetic on it)
on_use: Optional[Callable[["StoredInt"], None]] = None


class ChannelCount(int):
    """An int that counts channels (see module docstring)."""

    base: Optional[Tuple[int, ...]]

    def __new__(cls, value: int, base: Optional[Tuple[int, ...]] = None) -> "ChannelCount":
        obj = super().__new__(cls, value)
        obj.base = base
        return obj

    def __reduce__(self):
        return (int, (int(self),))

    def _wrap(self, value: Any, other: Any = None) -> Any:
        if not isinstance(value, int) or isinstance(value, bool):
            return value
        base = self.base if not isinstance(other, ChannelCount) else None
        return ChannelCount(value, base)

    def __add__(self, o): return self._wrap(int.__add__(self, o), o)  # noqa: E704
    def __radd__(self, o): return self._wrap(int.__radd__(self, o), o)  # noqa: E704
    def __sub__(self, o): return self._wrap(int.__sub__(self, o), o)  # noqa: E704
    def __rsub__(self, o): return self._wrap(int.__rsub__(self, o), o)  # noqa: E704
    def __mul__(self, o): return self._wrap(int.__mul__(self, o), o)  # noqa: E704
    def __rmul__(self, o): return self._wrap(int.__rmul__(self, o), o)  # noqa: E704
    def __floordiv__(self, o): return self._wrap(int.__floordiv__(self, o), o)  # noqa: E704
    def __rfloordiv__(self, o): return self._wrap(int.__rfloordiv__(self, o), o)  # noqa: E704
    def __mod__(self, o): return self._wrap(int.__mod__(self, o), o)  # noqa: E704
    def __rmod__(self, o): return self._wrap(int.__rmod__(self, o), o)  # noqa: E704
    def __neg__(self): return ChannelCount(-int(self), self.base)  # noqa: E704
    def __pos__(self): return self  # noqa: E704
    def __abs__(self): return ChannelCount(abs(int(self)), self.base)  # noqa: E704
    def __int__(self): return int.__int__(self)  # noqa: E704
    __hash__ = int.__hash__

    def __eq__(self, o):
        eq = int.__eq__(self, o)
        if eq is True:
            _found_equal(self, o)
        return eq

    def __ne__(self, o):
        ne = int.__ne__(self, o)
        if ne is False:
            _found_equal(self, o)
        return ne

    def __repr__(self): return int.__repr__(self)  # noqa: E704


class HeadCount(int):
    """A module's head-count attribute (``num_heads``, ...) while tracing.

    Read by the model as an ordinary int; a reshape that splits channels into
    ``(..., self.num_heads, self.head_dim)`` passes this very object, which
    tells the tracer that the heads dim may shrink and which attribute to
    rewrite. Arithmetic gives plain ints (``self.num_heads * self.head_dim`` is
    not a head count).

    >>> h = HeadCount(4, "blocks.0.attn", "num_heads")
    >>> h == 4, (h.module, h.attr), type(h * 2) is int
    (True, ('blocks.0.attn', 'num_heads'), True)
    """

    module: str
    attr: str

    def __new__(cls, value: int, module: str, attr: str) -> "HeadCount":
        obj = super().__new__(cls, value)
        obj.module = module
        obj.attr = attr
        return obj

    def __reduce__(self):
        return (int, (int(self),))

    def __repr__(self): return int.__repr__(self)  # noqa: E704


def _found_equal(a: int, b: Any) -> None:
    """``a == b`` held (or ``a != b`` failed): tell :data:`on_compare` when
    one side is a channel count and the other a module attribute."""
    if on_compare is None:
        return
    if isinstance(a, ChannelCount) and isinstance(b, StoredInt):
        on_compare(a, b)
    elif isinstance(a, StoredInt) and isinstance(b, ChannelCount):
        on_compare(b, a)


class StoredInt(int):
    """A plain int attribute of one of the model's own modules, while tracing.

    Read by the model as an ordinary int (arithmetic gives plain ints); found
    equal to a :class:`ChannelCount` by ``==`` or ``!=``, it tells the tracer
    which attribute the model checks a width against; computed with
    (arithmetic, :data:`on_use`) or passed to a torch function, it is an
    attribute the traced code reads, which the rules have seen.

    >>> s = StoredInt(64, "up.0", "channels")
    >>> s == 64, (s.module, s.attr), type(s + 1) is int
    (True, ('up.0', 'channels'), True)
    """

    module: str
    attr: str

    def __new__(cls, value: int, module: str, attr: str) -> "StoredInt":
        obj = super().__new__(cls, value)
        obj.module = module
        obj.attr = attr
        return obj

    __hash__ = int.__hash__
    __eq__ = ChannelCount.__eq__
    __ne__ = ChannelCount.__ne__

    def __reduce__(self):
        return (int, (int(self),))

    def __repr__(self): return int.__repr__(self)  # noqa: E704

    def _used(self) -> None:
        if on_use is not None:
            on_use(self)


def _noting_use(op: str) -> Callable[..., Any]:
    base = getattr(int, op)

    def method(self, *args):
        self._used()
        return base(self, *args)

    method.__name__ = op
    return method


for _op in ("__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__floordiv__",
            "__rfloordiv__", "__truediv__", "__rtruediv__", "__mod__", "__rmod__", "__pow__", "__rpow__",
            "__lshift__", "__rshift__", "__neg__", "__divmod__", "__rdivmod__"):
    setattr(StoredInt, _op, _noting_use(_op))
del _op


#: words in an attribute's name that say it counts something other than
#: channels (``num_key_value_groups``, ``layer_idx``, ``max_seq_len_cached``,
#: ``reg_max``): such an attribute is never taken for a stored width
COUNT_WORDS = frozenset((
    "num", "n", "nb", "idx", "index", "layer", "layers", "head", "heads", "group", "groups", "stride", "strides",
    "kernel", "patch", "window", "pad", "padding", "dilation", "vocab", "max", "min", "len", "length", "seq",
    "pos", "position", "positions", "step", "steps", "class", "classes", "nc", "nl", "na", "no", "reg", "k",
    "topk", "top", "depth", "block", "blocks", "order", "rank", "rep", "repeat", "repeats", "iter", "count",
    "expert", "experts", "batch", "sample", "image", "img", "frames", "time", "tokens", "token", "seed",
))


def names_a_width(attr: str) -> bool:
    """Whether an int attribute's name may hold a width (see :data:`COUNT_WORDS`).

    >>> [names_a_width(a) for a in ("c", "c_", "hidden_size", "out_channels", "num_key_value_groups", "layer_idx")]
    [True, True, True, True, False, False]
    """
    return not any(w in COUNT_WORDS for w in re.split(r"[_\d]+", attr.lower()) if w)


# attribute names that count attention heads in the model zoos
HEAD_COUNT_ATTRS = ("num_heads", "n_heads", "nheads", "heads", "n_head", "num_head", "num_attention_heads")

