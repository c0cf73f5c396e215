"""Channel reordering: make each consumer's subset a contiguous range (a view).

Plain data, no torch. Start at :func:`plan_reorder`, then :class:`Layout`.

A **segment** is a set of channel groups that are laid out together: all the
groups one producer emits (and, through residual adds, every producer summed
with it). Permuting a segment permutes the output rows of all its producers,
the matching per-channel parameters, and the input columns of all its
consumers, so the network computes the same thing in a new channel order.

A segment may be permuted only when every trace shows it as whole, canonical
blocks (each group possibly repeated, as after ``flatten``), no group of it is
pinned (pinned groups are exactly where literal channel positions matter), and
no parameter aligned with it is shared by two different uses.

The order itself: consumers that keep a proper subset of a segment define a
consumer x group incidence; we want every consumer's groups consecutive (the
consecutive-ones property). :func:`order_segment` works on classes of groups
with equal membership: an exact test (:func:`consecutive_order`) finds an
order with zero copies whenever one exists; when none does, it minimises the
channels copied (exhaustively up to 12 classes, else greedily) and then tries
to keep the largest consumers contiguous.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from itertools import groupby
from typing import Any, Callable, Dict, FrozenSet, Iterable, List, Optional, Sequence, Set, Tuple

from .graph import TracedGraph, is_tiling


class GroupVectors:
    """The group of every atom of a trace (``-1`` stays ``-1``), computed once
    per distinct trace (many traces repeat: a conv's outputs, its bias and
    the norm after it): ``roots`` is :meth:`SourceTable.roots`. The vectors
    returned are shared: read them, never change them."""

    def __init__(self, roots: List[int]) -> None:
        self.roots = roots
        self._cache: Dict[Tuple[int, ...], List[int]] = {}

    def __call__(self, ids: Sequence[int]) -> List[int]:
        key = tuple(ids)
        gs = self._cache.get(key)
        if gs is None:
            roots = self.roots
            if not key or min(key) >= 0:
                gs = list(map(roots.__getitem__, key))
            else:
                gs = [roots[a] if a >= 0 else -1 for a in key]
            self._cache[key] = gs
        return gs


def one_segment(gs: Sequence[int], seg_of: Dict[int, int]) -> Optional[int]:
    """The segment of a group vector whose groups all lie in one segment
    (most traces: a conv's input, a norm's parameters), else None."""
    s = seg_of.get(gs[0]) if gs else None
    if s is None or len(set(map(seg_of.get, gs))) != 1:
        return None
    return s


def segments_per_channel(gs: Sequence[int], seg_of: Dict[int, int]) -> List[Optional[int]]:
    """The segment of each channel of a group vector (None: no group, or a
    group in no segment)."""
    get = seg_of.get
    return [get(g) if g >= 0 else None for g in gs]


@dataclass
class ReorderPlan:
    """What :func:`plan_reorder` decided: the pruned layout, how many
    segments there are and how many got a new order."""

    layout: "Layout"
    segments: int
    reordered: int


def plan_reorder(
    graph: TracedGraph,
    groups: GroupVectors,
    groups_of: Dict[str, List[int]],
    dropped: Dict[str, Set[int]],
    absent: Set[int],
    physical: Dict[str, bool],
    pinned: Set[int],
    enabled: bool = True,
) -> ReorderPlan:
    """Order every free segment so that each consumer's kept channels are one
    contiguous range where possible (:func:`order_segment`), and return the
    pruned layout. ``groups_of``: consumer op -> the groups of its input;
    ``dropped``: consumer op -> the input positions it drops; ``absent``:
    the groups the pruned model does not have; ``physical``: consumer op ->
    whether it may read a subset. With ``enabled`` False every segment keeps
    its order (constrained and baseline export)."""
    seg_of, canon = find_segments(graph, groups)
    new_order: Dict[int, List[int]] = {}
    if enabled:
        traces = [p.out_ids for p in graph.producers.values()]
        traces += [c.in_ids for c in graph.consumers.values()]
        traces += [u.ids for u in graph.param_uses]
        free = free_segments(graph, groups, seg_of, canon, traces, pinned)
        keeps_by_seg = _keeps_by_segment(graph, groups_of, dropped, absent, physical, seg_of, free)
        for s in free:
            present = [g for g in canon[s] if g not in absent]
            order = order_segment(present, keeps_by_seg.get(s, []))
            if order != present:
                new_order[s] = order
    return ReorderPlan(Layout(groups, absent, seg_of, canon, new_order), len(canon), len(new_order))


def _keeps_by_segment(
    graph: TracedGraph,
    groups_of: Dict[str, List[int]],
    dropped: Dict[str, Set[int]],
    absent: Set[int],
    physical: Dict[str, bool],
    seg_of: Dict[int, int],
    free: Set[int],
) -> Dict[int, List[FrozenSet[int]]]:
    """Free segment -> the sets of its groups that each consumer keeps (with
    :data:`LEFT`/:data:`RIGHT` where a consumer also reads kept channels just
    before or after the segment's block: a concat)."""
    keeps_by_seg: Dict[int, List[FrozenSet[int]]] = defaultdict(list)
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
        if _hopeless(gs, d, absent, seg_of, free):
            continue  # it gathers whatever the order: leave the freedom to others
        kept_pos = [p for p, g in enumerate(gs) if p not in d and (g < 0 or g not in absent)]
        kept_set = set(kept_pos)
        at: Dict[int, List[int]] = {}  # free segment -> the positions of its channels (one pass over the input)
        for p, s in enumerate(segments_per_channel(gs, seg_of)):
            if s in free:
                at.setdefault(s, []).append(p)
        for s, runs in at.items():
            keep = {gs[p] for p in runs if p in kept_set}
            if runs[-1] - runs[0] + 1 == len(runs) and keep:
                # one block of the consumer's input: does it also read kept
                # channels just before / after it (a concat)?
                if kept_pos[0] < runs[0]:
                    keep.add(LEFT)
                if kept_pos[-1] > runs[-1]:
                    keep.add(RIGHT)
            keeps_by_seg[s].append(frozenset(keep))
    return keeps_by_seg


def _hopeless(gs: List[int], dropped: Set[int], absent: Set[int], seg_of: Dict[int, int], free: Set[int]) -> bool:
    """True when no reordering can make this consumer's read contiguous: its
    input is a sequence of blocks (one free segment each, or runs of channels
    whose order is fixed); between the first and last block it keeps from,
    every block must be read whole, and a fixed-order block must already be
    read as one range at the right end."""
    blocks: List[Tuple[Optional[int], List[int], List[int]]] = []  # (segment, present, kept)
    seg_get = seg_of.get
    cur: Any = ()  # the segment key of the last block (no key is ())
    present: List[int] = []
    kept: List[int] = []
    for p, g in enumerate(gs):
        if g >= 0:
            if g in absent:
                continue
            key = seg_get(g)
            if key not in free:
                key = None
        else:
            key = None
        if key != cur or not blocks:
            present, kept = [], []
            blocks.append((key, present, kept))
            cur = key
        present.append(p)
        if p not in dropped:
            kept.append(p)
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



class Layout:
    """Physical order of a tensor's present channels.

    ``order(ids)`` returns the original positions of the present channels of a
    trace, in the order the pruned model stores them.
    """

    def __init__(
        self,
        groups: Callable[[Sequence[int]], List[int]],
        absent: Set[int],
        seg_of: Dict[int, int],
        canon: Dict[int, List[int]],
        new_order: Dict[int, List[int]],
    ) -> None:
        self.groups = groups
        self.absent = absent
        self.seg_of = seg_of
        self.canon = canon
        self.new_order = new_order  # only reordered segments; present groups only
        # per reordered segment: the canonical index of each group, in the new order
        self.perm = {s: list(map({g: i for i, g in enumerate(canon[s])}.__getitem__, o)) for s, o in new_order.items()}
        self._cache: Dict[Tuple[int, ...], List[int]] = {}

    def order(self, ids: Sequence[int]) -> List[int]:
        """(cached per distinct trace: do not change the result)"""
        key = tuple(ids)
        hit = self._cache.get(key)
        if hit is None:
            hit = self._cache[key] = self._order(ids)
        return hit

    def _order(self, ids: Sequence[int]) -> List[int]:
        gs = self.groups(ids)
        absent = self.absent
        one = one_segment(gs, self.seg_of)
        if one is not None:
            if one not in self.new_order:  # kept in place: drop what is absent
                return list(range(len(gs))) if absent.isdisjoint(gs) else [p for p, g in enumerate(gs) if g not in absent]
            res: List[int] = []
            self._reordered(gs, 0, len(gs), one, res)
            return res
        res = []
        n = len(gs)
        p = 0
        while p < n:
            g = gs[p]
            s = self.seg_of.get(g) if g >= 0 else None
            if s is None or s not in self.new_order:
                if g < 0 or g not in absent:
                    res.append(p)
                p += 1
                continue
            q = p
            while q < n and gs[q] >= 0 and self.seg_of.get(gs[q]) == s:
                q += 1
            self._reordered(gs, p, q, s, res)
            p = q
        return res

    def _reordered(self, gs: List[int], p: int, q: int, s: int, res: List[int]) -> None:
        """Append positions ``p..q-1`` (whole tiles of reordered segment ``s``:
        each group repeated m times, tiled) in the new order."""
        m = 1
        while p + m < q and gs[p + m] == gs[p]:
            m += 1
        perm = self.perm[s]
        block = m * len(self.canon[s])
        for b in range(p, q, block):
            if m == 1:
                res.extend([b + i for i in perm] if b else perm)
            else:
                for i in perm:
                    res.extend(range(b + i * m, b + i * m + m))


def find_segments(graph: TracedGraph, groups: Callable[[Sequence[int]], List[int]]) -> Tuple[Dict[int, int], Dict[int, List[int]]]:
    """Group -> segment id, and each segment's canonical group order.

    Producers that share a group (summed by a residual add) are one segment:
    a union-find over producers, joined wherever a group was seen before."""
    producers = list(graph.producers.values())
    parent = list(range(len(producers)))

    def pfind(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: Dict[int, int] = {}  # group -> first producer that emits it
    producer_groups = []
    setdefault = owner.setdefault
    for i, p in enumerate(producers):
        gs = groups(p.out_ids)
        producer_groups.append(gs)
        for j in {setdefault(g, i) for g in gs}:  # the earlier producers it shares a group with
            if j != i:
                ri, rj = pfind(i), pfind(j)
                if ri != rj:
                    parent[max(ri, rj)] = min(ri, rj)
    # a segment is named by its first producer's first group
    name = [producer_groups[pfind(i)][0] for i in range(len(producers))]
    seg_of: Dict[int, int] = {g: name[i] for g, i in owner.items()}
    size: Dict[int, int] = {}
    for s in seg_of.values():
        size[s] = size.get(s, 0) + 1
    canon: Dict[int, List[int]] = {}
    for gs in producer_groups:
        s = seg_of[gs[0]]
        if s in canon:
            continue
        seen = list(dict.fromkeys(gs))
        if len(seen) == size[s]:
            canon[s] = seen
    return seg_of, canon


def free_segments(
    graph: TracedGraph,
    groups: Callable[[Sequence[int]], List[int]],
    seg_of: Dict[int, int],
    canon: Dict[int, List[int]],
    traces: Iterable[Sequence[int]],
    pinned: Optional[Set[int]] = None,
) -> Set[int]:
    """Segments whose channel order may be changed (see module docstring)."""
    free = {s for s, c in canon.items() if len(c) > 1}
    if pinned is None:
        pinned = graph.sources.pinned_roots()
    for g in pinned:
        s = seg_of.get(g)
        if s is not None:
            free.discard(s)
    uses: Dict[Tuple[str, int], int] = {}
    for u in graph.param_uses:
        uses[(u.param, u.dim)] = uses.get((u.param, u.dim), 0) + 1
    for u in graph.param_uses:
        if uses[(u.param, u.dim)] > 1:
            free.difference_update(seg_of.get(g, -1) for g in groups(u.ids))
    for ops in graph.consumers_by_param.values():  # a weight read by several calls
        if len(ops) > 1:
            for op in ops:
                free.difference_update(seg_of.get(g, -1) for g in groups(graph.consumers[op].in_ids))
    seen: Set[Tuple[int, ...]] = set()
    for ids in traces:
        if not free:
            break
        key = tuple(ids)
        if key in seen:
            continue
        seen.add(key)
        gs = groups(ids)
        s = one_segment(gs, seg_of)
        if s is not None:
            if s in free and gs != canon[s] and not is_tiling(gs, canon[s]):
                free.discard(s)
            continue
        p = 0
        for s, run in groupby(segments_per_channel(gs, seg_of)):  # the input's blocks, one segment each
            q = p + sum(1 for _ in run)
            if s is not None and s in free and not is_tiling(gs[p:q], canon[s]):
                free.discard(s)
            p = q
    return free


LEFT, RIGHT = -2, -3  # sentinels: "this consumer also keeps channels before / after the block"


def order_segment(present: List[int], keeps: List[FrozenSet[int]]) -> List[int]:
    """Order ``present`` groups so each set in ``keeps`` is contiguous if possible.

    A keep set may contain ``LEFT`` / ``RIGHT``: the consumer also reads kept
    channels just before / after this block (a concat), so its groups must sit
    at that edge of the block to form one contiguous read.

    >>> order_segment([1, 2, 3, 4], [frozenset({2, 3}), frozenset({3, 4})])
    [1, 2, 3, 4]
    >>> order_segment([1, 2, 3, 4], [frozenset({1, 3})])
    [1, 3, 2, 4]
    >>> order_segment([1, 2, 3, 4, 5], [frozenset({1, 3}), frozenset({3, 5})])
    [1, 3, 5, 2, 4]
    >>> order_segment([0, 1, 2, 3], [frozenset({0, 2, 3, RIGHT}), frozenset({1, 2, 3})])
    [1, 2, 3, 0]
    """
    pset = frozenset(present)
    keeps = [k & (pset | {LEFT, RIGHT}) for k in keeps]
    keeps = [k for k in keeps if 0 < len(k - {LEFT, RIGHT}) < len(present)]
    if not keeps:
        return list(present)
    return _order_classes(present, keeps)


def _order_classes(present: List[int], keeps: List[FrozenSet[int]]) -> List[int]:
    """:func:`order_segment` on its filtered keep sets, by membership classes."""
    use_l = any(LEFT in k for k in keeps)
    use_r = any(RIGHT in k for k in keeps)
    items = ([LEFT] if use_l else []) + list(present) + ([RIGHT] if use_r else [])
    n = len(keeps)
    # classes of groups with the same membership signature (a bitmask over
    # consumers), in canonical order; sentinels get a private bit each
    sig_of: Dict[int, int] = {g: 0 for g in items}
    for i, k in enumerate(keeps):
        for g in k:
            sig_of[g] |= 1 << i
    if use_l:
        sig_of[LEFT] |= 1 << n
    if use_r:
        sig_of[RIGHT] |= 1 << (n + 1)
    classes: Dict[int, List[int]] = {}
    for g in items:
        classes.setdefault(sig_of[g], []).append(g)
    sigs = list(classes)
    sizes = [len(k - {LEFT, RIGHT}) for k in keeps] + [0, 0]
    first_sig = sig_of[LEFT] if use_l else None
    last_sig = sig_of[RIGHT] if use_r else None

    bits_of = {sg: [i for i in range(n + 2) if sg >> i & 1] for sg in sigs}

    def cost(seq: Sequence[int]) -> int:
        """Channels copied by a class order: consumers not in one run."""
        first: Dict[int, int] = {}
        last: Dict[int, int] = {}
        count: Dict[int, int] = {}
        for j, sig in enumerate(seq):
            for i in bits_of[sig]:
                if i not in first:
                    first[i] = j
                last[i] = j
                count[i] = count.get(i, 0) + 1
        return sum(sizes[i] for i in count if last[i] - first[i] + 1 != count[i])

    def strip(seq: List[int]) -> List[int]:
        return [g for sg in seq for g in classes[sg] if g >= 0]

    if cost(_runs([sig_of[g] for g in items])) == 0:
        return list(present)
    members = [[sg for sg in sigs if sg >> i & 1] for i in range(n)]
    exact = consecutive_order(sigs, members, first_sig, last_sig)
    if exact is not None:  # every consumer contiguous: zero copies
        return strip(exact)
    if len(sigs) > 400:  # too many classes for the greedy search: sort by signature
        sigs.sort(key=lambda sg: (sg != first_sig, sg == last_sig, bin(sg)[::-1]))
        return strip(sigs)

    width = {sg: sg.bit_count() for sg in sigs}

    def greedy(start: int) -> List[int]:
        seq = [start]
        left = [(sg, -width[sg], -sg) for sg in sigs if sg != start and sg != last_sig]
        while left:
            prev = seq[-1]
            # most consumers shared with the last class, then fewest differences
            # (|sg ^ prev| = |sg| + |prev| - 2 |sg & prev|: with the shared count
            # fixed, fewest differences is fewest consumers), then the smaller sig
            _, _, _, i = max([((sg & prev).bit_count(), nw, ns, i) for i, (sg, nw, ns) in enumerate(left)])
            seq.append(left.pop(i)[0])
        if last_sig is not None and last_sig != start:
            seq.append(last_sig)
        return seq

    best_seq: Optional[List[int]] = None
    best_cost: Optional[int] = None
    starts = [first_sig] if first_sig is not None else sorted(
        (sg for sg in sigs if sg != last_sig), key=lambda sg: (sg.bit_count(), sg))[:2]
    for st in starts:
        seq = greedy(st)
        c = cost(seq)
        if best_cost is None or c < best_cost:
            best_seq, best_cost = seq, c
            if c == 0:
                break
    assert best_seq is not None and best_cost is not None
    if best_cost > 0 and len(sigs) <= 12:  # small instances: search exactly
        exact = _branch_and_bound(sigs, sizes, best_cost, budget=4000, first=first_sig, last=last_sig)
        if exact is not None:
            best_seq = exact
            best_cost = cost(exact)
    if best_cost > 0:
        # no order serves everyone: make the largest consumers contiguous (their
        # reads become views) and let the others gather
        sub = _largest_contiguous_subset(sigs, members, sizes[:n], first_sig, last_sig)
        if sub is not None:
            c = cost(sub)
            if c < best_cost:
                best_seq, best_cost = sub, c
    return strip(best_seq)


def consecutive_order(
    elements: Sequence[int], sets: Iterable[Iterable[int]], first: Optional[int] = None, last: Optional[int] = None,
) -> Optional[List[int]]:
    """An order of ``elements`` in which every set is consecutive, or None if
    there is none (an exact consecutive-ones test). ``first`` / ``last``: an
    element that must open / close the order.

    The sets split into *overlap components* (two sets overlap when they
    intersect and neither contains the other). Adding a component's sets in
    an order where each overlaps an earlier one refines its union into blocks
    whose order is forced up to reversal, so a contradiction there proves
    that no order exists. The unions of different components are nested or
    disjoint, and a nested component lies inside one block of its parent:
    laying out every block recursively gives the order. Polynomial (sets x
    elements per added set), exact for any number of elements.

    >>> consecutive_order([1, 2, 3, 4], [{1, 3}, {3, 4}])
    [1, 3, 4, 2]
    >>> consecutive_order([1, 2, 3, 4], [{1, 2}, {1, 3}, {1, 4}]) is None
    True
    >>> consecutive_order([1, 2, 3], [{1, 2}], first=2)
    [2, 1, 3]
    """
    universe = list(elements)
    whole = frozenset(universe)
    family = {frozenset(x) & whole for x in sets}
    if first is not None:
        family.add(whole - {first})
    if last is not None:
        family.add(whole - {last})
    rank = {e: i for i, e in enumerate(universe)}
    fam = sorted((x for x in family if 1 < len(x) < len(whole)), key=lambda x: (-len(x), sorted(rank[e] for e in x)))
    comps = _overlap_components(fam)
    atoms: List[Tuple[FrozenSet[int], List[FrozenSet[int]]]] = []
    for comp in comps:
        blocks = _refine(comp)
        if blocks is None:
            return None
        atoms.append((frozenset().union(*comp), blocks))
    order = _layout(whole, atoms, rank)
    if first is not None and order[0] != first:
        order.reverse()
    if last is not None and order[-1] != last and first is None:
        order.reverse()
    pos = {e: i for i, e in enumerate(order)}
    ok = (first is None or order[0] == first) and (last is None or order[-1] == last)
    for x in fam:
        ps = [pos[e] for e in x]
        ok = ok and max(ps) - min(ps) + 1 == len(ps)
    return order if ok else None


def _overlap_components(fam: List[FrozenSet[int]]) -> List[List[FrozenSet[int]]]:
    """Connected components of the overlap graph, each listed in an order
    where every set overlaps an earlier one."""
    seen = [False] * len(fam)
    comps = []
    for i in range(len(fam)):
        if seen[i]:
            continue
        seen[i] = True
        comp = [fam[i]]
        k = 0
        while k < len(comp):
            a = comp[k]
            k += 1
            for j in range(len(fam)):
                if not seen[j]:
                    b = fam[j]
                    if (a & b) and not a <= b and not b <= a:
                        seen[j] = True
                        comp.append(b)
        comps.append(comp)
    return comps


def _refine(comp: List[FrozenSet[int]]) -> Optional[List[FrozenSet[int]]]:
    """The forced block order of one overlap component (None: no order)."""
    blocks: List[FrozenSet[int]] = [comp[0]]
    covered = set(comp[0])
    for x in comp[1:]:
        hit = [i for i, b in enumerate(blocks) if b & x]
        i, j = hit[0], hit[-1]
        if len(hit) != j - i + 1 or any(not blocks[k] <= x for k in range(i + 1, j)):
            return None
        new = x - covered
        left, right = blocks[i] - x, blocks[j] - x
        if new:
            # new elements go past an end block the set fully covers (or
            # past its only block, which it then splits)
            if j == len(blocks) - 1 and (not right or i == j):
                blocks[j:j + 1] = [b for b in (right, blocks[j] & x) if b]
                if i < j:  # the run's other end may be partly covered
                    blocks[i:i + 1] = [b for b in (left, blocks[i] & x) if b]
                blocks.append(frozenset(new))
            elif i == 0 and (not left or i == j):
                blocks[0:1] = [b for b in (blocks[0] & x, left) if b]
                if i < j:
                    blocks[j:j + 1] = [b for b in (blocks[j] & x, right) if b]
                blocks.insert(0, frozenset(new))
            else:
                return None
            covered |= new
        elif i == j:
            return None  # inside one block: overlaps nothing added before
        else:
            blocks[j:j + 1] = [b for b in (blocks[j] & x, right) if b]
            blocks[i:i + 1] = [b for b in (left, blocks[i] & x) if b]
    return blocks


def _layout(
    region: FrozenSet[int], comps: List[Tuple[FrozenSet[int], List[FrozenSet[int]]]], rank: Dict[int, int],
) -> List[int]:
    """Elements of ``region``: each outermost component's blocks in order,
    recursively, then the elements no component covers."""
    inside = [c for c in comps if c[0] <= region]
    inside.sort(key=lambda c: (-len(c[0]), len(c[1]) > 1))
    tops: List[Tuple[FrozenSet[int], List[FrozenSet[int]]]] = []
    for c in inside:
        if not any(c[0] <= t[0] for t in tops):
            tops.append(c)
    rest = [c for c in inside if not any(c is t for t in tops)]
    out: List[int] = []
    covered: Set[int] = set()
    for union, blocks in sorted(tops, key=lambda c: min(rank[e] for e in c[0])):
        for b in blocks:
            out += _layout(b, [c for c in rest if c[0] <= b], rank)
        covered |= union
    out += sorted(region - covered, key=rank.__getitem__)
    return out


def _largest_contiguous_subset(
    sigs: List[int], members: List[List[int]], sizes: List[int], first: Optional[int], last: Optional[int],
) -> Optional[List[int]]:
    """Add consumers largest first while an order still keeps every chosen
    consumer contiguous (the exact test of :func:`consecutive_order`); return
    that order over ``sigs`` (or None). Stops after three consumers in a row
    that do not fit."""
    chosen: List[List[int]] = []
    order: Optional[List[int]] = None
    misses = 0
    for i in sorted(range(len(members)), key=lambda i: -sizes[i]):
        seq = consecutive_order(sigs, chosen + [members[i]], first, last)
        if seq is not None:
            chosen, order, misses = chosen + [members[i]], seq, 0
        else:
            misses += 1
            if misses >= 3:
                break
    return order


def _branch_and_bound(
    sigs: List[int], sizes: List[int], upper: int, budget: int = 20000,
    first: Optional[int] = None, last: Optional[int] = None,
) -> Optional[List[int]]:
    """Class order with the fewest copied channels, searched exhaustively with
    pruning (exact whenever the search finishes within ``budget`` nodes).

    A consumer is *broken* (its subset needs a copy) once a class without it
    follows one with it while it still has classes to place; broken
    consumers cost their size, charged as soon as they break (the bound that
    prunes the search). Returns a sequence cheaper than ``upper``, or None.
    """
    n_cons = len(sizes)
    best: List[Optional[List[int]]] = [None]
    bound = [upper]
    nodes = [0]
    # remaining members per consumer, to know when a consumer is complete
    total = [0] * n_cons
    for sgn in sigs:
        for i in range(n_cons):
            if sgn >> i & 1:
                total[i] += 1

    bits_of = {sgn: [i for i in range(n_cons) if sgn >> i & 1] for sgn in sigs}

    def rec(seq: List[int], left: Set[int], open_: int, broken: int, cost: int, seen: List[int]) -> None:
        if nodes[0] >= budget:
            return
        nodes[0] += 1
        if not left:
            if cost < bound[0]:
                bound[0] = cost
                best[0] = list(seq)
            return
        # try classes that keep every open consumer contiguous first
        if not seq and first is not None:
            order = [first]
        else:
            order = sorted(left, key=lambda s: (-(s & open_).bit_count(), (s & ~open_).bit_count()))
            if last is not None and len(left) > 1:
                order = [s for s in order if s != last]
        for sgn in order:
            # an open consumer (started, members left) that this class lacks
            # is broken from here on, whatever follows: charge it now
            newly_broken = open_ & ~sgn & ~broken
            add = 0
            b = newly_broken
            i = 0
            while b:
                if b & 1:
                    add += sizes[i]
                b >>= 1
                i += 1
            if cost + add >= bound[0]:
                continue
            seen2 = seen[:]
            now_open = 0
            for i in bits_of[sgn]:
                seen2[i] += 1
                if seen2[i] < total[i]:
                    now_open |= 1 << i
            left.discard(sgn)
            seq.append(sgn)
            rec(seq, left, now_open, broken | newly_broken, cost + add, seen2)
            seq.pop()
            left.add(sgn)
            if bound[0] == 0 or nodes[0] >= budget:
                return

    rec([], set(sigs), 0, 0, 0, [0] * n_cons)
    return best[0]


def _runs(seq: List[int]) -> List[int]:
    """Collapse consecutive equal signatures (so cost() sees classes)."""
    out: List[int] = []
    for s in seq:
        if not out or out[-1] != s:
            out.append(s)
    return out
