"""channelcut: export channel-pruned PyTorch models as genuinely smaller, faster ones.

>>> from channelcut import PruningManager
"""

from .errors import (
    ChannelcutError,
    ChannelRangeError,
    CheckpointError,
    EmptyLayerError,
    ExportCheckError,
    ExportError,
    MissingTensorError,
    NotExpressibleError,
    NotPrunableError,
    PlanError,
    PlanFormatError,
    PlanMismatchError,
    RequestError,
    StateError,
    TracingError,
    UnknownParameterError,
)
from .io import load, save
from .pruning import ChannelGroup, PruningManager, PruningSpec, Subselection
from .masking import MaskingManager

from ._version import __version__

__all__ = [
    "PruningManager",
    "MaskingManager",
    "save",
    "load",
    "PlanError",
    "PlanFormatError",
    "PlanMismatchError",
    "MissingTensorError",
    "ChannelGroup",
    "PruningSpec",
    "Subselection",
    "ChannelcutError",
    "ChannelRangeError",
    "CheckpointError",
    "EmptyLayerError",
    "ExportError",
    "ExportCheckError",
    "NotExpressibleError",
    "NotPrunableError",
    "RequestError",
    "StateError",
    "TracingError",
    "UnknownParameterError",
    "__version__",
]
