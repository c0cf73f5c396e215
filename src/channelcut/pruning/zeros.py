"""Channels the model already zeroed: find them, and the constants they leave.

Start at :func:`find_zero_channels`, which ``PruningManager.compute(inputs)``
calls when it is given no request. There are two kinds of zeros:

- **a zero input column** of a consumer (conv/linear weight): that input
  channel contributes nothing to the consumer, whatever it carries, so the
  consumer drops it.
- **a zero output row** of a producer (a filter zeroed by
  ``torch.nn.utils.prune.ln_structured(dim=0)``, network slimming, ...): the
  channel is zero right after the producer only. A bias, a BatchNorm shift or
  an activation with ``f(0) != 0`` turns it into a non-zero *constant* further
  on, and a reader that drops it would change the model. So each reader is
  looked at on one real forward pass: where the channel is exactly zero it is
  dropped; where it is one constant ``c`` everywhere and the reader is a
  ``nn.Linear`` or an unpadded ``nn.Conv*d`` with a bias, ``c``'s contribution
  is folded into that bias (exactly) and the channel dropped; anywhere else
  the channel is kept, and the reason reported (:attr:`ZeroChannels.kept`).

A channel counts as a producer zero only when every source mixed into its
channel group is a zero row (a zero filter added to a live residual stream is
not a zero channel). The exported model must equal the user's model as it
is, and ``prune()`` verifies it against exactly that.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .graph import Consumer, TracedGraph
from .model_run import run_model
from .spec import ConstantFold

Pair = Tuple[str, int]

# consumer calls whose input a probe can read: name -> channel dim of the input
_PROBED = {"conv1d": 1, "conv2d": 1, "conv3d": 1, "linear": -1}
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class ZeroChannels:
    """What :func:`find_zero_channels` found."""

    pruned_inputs: List[Pair] = field(default_factory=list)  # (consumer weight, input channel)
    folds: List[ConstantFold] = field(default_factory=list)  # constants folded into a bias
    kept: List[str] = field(default_factory=list)  # zeroed channels that stay, with the reason


def find_zero_channels(model: nn.Module, graph: TracedGraph, inputs: Any) -> ZeroChannels:
    """Channels the model's weights already remove (see the module docstring).

    ``inputs`` are the example inputs: readers of a producer's zeroed
    channels are looked at on one real forward pass (only when there are
    such channels)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    if any(p.device.type == "meta" for p in params.values()):
        from ..errors import TracingError

        raise TracingError(
            "compute(inputs) with no pruned_inputs/pruned_outputs finds the channels whose weights are "
            "zero, but this model's weights are on the meta device; pass the channels to prune explicitly"
        )
    found = ZeroChannels()
    zero_cols = _zero_columns(graph, params)
    for param, chans in zero_cols.items():
        found.pruned_inputs += [(param, c) for c in sorted(chans)]
    candidates = _zero_groups(graph, params)
    if not candidates:
        return found
    roots = graph.sources.roots()
    # consumer weight -> per call (op): input positions that read a zeroed group
    readers: Dict[str, List[List[int]]] = {}
    for param, ops in graph.consumers_by_param.items():
        per_op = []
        for op in ops:
            ids = graph.consumers[op].in_ids
            per_op.append([p for p, a in enumerate(ids)
                           if a >= 0 and roots[a] in candidates and p not in zero_cols.get(param, ())])
        if any(per_op):
            readers[param] = per_op
    if not readers:
        return found
    stats = _probe(model, graph, params, readers, inputs)
    for param, per_op in readers.items():
        _decide(model, graph, params, param, per_op, stats.get(param), found)
    return found


def _zero_columns(graph: TracedGraph, params: Dict[str, torch.Tensor]) -> Dict[str, Set[int]]:
    """Consumer weight -> input channels whose weight columns are all zero
    (grouped convs are left alone; so is a weight that is zero everywhere)."""
    out: Dict[str, Set[int]] = {}
    for param, ops in graph.consumers_by_param.items():
        c = graph.consumers[ops[0]]
        w = params.get(param)
        if w is None or c.groups != 1:
            continue
        w = w.detach()
        dims = tuple(d for d in range(w.dim()) if d != c.weight_dim)
        zero = (w == 0).all(dim=dims) if dims else (w == 0)
        if zero.numel() != len(c.in_ids) or bool(zero.all()):
            continue  # input width differs (flatten) or everything is zero: leave alone
        chans = set(torch.nonzero(zero).flatten().tolist())
        if chans:
            out[param] = chans
    return out


def _zero_groups(graph: TracedGraph, params: Dict[str, torch.Tensor]) -> Set[int]:
    """Channel groups (roots) every source of which is a zero output row of a
    producer, and that are not pinned."""
    src = graph.sources
    out_dim: Dict[Tuple[str, Tuple[int, ...]], int] = {}
    for u in graph.param_uses:  # the dim of a producer's weight that holds its outputs
        out_dim.setdefault((u.param, tuple(u.ids)), u.dim)
    zero_atoms: Set[int] = set()
    for p in graph.producers.values():
        w = params.get(p.param) if p.param is not None else None
        dim = out_dim.get((p.param, tuple(p.out_ids))) if w is not None else None
        if w is None or dim is None or w.shape[dim] != len(p.out_ids):
            continue
        w = w.detach()
        dims = tuple(d for d in range(w.dim()) if d != dim)
        zero = (w == 0).all(dim=dims) if dims else (w == 0)
        if bool(zero.all()):
            continue  # an all-zero layer: leave it alone
        zero_atoms.update(p.out_ids[j] for j in torch.nonzero(zero).flatten().tolist())
    if not zero_atoms:
        return set()
    roots = src.roots()
    groups = {roots[a] for a in zero_atoms}
    for a, r in enumerate(roots):
        if r in groups and a not in zero_atoms:
            groups.discard(r)  # mixed with a live source (a residual add, ...)
    return groups - src.pinned_roots()


class _InputProbe(TorchFunctionMode):
    """Records, for each call of a conv/linear with one of the watched
    weights, the min and max of the watched input channels."""

    def __init__(self, watched: Dict[int, Tuple[str, List[int]]]) -> None:
        super().__init__()
        self.watched = watched
        self.calls: Dict[str, List[Optional[Tuple[torch.Tensor, torch.Tensor]]]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        dim = _PROBED.get(getattr(func, "__name__", ""))
        if dim is not None:
            w = args[1] if len(args) > 1 else kwargs.get("weight")
            hit = self.watched.get(id(w)) if isinstance(w, torch.Tensor) else None
            if hit is not None:
                param, positions = hit
                x = args[0] if args else kwargs.get("input")
                self.calls.setdefault(param, []).append(_channel_range(x, dim, positions))
        return func(*args, **kwargs)


def _channel_range(x: Any, dim: int, positions: List[int]) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    if not isinstance(x, torch.Tensor) or x.dim() == 0 or not x.is_floating_point():
        return None
    if max(positions) >= x.shape[dim]:
        return None
    sel = x.detach().index_select(dim, torch.tensor(positions, device=x.device)).movedim(dim, 0)
    flat = sel.reshape(len(positions), -1).double()
    return flat.amin(1).cpu(), flat.amax(1).cpu()


def _probe(model: nn.Module, graph: TracedGraph, params: Dict[str, torch.Tensor],
           readers: Dict[str, List[List[int]]], inputs: Any) -> Dict[str, List[Any]]:
    """One real forward pass (eval mode, buffers kept): per consumer weight,
    per call, the (min, max) of each input channel that reads a zeroed group,
    over every other position. Calls of other kinds are not looked at."""

    watched: Dict[int, Tuple[str, List[int]]] = {}
    for param, per_op in readers.items():
        union = sorted({p for ps in per_op for p in ps})
        watched[id(params[param])] = (param, union)
    probe = _InputProbe(watched)
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad(), probe:
            run_model(model, inputs)
    except Exception:
        return {}  # the readers keep the channels (reported)
    finally:
        for m, mode in modes:
            m.training = mode
    out: Dict[str, List[Any]] = {}
    for param, calls in probe.calls.items():
        union = watched[id(params[param])][1]
        per_call = []
        for rng in calls:
            per_call.append(None if rng is None else {p: (float(rng[0][i]), float(rng[1][i])) for i, p in enumerate(union)})
        out[param] = per_call
    return out


def _decide(model: nn.Module, graph: TracedGraph, params: Dict[str, torch.Tensor], param: str,
            per_op: List[List[int]], calls: Optional[List[Any]], found: ZeroChannels) -> None:
    """Drop, fold or keep each zeroed channel that consumer ``param`` reads."""
    ops = graph.consumers_by_param[param]
    c = graph.consumers[ops[0]]
    positions = sorted({p for ps in per_op for p in ps})
    if calls is None or len(calls) != len(ops) or any(r is None for r in calls):
        why = ("it is not a conv/linear call whose input can be looked at"
               if calls is None or c.kind not in _PROBED else "its calls could not be matched to the trace")
        found.kept.append(f"{param} input channels {_fmt(positions)} read zeroed channels; kept: {why}")
        return
    reads_other = {p for k, ps in enumerate(per_op) for p in positions if p not in ps}  # live at another call
    zero, const, varying = [], {}, []
    for p in positions:
        values = [calls[k][p] for k in range(len(ops)) if p in per_op[k]]
        if p in reads_other:
            varying.append(p)
        elif all(lo == 0.0 and hi == 0.0 for lo, hi in values):
            zero.append(p)
        elif len(values) == 1 and values[0][0] == values[0][1]:
            const[p] = values[0][0]
        else:
            varying.append(p)
    found.pruned_inputs += [(param, p) for p in zero]
    if const:
        bias_name, why = _fold_target(model, graph, params, param, c, len(ops))
        if bias_name is None:
            found.kept.append(f"{param} input channels {_fmt(sorted(const))} carry a non-zero constant where their "
                              f"producer's weights are zero; kept: {why}")
        else:
            chans = sorted(const)
            delta = _fold_delta(model, graph, param, chans, [const[p] for p in chans])
            found.folds.append(ConstantFold(param, bias_name, chans, [const[p] for p in chans], delta))
            found.pruned_inputs += [(param, p) for p in chans]
    if varying:
        found.kept.append(f"{param} input channels {_fmt(varying)} read channels whose producer's weights are zero "
                          "but whose value is not one constant there (padding, pooling, mixing); kept")


def _fold_target(model: nn.Module, graph: TracedGraph, params: Dict[str, torch.Tensor], param: str,
                 c: Consumer, n_calls: int) -> Tuple[Optional[str], str]:
    """The bias that can absorb constant inputs of consumer ``param``
    exactly, or (None, why not)."""
    mod_name = graph.param_modules.get(param, "")
    m = model.get_submodule(mod_name) if mod_name else model
    if n_calls != 1:
        return None, "the weight is used by several calls"
    if not isinstance(m, (nn.Linear,) + _CONVS) or c.module != mod_name or c.groups != 1:
        return None, "the reader is not a plain nn.Linear or nn.Conv1d/2d/3d"
    if isinstance(m, _CONVS) and m.padding_mode == "zeros" and any(m._reversed_padding_repeated_twice):
        return None, "the reader is a zero-padded conv (the constant's contribution differs at the borders)"
    if m.bias is None:
        return None, "the reader has no bias to fold the constant into"
    bias_name = f"{mod_name}.bias" if mod_name else "bias"
    shared = sum(1 for p in params.values() if p is m.bias)
    if shared != 1:
        return None, "the reader's bias is shared"
    return bias_name, ""


def _fold_delta(model: nn.Module, graph: TracedGraph, param: str, chans: Sequence[int], values: Sequence[float]) -> List[float]:
    """What constant inputs ``values`` on input channels ``chans`` add to
    every output of the reader (computed in float64)."""
    mod_name = graph.param_modules.get(param, "")
    m = model.get_submodule(mod_name) if mod_name else model
    w = m.weight.detach().double().cpu()
    k = torch.tensor(values, dtype=torch.float64)
    idx = torch.tensor(chans, dtype=torch.long)
    if isinstance(m, nn.Linear):
        return (w.index_select(1, idx) @ k).tolist()
    span = [d * (s - 1) + 1 for s, d in zip(m.kernel_size, m.dilation)]  # the receptive field
    x = torch.zeros((1, w.shape[1] * m.groups, *span), dtype=torch.float64)
    x[0, idx] = k.reshape(-1, *([1] * len(span)))
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(span)]
    return conv(x, w, None, 1, 0, m.dilation, m.groups).reshape(-1).tolist()


def _fmt(chans: Sequence[int]) -> str:
    return "[" + ", ".join(map(str, list(chans)[:8])) + (", ...]" if len(chans) > 8 else "]")
