"""The op table itself: :func:`rule` registers an op, :class:`OpCall` is what
a rule is given. Every rules module imports this one and nothing else of the
package, so families never depend on each other's insides.

>>> from channelcut.pruning.rules import RULES, facts
>>> RULES["relu"].trace.__name__, RULES["relu"].shape.__name__, RULES["relu"].inplace_arg
('elementwise', 'same_as_first', 1)
>>> facts("arange").trace is None, facts("arange").creates
(True, 'constant')
>>> facts("no_such_op") is None
True

Each op is registered once:

>>> rule("relu", "no_such_op")(lambda rec, call: None)
Traceback (most recent call last):
...
ValueError: op 'relu' is registered twice (once for elementwise)
>>> facts("no_such_op") is None
True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch

from ..model_run import flatten_tensors
from ..recorder import Recorder

#: ``trace(rec, call)``: derive the traces of ``call.out`` from those of its
#: inputs, recording into ``rec``; raise :class:`Unsupported` to make the
#: call a barrier with that reason
TraceRule = Callable[[Recorder, "OpCall"], None]


class Unsupported(Exception):
    """A rule cannot follow the channels through these arguments: the call
    becomes a barrier, and the message is the reason the user is told."""


@dataclass
class OpRule:
    """Everything the engine knows about one op (by function name).

    ``trace``: the trace rule (None: the op is known, but a call with tracked
    inputs is a barrier). The other fields serve the shape-only pass
    (``shape_only.run``): ``shape`` builds the meta output directly (None:
    PyTorch's meta kernel); ``inplace_arg`` is the position of the functional
    form's ``inplace`` flag; ``creates`` is "constant" for creation ops whose
    values depend on no tensor's values and "template" for those whose first
    argument lends only shape, dtype and device; ``same_on_meta``: a meta
    tensor answers it like the real one. ``decompose(call, rec)`` returns a
    function that computes the op from ops the tracer follows (run under the
    tracer instead of the op), or None to leave the call as it is."""

    trace: Optional[TraceRule] = None
    shape: Optional[Callable[[tuple, dict], Optional[torch.Tensor]]] = None
    inplace_arg: Optional[int] = None
    creates: Optional[str] = None
    same_on_meta: bool = False
    decompose: Optional[Callable[["OpCall", Any], Optional[Callable[[], Any]]]] = None


#: function name -> its rule; in-place variants (``add_``, ``__iadd__``) use
#: the rule of their base op unless they have their own
RULES: Dict[str, OpRule] = {}


def rule(
    *names: str,
    shape: Optional[Callable[[tuple, dict], Optional[torch.Tensor]]] = None,
    inplace_arg: Optional[int] = None,
    creates: Optional[str] = None,
    same_on_meta: bool = False,
    decompose: Optional[Callable[["OpCall", Any], Optional[Callable[[], Any]]]] = None,
) -> Callable[[Optional[TraceRule]], Optional[TraceRule]]:
    """Register the decorated trace rule for ``names``, with the facts the
    shape-only pass uses (see :class:`OpRule`). Each op is registered once:
    a second registration raises."""

    def register(fn: Optional[TraceRule]) -> Optional[TraceRule]:
        for n in names:
            if n in RULES or names.count(n) > 1:
                earlier = _describe(RULES[n]) if n in RULES else "the same call"
                raise ValueError(f"op {n!r} is registered twice (once for {earlier})")
        for n in names:
            RULES[n] = OpRule(fn, shape, inplace_arg, creates, same_on_meta, decompose)
        return fn

    return register


def declare(*names: str, **facts: Any) -> None:
    """Register ops with facts for the shape-only pass and no trace rule."""
    rule(*names, **facts)(None)


def _describe(r: OpRule) -> str:
    return getattr(r.trace, "__qualname__", None) or "an entry without a trace rule"


def facts(name: str) -> Optional[OpRule]:
    """The table's entry for function ``name`` exactly (None: unknown op)."""
    return RULES.get(name)


def trace_rule(name: str) -> Optional[TraceRule]:
    """The trace rule for ``name``, else for its base op (in-place variants)."""
    r = RULES.get(name)
    if r is None or r.trace is None:
        r = RULES.get(base_name(name))
    return r.trace if r is not None else None


def func_name(func: Any) -> str:
    """The name an op is registered under (``get:T`` for attribute getters)."""
    name = getattr(func, "__name__", None) or repr(func)
    if name == "__get__":
        owner = getattr(func, "__self__", None)
        return "get:" + getattr(owner, "__name__", "?")
    return name


_INPLACE_DUNDERS = {"add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "and", "or", "xor", "lshift", "rshift", "matmul"}


def base_name(name: str) -> str:
    """The out-of-place op of an in-place one (``add_`` and ``__iadd__``:
    ``add`` and ``__add__``); other names unchanged.

    >>> base_name("relu_"), base_name("__imul__"), base_name("__invert__"), base_name("_foo_")
    ('relu', '__mul__', '__invert__', '_foo_')
    """
    if name.startswith("__i") and name.endswith("__") and name[3:-2] in _INPLACE_DUNDERS:
        return "__" + name[3:-2] + "__"
    if name.endswith("_") and not name.endswith("__") and not name.startswith("_"):
        return name[:-1]
    return name


class OpCall:
    """One torch call as a rule sees it: the function, its name, its
    arguments as given and its output (already computed).

    >>> call = OpCall(torch.sum, "sum", (torch.ones(2, 3), 1), {"keepdim": True}, torch.full((2, 1), 3.0))
    >>> call.arg(1, "dim"), call.arg(2, "keepdim"), call.arg(3, "dtype", "none")
    (1, True, 'none')
    >>> len(call.tensors), [tuple(y.shape) for y in call.outs], call.base, call.inplace
    (1, [(2, 1)], 'sum', False)
    """

    __slots__ = ("func", "name", "args", "kwargs", "out", "_tensors")

    def __init__(self, func: Any, name: str, args: tuple, kwargs: dict, out: Any) -> None:
        self.func = func
        self.name = name
        self.args = tuple(args)
        self.kwargs = kwargs
        self.out = out
        self._tensors: Optional[List[torch.Tensor]] = None

    def arg(self, i: int, name: str, default: Any = None) -> Any:
        """The argument at position ``i`` or keyword ``name`` (or ``default``)."""
        if name in self.kwargs:
            return self.kwargs[name]
        return self.args[i] if len(self.args) > i else default

    @property
    def base(self) -> str:
        """The name of the out-of-place op (see :func:`base_name`)."""
        return base_name(self.name)

    @property
    def inplace(self) -> bool:
        """Called as an in-place variant (``add_``, ``__iadd__``)."""
        return base_name(self.name) != self.name

    @property
    def tensors(self) -> List[torch.Tensor]:
        """Every tensor among the arguments (inside lists and dicts too), in order."""
        if self._tensors is None:
            out: List[torch.Tensor] = []
            for a in list(self.args) + list(self.kwargs.values()):
                if isinstance(a, torch.Tensor):
                    out.append(a)
                elif isinstance(a, (list, tuple, dict)):
                    out.extend(flatten_tensors(a))
            self._tensors = out
        return self._tensors

    @property
    def outs(self) -> List[torch.Tensor]:
        """The output tensors (one, or those inside a tuple or list)."""
        return [self.out] if isinstance(self.out, torch.Tensor) else flatten_tensors(self.out)
