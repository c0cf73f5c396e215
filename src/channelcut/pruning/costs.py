"""Measure what a memory copy costs against arithmetic on this machine.

The export's cost model (``compute(..., copy_cost=...)``) compares, for a
consumer whose kept channels are scattered, gathering them (a copy of every
kept value) with reading a contiguous superset as a view and multiplying the
extra channels by zero weight columns (more multiply-accumulates, no copy).
:func:`calibrate_copy_cost` measures the exchange rate: the time to gather one
value divided by the time of one multiply-accumulate in a 1x1 convolution of
the same input, median of repeats.

>>> cost = calibrate_copy_cost(channels=32, size=16, repeats=3)
>>> cost > 0
True
"""

from __future__ import annotations

import statistics
import time
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["calibrate_copy_cost"]


def _median_time(fn, repeats: int) -> float:
    fn()  # warm up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@torch.no_grad()
def calibrate_copy_cost(
    channels: int = 256,
    size: int = 28,
    out_channels: Optional[int] = None,
    batch: int = 1,
    repeats: int = 20,
    device: Optional[torch.device] = None,
    dtype: torch.dtype = torch.float32,
) -> float:
    """Cost of copying one value, in multiply-accumulates, measured on
    ``device`` with a ``(batch, channels, size, size)`` activation: the time
    of gathering half of its channels per copied value, over the time of a
    1x1 convolution to ``out_channels`` (default ``channels``) per MAC.
    Pass the result as ``PruningManager.compute(..., copy_cost=...)``."""
    out_channels = out_channels or channels
    x = torch.randn(batch, channels, size, size, device=device, dtype=dtype)
    w = torch.randn(out_channels, channels, 1, 1, device=device, dtype=dtype)
    idx = torch.arange(0, channels, 2, device=device)
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)

    def gather() -> None:
        x.index_select(1, idx)
        sync()

    def conv() -> None:
        F.conv2d(x, w)
        sync()

    t_copy = _median_time(gather, repeats) / (batch * idx.numel() * size * size)
    t_mac = _median_time(conv, repeats) / (batch * out_channels * channels * size * size)
    return t_copy / t_mac
