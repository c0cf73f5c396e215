"""Small helpers: zero-channel detection and output comparison."""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import torch
from torch import nn

from .trace import TracedGraph
from .tracing import flatten_tensors


def find_zero_channels(model: nn.Module, graph: TracedGraph) -> Tuple[List[Tuple[str, int]], List[Tuple[str, int]]]:
    """Channels whose weights are entirely zero: consumers' input columns and
    producers' output rows (with a zero bias). Pinned outputs are skipped."""
    params = dict(model.named_parameters(remove_duplicate=False))
    pruned_inputs: List[Tuple[str, int]] = []
    pruned_outputs: List[Tuple[str, int]] = []
    seen = set()
    for c in graph.consumers.values():
        if c.param in seen or c.param not in params:
            continue
        seen.add(c.param)
        w = params[c.param].detach()
        if c.groups != 1:
            continue
        dims = [d for d in range(w.dim()) if d != c.weight_dim]
        zero = (w == 0).all(dim=tuple(dims)) if dims else (w == 0)
        n = len(c.in_ids)
        if zero.numel() != n or bool(zero.all()):
            continue  # input width differs (flatten) or everything is zero: leave alone
        pruned_inputs += [(c.param, int(i)) for i in torch.nonzero(zero).flatten().tolist()]
    seen = set()
    for p in graph.producers.values():
        if p.param is None or p.param in seen or p.param not in params or p.kind == "embedding":
            continue
        seen.add(p.param)
        w = params[p.param].detach()
        out_dim = 1 if "transpose" in p.kind or p.kind == "matmul" else 0
        dims = tuple(d for d in range(w.dim()) if d != out_dim)
        zero = (w == 0).all(dim=dims) if dims else (w == 0)
        bias_name = p.param.rpartition(".")[0] + ".bias" if p.param.endswith(".weight") else None
        if bias_name and bias_name in params:
            zero = zero & (params[bias_name].detach() == 0)
        if bool(zero.all()):
            continue
        for j in torch.nonzero(zero).flatten().tolist():
            if not graph.sources.is_pinned(p.out_ids[j]):
                pruned_outputs.append((p.param, int(j)))
    return pruned_inputs, pruned_outputs


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
