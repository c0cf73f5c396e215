"""Choosing channels: masks from importance heuristics, and masks users already have.

Start at :class:`MaskingManager` (``manager.py``); the selection rules are in
``select.py``, the model's layers, channel groups and segments in
``structure.py``, and ``torch.nn.utils.prune`` masks are read by
:func:`from_torch_prune` (``torch_prune.py``). The heuristics themselves live
in :mod:`channelcut.importance`.

Masking only decides *which* channels go; it hands the export zeroed weights
or ``(weight name, channel)`` pairs and knows nothing about how export works.
"""

from .manager import MaskingManager
from .select import Selection
from .structure import Segment
from .torch_prune import TorchPruneMasks, from_torch_prune

__all__ = ["MaskingManager", "Segment", "Selection", "TorchPruneMasks", "from_torch_prune"]
