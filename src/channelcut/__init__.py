"""channelcut: export channel-pruned PyTorch models as genuinely smaller, faster ones.

>>> from channelcut import PruningManager
"""

from .errors import (
    ChannelcutError,
    ChannelRangeError,
    EmptyLayerError,
    ExportError,
    NotPrunableError,
    RequestError,
    StateError,
    TracingError,
    UnknownParameterError,
)
from .io import MissingTensorError, PlanError, PlanFormatError, PlanMismatchError, load, save
from .pruning import ChannelGroup, PruningManager, PruningSpec, Subselection
from .masking import MaskingManager

__version__ = "0.1.0"

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
    "EmptyLayerError",
    "ExportError",
    "NotPrunableError",
    "RequestError",
    "StateError",
    "TracingError",
    "UnknownParameterError",
    "__version__",
]
