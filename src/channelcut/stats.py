"""Model statistics: parameter counts, MACs, copies per inference and CPU latency.

Start at :func:`compare_latency` if you want to know whether a pruned model is
faster: it times several models round-robin in one process, so that drift in
the machine's speed (other jobs, thermal state) hits every variant alike.
:func:`measure_latency` times a single model; :func:`count_parameters` and
:func:`count_macs` give the static size of a model, :func:`count_copies` the
channels a pruned model gathers per inference.

Inputs are passed the way :class:`channelcut.PruningManager` takes them: a
list/tuple of positional arguments or a dict of keyword arguments (a bare
tensor is accepted too and means ``[tensor]``).

>>> import torch
>>> from torch import nn
>>> conv = nn.Conv2d(3, 8, kernel_size=3)
>>> count_parameters(conv)
224
>>> count_macs(conv, [torch.rand(1, 3, 16, 16)])  # 8 * 14 * 14 outputs, 3 * 3 * 3 MACs each
42336
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from typing import Any, Dict, Iterator, List, Mapping, NamedTuple, Optional, Sequence, TypedDict, Union

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .pruning.subselect import subselection_of

__all__ = [
    "Inputs",
    "LatencyStats",
    "count_parameters",
    "count_macs",
    "CopyCount",
    "count_copies",
    "measure_latency",
    "compare_latency",
]

Inputs = Union[torch.Tensor, Sequence[Any], Mapping[str, Any]]


class LatencyStats(TypedDict):
    """Wall-clock time of one forward call, in milliseconds, over ``repeats`` calls."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    repeats: int


# ----------------------------------------------------------------------------
# size
# ----------------------------------------------------------------------------
def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters in ``model``.

    A parameter shared by several modules is counted once. Buffers (e.g.
    batch-norm running statistics) are not parameters and are not counted.

    Args:
        model: any ``nn.Module``.
        trainable_only: count only parameters with ``requires_grad``.
    """
    _check_module(model, "count_parameters")
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_macs(model: nn.Module, inputs: Inputs) -> int:
    """Multiply-accumulate operations of one forward call of ``model`` on ``inputs``.

    Counted with :class:`torch.utils.flop_counter.FlopCounterMode` (MACs =
    FLOPs / 2). Only ops that torch has a FLOP formula for are counted:
    convolutions, matrix products (linear layers, attention) and the like.
    Element-wise ops, normalisations, pooling, biases and memory copies are
    not; for conv nets they are a small fraction of the total.

    The call runs under ``torch.no_grad()``; the model's train/eval mode is
    left as it is. The fused fast path of ``nn.MultiheadAttention`` and
    ``nn.TransformerEncoderLayer`` is switched off while counting (its native
    kernel has no FLOP formula, so a dense model would be under-counted).
    """
    _check_module(model, "count_macs")
    args, kwargs = _split_inputs(inputs)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), _no_mha_fastpath(), counter:
        model(*args, **kwargs)
    return int(counter.get_total_flops()) // 2


class CopyCount(NamedTuple):
    """How the layers of a pruned model that read a subset of their input read it."""

    views: int  #: layers reading a contiguous range (a free view)
    copies: int  #: layers gathering their channels (a copy per inference)
    copied_channels: int  #: channels those gathers copy per inference


def count_copies(model: nn.Module) -> CopyCount:
    """Views, gathers and channels gathered per inference by the Subselect
    layers of a pruned (or loaded) model; all zero for a model channelcut did
    not prune. For an export at hand, ``PruningSpec.copied_channels`` holds the
    same numbers.

    >>> count_copies(nn.Linear(4, 2))
    CopyCount(views=0, copies=0, copied_channels=0)
    """
    _check_module(model, "count_copies")
    reads = [s for m in model.modules() if (s := subselection_of(m)) is not None]
    gathers = [s for s in reads if not s["contiguous"]]
    return CopyCount(len(reads) - len(gathers), len(gathers), sum(len(s["indices"]) for s in gathers))


@contextlib.contextmanager
def _no_mha_fastpath() -> Iterator[None]:
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


# ----------------------------------------------------------------------------
# latency
# ----------------------------------------------------------------------------
def measure_latency(
    model: nn.Module,
    inputs: Inputs,
    repeats: int = 30,
    warmup: int = 3,
    threads: Optional[int] = None,
) -> LatencyStats:
    """Time ``repeats`` forward calls of ``model`` (after ``warmup`` untimed ones).

    Calls run under ``torch.no_grad()``; put the model in eval mode first if
    that is what you want to time. With ``threads``, torch's intra-op thread
    count is set for the measurement and restored afterwards.

    To compare models, prefer :func:`compare_latency`: timings taken one model
    after the other are skewed by whatever else the machine does meanwhile.

    Returns:
        :class:`LatencyStats`: median, 10th and 90th percentile, mean and
        minimum in milliseconds, and the number of timed calls.
    """
    return compare_latency({"model": model}, inputs, repeats=repeats, warmup=warmup, threads=threads)["model"]


def compare_latency(
    models: Mapping[str, nn.Module],
    inputs: Inputs,
    repeats: int = 30,
    warmup: int = 3,
    threads: Optional[int] = None,
) -> Dict[str, LatencyStats]:
    """Time several models on the same inputs, interleaved round-robin.

    Each round calls every model once; the order rotates from one round to
    the next, so no model always runs first (or right after the same
    neighbour). Slow drift of the machine's speed then affects all models
    alike and the ratios of the medians are trustworthy even when the
    absolute times are not.

    Args:
        models: name -> model; the result has the same names in the same order.
        inputs: positional inputs (list/tuple), keyword inputs (dict) or one tensor.
        repeats: timed rounds (each model is timed ``repeats`` times).
        warmup: untimed rounds first (allocator, caches, lazy init).
        threads: if given, ``torch.set_num_threads(threads)`` for the
            measurement; the previous setting is restored afterwards.

    Returns:
        name -> :class:`LatencyStats`.
    """
    if not isinstance(models, Mapping) or not models:
        raise ValueError("compare_latency needs a non-empty dict of name -> model")
    for name, model in models.items():
        _check_module(model, f"compare_latency (model {name!r})")
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an integer >= 1, got {repeats!r}")
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an integer >= 0, got {warmup!r}")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be None or an integer >= 1, got {threads!r}")

    args, kwargs = _split_inputs(inputs)
    names = list(models)
    times: Dict[str, List[float]] = {name: [] for name in names}
    previous_threads = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        with torch.no_grad():
            for r in range(warmup + repeats):
                shift = r % len(names)
                for name in names[shift:] + names[:shift]:
                    model = models[name]
                    start = time.perf_counter()
                    model(*args, **kwargs)
                    elapsed = time.perf_counter() - start
                    if r >= warmup:
                        times[name].append(elapsed * 1e3)
    finally:
        torch.set_num_threads(previous_threads)
    return {name: _summarise(times[name]) for name in names}


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------
def _summarise(ms: List[float]) -> LatencyStats:
    return LatencyStats(
        median_ms=statistics.median(ms),
        p10_ms=_percentile(ms, 10.0),
        p90_ms=_percentile(ms, 90.0),
        mean_ms=statistics.fmean(ms),
        min_ms=min(ms),
        repeats=len(ms),
    )


def _percentile(values: List[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation between ranks."""
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _split_inputs(inputs: Inputs) -> "tuple[tuple[Any, ...], Dict[str, Any]]":
    if isinstance(inputs, torch.Tensor):
        return (inputs,), {}
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    if isinstance(inputs, (list, tuple)):
        return tuple(inputs), {}
    raise TypeError(
        "inputs must be a tensor, a list/tuple of positional inputs or a dict of keyword inputs, "
        f"got {type(inputs).__name__}"
    )


def _check_module(model: Any, where: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where} needs a torch.nn.Module, got {type(model).__name__}")
