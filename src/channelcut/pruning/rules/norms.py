"""Normalisation layers: batch, instance, layer, RMS, group and local
response norms.

Statistics per channel (batch and instance norm) let channels pass through,
with their per-channel parameters sliced alike. Statistics over the channels
(layer norm and RMS norm over the channel dim, local response norm) couple
every channel they read; group norm couples the channels of each group and
keeps the groups uniform.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence

import torch

from ..recorder import CompactTrace, Recorder
from ..shape_only import same_as_first
from .registry import OpCall, rule


def _per_channel(rec: Recorder, x: torch.Tensor, dim: int, params: Sequence[Any], what: str) -> torch.Tensor:
    """Output = input trace; per-channel params aligned with ``dim``."""
    t = rec.get(x)
    if t.vdim is not None and t.vdim != dim % x.dim():
        t = CompactTrace.scalar(rec.couple(t.ids), x.dim())
        rec.set(x, t)
    ids = rec.ids_along(x, dim)
    ids_l: Optional[List[int]] = None
    for p in params:
        if p is None or not isinstance(p, torch.Tensor):
            continue
        name = rec.param_name(p)
        if name is None:
            rec.pin_ids(ids, f"{what} with a non-parameter per-channel tensor")
        elif p.dim() == 1 and p.numel() == ids.numel():
            if ids_l is None:
                ids_l = ids.tolist()
            rec.record_param_use(name, 0, list(range(p.numel())), ids_l)
        else:
            rec.pin_ids(ids, f"{what} parameter {name} has an unexpected shape")
    return ids


def _statistics_per_channel(rec: Recorder, call: OpCall, what: str, module_cls: type) -> None:
    """Batch / instance norm: channels pass through; running statistics,
    weight and bias are sliced with them. Without any of those, the
    module's ``num_features`` still counts the channels."""
    x = call.args[0]
    params = [call.arg(i, n) for i, n in ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias"))]
    ids = _per_channel(rec, x, 1, params, what)
    if all(p is None for p in params):
        mod = rec.modules.running_name_if(module_cls)
        if mod is not None:
            rec.add_module_size((mod, "num_features", ids.tolist(), 1))
    t = rec.get(x)
    rec.set(call.out, CompactTrace(t.atoms, t.vdim))


@rule("batch_norm", shape=same_as_first)
def batch_norm(rec: Recorder, call: OpCall) -> None:
    _statistics_per_channel(rec, call, "batch_norm", torch.nn.modules.batchnorm._BatchNorm)


@rule("instance_norm", shape=same_as_first)
def instance_norm(rec: Recorder, call: OpCall) -> None:
    _statistics_per_channel(rec, call, "instance_norm", torch.nn.modules.instancenorm._InstanceNorm)


def _norm_over_last_dims(rec: Recorder, call: OpCall, w: Any, b: Any) -> None:
    """Statistics over the last ``len(normalized_shape)`` dims: channels
    among them are coupled (weight and bias sliced with them), others pass."""
    x, out, name = call.args[0], call.out, call.name
    shape = call.arg(1, "normalized_shape")
    k = 1 if isinstance(shape, int) else len(shape)
    t = rec.get(x)
    normed = set(range(x.dim() - k, x.dim()))
    if t.vdim is not None and t.vdim in normed:
        # statistics over the channels: every output channel depends on all of them
        rep = rec.couple(t.ids)
        if rep >= 0:
            rec.graph.coupling_norms.append((f"{name} in {rec.module or '<model>'}", rep))
        res = CompactTrace(torch.full_like(t.atoms, rep), t.vdim)
        for p in (w, b):
            if isinstance(p, torch.Tensor):
                pname = rec.param_name(p)
                pd = t.vdim - (x.dim() - k)
                if pname is None or p.shape[pd] != t.ids.numel():
                    rec.pin_ids(res.ids, f"{name} with an unexpected weight")
                else:
                    rec.record_param_use(pname, pd, list(range(p.shape[pd])), res.ids)
        rec.set(out, res)
    else:
        rec.set(out, CompactTrace(t.atoms, t.vdim))


@rule("layer_norm", shape=same_as_first)
def layer_norm(rec: Recorder, call: OpCall) -> None:
    _norm_over_last_dims(rec, call, call.arg(2, "weight"), call.arg(3, "bias"))


@rule("rms_norm", shape=same_as_first)
def rms_norm(rec: Recorder, call: OpCall) -> None:
    """An RMS norm over the channel dim lets its channels pass: removing some
    rescales its ``eps`` and weight exactly (``rmsnorm.py``), when it has a
    weight and ``eps`` is an attribute the export can rewrite
    (``nn.RMSNorm.eps``, or the one float attribute of the running module
    equal to it). Otherwise (or over more dims than the channels) its
    channels are coupled, like LayerNorm's."""
    x, w = call.args[0], call.arg(2, "weight")
    shape = call.arg(1, "normalized_shape")
    t = rec.get(x)
    one_dim = isinstance(shape, int) or len(shape) == 1
    if t.vdim is None or t.vdim != x.dim() - 1 or not one_dim:
        _norm_over_last_dims(rec, call, w, None)
        return
    eps = call.arg(3, "eps")
    module, eps_attr = _eps_attribute(rec, eps)
    if eps_attr is None or not isinstance(w, torch.Tensor) or rec.param_name(w) is None:
        # (without a weight to absorb the rescaling, its channels are coupled)
        _norm_over_last_dims(rec, call, w, None)
        return
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    ids = rec.ids_along(x, -1)
    wname = rec.param_name(w)
    rec.record_param_use(wname, 0, list(range(w.numel())), ids)
    rec.note_rms_norm(module, wname, eps_attr, float(eps), False, ids.tolist())
    rec.set(call.out, CompactTrace(t.atoms, t.vdim))


def _eps_attribute(rec: Recorder, eps: Any):
    """(module, attribute) holding ``eps`` of an ``F.rms_norm`` call: the
    running ``nn.RMSNorm``'s ``eps``, or the one float attribute of the
    running module that equals it; (None, None) when there is none."""
    m = rec.modules.running()
    if m is None:
        return None, None
    name = rec.modules.current
    if isinstance(m, torch.nn.RMSNorm):
        return name, "eps"
    if not isinstance(eps, float):
        return None, None
    hits = [k for k, v in vars(m).items() if type(v) is float and v == eps and not k.startswith("_")]
    return (name, hits[0]) if len(hits) == 1 else (None, None)


@rule("group_norm", shape=same_as_first)
def group_norm(rec: Recorder, call: OpCall) -> None:
    """The channels of each group are coupled (kept or removed as a whole),
    so the groups stay uniform; ``num_channels`` and ``num_groups`` follow."""
    x = call.args[0]
    g = call.arg(1, "num_groups")
    w, b = call.arg(2, "weight"), call.arg(3, "bias")
    t = rec.get(x)
    if t.vdim is not None and t.vdim != 1:
        t = CompactTrace.scalar(rec.couple(t.ids), x.dim())
    ids = rec.ids_along(x, 1) if t.vdim == 1 else t.ids.expand(x.shape[1]).clone()
    per = x.shape[1] // g
    reps = [rec.couple(ids[i * per:(i + 1) * per]) for i in range(g)]
    new_ids = torch.tensor(reps, dtype=torch.long).repeat_interleave(per)
    mod = rec.modules.running_name_if(torch.nn.GroupNorm)
    if mod is not None:
        rec.add_module_size((mod, "num_channels", new_ids.tolist(), 1))
        rec.add_module_size((mod, "num_groups", new_ids.tolist(), per))
    for p in (w, b):
        if isinstance(p, torch.Tensor):
            pname = rec.param_name(p)
            if pname is None:
                rec.pin_ids(new_ids, "group_norm with a non-parameter weight")
            else:
                rec.record_param_use(pname, 0, list(range(p.numel())), new_ids)
    out_trace = CompactTrace.along(new_ids, 1, x.dim()) if x.shape[1] > 1 else CompactTrace.scalar(int(new_ids[0]), x.dim())
    rec.set(call.out, out_trace)


@rule("local_response_norm")
def local_response_norm(rec: Recorder, call: OpCall) -> None:
    """Each channel is normalised by its neighbours: all are coupled."""
    t = rec.get(call.args[0])
    rep = rec.couple(t.ids)
    rec.set(call.out, CompactTrace(torch.full_like(t.atoms, rep), t.vdim))
