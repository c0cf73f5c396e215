"""The one output comparison of the tests: :func:`compare` (a message, or
None when equal), :func:`assert_close`, :func:`rel_error`, and
:func:`n_params`.

A floating output matches when ``max |out - ref| <= rtol * max |ref|`` plus
the dtype's rounding floor (an output that is rounding noise itself differs by
a few ulps whenever the pruned model sums in another order), with the same
structure, shapes and dtypes; ``rtol=None`` asks for bit-identical outputs.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from channelcut.pruning.model_run import rounding_floor

RTOL = 1e-10  # float64 exports


def compare(out: Any, ref: Any, rtol: Optional[float] = RTOL) -> Optional[str]:
    """None when ``out`` matches ``ref`` (same structure; tensors equal to
    ``rtol`` relative to ``max |ref|`` plus ``rounding_floor``, for outputs
    that are rounding noise themselves, or bit-equal when ``rtol`` is None)."""
    a, sa = tree_flatten(out)
    b, sb = tree_flatten(ref)
    if sa != sb:
        return f"output structure differs: {sa} vs {sb}"
    for i, (x, y) in enumerate(zip(a, b)):
        if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
            if x != y:
                return f"output leaf {i} differs: {x!r} vs {y!r}"
            continue
        if x.shape != y.shape or x.dtype != y.dtype:
            return f"output {i}: shape/dtype {tuple(x.shape)}/{x.dtype} vs expected {tuple(y.shape)}/{y.dtype}"
        if rtol is None:
            if not torch.equal(x, y):
                return f"output {i} is not bit-identical (max diff {float((x - y).abs().max()):.3g})"
            continue
        if x.numel() == 0:
            continue
        scale = float(y.abs().max())
        err = float((x - y).abs().max())
        if not err <= rtol * scale + rounding_floor(x.dtype):
            return f"output {i} differs by {err:.3g} (max |ref| {scale:.3g}, rtol {rtol:g})"
    return None


def n_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def assert_close(out: Any, ref: Any, rtol: Optional[float] = RTOL, what: str = "") -> None:
    """:func:`compare` as an assertion."""
    problem = compare(out, ref, rtol)
    assert problem is None, f"{what}: {problem}" if what else problem


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    """``max |y - ref| / max |ref|`` (0 when equal, inf when ``ref`` is 0 and ``y`` is not)."""
    y, ref = y.detach(), ref.detach()
    err = float((y - ref).abs().max()) if y.numel() else 0.0
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    if err == 0.0:
        return 0.0
    return err / scale if scale > 0 else float("inf")


def max_rel_difference(out: Any, ref: Any) -> float:
    """The largest :func:`rel_error` over the tensors of two outputs."""
    a = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
    b = [t for t in tree_flatten(ref)[0] if isinstance(t, torch.Tensor)]
    return max(rel_error(y, r) for y, r in zip(a, b))
