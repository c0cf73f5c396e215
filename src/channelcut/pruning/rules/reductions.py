"""Reductions (sum, mean, max, norm, ...) and ops that mix along one dim
(softmax, cumsum, normalize).

Reducing or mixing along the channel dim couples every channel it reads
(they are kept or removed together); along any other dim the channels pass
through, shifted left by the dims it drops.
"""

from __future__ import annotations

from typing import Any, List, Optional

import torch

from ..recorder import CompactTrace, Recorder
from ..shape_only import empty, plain
from .elementwise import elementwise
from .registry import OpCall, Unsupported, rule

REDUCTIONS = {"sum", "mean", "amax", "amin", "max", "min", "prod", "logsumexp", "all", "any", "argmax",
              "argmin", "nansum", "nanmean", "median", "nanmedian", "count_nonzero", "std", "var",
              "std_mean", "var_mean", "aminmax", "mode"}
# their positional arguments after ``dim`` are (unbiased, keepdim): a second
# positional argument is not keepdim
_VARIANCES = ("std", "var", "std_mean", "var_mean")


def _dims(d: Any, ndim: int) -> Optional[List[int]]:
    if d is None:
        return None
    if isinstance(d, int):
        return [d % ndim] if ndim else []
    return [int(i) % ndim for i in d]


def mean_shape(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    """Shape function of ``mean`` over given dims of a plain float tensor."""
    x = args[0] if args else None
    dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
    keep = kwargs.get("keepdim", args[2] if len(args) > 2 else False)
    if not plain(x) or "out" in kwargs or "dtype" in kwargs or not isinstance(keep, bool):
        return None
    if isinstance(dim, int):
        dim = (dim,)
    if not isinstance(dim, (tuple, list)) or not dim or not all(isinstance(d, int) for d in dim):
        return None
    drop = {d % x.dim() for d in dim}
    if len(drop) != len(dim):
        return None
    shape = [1 if d in drop else s for d, s in enumerate(x.shape) if keep or d not in drop]
    return empty(shape, x.dtype)


def _reduce(rec: Recorder, call: OpCall, variance: bool) -> None:
    args, kwargs = call.args, call.kwargs
    x = args[0]
    rest = list(args[1:])
    if "other" in kwargs:
        return elementwise(rec, call)
    dim = kwargs.get("dim", kwargs.get("axis", None))
    keepdim = kwargs.get("keepdim", False)
    if dim is None and rest and (isinstance(rest[0], (int, list, tuple))) and not isinstance(rest[0], bool):
        dim = rest[0]
        if len(rest) > 1 and isinstance(rest[-1], bool) and "keepdim" not in kwargs:
            keepdim = rest[-1] if not (variance and len(rest) == 2) else False
    dims = _dims(dim, x.dim())
    for y in call.outs:
        _reduce_dims(rec, x, dims, keepdim, y)


@rule("mean", shape=mean_shape)
@rule(*REDUCTIONS.difference(("mean", "max", "min"), _VARIANCES))
def reduction(rec: Recorder, call: OpCall) -> None:
    """Reduce over ``dim`` (all dims when None)."""
    _reduce(rec, call, variance=False)


@rule(*_VARIANCES)
def variance(rec: Recorder, call: OpCall) -> None:
    """``std`` / ``var`` (and with the mean): a reduction over ``dim``."""
    _reduce(rec, call, variance=True)


@rule("max", "min")
def max_or_min(rec: Recorder, call: OpCall) -> None:
    """A reduction, or with a tensor as second argument elementwise."""
    rest = call.args[1:]
    if rest and isinstance(rest[0], torch.Tensor):
        return elementwise(rec, call)
    _reduce(rec, call, variance=False)


@rule("norm")
def norm(rec: Recorder, call: OpCall) -> None:
    """``torch.norm(x, p, dim, keepdim)``: a reduction over ``dim``."""
    x = call.args[0]
    keepdim = call.arg(3, "keepdim", False)
    _reduce_dims(rec, x, _dims(call.arg(2, "dim"), x.dim()), keepdim, call.out)


@rule("linalg_vector_norm")
def vector_norm(rec: Recorder, call: OpCall) -> None:
    """``torch.linalg.vector_norm(x, ord, dim, keepdim)``: a reduction over
    ``dim`` (all dims when None; ConvNeXt-V2's global response norm)."""
    x = call.args[0]
    keepdim = call.arg(3, "keepdim", False)
    _reduce_dims(rec, x, _dims(call.arg(2, "dim"), x.dim()), keepdim, call.out)


def _reduce_dims(rec: Recorder, x, dims, keepdim, out) -> None:
    t = rec.get(x)
    if dims is None or (t.vdim is not None and t.vdim in dims):
        rec.set(out, CompactTrace.scalar(rec.couple(t.ids), out.dim()))
        return
    vd = t.vdim
    if vd is not None and not keepdim:
        vd -= sum(1 for d in dims if d < vd)
    rec.set(out, CompactTrace.scalar(int(t.ids[0]), out.dim()) if vd is None else CompactTrace.along(t.ids, vd, out.dim()))


MIX_ALONG = {"softmax", "log_softmax", "softmin", "cumsum", "cumprod", "logcumsumexp", "cummax", "cummin",
             "normalize"}


def _mix(rec: Recorder, call: OpCall, dim: Any) -> None:
    x = call.args[0]
    t = rec.get(x)
    dims = _dims(dim, x.dim())
    if dims is None or (t.vdim is not None and t.vdim in dims):
        rep = rec.couple(t.ids)
        res = CompactTrace(torch.full_like(t.atoms, rep), t.vdim)
    else:
        res = CompactTrace(t.atoms, t.vdim)
    for y in call.outs:
        rec.set(y, CompactTrace(res.atoms, res.vdim))


@rule(*MIX_ALONG.difference(("normalize",)))
def mix_along(rec: Recorder, call: OpCall) -> None:
    """Every output element along ``dim`` reads every input element along it."""
    _mix(rec, call, call.arg(1, "dim"))


@rule("normalize")
def normalize(rec: Recorder, call: OpCall) -> None:
    """``F.normalize(x, p, dim=1)``: divides by a norm along ``dim``."""
    _mix(rec, call, call.arg(2, "dim", 1))


@rule("topk", "sort", "argsort", "msort")
def select_along(rec: Recorder, call: OpCall) -> None:
    """``topk`` / ``sort`` / ``argsort`` along ``dim``: the values keep the
    input's channels when ``dim`` is not the channel dim; along the channel
    dim they mix them all (one coupled, pinned group: the indices returned are
    channel positions, which removing a channel would change; a router's
    top-k over experts). The indices hold positions, not channels: they stay
    untraced, so an op indexing with them (``x[idx]``, ``gather``) uses their
    values."""
    x = call.args[0]
    t = rec.get(x)
    base = call.base
    dim = call.arg(2, "dim", -1) if base == "topk" else call.arg(1, "dim", -1)
    if not isinstance(dim, int):
        raise Unsupported(f"'{base}' with a non-int dim")
    dim %= max(x.dim(), 1)
    outs = call.outs
    if base == "argsort":
        values, indices = [], outs
    elif base == "msort":
        values, indices = outs, []
    else:
        values, indices = outs[:1], outs[1:]
    if t.vdim is not None and t.vdim == dim:
        rep = rec.couple(t.ids)
        rec.pin_ids(t.ids, f"'{base}' along the channel dim returns channel positions ({rec.module or '<model>'})")
        res = CompactTrace.scalar(rep, x.dim())
    else:
        res = CompactTrace(t.atoms, t.vdim)
    for y in values:
        rec.set(y, CompactTrace(res.atoms, res.vdim))
    for y in indices:
        rec.leave_untraced(y)
