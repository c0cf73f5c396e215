"""Running the user's model: call it on example inputs, leave its buffers as
they were, flatten its outputs and compare two of them.

Used by every step that runs the model (tracing, finding zeros, verifying a
pruned model); start at :func:`run_model` and :func:`compare_outputs`.
"""

from __future__ import annotations

import array
import contextlib
import gc
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils._pytree import tree_flatten


def flatten_tensors(obj: Any) -> List[torch.Tensor]:
    """All tensors in a (nested) container, in order."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)) and all(isinstance(o, (torch.Tensor, int, float, bool, str, type(None), torch.dtype, torch.device)) for o in obj):
        return [o for o in obj if isinstance(o, torch.Tensor)]
    leaves, _ = tree_flatten(obj)
    out = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            out.append(leaf)
        elif hasattr(leaf, "items") or hasattr(leaf, "__dict__"):
            # e.g. HF ModelOutput already flattens as dict; dataclass-like: look inside
            try:
                out.extend(v for v in vars(leaf).values() if isinstance(v, torch.Tensor))
            except TypeError:
                pass
    return out


def long_tensor(values: Sequence[int], device: Any = None) -> torch.Tensor:
    """``torch.tensor(values, dtype=torch.long, device=device)`` for a list
    of channel indices, through an int64 array (about 4x faster for a
    thousand indices: an export makes hundreds of these).

    >>> long_tensor([3, 1, 2]).tolist(), long_tensor([]).shape
    ([3, 1, 2], torch.Size([0]))
    """
    if not len(values):
        return torch.empty(0, dtype=torch.long, device=device)
    t = torch.frombuffer(array.array("q", values), dtype=torch.long)
    return t if device is None or torch.device(device).type == "cpu" else t.to(device)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for the block (back on after,
    if it was on). An export makes a few hundred thousand small objects that
    live until it ends (atoms, index lists, graph records); every full
    collection on the way walks all the objects of the process (torch's, the
    user's) and frees nothing: 4-7% of an export's time. Garbage made
    meanwhile is collected once the block ends, as usual."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


@contextlib.contextmanager
def preserve_buffers(model: torch.nn.Module) -> Iterator[None]:
    """Restore every buffer afterwards: its value (a forward pass in train mode
    updates BatchNorm running statistics; tracing must not) and which tensor
    the module holds (``self.buf = new_tensor`` in forward replaces it)."""
    held = [(m, dict(m._buffers)) for m in model.modules()]
    # a batch norm in eval mode reads its running statistics and writes nothing
    # (no copy: a model has hundreds of them)
    written = {id(b): b for m, bs in held if m.training or type(m).forward is not _BatchNorm.forward
               for b in bs.values() if b is not None}
    saved = [(b, b.detach().clone()) for b in written.values()]
    try:
        yield
    finally:
        for m, buffers in held:
            if m._buffers.keys() != buffers.keys() or any(m._buffers[k] is not v for k, v in buffers.items()):
                m._buffers.clear()
                m._buffers.update(buffers)
        with torch.no_grad():
            for b, v in saved:
                if b.shape == v.shape:
                    b.copy_(v)


def call_model(model: torch.nn.Module, inputs: Sequence[Any] | Dict[str, Any]) -> Any:
    """Call the model on positional (list/tuple) or keyword (dict) inputs."""
    return model(**inputs) if isinstance(inputs, dict) else model(*inputs)


def run_model(model: torch.nn.Module, inputs: Sequence[Any] | Dict[str, Any]) -> Any:
    """:func:`call_model`, leaving the model's buffers unchanged."""
    with preserve_buffers(model):
        return call_model(model, inputs)


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


def mismatch_hint(model: torch.nn.Module, inputs: Sequence[Any] | Dict[str, Any]) -> Optional[str]:
    """For a model that failed on ``inputs``: what to change when its floating
    point inputs have another dtype than its parameters, or its inputs are on
    another device; None when they agree (the failure is something else)."""
    leaves = list(inputs.values()) if isinstance(inputs, dict) else list(inputs)
    xs = flatten_tensors(leaves)
    ps = list(model.parameters()) or list(model.buffers())
    pf = sorted({str(p.dtype) for p in ps if p.is_floating_point()})
    xf = sorted({str(x.dtype) for x in xs if x.is_floating_point()})
    pd = sorted({str(p.device) for p in ps})
    xd = sorted({str(x.device) for x in xs})
    hints = []
    if len(pf) == 1 and xf and xf != pf:
        hints.append(f"the example inputs are {' and '.join(xf)} but the model's parameters are {pf[0]}: "
                     f"pass inputs of the model's dtype, e.g. x.to({pf[0]}) (or convert the model, "
                     f"model.to({xf[0]}))")
    if len(pd) == 1 and xd and xd != pd:
        hints.append(f"the example inputs are on {' and '.join(xd)} but the model is on {pd[0]}: "
                     f"move them to the model's device, e.g. x.to({pd[0]!r}) (or model.to({xd[0]!r}))")
    if not hints:
        return None
    text = "; ".join(hints)
    return text[0].upper() + text[1:] + "."
