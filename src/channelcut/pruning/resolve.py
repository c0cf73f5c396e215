"""Resolve pruned channels into a :class:`PruningSpec`. Plain data, no torch.

Start at :func:`resolve`. The steps:

1. validate the request and turn it into, per consumer, the set of input
   channels it drops (``pruned_outputs`` drop a channel group everywhere);
2. decide which channel groups stay *present* in the pruned model:
   unconstrained, a group is removed when no consumer keeps it; constrained,
   when any consumer drops it. Pinned groups and groups that present ones
   depend on always stay;
3. reorder segments so subsets become contiguous (:func:`reorder.plan_reorder`);
4. write the spec: kept indices per parameter dim (in the new order), which
   consumers read a subset of their input, and what the mock masks.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Set, Tuple

from ..errors import (ChannelRangeError, EmptyLayerError, ExportError, NotPrunableError, RequestError,
                      UnknownParameterError)
from .counts import names_a_width
from .reorder import GroupVectors, Layout, ReorderPlan, plan_reorder
from .rmsnorm import rescale_factor
from .spec import LayerStat, MaskAddition, MaskEntry, NormRescale, PruningSpec, Subselection
from .graph import TracedGraph

MODES = ("unconstrained", "constrained", "baseline")
# what copying one value costs, in multiply-accumulates (see _cheaper_superset)
DEFAULT_COPY_COST = 4.0
# the fixed cost of one view or gather op, in multiply-accumulates (0: not counted)
DEFAULT_OP_COST = 0.0


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


@dataclass
class Resolution:
    """What the phases of :func:`resolve` hand on to each other."""

    graph: TracedGraph
    mode: str
    roots: List[int]  # the group (root atom) of every atom
    groups: GroupVectors  # a trace's atoms -> their groups
    pinned: Set[int]  # groups that can never be removed
    # consumer op -> the input positions it drops
    dropped: Dict[str, Set[int]] = field(default_factory=lambda: defaultdict(set))
    # consumer weight -> the input channels the request named
    requested: Dict[str, Set[int]] = field(default_factory=lambda: defaultdict(set))
    removed_req: Set[int] = field(default_factory=set)  # groups pruned_outputs remove
    requested_outputs: List[str] = field(default_factory=list)  # "name[channel]", for messages
    outputs_of_group: Dict[int, List[str]] = field(default_factory=lambda: defaultdict(list))
    groups_of: Dict[str, List[int]] = field(default_factory=dict)  # consumer op -> groups of its input (read only)
    physical: Dict[str, bool] = field(default_factory=dict)  # consumer op -> may read a subset of its input
    absent: Set[int] = field(default_factory=set)  # groups the pruned model does not have
    kept_by_any: Set[int] = field(default_factory=set)  # groups some consumer keeps
    depthwise: List[Tuple[str, List[int]]] = field(default_factory=list)  # (weight, groups it passes)
    op_cost: float = 0.0  # the fixed cost of one view or gather, in MACs (see _cheaper_superset)

    @property
    def find(self):
        return self.roots.__getitem__


def resolve(
    graph: TracedGraph,
    pruned_inputs: Iterable[Tuple[str, int]] = (),
    pruned_outputs: Iterable[Tuple[str, int]] = (),
    mode: str = "unconstrained",
    reorder: bool = True,
    copy_cost: float = DEFAULT_COPY_COST,
    op_cost: float = DEFAULT_OP_COST,
) -> PruningSpec:
    """Compute the :class:`PruningSpec` for the given pruned channels.

    ``copy_cost``: the cost of copying one value, in multiply-accumulates;
    a consumer whose kept channels are not contiguous reads a contiguous
    superset with zero weight columns instead of gathering when that costs
    less (0 turns this off: always gather). ``op_cost``: the fixed cost of
    one view or gather op (a launch and a module call), in MACs; with it a
    consumer may read its whole input with zero columns, no op at all."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    r = _start(graph, mode)
    r.op_cost = float(op_cost)
    _read_inputs(r, pruned_inputs)  # 1. the request, per consumer
    _read_outputs(r, pruned_outputs)
    _choose_subset_readers(r)
    _check_no_consumer_emptied(r)
    _decide_presence(r)  # 2. which groups stay
    _keep_what_present_groups_need(r)
    if mode == "constrained":
        _grow_constrained(r)
    _check_no_layer_emptied(r)
    plan = plan_reorder(graph, r.groups, r.groups_of, r.dropped, r.absent, r.physical, r.pinned,
                        enabled=mode == "unconstrained" and reorder)  # 3. channel orders
    return _write_spec(r, plan, copy_cost)  # 4. the spec


def _start(graph: TracedGraph, mode: str) -> Resolution:
    """Groups and pins (resolve never unions: one lookup table for every
    find). Channel counts that must not change pin their groups."""
    src = graph.sources
    roots = src.roots()
    r = Resolution(graph, mode, roots, GroupVectors(roots), src.pinned_roots())
    for atoms, reason in graph.fixed_counts:
        gs = {roots[a] for a in atoms}
        if len(gs) > 1:
            r.pinned |= gs
            for g in gs:
                src.pin(g, reason)  # recorded for reports
    r.depthwise = [(param, [roots[a] for a in ids if a >= 0]) for param, ids in graph.depthwise]
    return r


def _read_inputs(r: Resolution, pruned_inputs: Iterable[Tuple[str, int]]) -> None:
    """Phase 1a: validate ``pruned_inputs``; each consumer op drops them."""
    graph = r.graph
    asked: Dict[str, List[Any]] = {}  # consumer name -> its channels, in the order given
    for item in pruned_inputs:
        if type(item) is tuple and len(item) == 2 and type(item[0]) is str:
            name, ch = item
        else:
            name, ch = _pair(item, "pruned_inputs")
        chans = asked.get(name)
        if chans is None:
            chans = asked[name] = []
        chans.append(ch)
    checked: List[Tuple[List[str], Set[int]]] = []
    for name, chans in asked.items():  # a layer at a time: its name, then its channels
        ops = _lookup(name, graph.consumers_by_param, graph.consumers, graph.param_aliases)
        if ops is None:
            raise _not_found(graph, name, "consumer")
        n = len(graph.consumers[ops[0]].in_ids)
        if not (all(type(ch) is int for ch in chans) and 0 <= min(chans) and max(chans) < n):
            chans = [ch if type(ch) is int and 0 <= ch < n else _check_channel(name, ch, n, "input") for ch in chans]
        checked.append((ops, set(chans)))
    for ops, chans in checked:  # every channel checked: record them
        for op in ops:
            r.dropped[op] |= chans
        r.requested[graph.consumers[ops[0]].param] |= chans


def _read_outputs(r: Resolution, pruned_outputs: Iterable[Tuple[str, int]]) -> None:
    """Phase 1b: validate ``pruned_outputs``; every consumer drops the
    channel groups they remove, wherever they flow."""
    graph, find = r.graph, r.find
    for item in pruned_outputs:
        name, ch = _pair(item, "pruned_outputs")
        r.requested_outputs.append(f"{name}[{ch}]")
        ops = _lookup(name, graph.producers_by_param, graph.producers, graph.param_aliases)
        if ops is None:
            raise _not_found(graph, name, "producer")
        for op in _in_its_role(graph, name, ops):
            out_ids = graph.producers[op].out_ids
            ch = _check_channel(name, ch, len(out_ids), "output")
            a = out_ids[ch]
            reason = graph.sources.pinned_reason(a)
            if reason is not None:
                raise NotPrunableError(f"output channel {ch} of {name!r} can not be removed: it {reason}")
            r.removed_req.add(find(a))
            r.outputs_of_group[find(a)].append(f"{name}[{ch}]")
    r.groups_of = {op: r.groups(c.in_ids) for op, c in graph.consumers.items()}
    if r.removed_req:
        for op, gs in r.groups_of.items():
            for p, g in enumerate(gs):
                if g in r.removed_req:
                    r.dropped[op].add(p)


def _choose_subset_readers(r: Resolution) -> None:
    """Which consumers may read a subset of their input (``physical``).
    Consumers sharing one weight drop the same columns and can not
    subselect; constrained export never reads subsets (pruned channels that
    must stay present become zero weight columns, so inference makes no
    copies); a module holds one input selection, so several consumers in one
    module that read different tensors or channels (separate q/k/v
    projections of nn.MultiheadAttention) keep zero columns instead; so does
    a consumer whose module's code reads an int attribute equal to the input
    width (``x.reshape(-1, self.hidden_dim)`` before the linear: a narrower
    input would not fit it)."""
    graph, dropped = r.graph, r.dropped
    physical = r.physical = {op: c.physical and r.mode != "constrained" for op, c in graph.consumers.items()}
    widths_read: Dict[str, Set[int]] = defaultdict(set)  # module -> values of the width attributes its code reads
    for module, attr in graph.read_attributes:
        held = graph.stored_widths.get((module, attr))
        if held is not None:
            widths_read[module].add(held[0])
    for op, c in graph.consumers.items():
        if physical[op] and len(c.in_ids) in widths_read.get(c.module or "", ()):
            physical[op] = False
    for ops in graph.consumers_by_param.values():
        if len(ops) > 1:
            shared: Set[int] = set().union(*(dropped.get(op, set()) for op in ops))
            for op in ops:
                physical[op] = False
                if shared:
                    dropped[op] = set(shared)
    by_module: Dict[str, List[str]] = defaultdict(list)
    for op, c in graph.consumers.items():
        if physical[op]:
            by_module[c.module or ""].append(op)
    for ops in by_module.values():
        if len({(tuple(graph.consumers[op].in_ids), frozenset(dropped.get(op, ()))) for op in ops}) > 1:
            for op in ops:
                physical[op] = False


def _check_no_consumer_emptied(r: Resolution) -> None:
    """Every consumer keeps an input channel (checked first: a request that
    empties a layer gets that error, even when it is invalid otherwise too;
    constrained growth never empties a consumer)."""
    for op, c in r.graph.consumers.items():
        if len(r.dropped.get(op, ())) >= len(c.in_ids):
            why = ""
            if not r.removed_req.isdisjoint(r.groups_of[op]):
                why = (f" (pruned_outputs {', '.join(r.requested_outputs[:6])} remove the channel groups "
                       f"{c.param!r} reads; a group is every channel coupled with the one you named, e.g. by a "
                       "residual add, a norm over channels or attention)")
                norms = sorted({n for n, a in r.graph.coupling_norms if r.roots[a] in r.removed_req})
                if norms:
                    why = (f" (pruned_outputs {', '.join(r.requested_outputs[:6])}: the channels {c.param!r} reads "
                           f"are coupled by {', '.join(norms[:3])}, which subtracts a mean over them; no rescaling "
                           "keeps that exact once a channel is removed, so they go together (an RMS norm is "
                           "rescaled exactly instead))")
            raise EmptyLayerError(
                f"this would remove every input channel of {c.param!r} ({len(c.in_ids)} channels){why}; "
                "keep at least one channel of each layer"
            )


def _decide_presence(r: Resolution) -> None:
    """Phase 2: unconstrained, a group is removed when no consumer keeps it;
    constrained, when any consumer drops it. Pinned groups always stay, and
    every depthwise conv keeps a channel."""
    dropped_by_any: Set[int] = set()
    kept = r.kept_by_any
    for op, gs in r.groups_of.items():
        d = r.dropped.get(op)
        if not d:
            kept.update(gs)
            continue
        n = len(gs)
        dropped_by_any.update(gs[p] for p in d if p < n)
        kept.update(map(gs.__getitem__, set(range(n)).difference(d)))
    dropped_by_any.discard(-1)
    kept.discard(-1)
    if r.mode == "constrained":
        absent = dropped_by_any | r.removed_req
    else:
        absent = (dropped_by_any - r.kept_by_any) | r.removed_req
    r.absent = {g for g in absent if g not in r.pinned}
    _keep_a_channel_per_depthwise_conv(r)


def _keep_a_channel_per_depthwise_conv(r: Resolution) -> bool:
    """torch has no conv with zero groups: a depthwise conv keeps a channel
    (unless pruned_outputs removed them all: an EmptyLayerError later).
    Returns whether anything changed."""
    changed = False
    for _, gs in r.depthwise:
        if gs and all(g in r.absent for g in gs):
            free = [g for g in gs if g not in r.removed_req]
            if free:
                r.absent.discard(next((g for g in free if g in r.kept_by_any), free[0]))
                changed = True
    return changed


def _keep_what_present_groups_need(r: Resolution) -> None:
    """Groups that present ones depend on (attention scores, a gate computed
    from them) stay; a requested output among them can not be removed."""
    graph, find, absent = r.graph, r.find, r.absent
    if not graph.needs or not absent:
        return
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
                if h in r.removed_req:
                    names = [f"{pr.param or pop}[{j}]" for pop, pr in graph.producers.items()
                             for j, a in enumerate(pr.out_ids) if find(a) == h]
                    raise NotPrunableError(
                        f"pruned_outputs {', '.join(r.requested_outputs[:6])} can not be removed (with its group: "
                        f"{', '.join(names[:6])}{', ...' if len(names) > 6 else ''}): channels the model keeps "
                        "depend on all of them (e.g. attention scores or a gate computed from them); "
                        "prune the consumers that read them instead"
                    )
            if h not in seen:
                seen.add(h)
                stack.append(h)


def _grow_constrained(r: Resolution) -> None:
    """Constrained export: every consumer drops every absent group it reads.
    Growing the pruned set must never empty a layer: a consumer left with
    nothing keeps what it asked for; a producer left with nothing keeps what
    any consumer asked for (the others mask those as zero columns)."""
    graph, find, absent = r.graph, r.find, r.absent
    changed = True
    while changed:
        changed = False
        for op, gs in r.groups_of.items():
            d = r.dropped.get(op, ())
            if all(g in absent for p, g in enumerate(gs) if p not in d):
                restore = {g for p, g in enumerate(gs) if p not in d and g >= 0}
                if restore & absent:
                    absent -= restore
                    changed = True
        for p in graph.producers.values():
            gs = {find(a) for a in p.out_ids}
            if gs <= absent:
                restore = gs & r.kept_by_any
                if restore:
                    absent -= restore
                    changed = True
        changed = _keep_a_channel_per_depthwise_conv(r) or changed
    for op, gs in r.groups_of.items():
        extra = {p for p, g in enumerate(gs) if g in absent}
        if extra:
            r.dropped[op] |= extra


def _check_no_layer_emptied(r: Resolution) -> None:
    """Every depthwise conv and producer keeps something (consumers were
    checked first)."""
    for param, gs in r.depthwise:
        if gs and all(g in r.absent for g in gs):
            raise EmptyLayerError(
                f"this would remove every channel of {param!r} ({len(gs)} channels): pruned_outputs "
                f"{', '.join(r.requested_outputs[:6])} remove all the groups it passes through; keep at least one"
            )
    for op, p in r.graph.producers.items():
        if r.absent.issuperset(r.groups(p.out_ids)):
            raise EmptyLayerError(
                f"this would remove every output channel of {p.param or op!r} ({len(p.out_ids)} channels): "
                "no consumer keeps any of them; keep at least one"
            )


class _Slices:
    """Kept indices per parameter dim; one dim sliced two ways is a bug."""

    def __init__(self, graph: TracedGraph) -> None:
        self.graph = graph
        self.kept: Dict[str, Dict[int, List[int]]] = defaultdict(dict)

    def put(self, param: str, dim: int, kept: List[int], what: str) -> None:
        prev = self.kept[param].get(dim)
        if prev is not None and prev != kept:
            raise ExportError(
                f"internal inconsistency: {param!r} dim {dim} is sliced two different ways ({what}); "
                "please report this model"
            )
        self.kept[param][dim] = kept

    def changed(self) -> Dict[str, Dict[int, List[int]]]:
        """Every slice that is not the identity."""
        out: Dict[str, Dict[int, List[int]]] = {}
        for param, dims in self.kept.items():
            for dim, kept in dims.items():
                n = self.graph.param_shapes[param][dim]
                if len(kept) != n or kept != list(range(n)):
                    out.setdefault(param, {})[dim] = kept
        return out


def _stored_widths(graph: TracedGraph, spec: PruningSpec, layout: Layout) -> None:
    """Int attributes that held the width of some of their module's tensors
    (``graph.stored_widths``), that the traced code never read and that no
    rule already rewrites (an untraced code path may read them), whose name
    may hold a width (``counts.names_a_width``), of modules with a pruned
    parameter in them: the new width when all those tensors keep
    one same count and no other attribute of the module held the same value
    (``spec.inferred_attributes``), else reported in ``spec.stale_attributes``
    and left alone."""
    explicit = {(m, a) for m, a, _, _ in graph.module_sizes} | {(m, a) for m, a, _, _ in graph.module_lists}
    # modules with a pruned parameter in them: the owners and all their ancestors
    pruned = {""} if spec.slices else set()
    for p in spec.slices:
        parts = (graph.param_modules.get(p) or "").split(".")
        pruned.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    # how many attributes of each module held each value
    holders = Counter((m, v) for (m, _), (v, _) in graph.stored_widths.items())
    for (module, attr), (old, id_lists) in graph.stored_widths.items():
        if (module, attr) in explicit or (module, attr) in graph.read_attributes or attr in spec.attributes.get(module, {}):
            continue
        if not names_a_width(attr) or module not in pruned:
            continue  # its name says it counts something else, or nothing in it changed
        new = sorted({len(layout.order(ids)) for ids in id_lists})
        if new == [old]:
            continue
        if len(new) == 1 and holders[module, old] == 1:
            spec.attributes.setdefault(module, {})[attr] = new[0]
            spec.inferred_attributes.append((module, attr))
        else:
            spec.stale_attributes.append((module, attr, old, new))


def _write_spec(r: Resolution, plan: ReorderPlan, copy_cost: float) -> PruningSpec:
    """Phase 4: kept indices per parameter dim (in the new order), which
    consumers read a subset of their input, what the mock masks, and the
    report."""
    graph, layout = r.graph, plan.layout
    spec = PruningSpec(mode=r.mode)
    slices = _Slices(graph)
    for u in graph.param_uses:
        slices.put(u.param, u.dim, list(map(u.positions.__getitem__, layout.order(u.ids))), "parameter alignment")
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
        d = r.dropped.get(op, set())
        if d:
            m = masks.get(c.param)
            if m is None:
                masks[c.param] = MaskEntry(c.param, c.weight_dim, c.groups, sorted(d))
            else:
                m.channels = sorted(set(m.channels) | d)
        _consumer_read(r, spec, slices, op, layout.order(c.in_ids), d, copy_cost)
    spec.slices = slices.changed()
    _stored_widths(graph, spec, layout)
    spec.masks = list(masks.values())
    spec.requested = {p: sorted(chs) for p, chs in r.requested.items()}
    spec.additions = _additions(graph, r.groups_of, masks, r.requested, r.outputs_of_group, r.mode)
    _rescale_rms_norms(r, spec, layout)
    if r.mode == "baseline":
        for s in spec.subselections:
            s.allow_view = False
    for op, p in graph.producers.items():
        gs = r.groups(p.out_ids)
        kept_out = len(gs) if r.absent.isdisjoint(gs) else len(gs) - sum(map(r.absent.__contains__, gs))
        spec.producers.append(LayerStat(p.param or op, p.kind, len(gs), kept_out))
    spec.total_groups = len(set(r.roots))
    spec.removed_groups = len(r.absent)
    spec.pinned_groups = len(r.pinned)
    spec.barriers = list(graph.barriers)
    spec.segments = plan.segments
    spec.reordered_segments = plan.reordered
    return spec


def _rescale_rms_norms(r: Resolution, spec: PruningSpec, layout: Layout) -> None:
    """An RMS norm that loses channels is rescaled (``rmsnorm.py``); that is
    exact when the removed channels are zero at its input, so the reference
    and the mock zero them where they are made: every producer's rows (and
    bias entries) in the removed groups, reported as additions."""
    graph = r.graph
    seen = set()
    gone: Dict[int, str] = {}  # removed group -> the norm that needs it zero
    for use in graph.rms_norms:
        d, kept = len(use.ids), len(layout.order(use.ids))
        if kept == d or use.eps_attr is None:
            continue
        for g in r.groups(use.ids):
            if g in r.absent:
                gone.setdefault(g, use.module or use.weight or "?")
        key = (use.module, use.eps_attr)
        if key not in seen:
            seen.add(key)
            spec.rescales.append(NormRescale(use.module, use.weight, use.eps_attr, use.eps * d / kept,
                                             rescale_factor(d, kept), use.plus_one, use.float32))
    if not gone:
        return
    rows: Dict[Tuple[str, int], Set[int]] = defaultdict(set)  # (tensor, dim) -> indices zeroed at the source
    norms: Dict[Tuple[str, int], Set[str]] = defaultdict(set)
    for p in graph.producers.values():
        if p.param is None:
            continue
        for j, a in enumerate(p.out_ids):
            g = r.roots[a]
            if g in gone:
                for key in [(p.param, p.out_dim)] + ([(p.bias, 0)] if p.bias else []):
                    rows[key].add(j)
                    norms[key].add(gone[g])
    for (param, dim), chans in rows.items():
        ordered = sorted(chans)
        spec.masks.append(MaskEntry(param, dim, 1, ordered))
        names = sorted(norms[(param, dim)])
        spec.additions.append(MaskAddition(
            param, ordered, f"removed from the channels RMS norm {', '.join(names[:3])} normalises: the norm is "
            "rescaled, which is exact when they are zero where they are made", dim))


def _consumer_read(r: Resolution, spec: PruningSpec, slices: _Slices, op: str, order: List[int], d: Set[int],
                   copy_cost: float) -> None:
    """How consumer ``op`` reads its input (channel positions ``order`` in
    the pruned layout, dropping ``d``): its weight's kept columns, a
    Subselection (a view or a gather), or zero columns."""
    c = r.graph.consumers[op]
    physical = r.physical[op]
    kept = [p for p in order if p not in d] if d else list(order)
    zero_at: Optional[List[int]] = None  # positions of ``order`` read with zero weight columns
    if c.groups == 1:
        superset = None
        if physical and len(kept) != len(order) and r.mode == "unconstrained" and copy_cost > 0:
            superset = _cheaper_superset(order, d, r.graph.param_shapes[c.param], c.weight_dim, copy_cost,
                                         r.op_cost, c.positions)
        if superset is not None:
            # read the smallest contiguous range as a view; the extra
            # channels meet zero weight columns (more MACs, no copy)
            lo, hi = superset
            slices.put(c.param, c.weight_dim, order[lo:hi], "consumer input")
            if hi - lo != len(order):
                spec.subselections.append(
                    Subselection(op, c.module or "", c.param, c.activation_dim, list(range(lo, hi)), len(order)))
            zero_at = [i for i, p in enumerate(order[lo:hi]) if p in d]
            spec.superset_reads += 1
        elif physical:
            slices.put(c.param, c.weight_dim, kept, "consumer input")
            if len(kept) != len(order):
                at = [i for i, p in enumerate(order) if p not in d]
                spec.subselections.append(Subselection(op, c.module or "", c.param, c.activation_dim, at, len(order)))
            zero_at = []
        else:
            slices.put(c.param, c.weight_dim, order, "consumer input")
    if zero_at is None:
        zero_at = [i for i, p in enumerate(order) if p in d] if d else []
    if zero_at:
        spec.zeros.append(MaskEntry(c.param, c.weight_dim, c.groups, zero_at))
    spec.consumers.append(LayerStat(c.param, c.kind, len(c.in_ids), len(kept)))


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
    order: List[int], dropped: Set[int], wshape: Tuple[int, ...], weight_dim: int, copy_cost: float,
    op_cost: float = 0.0, positions: int = 1,
) -> Optional[Tuple[int, int]]:
    """For a consumer that drops some input channels: the range ``(lo, hi)``
    of its input to read as a view (or, ``(0, n)``, the whole input: no op
    at all) with zero weight columns for the dropped channels inside it, when
    that is estimated cheaper than the plain read (a view of a contiguous
    kept range, else a gather); else None.

    Costs per output position, in multiply-accumulates: a gather copies the
    kept values, each costing ``copy_cost`` (bytes moved vs FLOPs; see
    :func:`channelcut.pruning.costs.calibrate_copy_cost`); reading a range
    adds ``extra * macs_per_channel`` MACs for its ``extra`` dropped channels
    (``macs_per_channel``: the weight's other dims, e.g. out channels x
    kernel area); every view or gather is also one op of fixed cost
    ``op_cost`` (a kernel launch and a module call, what dominates a GPU at
    batch 1), spread over the call's ``positions``. With ``op_cost`` 0 a
    contiguous kept range is always a view.
    """
    idx = [i for i, p in enumerate(order) if p not in dropped]
    lo, hi = idx[0], idx[-1] + 1
    macs_per_channel = 1
    for k, n in enumerate(wshape):
        if k != weight_dim:
            macs_per_channel *= n
    per_op = op_cost / max(positions, 1)
    whole = (len(order) - len(idx)) * macs_per_channel  # read everything: no op
    if hi - lo == len(idx):  # one range already: a view, unless no op at all costs less
        return (0, len(order)) if op_cost > 0 and whole < per_op else None
    gather = copy_cost * len(idx) + per_op
    ranged = ((hi - lo) - len(idx)) * macs_per_channel + (per_op if hi - lo != len(order) else 0)
    if op_cost > 0 and whole < min(gather, ranged):
        return 0, len(order)
    if ranged <= gather:
        return lo, hi
    return None


def _pair(item: object, what: str) -> Tuple[str, int]:
    if not isinstance(item, (tuple, list)) or len(item) != 2 or not isinstance(item[0], str):
        raise RequestError(f"each entry of {what} must be a (parameter name, channel index) pair, got {item!r}")
    return item[0], item[1]  # type: ignore[return-value]
