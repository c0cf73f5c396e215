"""The export algorithm, one file per step (see DESIGN.md):

``tracing`` (+ ``rules``) -> ``trace`` data -> ``resolve`` (+ ``reorder``) ->
``spec`` -> ``mock`` / ``pruner``; ``manager`` is the front door.
"""

from .manager import ChannelGroup, PruningManager
from .spec import PruningSpec, Subselection

__all__ = ["ChannelGroup", "PruningManager", "PruningSpec", "Subselection"]
