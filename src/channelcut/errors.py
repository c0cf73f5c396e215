"""The exceptions channelcut raises. All derive from :class:`ChannelcutError`.

Each message says what is wrong and what would be valid instead.
"""

from __future__ import annotations

import difflib
from typing import Iterable


class ChannelcutError(Exception):
    """Base class of every error channelcut raises on purpose."""


class TracingError(ChannelcutError):
    """The model could not be run or traced on the example inputs."""


class RequestError(ChannelcutError, TypeError, ValueError):
    """A request that is malformed as such: ``pruned_inputs`` / ``pruned_outputs``
    not made of (parameter name, channel) pairs, or options that contradict
    each other. A TypeError and a ValueError too, for code written against
    the plain Python errors raised before."""


class UnknownParameterError(ChannelcutError, KeyError):
    """A parameter name (or op id) that the traced model does not have."""

    def __init__(self, name: str, valid: Iterable[str], what: str = "parameter") -> None:
        valid = sorted(set(valid))
        close = difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        shown = ", ".join(valid[:8]) + (", ..." if len(valid) > 8 else "")
        msg = f"unknown {what} {name!r}.{hint} Valid names: {shown}"
        super().__init__(msg)
        self.name = name
        self.suggestions = close

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class ChannelRangeError(ChannelcutError, IndexError):
    """A channel index outside the layer's channels."""


class NotPrunableError(ChannelcutError, ValueError):
    """A parameter that is neither a producer nor a consumer, or a channel that
    can not be removed (it reaches the output, a barrier op, ...)."""


class EmptyLayerError(ChannelcutError, ValueError):
    """The request would remove every channel of a layer."""


class StateError(ChannelcutError, RuntimeError):
    """Methods called in the wrong order (e.g. ``prune()`` before ``compute()``)."""


class ExportError(ChannelcutError, RuntimeError):
    """Applying the spec failed; the model was restored to its previous state."""
