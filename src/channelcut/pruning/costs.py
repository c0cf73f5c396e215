"""Measure what memory copies and ops cost against arithmetic on a device.

The export's cost model (``compute(..., copy_cost=..., op_cost=...)``)
compares, for a consumer that drops some input channels, gathering the kept
ones (a copy of every kept value, and one op), reading a contiguous superset
as a view (one op) and multiplying the extra channels by zero weight columns,
and reading the whole input (no op, the most zero columns).
:func:`calibrate_copy_cost` measures the exchange rate of a copied value: the
time to gather one value divided by the time of one multiply-accumulate in a
1x1 convolution of the same input, median of repeats;
:func:`calibrate_op_cost` the fixed cost of one op (a launch and a call) in
multiply-accumulates; :func:`calibrate_costs` both.

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

__all__ = ["calibrate_copy_cost", "calibrate_op_cost", "calibrate_costs"]


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


@torch.no_grad()
def calibrate_op_cost(
    repeats: int = 20,
    device: Optional[torch.device] = None,
    dtype: torch.dtype = torch.float32,
    calls: int = 50,
) -> float:
    """Fixed cost of one view or gather op, in multiply-accumulates: the time
    of a gather on a tiny activation (a kernel launch and a Python call,
    ``calls`` back to back) over the time of one MAC in a large 1x1
    convolution. On a GPU at batch 1 this fixed cost is what subset reads
    cost; pass it as ``PruningManager.compute(..., op_cost=...)``."""
    tiny = torch.randn(1, 64, 4, 4, device=device, dtype=dtype)
    idx = torch.arange(0, 64, 2, device=tiny.device)
    x = torch.randn(8, 256, 56, 56, device=device, dtype=dtype)
    w = torch.randn(256, 256, 1, 1, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)

    def ops() -> None:
        for _ in range(calls):
            tiny.index_select(1, idx)
        sync()

    def conv() -> None:
        F.conv2d(x, w)
        sync()

    t_op = _median_time(ops, repeats) / calls
    t_mac = _median_time(conv, repeats) / (8 * 256 * 256 * 56 * 56)
    return t_op / t_mac


def calibrate_costs(device: Optional[torch.device] = None, dtype: torch.dtype = torch.float32, repeats: int = 20) -> dict:
    """``{"copy_cost": ..., "op_cost": ...}`` measured on ``device``: the
    keyword arguments of ``PruningManager.compute`` for a model that runs
    there."""
    return {"copy_cost": calibrate_copy_cost(device=device, dtype=dtype, repeats=repeats),
            "op_cost": calibrate_op_cost(device=device, dtype=dtype, repeats=repeats)}
