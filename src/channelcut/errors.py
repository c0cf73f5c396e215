"""Every public exception channelcut raises. All derive from :class:`ChannelcutError`.

Each message says what is wrong and what would be valid instead. Catch
:class:`ChannelcutError` for "anything channelcut refused"; the subclasses say
which step refused:

- tracing and the request: :class:`TracingError`, :class:`UnknownParameterError`,
  :class:`ChannelRangeError`, :class:`NotPrunableError`, :class:`EmptyLayerError`,
  :class:`StateError`;
- applying the plan: :class:`ExportError`;
- saved models (:mod:`channelcut.io`): :class:`PlanError` and its subclasses
  :class:`PlanFormatError`, :class:`PlanMismatchError`, :class:`MissingTensorError`;
- exported artifacts (:mod:`channelcut.export`): :class:`ExportCheckError`;
- Hugging Face checkpoints (:mod:`channelcut.hf`): :class:`NotExpressibleError`.

They are importable from ``channelcut`` and, for the last three groups, from
the module that raises them as well.

>>> issubclass(PlanMismatchError, PlanError) and issubclass(PlanError, ChannelcutError)
True
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


# ----------------------------------------------------------------------------
# saved models (channelcut.io)
# ----------------------------------------------------------------------------
class PlanError(ChannelcutError):
    """A saved pruned model could not be read or does not fit the given model
    (:func:`channelcut.load`); the model passed in is left untouched."""


class PlanFormatError(PlanError, ValueError):
    """The plan file is missing, not a channelcut plan, or of an unknown version."""


class PlanMismatchError(PlanError, ValueError):
    """The plan does not fit the model: a parameter or module it names is
    missing, or has another shape (the model was built differently)."""


class MissingTensorError(PlanError, KeyError):
    """The weights file lacks tensors the pruned model needs."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


# ----------------------------------------------------------------------------
# exported artifacts (channelcut.export) and Hugging Face checkpoints (channelcut.hf)
# ----------------------------------------------------------------------------
class ExportCheckError(ChannelcutError, RuntimeError):
    """An exported model (ONNX, TorchScript, ``torch.export``) does not compute
    what the eager model computes: another number of outputs, another shape,
    or values beyond the tolerance."""


class NotExpressibleError(ChannelcutError, ValueError):
    """The pruned model's widths do not fit one Hugging Face config (per-layer
    widths, heads a BERT/GPT-2 config can not hold, or layers that read a
    channel subset); save it with :func:`channelcut.save` instead."""


class CheckpointError(ChannelcutError, ValueError):
    """The checkpoint cannot be streamed: no safetensors weights, a tensor the
    model does not have, a shape that does not fit the config, ..."""
