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
"""

from __future__ import annotations

from typing import Any, Optional, Tuple


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


# attribute names that count attention heads in the model zoos
HEAD_COUNT_ATTRS = ("num_heads", "n_heads", "nheads", "heads", "n_head", "num_head", "num_attention_heads")

