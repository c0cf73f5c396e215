"""Ops whose sizes the model writes down: reshape / view / flatten /
unflatten / squeeze, expand, and chunk / split along the channel dim.

The sizes a model passes are ints the tracer can read: a
:class:`~channelcut.pruning.counts.ChannelCount` (read off a channel dim,
so it follows pruning), a :class:`~channelcut.pruning.counts.HeadCount`
(a module's head count, rewritten when heads go), ``-1``, a module's int
attribute (rewritten when pruning), or a literal (hard-coded: the channels
are kept). Start at :func:`_reshape_fast`.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import torch

from ..counts import ChannelCount, HeadCount
from ..recorder import CompactTrace, Recorder
from .movement import EXPANDING, RESHAPING, move_ids, one_to_one, uniform_passes
from .registry import OpCall, rule


@rule(*RESHAPING)
def reshape(rec: Recorder, call: OpCall) -> None:
    """The channel dim goes to the output dim that adapts to its count."""
    if uniform_passes(rec, call):
        return
    one = one_to_one(rec, call)
    if one is not None:
        x, t, y = one
        if _reshape_fast(rec, t, x, y, _requested_shape(rec, call, x), call.base):
            return
    move_ids(rec, call)


@rule(*EXPANDING)
def expand(rec: Recorder, call: OpCall) -> None:
    """Channels pass to the same dim; expanding to a literal channel count
    keeps them."""
    if uniform_passes(rec, call):
        return
    one = one_to_one(rec, call)
    if one is not None:
        x, t, y = one
        vd = t.vdim + y.dim() - x.dim()
        if x.shape[t.vdim] == y.shape[vd]:
            req = _requested_shape(rec, call, x)
            size = req[vd] if req is not None and len(req) == y.dim() else -1
            if not (size == -1 or isinstance(size, ChannelCount) and follows(rec, size, t.ids)):
                rec.pin_ids(t.ids, f"'{call.base}' to a hard-coded channel count ({rec.module or '<model>'})")
            rec.set(y, CompactTrace.along(t.ids, vd, y.dim()))
            return
    move_ids(rec, call)


@rule("chunk", "unsafe_chunk")
def chunk(rec: Recorder, call: OpCall) -> None:
    """``chunk(n)`` along the channel dim: equal parts (see :func:`_equal_parts`)."""
    split = _split_of_channels(rec, call)
    if split is not None:
        x, t = split
        n = call.arg(1, "chunks")
        if isinstance(n, int) and not x.shape[t.vdim] % n and _equal_parts(rec, call, x, t, n, None, False):
            return
    if uniform_passes(rec, call):
        return
    move_ids(rec, call)


@rule("split", "unsafe_split")
def split(rec: Recorder, call: OpCall) -> None:
    """``split(size)``: equal parts; ``split([a, b, ...])``: sections."""
    if _split_size_fast(rec, call) or _split_sections_fast(rec, call):
        return
    if uniform_passes(rec, call):
        return
    move_ids(rec, call)


@rule("split_with_sizes")
def split_with_sizes(rec: Recorder, call: OpCall) -> None:
    """Sections (see :func:`_split_sections_fast`)."""
    if _split_sections_fast(rec, call):
        return
    if uniform_passes(rec, call):
        return
    move_ids(rec, call)


def _dim_groups(s_in: List[int], s_out: List[int]) -> Optional[List[Tuple[List[int], List[int]]]]:
    """Match the dims of a reshape: consecutive groups of input and output
    dims with equal products (trailing size-1 dims absorbed); None if the
    shapes do not match up."""
    i = j = 0
    groups = []  # (in dims, out dims)
    while i < len(s_in) or j < len(s_out):
        gi, gj = [], []
        pi = pj = 1
        if i < len(s_in):
            gi.append(i)
            pi *= s_in[i]
            i += 1
        if j < len(s_out):
            gj.append(j)
            pj *= s_out[j]
            j += 1
        while pi != pj:
            if pi < pj and i < len(s_in):
                gi.append(i)
                pi *= s_in[i]
                i += 1
            elif pj < pi and j < len(s_out):
                gj.append(j)
                pj *= s_out[j]
                j += 1
            else:
                return None
        # absorb trailing size-1 dims
        while i < len(s_in) and s_in[i] == 1 and (j >= len(s_out) or s_out[j] != 1):
            gi.append(i)
            i += 1
        while j < len(s_out) and s_out[j] == 1 and (i >= len(s_in) or s_in[i] != 1):
            gj.append(j)
            j += 1
        groups.append((gi, gj))
    return groups


def _reshape_fast(rec: Recorder, t: CompactTrace, x: torch.Tensor, y: torch.Tensor, requested: Optional[List[Any]] = None, name: str = "reshape") -> bool:
    """Map the channel dim through a reshape by matching groups of dims.

    The output dims that receive the channel dim must include exactly one
    *adaptive* dim (written as -1 or computed from the channel count), which
    then carries the channels; other dims of that group (e.g. the literal
    ``groups`` of a channel shuffle) keep their size, so channels are coupled
    across them. With no adaptive dim the size is hard-coded: keep them all.
    """
    s_in, s_out = list(x.shape), list(y.shape)
    groups = _dim_groups(s_in, s_out)
    if groups is None:
        return False
    gi, gj = next(((gi, gj) for gi, gj in groups if t.vdim in gi), (None, None))
    if gi is None:
        return False
    known = requested is not None and len(requested) == len(s_out)  # sizes aligned with the output dims
    adaptive, attr_update = _adaptive_dims(rec, gj, s_out, requested if known else None)
    if len(adaptive) != 1:
        where = rec.module or "<model>"
        why = "a hard-coded size" if not adaptive else "several sizes computed from the channel count"
        rec.pin_ids(t.ids, f"'{name}' with {why} for the channel dim ({where})")
        return False
    a = adaptive[0]
    if attr_update is None and known:
        sz = requested[a]
        if isinstance(sz, int) and not isinstance(sz, ChannelCount) and sz == -1 and len(gj) > 1:
            # view(..., -1, self.head_size) in a module that counts its
            # heads (BERT's num_attention_heads): keep the count true
            heads = rec.modules.head_count_attrs(s_out[a])
            if len(heads) == 1:
                attr_update = (rec.module, heads[0])
        if isinstance(sz, ChannelCount) and sz.base is not None and len(sz.base) != sz:
            retry = _split_heads_of(rec, t, gj, requested)
            if retry is not None:
                # reshape(B, N, 3, self.num_heads, C // self.num_heads):
                # the head size is computed from the stream's width C, so
                # whole heads go and the stream keeps as many channels as
                # each of q, k and v
                return _reshape_fast(rec, t, x, y, retry, name)
    ids = _ids_of_dim(rec, t, [s_in[d] for d in gi], gi.index(t.vdim), [s_out[d] for d in gj], gj.index(a))
    size = requested[a] if known else None
    if isinstance(size, ChannelCount) and not follows(rec, size, ids):
        where = rec.module or "<model>"
        rec.pin_ids(t.ids, f"'{name}' with a size computed from another tensor's channel count ({where})")
        base = [a for a in (size.base or ()) if a >= 0]
        if base:
            # its count must not change: decided in resolve, since a stream
            # coupled into one group later (e.g. by LayerNorm) is kept or
            # dropped whole anyway
            rec.graph.fixed_counts.append((base, f"its channel count sizes a '{name}' elsewhere ({where})"))
    if attr_update is not None:
        rec.add_module_size((attr_update[0], attr_update[1], ids.tolist(), 1))
    if ids.numel() == 1:
        rec.set(y, CompactTrace.scalar(int(ids[0]), y.dim()))
    else:
        rec.set(y, CompactTrace.along(ids, a, y.dim()))
    return True


def _adaptive_dims(rec: Recorder, gj: List[int], s_out: List[int],
                   requested: Optional[List[Any]]) -> Tuple[List[int], Optional[Tuple[Optional[str], str]]]:
    """The output dims among ``gj`` that adapt to the channel count, and the
    (module, attribute) that holds that count, if the model read it from one."""
    if requested is None:  # no sizes as written: the dims that are not 1
        adaptive = [d for d in gj if s_out[d] != 1]
        return (adaptive or gj[:1]), None
    adaptive = [d for d in gj if isinstance(requested[d], ChannelCount) or (requested[d] == -1 and not isinstance(requested[d], bool))]
    if adaptive:
        return adaptive, None
    heads = [d for d in gj if isinstance(requested[d], HeadCount)]
    if len(heads) == 1:
        # (..., self.num_heads, self.head_dim): whole heads go, and
        # the head count is rewritten when pruning
        return heads, (requested[heads[0]].module, requested[heads[0]].attr)
    # a literal size may be a module attribute (Conv1D.nf, ...): if
    # exactly one dim matches exactly one int attribute, that dim
    # follows the channels and the attribute is rewritten when pruning
    cands = [(d, names) for d in gj for names in [rec.modules.int_attrs_equal(requested[d])] if len(names) == 1]
    if len(cands) == 1:
        return [cands[0][0]], (rec.module, cands[0][1][0])
    return [], None


def _ids_of_dim(rec: Recorder, t: CompactTrace, shape_in: List[int], vdim_in: int, shape_out: List[int], k: int) -> torch.Tensor:
    """The atoms along output dim ``k`` of a group of dims reshaped from
    ``shape_in`` (channels along ``vdim_in``) to ``shape_out``: atoms that
    meet in one position of dim ``k`` are coupled."""
    ids_shape = [1] * len(shape_in)
    ids_shape[vdim_in] = t.ids.numel()
    block = t.ids.reshape(ids_shape).expand(shape_in).reshape(shape_out)
    if block.dim() > 1:
        rows = block.movedim(k, 0).reshape(block.shape[k], -1)
        if rows.shape[1] > 1 and not bool((rows == rows[:, :1]).all()):
            reps = [rec.couple(r) for r in rows]
            return torch.tensor(reps, dtype=torch.long)
        return rows[:, 0].clone()
    return block.clone()


def _split_heads_of(rec: Recorder, t: CompactTrace, gj: List[int], requested: List[Any]) -> Optional[List[Any]]:
    """For a channel split ``(..., heads, C // heads)`` whose head count is a
    module attribute (:class:`HeadCount`) and whose head size is computed from
    another tensor's ``C`` channels: couple every C-block of the split
    channels with those C channels position by position (their counts stay
    equal) and return the sizes with the head size as a plain int, so that
    the heads dim is the one that shrinks. None when they do not fit."""
    heads = [d for d in gj if isinstance(requested[d], HeadCount)]
    sized = [d for d in gj if isinstance(requested[d], ChannelCount)]
    if len(heads) != 1 or len(sized) != 1:
        return None
    base = [a for a in (requested[sized[0]].base or ())]
    n = t.ids.numel()
    if not base or min(base) < 0 or n % len(base):
        return None
    blocks = n // len(base)
    rec.union_pairs(torch.tensor(base, dtype=torch.long).expand(blocks, len(base)), t.ids.reshape(blocks, len(base)))
    retry = list(requested)
    retry[sized[0]] = int(retry[sized[0]])
    return retry


def _requested_shape(rec: Recorder, call: OpCall, x: torch.Tensor) -> Optional[List[Any]]:
    """The shape arguments of reshape/view/unflatten as the model wrote them
    (ints, -1, or channel-carrying :class:`ChannelCount`), aligned to output dims."""
    name, args, kwargs = call.base, call.args, call.kwargs
    if name in ("view_as", "reshape_as", "expand_as"):
        other = call.arg(1, "other")
        if not isinstance(other, torch.Tensor):
            return None
        t = rec.get(other)
        base = tuple(t.ids.tolist()) if t is not None and t.vdim is not None else None
        return [ChannelCount(v, base) if t is not None and d == t.vdim else int(v) for d, v in enumerate(other.shape)]
    if name in ("reshape", "view", "expand", "broadcast_to"):
        shape = kwargs.get("shape", kwargs.get("size"))
        if shape is None:
            rest = list(args[1:])
            shape = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
        if any(isinstance(v, torch.dtype) for v in shape):
            return None
        return list(shape)
    if name == "unflatten":
        dim = call.arg(1, "dim")
        sizes = list(call.arg(2, "sizes"))
        dim %= x.dim()
        return [None] * dim + sizes + [None] * (x.dim() - dim - 1)
    return None


def follows(rec: Recorder, size: ChannelCount, ids: torch.Tensor) -> bool:
    """Will ``size`` (read from some tensor's channel dim) still equal the
    number of channels ``ids`` after pruning? True when it was read from the
    same channels, or (same length) once the two are coupled."""
    if size.base is None:
        return False
    find = rec.sources.find
    base_groups = {find(a) for a in size.base if a >= 0}
    own = {find(a) for a in ids.tolist() if a >= 0}
    if base_groups == own and len(size.base) % max(ids.numel(), 1) == 0:
        return True
    if base_groups == own and ids.numel() % len(size.base) == 0 and _repeats_each(rec, size.base, ids):
        # each channel repeated r times (repeat_kv: n_rep query heads per KV
        # head), the size ``channels * r``: it stays ``kept * r``
        return True
    if len(size.base) == ids.numel():
        rec.union_pairs(torch.tensor(size.base, dtype=torch.long), ids)
        return True
    return False


def _repeats_each(rec: Recorder, base: Sequence[int], ids: torch.Tensor) -> bool:
    """Every group of ``base`` appears in ``ids`` exactly ``r`` times as
    often as in ``base``, ``r = len(ids) / len(base)``."""
    from collections import Counter

    find = rec.sources.find
    r = ids.numel() // len(base)
    want = Counter(find(a) for a in base if a >= 0)
    have = Counter(find(a) for a in ids.tolist() if a >= 0)
    return have == Counter({g: n * r for g, n in want.items()})


def _follows_part(rec: Recorder, size: ChannelCount, ids: torch.Tensor, n: int) -> bool:
    """``size`` was computed from these very channels (e.g. ``C // 2``)."""
    if size.base is None or len(size.base) != ids.numel():
        return False
    find = rec.sources.find
    return [find(a) for a in size.base if a >= 0] == [find(a) for a in ids.tolist() if a >= 0]


def _split_of_channels(rec: Recorder, call: OpCall) -> Optional[Tuple[torch.Tensor, CompactTrace]]:
    """(input, its trace) of a chunk / split along the input's channel dim; else None."""
    x = call.args[0]
    t = rec.get(x)
    dim = call.arg(2, "dim", 0)
    if t is None or t.vdim is None or not isinstance(dim, int) or dim % x.dim() != t.vdim:
        return None
    return x, t


def _split_size_fast(rec: Recorder, call: OpCall) -> bool:
    """``split(C // n)`` along the channel dim (see :func:`_equal_parts`),
    with a size computed from these channels or held by the module."""
    split = _split_of_channels(rec, call)
    if split is None:
        return False
    x, t = split
    c = x.shape[t.vdim]
    size = call.arg(1, "split_size_or_sections", call.arg(1, "split_size"))
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0 or c % size:
        return False
    attr, total = None, False
    if not isinstance(size, ChannelCount):
        # split(self.split_size) (GPT-2): the attribute is rewritten to
        # the kept count of each (equal) part
        names = rec.modules.int_attrs_equal(size)
        if len(names) > 1:
            names = [k for k in names if "split" in k]
        if not names and c // size > 1:
            # split(self.expand_chs // 2) (CSPNet): the attribute holds the
            # whole width; it is rewritten to the kept total
            names, total = rec.modules.int_attrs_equal(c), True
        if len(names) != 1:
            return False
        attr = names[0]
    elif not _follows_part(rec, size, t.ids, c // size):
        return False
    return _equal_parts(rec, call, x, t, c // size, attr, total)


def _equal_parts(rec: Recorder, call: OpCall, x: torch.Tensor, t: CompactTrace, n: int,
                 attr: Optional[str], total: bool) -> bool:
    """``n`` equal parts along the channel dim: position j of every part is
    coupled, so after pruning all parts keep the same count and the op still
    splits at the right places (``attr``: the module attribute that holds the
    part's size, or with ``total`` the whole width)."""
    outs = call.outs
    if len(outs) != n:
        return False
    c = x.shape[t.vdim]
    parts = t.ids.reshape(n, c // n)
    merged = parts[0]
    for q in range(1, n):
        merged = rec.union_pairs(merged, parts[q])
    if attr is not None:
        # (the total: every part keeps the same count)
        rec.add_module_size((rec.module, attr, merged.tolist() * (n if total else 1), 1))
    for y in outs:
        rec.set(y, CompactTrace.along(merged, t.vdim, y.dim()) if merged.numel() > 1 else CompactTrace.scalar(int(merged[0]), y.dim()))
    return True


def _split_sections_fast(rec: Recorder, call: OpCall) -> bool:
    """``split([a, b, c])`` along the channel dim with sizes the module holds:
    the whole list as one attribute (MixNet's ``self.splits``: rewritten to the
    kept counts), or each size as an int attribute (``[self.key_dim,
    self.key_dim, self.val_dim]``: sections of one attribute are coupled
    position by position so they stay equal; the attribute is rewritten).
    Sections of any other literal size keep their channels."""
    name, outs = call.base, call.outs
    split = _split_of_channels(rec, call)
    if split is None:
        return False
    x, t = split
    sections = call.arg(1, "split_size_or_sections", call.arg(1, "split_sizes"))
    if not isinstance(sections, (list, tuple)) or len(sections) < 2 or len(sections) != len(outs):
        return False
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in sections):
        return False
    if sum(sections) != x.shape[t.vdim]:
        return False
    parts, start = [], 0
    for v in sections:
        parts.append(t.ids[start:start + v])
        start += v
    module = rec.modules.running()
    whole = [] if module is None else [
        k for k, v in vars(module).items()
        if not k.startswith("_") and isinstance(v, (list, tuple)) and len(v) == len(sections)
        and all(type(a) is int and a == b for a, b in zip(v, sections))
    ]
    where = rec.module or "<model>"
    if len(whole) == 1:
        is_tuple = isinstance(getattr(module, whole[0]), tuple)
        rec.couple_attribute_uses(rec.module, whole[0], t.ids.tolist())
        rec.graph.module_lists.append((rec.module, whole[0], [p.tolist() for p in parts], is_tuple))
    else:
        followed = False
        for i, v in enumerate(sections):
            names = [v.attr] if isinstance(v, HeadCount) else rec.modules.int_attrs_equal(v)
            if len(names) == 1:  # (add_module_size couples sections of one attribute)
                rec.add_module_size((rec.module, names[0], parts[i].tolist(), 1))
                followed = True
            else:
                rec.pin_ids(parts[i], f"'{name}' with a hard-coded section size ({where})")
        if not followed:
            return False
    for y, p in zip(outs, parts):
        rec.set(y, CompactTrace.along(p, t.vdim, y.dim()) if p.numel() > 1 else CompactTrace.scalar(int(p[0]), y.dim()))
    return True
