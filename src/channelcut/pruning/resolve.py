"""Resolve pruned channels into a :class:`PruningSpec`. Plain data, no torch.

Start at :func:`resolve`. The steps:

1. validate the request and turn it into, per consumer, the set of input
   channels it drops (``pruned_outputs`` drop a channel group everywhere);
2. decide which channel groups stay *present* in the pruned model:
   unconstrained, a group is removed when no consumer keeps it; constrained,
   when any consumer drops it. Pinned groups and groups that present ones
   depend on always stay;
3. reorder segments so subsets become contiguous (``reorder.py``);
4. write the spec: kept indices per parameter dim (in the new order), which
   consumers read a subset of their input, and what the mock masks.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Dict, Iterable, List, Mapping, Optional, Set, Tuple

from ..errors import (ChannelRangeError, EmptyLayerError, ExportError, NotPrunableError, RequestError,
                      UnknownParameterError)
from .reorder import LEFT, RIGHT, GroupVectors, Layout, find_segments, free_segments, one_segment, order_segment
from .spec import LayerStat, MaskAddition, MaskEntry, PruningSpec, Subselection
from .graph import TracedGraph

MODES = ("unconstrained", "constrained", "baseline")
# what copying one value costs, in multiply-accumulates (see _cheaper_superset)
DEFAULT_COPY_COST = 4.0


def _lookup(name: str, by_param: Dict[str, List[str]], ops: Mapping[str, object],
            aliases: Mapping[str, str]) -> Optional[List[str]]:
    """The op ids that ``name`` means: a weight by any of its names (a tied
    weight's alias means its first name), an op id, or a module's name."""
    canonical = aliases.get(name, name)
    if canonical in by_param:
        return by_param[canonical]
    if name in ops:
        return [name]
    weight = aliases.get(name + ".weight", name + ".weight")
    if weight in by_param:
        return by_param[weight]
    return None


def _in_its_role(graph: TracedGraph, name: str, ops: List[str]) -> List[str]:
    """A weight tied between layers of different kinds (an embedding table
    that is also the LM head) produces different channels in each: its output
    channels are those of the layer that ``name`` belongs to."""
    if len(ops) < 2 or len({graph.producers[op].kind for op in ops}) < 2:
        return ops
    module = graph.param_modules.get(name, graph.param_modules.get(name + ".weight"))
    where = {r.op: r.module for r in graph.ops}
    return [op for op in ops if where.get(op) == module] or ops


def _not_found(graph: TracedGraph, name: str, role: str) -> Exception:
    valid = list(graph.consumers_by_param) if role == "consumer" else list(graph.producers_by_param)
    other = graph.producers_by_param if role == "consumer" else graph.consumers_by_param
    aliases = graph.param_aliases
    canonical = aliases.get(name) or aliases.get(name + ".weight")
    shown = repr(name) + (f" (the same tensor as {canonical!r})" if canonical else "")
    name = canonical or name
    if name in graph.param_shapes or name in other or name + ".weight" in other:
        kinds = "consumers (conv/linear layers whose input channels can be cut)" if role == "consumer" else "producers (conv/linear/embedding layers whose output channels can be cut)"
        return NotPrunableError(
            f"{shown} is not one of the {kinds}. Valid names include: "
            + ", ".join(sorted(valid)[:8]) + (", ..." if len(valid) > 8 else "")
        )
    return UnknownParameterError(name, valid, what=f"{role} parameter")


def _check_channel(name: str, ch: object, n: int, what: str) -> int:
    if isinstance(ch, bool):
        raise ChannelRangeError(f"channel {ch!r} for {name!r} is a bool, not a channel index; give an index in 0..{n - 1}")
    if not isinstance(ch, int):
        try:
            import numbers

            if isinstance(ch, numbers.Integral):
                ch = int(ch)
            elif getattr(ch, "ndim", None) == 0 and hasattr(ch, "item") and type(ch.item()) is int:  # 0-d tensor
                ch = ch.item()
            else:
                raise TypeError
        except TypeError:
            raise ChannelRangeError(f"channel {ch!r} for {name!r} is not an integer; give an index in 0..{n - 1}") from None
    if not 0 <= ch < n:
        raise ChannelRangeError(f"channel {ch} out of range for {name!r}: it has {n} {what} channels (valid 0..{n - 1})")
    return ch


def resolve(
    graph: TracedGraph,
    pruned_inputs: Iterable[Tuple[str, int]] = (),
    pruned_outputs: Iterable[Tuple[str, int]] = (),
    mode: str = "unconstrained",
    reorder: bool = True,
    copy_cost: float = DEFAULT_COPY_COST,
) -> PruningSpec:
    """Compute the :class:`PruningSpec` for the given pruned channels.

    ``copy_cost``: the cost of copying one value, in multiply-accumulates;
    a consumer whose kept channels are not contiguous reads a contiguous
    superset with zero weight columns instead of gathering when that costs
    less (0 turns this off: always gather)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    src = graph.sources
    roots = src.roots()  # resolve never unions: one lookup table for every find
    find = roots.__getitem__
    groups = GroupVectors(roots)
    pinned = src.pinned_roots()
    for atoms, reason in graph.fixed_counts:
        gs = {find(a) for a in atoms}
        if len(gs) > 1:
            pinned |= gs
            for g in gs:
                src.pin(g, reason)  # recorded for reports (resolve never unions)

    # 1. per consumer op: dropped input positions --------------------------------
    dropped: Dict[str, Set[int]] = defaultdict(set)
    requested: Dict[str, Set[int]] = defaultdict(set)  # consumer weight -> channels named by the request
    by_name: Dict[str, Tuple[List[str], int]] = {}  # consumer name -> (its ops, input channels)
    for item in pruned_inputs:
        name, ch = _pair(item, "pruned_inputs")
        hit = by_name.get(name)
        if hit is None:
            ops = _lookup(name, graph.consumers_by_param, graph.consumers, graph.param_aliases)
            if ops is None:
                raise _not_found(graph, name, "consumer")
            hit = by_name[name] = (ops, len(graph.consumers[ops[0]].in_ids))
        ops, n = hit
        if type(ch) is not int or not 0 <= ch < n:
            ch = _check_channel(name, ch, n, "input")
        for op in ops:
            dropped[op].add(ch)
        requested[graph.consumers[ops[0]].param].add(ch)
    removed_req: Set[int] = set()
    requested_outputs: List[str] = []
    outputs_of_group: Dict[int, List[str]] = defaultdict(list)  # removed group -> the request's names for it
    for item in pruned_outputs:
        name, ch = _pair(item, "pruned_outputs")
        requested_outputs.append(f"{name}[{ch}]")
        ops = _lookup(name, graph.producers_by_param, graph.producers, graph.param_aliases)
        if ops is None:
            raise _not_found(graph, name, "producer")
        ops = _in_its_role(graph, name, ops)
        for op in ops:
            out_ids = graph.producers[op].out_ids
            ch = _check_channel(name, ch, len(out_ids), "output")
            a = out_ids[ch]
            reason = src.pinned_reason(a)
            if reason is not None:
                raise NotPrunableError(f"output channel {ch} of {name!r} can not be removed: it {reason}")
            removed_req.add(find(a))
            outputs_of_group[find(a)].append(f"{name}[{ch}]")
    groups_of: Dict[str, List[int]] = {op: groups(c.in_ids) for op, c in graph.consumers.items()}  # (shared: read only)
    if removed_req:
        for op, gs in groups_of.items():
            for p, g in enumerate(gs):
                if g in removed_req:
                    dropped[op].add(p)
    # consumers sharing one weight drop the same columns and can not subselect
    # (constrained export never reads subsets: pruned channels that must stay
    # present become zero weight columns, so inference makes no copies)
    physical: Dict[str, bool] = {op: c.physical and mode != "constrained" for op, c in graph.consumers.items()}
    for param, ops in graph.consumers_by_param.items():
        if len(ops) > 1:
            shared: Set[int] = set().union(*(dropped.get(op, set()) for op in ops))
            for op in ops:
                physical[op] = False
                if shared:
                    dropped[op] = set(shared)
    # a module holds one input selection: several consumers in one module
    # that read different tensors or channels (separate q/k/v projections of
    # nn.MultiheadAttention) keep zero columns instead
    by_module: Dict[str, List[str]] = defaultdict(list)
    for op, c in graph.consumers.items():
        if physical[op]:
            by_module[c.module or ""].append(op)
    for ops in by_module.values():
        if len({(tuple(graph.consumers[op].in_ids), frozenset(dropped.get(op, ()))) for op in ops}) > 1:
            for op in ops:
                physical[op] = False

    # every consumer keeps an input channel (checked first: a request that
    # empties a layer gets that error, even when it is invalid otherwise too;
    # constrained growth below never empties a consumer)
    for op, c in graph.consumers.items():
        if len(dropped.get(op, ())) >= len(c.in_ids):
            why = ""
            if not removed_req.isdisjoint(groups_of[op]):
                why = (f" (pruned_outputs {', '.join(requested_outputs[:6])} remove the channel groups "
                       f"{c.param!r} reads; a group is every channel coupled with the one you named, e.g. by a "
                       "residual add, a norm over channels or attention)")
            raise EmptyLayerError(
                f"this would remove every input channel of {c.param!r} ({len(c.in_ids)} channels){why}; "
                "keep at least one channel of each layer"
            )

    # 2. which groups stay present --------------------------------------------
    kept_by_any: Set[int] = set()
    dropped_by_any: Set[int] = set()
    for op, gs in groups_of.items():
        d = dropped.get(op, ())
        for p, g in enumerate(gs):
            if g < 0:
                continue
            if p in d:
                dropped_by_any.add(g)
            else:
                kept_by_any.add(g)
    if mode == "constrained":
        absent = (dropped_by_any | removed_req)
    else:
        absent = (dropped_by_any - kept_by_any) | removed_req
    absent = {g for g in absent if g not in pinned}
    # a depthwise conv must keep a channel: torch has no conv with zero
    # groups (unless pruned_outputs removed them all: an EmptyLayerError below)
    conv_uses = [(param, [find(a) for a in ids if a >= 0]) for param, ids in graph.depthwise]

    def keep_a_channel_per_conv() -> bool:
        changed = False
        for _, gs in conv_uses:
            if gs and all(g in absent for g in gs):
                free = [g for g in gs if g not in removed_req]
                if free:
                    absent.discard(next((g for g in free if g in kept_by_any), free[0]))
                    changed = True
        return changed

    keep_a_channel_per_conv()
    if graph.needs and absent:
        adj: Dict[int, List[int]] = defaultdict(list)
        for a, b in graph.needs:
            adj[find(a)].append(find(b))
        stack = [g for g in adj if g not in absent]
        seen = set(stack)
        while stack:
            g = stack.pop()
            for h in adj.get(g, ()):
                if h in absent:
                    absent.discard(h)
                    if h in removed_req:
                        names = [f"{pr.param or pop}[{j}]" for pop, pr in graph.producers.items()
                                 for j, a in enumerate(pr.out_ids) if find(a) == h]
                        raise NotPrunableError(
                            f"pruned_outputs {', '.join(requested_outputs[:6])} can not be removed (with its group: "
                            f"{', '.join(names[:6])}{', ...' if len(names) > 6 else ''}): channels the model keeps "
                            "depend on all of them (e.g. attention scores or a gate computed from them); "
                            "prune the consumers that read them instead"
                        )
                if h not in seen:
                    seen.add(h)
                    stack.append(h)
    if mode == "constrained":
        # growing the pruned set must never empty a layer: a consumer left with
        # nothing keeps what it asked for; a producer left with nothing keeps
        # what any consumer asked for (the others mask those as zero columns)
        changed = True
        while changed:
            changed = False
            for op, gs in groups_of.items():
                d = dropped.get(op, ())
                if all(g in absent for p, g in enumerate(gs) if p not in d):
                    restore = {g for p, g in enumerate(gs) if p not in d and g >= 0}
                    if restore & absent:
                        absent -= restore
                        changed = True
            for p in graph.producers.values():
                gs = {find(a) for a in p.out_ids}
                if gs <= absent:
                    restore = gs & kept_by_any
                    if restore:
                        absent -= restore
                        changed = True
            changed = keep_a_channel_per_conv() or changed
        for op, gs in groups_of.items():
            extra = {p for p, g in enumerate(gs) if g in absent}
            if extra:
                dropped[op] |= extra

    # every consumer (checked above) and producer keeps something
    for param, gs in conv_uses:
        if gs and all(g in absent for g in gs):
            raise EmptyLayerError(
                f"this would remove every channel of {param!r} ({len(gs)} channels): pruned_outputs "
                f"{', '.join(requested_outputs[:6])} remove all the groups it passes through; keep at least one"
            )
    for op, p in graph.producers.items():
        if absent.issuperset(groups(p.out_ids)):
            raise EmptyLayerError(
                f"this would remove every output channel of {p.param or op!r} ({len(p.out_ids)} channels): "
                "no consumer keeps any of them; keep at least one"
            )

    # 3. reorder --------------------------------------------------------------
    seg_of, canon = find_segments(graph, groups)
    new_order: Dict[int, List[int]] = {}
    free: Set[int] = set()
    if mode == "unconstrained" and reorder:
        traces = [p.out_ids for p in graph.producers.values()]
        traces += [c.in_ids for c in graph.consumers.values()]
        traces += [u.ids for u in graph.param_uses]
        free = free_segments(graph, groups, seg_of, canon, traces, pinned)
        keeps_by_seg: Dict[int, List[frozenset]] = defaultdict(list)
        for op, gs in groups_of.items():
            if not physical[op] or graph.consumers[op].groups != 1:
                continue
            d = dropped.get(op, ())
            s = one_segment(gs, seg_of)
            if s is not None:  # the common case: the input is one segment
                if s in free:
                    keep = {g for p, g in enumerate(gs) if p not in d} if d else set(gs)
                    keep -= absent
                    if keep:  # (else it reads nothing from here)
                        keeps_by_seg[s].append(frozenset(keep))
                continue
            kept_pos = [p for p, g in enumerate(gs) if p not in d and (g < 0 or g not in absent)]
            if _hopeless(gs, d, absent, seg_of, free):
                continue  # it gathers whatever the order: leave the freedom to others
            touched = {seg_of.get(g) for g in gs if g >= 0} & free
            for s in touched:
                runs = [p for p, g in enumerate(gs) if g >= 0 and seg_of.get(g) == s]
                keep = {gs[p] for p in kept_pos if gs[p] >= 0 and seg_of.get(gs[p]) == s}
                if runs and runs[-1] - runs[0] + 1 == len(runs) and keep:
                    # one block of the consumer's input: does it also read kept
                    # channels just before / after it (a concat)?
                    if any(p < runs[0] for p in kept_pos):
                        keep.add(LEFT)
                    if any(p > runs[-1] for p in kept_pos):
                        keep.add(RIGHT)
                keeps_by_seg[s].append(frozenset(keep))
        for s in free:
            present = [g for g in canon[s] if g not in absent]
            order = order_segment(present, keeps_by_seg.get(s, []))
            if order != present:
                new_order[s] = order
    layout = Layout(groups, absent, seg_of, canon, new_order)

    # 4. write the spec ---------------------------------------------------------
    spec = PruningSpec(mode=mode)
    slices: Dict[str, Dict[int, List[int]]] = defaultdict(dict)
    full_sizes: Dict[Tuple[str, int], int] = {}

    def put(param: str, dim: int, kept: List[int], size: int, what: str) -> None:
        prev = slices[param].get(dim)
        if prev is not None and prev != kept:
            raise ExportError(
                f"internal inconsistency: {param!r} dim {dim} is sliced two different ways ({what}); "
                "please report this model"
            )
        slices[param][dim] = kept
        full_sizes[(param, dim)] = size

    for u in graph.param_uses:
        order = layout.order(u.ids)
        put(u.param, u.dim, list(map(u.positions.__getitem__, order)), graph.param_shapes[u.param][u.dim], "parameter alignment")
    for module, attr, ids, divisor in graph.module_sizes:
        new = len(layout.order(ids)) // divisor
        if new != len(ids) // divisor:
            spec.attributes.setdefault(module, {})[attr] = new
    for module, attr, sections, is_tuple in graph.module_lists:
        sizes = [len(layout.order(ids)) for ids in sections]
        if sizes != [len(ids) for ids in sections]:
            spec.attributes.setdefault(module, {})[attr] = tuple(sizes) if is_tuple else sizes

    masks: Dict[str, MaskEntry] = {}
    for op, c in graph.consumers.items():
        d = dropped.get(op, set())
        if d:
            m = masks.get(c.param)
            if m is None:
                masks[c.param] = MaskEntry(c.param, c.weight_dim, c.groups, sorted(d))
            else:
                m.channels = sorted(set(m.channels) | d)
        order = layout.order(c.in_ids)
        kept = [p for p in order if p not in d]
        zero_at = [i for i, p in enumerate(order) if p in d]
        if c.groups == 1:
            superset = None
            if physical[op] and len(kept) != len(order) and mode == "unconstrained" and copy_cost > 0:
                superset = _cheaper_superset(order, d, graph.param_shapes[c.param], c.weight_dim, copy_cost)
            if superset is not None:
                # read the smallest contiguous range as a view; the extra
                # channels meet zero weight columns (more MACs, no copy)
                lo, hi = superset
                put(c.param, c.weight_dim, order[lo:hi], graph.param_shapes[c.param][c.weight_dim], "consumer input")
                if hi - lo != len(order):
                    spec.subselections.append(
                        Subselection(op, c.module or "", c.param, c.activation_dim, list(range(lo, hi)), len(order)))
                zero_at = [i for i, p in enumerate(order[lo:hi]) if p in d]
                spec.superset_reads += 1
            elif physical[op]:
                put(c.param, c.weight_dim, kept, graph.param_shapes[c.param][c.weight_dim], "consumer input")
                if len(kept) != len(order):
                    pos = {p: i for i, p in enumerate(order)}
                    sub = Subselection(op, c.module or "", c.param, c.activation_dim, [pos[p] for p in kept], len(order))
                    spec.subselections.append(sub)
                zero_at = []
            else:
                put(c.param, c.weight_dim, order, graph.param_shapes[c.param][c.weight_dim], "consumer input")
        if zero_at:
            spec.zeros.append(MaskEntry(c.param, c.weight_dim, c.groups, zero_at))
        spec.consumers.append(LayerStat(c.param, c.kind, len(c.in_ids), len(kept)))
    spec.masks = list(masks.values())
    spec.requested = {p: sorted(chs) for p, chs in requested.items()}
    spec.additions = _additions(graph, groups_of, masks, requested, outputs_of_group, mode)
    if mode == "baseline":
        for s in spec.subselections:
            s.allow_view = False
    for op, p in graph.producers.items():
        gs = groups(p.out_ids)
        kept_out = len(gs) if absent.isdisjoint(gs) else sum(1 for g in gs if g not in absent)
        spec.producers.append(LayerStat(p.param or op, p.kind, len(gs), kept_out))
    # drop identity slices
    for param, dims in slices.items():
        for dim, kept in dims.items():
            if kept != list(range(full_sizes[(param, dim)])):
                spec.slices.setdefault(param, {})[dim] = kept
    all_groups = set(roots)
    spec.total_groups = len(all_groups)
    spec.removed_groups = len(absent)
    spec.pinned_groups = len(pinned)
    spec.barriers = list(graph.barriers)
    spec.segments = len(canon)
    spec.reordered_segments = len(new_order)
    return spec


def _additions(
    graph: TracedGraph,
    groups_of: Dict[str, List[int]],
    masks: Dict[str, MaskEntry],
    requested: Dict[str, Set[int]],
    outputs_of_group: Dict[int, List[str]],
    mode: str,
) -> List[MaskAddition]:
    """Every input channel masked beyond the request, with why: a
    ``pruned_outputs`` group that flows into it, or (constrained) another
    reader of its channel group that drops it."""
    dropper: Dict[int, str] = {}  # group -> a requested (consumer, channel) that drops it
    for param, chans in requested.items():
        gs = groups_of[graph.consumers_by_param[param][0]]
        for ch in sorted(chans):
            if gs[ch] >= 0:
                dropper.setdefault(gs[ch], f"{param}[{ch}]")
    out: List[MaskAddition] = []
    for param, entry in masks.items():
        extra = sorted(set(entry.channels) - requested.get(param, set()))
        if not extra:
            continue
        ops = graph.consumers_by_param[param]
        by_reason: Dict[str, List[int]] = {}
        for ch in extra:
            gs = {groups_of[op][ch] for op in ops}
            removed = sorted({n for g in gs for n in outputs_of_group.get(g, ())})
            readers = sorted({dropper[g] for g in gs if g in dropper})
            if removed:
                reason = f"pruned_outputs {', '.join(removed[:4])} remove its channel group"
            elif mode == "constrained" and readers:
                reason = (f"constrained export: its channel group is also read by {', '.join(readers[:4])}, "
                          "which the request drops")
            else:
                reason = "the weight is shared with a call the request drops it from"
            by_reason.setdefault(reason, []).append(ch)
        out += [MaskAddition(param, chans, reason) for reason, chans in by_reason.items()]
    return out


def _cheaper_superset(
    order: List[int], dropped: Set[int], wshape: Tuple[int, ...], weight_dim: int, copy_cost: float
) -> Optional[Tuple[int, int]]:
    """For a consumer whose kept channels are not one range: the range
    ``(lo, hi)`` of its input to read as a view instead of gathering, when
    that is estimated cheaper, else None.

    Cost per input position: a gather copies the kept values, each
    costing ``copy_cost`` multiply-accumulates (bytes moved vs FLOPs; see
    :func:`channelcut.pruning.costs.calibrate_copy_cost`); reading the range
    instead adds ``extra * macs_per_channel`` MACs for its ``extra`` dropped
    channels (``macs_per_channel``: the weight's other dims, e.g. out
    channels x kernel area).
    """
    idx = [i for i, p in enumerate(order) if p not in dropped]
    lo, hi = idx[0], idx[-1] + 1
    if hi - lo == len(idx):
        return None  # already one range: a view anyway
    macs_per_channel = 1
    for k, n in enumerate(wshape):
        if k != weight_dim:
            macs_per_channel *= n
    extra = (hi - lo) - len(idx)
    if extra * macs_per_channel <= copy_cost * len(idx):
        return lo, hi
    return None


def _hopeless(gs: List[int], dropped: Set[int], absent: Set[int], seg_of: Dict[int, int], free: Set[int]) -> bool:
    """True when no reordering can make this consumer's read contiguous: its
    input is a sequence of blocks (one free segment each, or runs of channels
    whose order is fixed); between the first and last block it keeps from,
    every block must be read whole, and a fixed-order block must already be
    read as one range at the right end."""
    blocks: List[Tuple[Optional[int], List[int], List[int]]] = []  # (segment, present, kept)
    for p, g in enumerate(gs):
        key = seg_of.get(g) if g >= 0 and seg_of.get(g) in free else None
        if g >= 0 and g in absent:
            continue
        if not blocks or blocks[-1][0] != key:
            blocks.append((key, [], []))
        blocks[-1][1].append(p)
        if p not in dropped:
            blocks[-1][2].append(p)
    used = [i for i, b in enumerate(blocks) if b[2]]
    if not used:
        return True
    first, last = used[0], used[-1]
    for i in range(first, last + 1):
        seg, present, kept = blocks[i]
        whole = len(kept) == len(present)
        if first < i < last and not whole:
            return True
        if seg is None and not whole:
            # fixed order: the kept positions must be one range at the right end
            where = {p: j for j, p in enumerate(present)}
            k0, k1 = where[kept[0]], where[kept[-1]]
            contiguous = k1 - k0 + 1 == len(kept)
            if not contiguous or (i < last and k1 != len(present) - 1) or (i > first and k0 != 0):
                return True
    return False


def _pair(item: object, what: str) -> Tuple[str, int]:
    if not isinstance(item, (tuple, list)) or len(item) != 2 or not isinstance(item[0], str):
        raise RequestError(f"each entry of {what} must be a (parameter name, channel index) pair, got {item!r}")
    return item[0], item[1]  # type: ignore[return-value]
