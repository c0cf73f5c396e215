"""Data movement: permute, index, slice, cat, stack, flip, gather, ...
(reshapes, expands and splits, whose sizes the model writes down, are in
``reshape.py``).

The general rule (:func:`move_ids`) applies the op itself to the tensors'
atoms instead of their values and compresses the result: channels that come
out as a tiling of the channels that went in pass through; an op that
selects or reorders channels keeps them all (pins). Common cases have
shortcuts on the compact traces.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from ..graph import NO_SOURCE, is_tiling
from ..model_run import flatten_tensors
from ..recorder import CompactTrace, Recorder
from ..shape_only import empty, plain
from .registry import OpCall, Unsupported, rule

MOVEMENT = {
    "reshape", "view", "flatten", "unflatten", "permute", "transpose", "t", "swapaxes", "swapdims", "movedim",
    "moveaxis", "squeeze", "unsqueeze", "expand", "expand_as", "repeat", "tile", "__getitem__", "narrow",
    "select", "index_select", "cat", "concat", "concatenate", "stack", "hstack", "vstack", "dstack", "split",
    "chunk", "tensor_split", "unbind", "split_with_sizes", "flip", "fliplr", "flipud", "roll", "rot90",
    "take_along_dim", "gather", "view_as", "reshape_as", "broadcast_to", "unfold", "get:T", "get:mT", "get:H", "get:mH", "ravel",
    "atleast_1d", "atleast_2d", "atleast_3d", "diagonal", "masked_select", "repeat_interleave", "as_strided",
    "split_copy", "unsafe_split", "unsafe_chunk", "movedim_copy", "narrow_copy",
}

# movement ops with a rule of their own (every other one: :func:`movement`):
# permutations of dims (the compact trace is permuted alike), indexing,
# concatenation, ``x[...]``, unfold, and (in reshape.py) the ops whose sizes
# the model writes down
PERMUTING = ("permute", "transpose", "t", "swapaxes", "swapdims", "movedim", "moveaxis", "get:T", "get:mT")
INDEXING = ("gather", "take_along_dim", "index_select", "masked_select")
CONCATENATING = ("cat", "concat", "concatenate")
RESHAPING = ("reshape", "view", "flatten", "unflatten", "view_as", "reshape_as", "squeeze", "unsqueeze", "ravel")
EXPANDING = ("expand", "expand_as", "broadcast_to")
SPLITTING = ("chunk", "unsafe_chunk", "split", "unsafe_split", "split_with_sizes")
_OWN_RULE = set(PERMUTING + INDEXING + CONCATENATING + RESHAPING + EXPANDING + SPLITTING + ("__getitem__", "unfold"))


def cat_shape(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    """Shape function of ``cat`` of plain float tensors of one dtype."""
    xs = kwargs.get("tensors", args[0] if args else None)
    dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
    if "out" in kwargs or not isinstance(xs, (list, tuple)) or not xs or not isinstance(dim, int):
        return None
    if not all(plain(x) for x in xs) or len({(x.dtype, x.dim()) for x in xs}) != 1:
        return None
    d = dim % xs[0].dim()
    rest = {tuple(x.shape[:d]) + tuple(x.shape[d + 1:]) for x in xs}
    if len(rest) != 1:
        return None
    shape = list(xs[0].shape)
    shape[d] = sum(int(x.shape[d]) for x in xs)
    return empty(shape, xs[0].dtype)


def move_ids(rec: Recorder, call: OpCall) -> None:
    """The general rule: compute the op on the atoms (see module docstring)."""
    name = call.base
    tensors = call.tensors
    src = [x for x in tensors if rec.get(x) is not None]
    outs = call.outs
    res = apply_to_ids(call.func, call.args, call.kwargs, {}, rec)
    res_list = flatten_tensors(res) if not isinstance(res, torch.Tensor) else [res]
    if len(res_list) != len(outs):
        raise Unsupported("unexpected outputs")
    for x in src:  # a fixed-size mask/index laid along the channel dim
        t = rec.get(x)
        if t.vdim is not None and any(
            rec.get(u) is None and u.dim() == x.dim() and u.shape[t.vdim] == x.shape[t.vdim] > 1 for u in tensors
        ):
            rec.pin_ids(t.ids, f"'{name}' with a fixed-size tensor along the channel dim ({rec.module or '<model>'})")
    in_groups = [_groups(rec, rec.get(x)) for x in src]
    for y, r in zip(outs, res_list):
        ctr = rec.compress(r)
        if not _preserves_channels(rec, in_groups, ctr):
            for x in src:
                rec.pin_ids(rec.get(x).ids, f"'{name}' selects or reorders channels ({rec.module or '<model>'})")
            rec.pin_ids(ctr.ids, f"'{name}' selects or reorders channels ({rec.module or '<model>'})")
        rec.set(y, ctr)


def one_to_one(rec: Recorder, call: OpCall) -> Optional[Tuple[torch.Tensor, CompactTrace, torch.Tensor]]:
    """(input, its trace, output) of a call on one tracked tensor (its first
    argument) with one output; else None."""
    outs = call.outs
    if len(outs) != 1:
        return None
    x = call.args[0] if call.args and isinstance(call.args[0], torch.Tensor) else None
    if x is None or rec.get(x) is None:
        return None
    return x, rec.get(x), outs[0]


def uniform_passes(rec: Recorder, call: OpCall) -> bool:
    """Shortcut: one tracked input whose elements all carry one atom gives
    an output whose elements carry it too."""
    one = one_to_one(rec, call)
    if one is None or one[1].vdim is not None:
        return False
    x, t, y = one
    rec.set(y, CompactTrace.scalar(int(t.ids[0]), y.dim()))
    return True


@rule(*MOVEMENT.difference(_OWN_RULE))
def movement(rec: Recorder, call: OpCall) -> None:
    """Any data movement: :func:`move_ids`."""
    if uniform_passes(rec, call):
        return
    move_ids(rec, call)


@rule(*INDEXING)
def indexing(rec: Recorder, call: OpCall) -> None:
    """Gathering by an index: data movement, unless the index itself is traced."""
    if rec.get(call.args[0]) is None:
        raise Unsupported("indexing with a tracked index")
    movement(rec, call)


@rule(*PERMUTING)
def permute(rec: Recorder, call: OpCall) -> None:
    """A permutation of dims: the compact trace is permuted alike."""
    if uniform_passes(rec, call):
        return
    one = one_to_one(rec, call)
    if one is not None:
        x, t, y = one
        res = apply_to_ids(call.func, (t.atoms,) + tuple(call.args[1:]), call.kwargs, {}, rec)
        if res.dim() == y.dim():
            vd = [d for d in range(res.dim()) if res.shape[d] > 1]
            rec.set(y, CompactTrace(res.contiguous(), vd[0] if vd else None))
            return
    move_ids(rec, call)


@rule("__getitem__")
def getitem(rec: Recorder, call: OpCall) -> None:
    """``x[...]``: basic indexing that leaves the channel dim whole moves it;
    anything else is :func:`move_ids`."""
    if uniform_passes(rec, call):
        return
    one = one_to_one(rec, call)
    if one is not None and _getitem_fast(rec, one[1], one[0], call.args[1], one[2]):
        return
    if one is not None and _getitem_leading(rec, one[1], one[0], call.args[1], one[2]):
        return
    move_ids(rec, call)


def _getitem_leading(rec: Recorder, t: CompactTrace, x: torch.Tensor, idx: Any, y: torch.Tensor) -> bool:
    """``x[token_idx]``, ``x[rows, cols]``: untraced index tensors, ints and
    slices on leading dims only, the channel dim and every dim after it
    untouched. The trailing dims come out as they were, whatever the indices
    hold (also none: an expert no token was routed to)."""
    if t.vdim is None:
        return False
    if not isinstance(idx, tuple):
        idx = (idx,)
    if len(idx) > t.vdim:
        return False
    for i in idx:
        if isinstance(i, torch.Tensor):
            if rec.get(i) is not None or i.dtype not in (torch.long, torch.int32, torch.bool):
                return False
        elif not isinstance(i, (int, slice)) or isinstance(i, bool):
            return False
    tail = x.dim() - t.vdim
    if y.dim() < tail or tuple(y.shape[y.dim() - tail:]) != tuple(x.shape[t.vdim:]):
        return False
    rec.set(y, CompactTrace.along(t.ids, y.dim() - tail, y.dim()))
    return True


@rule("cat", "concat", "concatenate", shape=cat_shape)
def cat(rec: Recorder, call: OpCall) -> None:
    """Concatenation (see :func:`_cat_fast`); else :func:`move_ids`."""
    outs = call.outs
    if len(outs) == 1 and _cat_fast(rec, call, outs[0]):
        return
    move_ids(rec, call)


def _cat_fast(rec: Recorder, call: OpCall, y: torch.Tensor) -> bool:
    """cat along the channel dim concatenates traces; along another dim it
    aligns (unions) the inputs' channels position by position."""
    name = call.base
    xs = call.args[0] if call.args else call.kwargs.get("tensors")
    dim = call.arg(1, "dim", 0)
    if not isinstance(xs, (list, tuple)) or not xs or not isinstance(dim, int):
        return False
    nd = y.dim()
    dim %= nd
    trs = [rec.get(x) for x in xs]
    vds = {t.vdim for t in trs if t is not None and t.vdim is not None}
    if len(vds) > 1:
        return False
    vd = next(iter(vds)) if vds else None
    if vd is None or vd == dim:
        parts = []
        for x, t in zip(xs, trs):
            n = x.shape[dim] if x.dim() == nd else 0
            if t is None:
                parts.append(torch.full((n,), NO_SOURCE, dtype=torch.long))
            elif t.vdim is None:
                parts.append(t.ids[:1].expand(n))
            else:
                parts.append(t.ids)
        ids = torch.cat(parts)
        if vd is None and bool((ids == ids[0]).all()):
            rec.set(y, CompactTrace.scalar(int(ids[0]), nd))
        else:
            rec.set(y, CompactTrace.along(ids, dim, nd))
        return True
    if any(t is not None and t.vdim is None for t in trs):
        return False
    merged = None
    for t in trs:
        if t is not None:
            merged = t.ids if merged is None else rec.union_pairs(merged, t.ids)
    for x, t in zip(xs, trs):
        if t is None and x.dim() == nd:
            rec.align_operand(x, nd, vd, merged, name)
    rec.set(y, CompactTrace.along(merged, vd, nd))
    return True


def _getitem_fast(rec: Recorder, t: CompactTrace, x: torch.Tensor, idx: Any, y: torch.Tensor) -> bool:
    if not isinstance(idx, tuple):
        idx = (idx,)
    if any(isinstance(i, (torch.Tensor, list)) or i is Ellipsis and False for i in idx):
        return False
    # expand Ellipsis
    n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
    full: List[Any] = []
    for i in idx:
        if i is Ellipsis:
            full.extend([slice(None)] * (x.dim() - n_real))
        else:
            full.append(i)
    d = 0
    out_dim = 0
    vd_out = None
    for i in full:
        if i is None:
            out_dim += 1
            continue
        if isinstance(i, bool):
            return False
        if d == t.vdim:
            if not (isinstance(i, slice) and i == slice(None)) and not (
                isinstance(i, slice) and range(*i.indices(x.shape[d])) == range(x.shape[d])
            ):
                return False  # touches the channel dim: generic path decides
            vd_out = out_dim
        if isinstance(i, int):
            d += 1
            continue
        if not isinstance(i, slice):
            return False
        d += 1
        out_dim += 1
    if vd_out is None:
        vd_out = out_dim + (t.vdim - d)
    if not (0 <= vd_out < y.dim()) or y.shape[vd_out] != x.shape[t.vdim]:
        return False
    rec.set(y, CompactTrace.along(t.ids, vd_out, y.dim()))
    return True


def _groups(rec: Recorder, t: CompactTrace) -> List[int]:
    if t.vdim is None:
        return []
    find = rec.sources.find
    return [find(a) if a >= 0 else -1 for a in t.ids.tolist()]


def _preserves_channels(rec: Recorder, in_groups: List[List[int]], out: CompactTrace) -> bool:
    if out.vdim is None:
        return all(len(set(g)) <= 1 for g in in_groups)
    og = _groups(rec, out)
    nonempty = [g for g in in_groups if g]
    if not nonempty:
        return True
    if is_tiling(og, [g for grp in nonempty for g in grp]):
        return True
    return all(is_tiling(og, g) for g in nonempty)


def apply_to_ids(func, args, kwargs, subst: Dict[int, torch.Tensor], rec: Recorder):
    """``func`` applied to the atoms of its tensor arguments instead of their
    values (``subst``: id of a tensor -> the atoms to use for it); integer
    index tensors that carry no trace are passed as they are."""
    def conv(a):
        if isinstance(a, torch.Tensor) and not (a.dtype in (torch.long, torch.int, torch.bool) and rec.get(a) is None and id(a) not in subst and not _is_data(a, rec)):
            if id(a) in subst:
                return subst[id(a)]
            return rec.materialize(a)
        if isinstance(a, (list, tuple)):
            return type(a)(conv(b) for b in a) if not hasattr(a, "_fields") else type(a)(*[conv(b) for b in a])
        return a

    cargs = tuple(conv(a) for a in args)
    ckw = {k: conv(v) for k, v in kwargs.items()}
    return func(*cargs, **ckw)


def _is_data(a: torch.Tensor, rec: Recorder) -> bool:
    """Integer tensors that carry traced channels (data); other integer tensors,
    buffers included, are indices and are passed through unchanged."""
    return rec.get(a) is not None


@rule("channel_shuffle", "native_channel_shuffle")
def channel_shuffle(rec: Recorder, call: OpCall) -> None:
    """Output channel ``i*g + j`` is input channel ``j*(C/g) + i``; channels
    at the same place in each group are coupled so ``C`` stays divisible."""
    x, out = call.args[0], call.out
    g = int(call.arg(1, "groups"))
    ids = rec.ids_along(x, 1)
    per = ids.numel() // g
    blocks = ids.reshape(g, per)
    reps = torch.tensor([rec.couple(blocks[:, i]) for i in range(per)], dtype=torch.long)
    new = reps.repeat_interleave(g)
    rec.set(out, CompactTrace.along(new, 1, out.dim()) if per > 1 else CompactTrace.scalar(int(reps[0]), out.dim()))


@rule("pixel_shuffle")
def pixel_shuffle(rec: Recorder, call: OpCall) -> None:
    """Each block of r*r input channels becomes one output channel."""
    x, out = call.args[0], call.out
    r = int(call.arg(1, "upscale_factor"))
    ids = rec.ids_along(x, -3).reshape(-1, r * r)
    reps = torch.tensor([rec.couple(row) for row in ids], dtype=torch.long)
    rec.set(out, CompactTrace.along(reps, out.dim() - 3, out.dim()) if reps.numel() > 1 else CompactTrace.scalar(int(reps[0]), out.dim()))


@rule("pixel_unshuffle")
def pixel_unshuffle(rec: Recorder, call: OpCall) -> None:
    """Each input channel becomes r*r output channels."""
    x, out = call.args[0], call.out
    r = int(call.arg(1, "downscale_factor"))
    ids = rec.ids_along(x, -3).repeat_interleave(r * r)
    rec.set(out, CompactTrace.along(ids, out.dim() - 3, out.dim()))


@rule("unfold")
def unfold(rec: Recorder, call: OpCall) -> None:
    """``F.unfold`` (im2col): channel ``c`` becomes rows ``c*k .. c*k+k-1``;
    ``Tensor.unfold`` (sliding windows on one dim) is data movement."""
    if call.func is not F.unfold:
        return movement(rec, call)
    x, out = call.args[0], call.out
    ids = rec.ids_along(x, 1)
    k = out.shape[1] // max(ids.numel(), 1)
    rec.set(out, CompactTrace.along(ids.repeat_interleave(k), 1, out.dim()))


@rule("fold")
def fold(rec: Recorder, call: OpCall) -> None:
    """``F.fold`` (col2im, the inverse of ``F.unfold``): input rows
    ``c*k .. c*k+k-1`` (one per kernel position) are summed into output
    channel ``c``, so they are coupled."""
    x, out = call.args[0], call.out
    cdim = x.dim() - 2  # (N, C*k, L), or unbatched (C*k, L)
    ids = rec.ids_along(x, cdim)
    c = out.shape[cdim]
    k = ids.numel() // c
    reps = torch.tensor([rec.couple(ids[i * k:(i + 1) * k]) for i in range(c)], dtype=torch.long)
    rec.set(out, CompactTrace.along(reps, cdim, out.dim()) if c > 1 else CompactTrace.scalar(int(reps[0]), out.dim()))
