"""The export algorithm, one file per step (``README.md`` here lists them all):

``tracing`` (+ ``recorder``, ``rules/``, ``shape_only``, ``counts``) -> ``graph``
data -> ``resolve`` (+ ``reorder``) -> ``spec`` -> ``mock`` / ``pruner`` (+
``subselect``, ``attention``); ``manager`` is the front door.
"""

from .manager import ChannelGroup, PruningManager
from .spec import PruningSpec, Subselection

__all__ = ["ChannelGroup", "PruningManager", "PruningSpec", "Subselection"]
