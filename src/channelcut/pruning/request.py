"""What the user asked for, as plain data. Start at :func:`normalize_request`.

``compute(pruned_inputs=..., pruned_outputs=...)`` accepts the forms people
really write (a dict, one pair, numpy integers, a channel list per name,
duplicates); this module turns each into one list of ``(name, channel)``
pairs, so that resolve sees a single form. :func:`export_mode` turns the
mode flags into one mode name. No torch here: tensors and numpy arrays are
read through ``.ndim``, ``.item()`` and ``.tolist()``.
"""

from __future__ import annotations

import numbers
from typing import Any, Iterable, List, Optional, Tuple

from ..errors import RequestError

Pair = Tuple[str, Any]

_EXAMPLE = "e.g. [('fc.weight', 3), ('fc.weight', 5)] or {'fc.weight': [3, 5]}"


def normalize_request(request: Any, what: str = "pruned_inputs") -> Optional[List[Pair]]:
    """The ``(parameter name, channel)`` pairs that ``request`` names, in
    order, without duplicates; None stays None (nothing was given).

    Accepted: an iterable of pairs; one pair; a dict ``{name: channels}``.
    A channel is an int, a numpy integer or a 0-d integer array/tensor; where
    a pair holds a list, range, set or 1-d integer array/tensor of channels,
    it stands for one pair per channel. A channel that is no integer (``1.5``,
    ``"2"``, ``None``, ``True``) is passed on as it is: resolve rejects it
    with the layer's valid range, which only it knows. Anything else raises
    :class:`~channelcut.errors.RequestError` saying what was expected.

    >>> normalize_request({"fc.weight": [3, 1], "conv.weight": 0})
    [('fc.weight', 3), ('fc.weight', 1), ('conv.weight', 0)]
    >>> normalize_request(("fc.weight", 2))
    [('fc.weight', 2)]
    >>> normalize_request([("fc.weight", 2), ["fc.weight", range(1, 3)]])
    [('fc.weight', 2), ('fc.weight', 1)]
    >>> normalize_request(["fc.weight"])
    Traceback (most recent call last):
    ...
    channelcut.errors.RequestError: pruned_inputs[0] is 'fc.weight': each entry must be a (parameter name, channel) pair, e.g. [('fc.weight', 3), ('fc.weight', 5)] or {'fc.weight': [3, 5]}
    """
    if request is None:
        return None
    if isinstance(request, list) and all(type(p) is tuple and len(p) == 2 and type(p[0]) is str and type(p[1]) is int
                                         for p in request):  # the common form, already plain: only drop duplicates
        return list(dict.fromkeys(request))
    out: List[Pair] = []
    seen = set()
    for name, channels in _entries(request, what):
        for ch in channels:
            key = (name, ch)
            try:
                if key in seen:
                    continue
                seen.add(key)
            except TypeError:  # an unhashable non-channel: resolve reports it
                pass
            out.append(key)
    return out


def _entries(request: Any, what: str) -> Iterable[Tuple[str, List[Any]]]:
    """(name, its channels) for every entry of ``request``."""
    if isinstance(request, (str, bytes)):
        raise RequestError(f"{what} is the string {request!r}; give (parameter name, channel) pairs, {_EXAMPLE}")
    if isinstance(request, dict):
        for name, channels in request.items():
            yield _name(name, f"{what} key {name!r}"), _channels(channels, name, what)
        return
    if _is_pair(request) and not isinstance(request[1], str) and not _is_pair(request[1]):  # one pair, no list
        request = [request]
    try:
        items = list(request)
    except TypeError:
        raise RequestError(f"{what} must be a list of (parameter name, channel) pairs or a dict, "
                           f"got {type(request).__name__} {_short(request)}; {_EXAMPLE}") from None
    for i, item in enumerate(items):
        if not (_is_pair(item) and isinstance(item[0], str)):
            raise RequestError(f"{what}[{i}] is {_short(item)}: each entry must be a (parameter name, channel) "
                               f"pair, {_EXAMPLE}")
        yield item[0], _channels(item[1], item[0], what)


def _is_pair(x: Any) -> bool:
    return isinstance(x, (tuple, list)) and len(x) == 2 and isinstance(x[0], str)


def _name(name: Any, where: str) -> str:
    if not isinstance(name, str):
        raise RequestError(f"{where} is not a parameter name ({type(name).__name__}); use the names "
                           f"of model.named_parameters(), {_EXAMPLE}")
    return name


def _channels(ch: Any, name: str, what: str) -> List[Any]:
    """The channels one entry names: a scalar, or each element of a list of them."""
    ndim = getattr(ch, "ndim", None)
    if isinstance(ndim, int) and hasattr(ch, "tolist"):  # numpy array / torch tensor
        if ndim == 0:
            return [_scalar(ch)]
        if ndim == 1:
            return [_scalar(c) for c in ch.tolist()]
        raise RequestError(f"{what}: the channels for {name!r} are a {ndim}-d array of shape "
                           f"{tuple(ch.shape)}; give one index or a 1-d list of indices")
    if isinstance(ch, (list, tuple, range, set, frozenset)) or _is_generator(ch):
        return [_scalar(c) for c in ch]
    return [_scalar(ch)]


def _is_generator(x: Any) -> bool:
    return hasattr(x, "__next__") and hasattr(x, "__iter__")


def _scalar(ch: Any) -> Any:
    """``ch`` as a Python int when it is an integer (numpy integers, 0-d
    integer arrays and tensors included); else ``ch`` itself."""
    if isinstance(ch, bool):
        return ch
    if isinstance(ch, numbers.Integral):
        return int(ch)
    if getattr(ch, "ndim", None) == 0 and hasattr(ch, "item"):
        v = ch.item()
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return ch


def _short(x: Any) -> str:
    r = repr(x)
    return r if len(r) <= 80 else r[:77] + "..."


def export_mode(constrained: bool, baseline: bool) -> str:
    """The export mode the ``compute`` flags ask for.

    >>> export_mode(False, False), export_mode(True, False), export_mode(False, True)
    ('unconstrained', 'constrained', 'baseline')
    """
    if constrained and baseline:
        raise RequestError(
            "constrained=True and baseline=True ask for two different export modes; pick one: "
            "constrained=True (readers of a tensor agree, zero copies, may prune channels you did not name), "
            "baseline=True (exactly your channels, no reordering, for comparison) or neither "
            "(exactly your channels, reordered to save copies)"
        )
    return "constrained" if constrained else ("baseline" if baseline else "unconstrained")
