"""Channel-carrying sizes: ints that remember they count channels.

While tracing, ``x.shape`` / ``x.size(d)`` of a tensor whose dim ``d`` carries
channels returns a :class:`SizeInt` for that dim. Arithmetic keeps the mark,
so ``c // groups`` is still a channel-carrying size. When the model reshapes
with it, the tracer knows the size will follow the pruned channel count; a
plain literal (``x.view(b, 512 * 7 * 7)``) tells it the size is hard-coded and
those channels must be kept. ``int(s)`` drops the mark (conservative).

>>> c = SizeInt(64)
>>> isinstance(c // 4, SizeInt), isinstance(4 * c + 1, SizeInt), (c // 4) == 16
(True, True, True)
>>> isinstance(int(c), SizeInt)
False
"""

from __future__ import annotations

from typing import Any


class SizeInt(int):
    """An int that counts channels (see module docstring)."""

    def _wrap(self, value: Any) -> Any:
        return SizeInt(value) if isinstance(value, int) and not isinstance(value, bool) else value

    def __add__(self, o): return self._wrap(int.__add__(self, o))  # noqa: E704
    def __radd__(self, o): return self._wrap(int.__radd__(self, o))  # noqa: E704
    def __sub__(self, o): return self._wrap(int.__sub__(self, o))  # noqa: E704
    def __rsub__(self, o): return self._wrap(int.__rsub__(self, o))  # noqa: E704
    def __mul__(self, o): return self._wrap(int.__mul__(self, o))  # noqa: E704
    def __rmul__(self, o): return self._wrap(int.__rmul__(self, o))  # noqa: E704
    def __floordiv__(self, o): return self._wrap(int.__floordiv__(self, o))  # noqa: E704
    def __rfloordiv__(self, o): return self._wrap(int.__rfloordiv__(self, o))  # noqa: E704
    def __mod__(self, o): return self._wrap(int.__mod__(self, o))  # noqa: E704
    def __rmod__(self, o): return self._wrap(int.__rmod__(self, o))  # noqa: E704
    def __neg__(self): return SizeInt(-int(self))  # noqa: E704
    def __pos__(self): return self  # noqa: E704
    def __abs__(self): return SizeInt(abs(int(self)))  # noqa: E704
    def __int__(self): return int.__int__(self)  # noqa: E704
    def __repr__(self): return int.__repr__(self)  # noqa: E704


def is_channel_size(v: Any) -> bool:
    return isinstance(v, SizeInt)
