"""Output comparison: :func:`compare_outputs` and its rounding floor."""

from __future__ import annotations

from typing import Any, Optional

import torch

from .tracing import flatten_tensors


def rounding_floor(dtype: torch.dtype) -> float:
    """What two computations of one value in ``dtype`` may differ by when the
    value is itself rounding noise (a norm over one channel, a difference of
    equal terms): 64 machine epsilons (0 for non-float dtypes)."""
    return 64 * torch.finfo(dtype).eps if dtype.is_floating_point else 0.0


def compare_outputs(out: Any, ref: Any, rtol: Optional[float] = None) -> Optional[str]:
    """None if the two outputs match to their dtype's rounding, else a message.

    A floating output matches when ``max |out - ref| <= rtol * max |ref|``
    plus :func:`rounding_floor`: an output that is rounding noise itself
    differs by a few ulps whenever the pruned model sums in another order."""
    a, b = flatten_tensors(out), flatten_tensors(ref)
    if len(a) != len(b):
        return f"the pruned model returned {len(a)} tensors, the mock {len(b)}"
    for i, (x, y) in enumerate(zip(a, b)):
        if x.shape != y.shape:
            return f"output {i} has shape {tuple(x.shape)}, expected {tuple(y.shape)}"
        if not x.is_floating_point():
            if not torch.equal(x, y):
                return f"output {i} differs"
            continue
        tol = rtol if rtol is not None else (1e-9 if x.dtype == torch.float64 else 1e-3)
        scale = float(y.abs().max()) if y.numel() else 0.0
        err = float((x - y).abs().max()) if x.numel() else 0.0
        if not err <= tol * scale + rounding_floor(x.dtype):  # also catches NaN
            return f"output {i} differs from the mock by {err:.3g} (relative to max |y| = {scale:.3g})"
    return None
