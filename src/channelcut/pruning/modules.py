"""The former name of :mod:`channelcut.pruning.subselect`, kept so that code
and pickled models that name it still load. New code imports ``subselect``."""

from .subselect import *  # noqa: F401,F403
from .subselect import SubselectMultiheadAttention, __all__, _generic_reduce, _rebuild  # noqa: F401
