"""Turn channel scores into a selection of channels to remove.

Start at :func:`select_unconstrained` and :func:`select_constrained`. Both
work on plain score tensors and the :class:`~.structure.Structure`; neither
touches weights.

Rules shared by both:

- ``amount`` of the channels in scope is removed per layer (``scope="local"``)
  or over all layers at once (``scope="global"``, on normalised scores);
  counts are rounded to the nearest channel;
- ``round_to=N`` rounds each layer's (segment's) remaining width to a multiple
  of N (layers narrower than N are left alone);
- channels whose weights are already zero count as removed first;
- no consumer loses every input channel, no producer every output channel,
  and the outputs of ignored layers are never removed.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

import torch

from .structure import Structure

Pair = Tuple[str, int]


@dataclass
class Selection:
    """The outcome of one selection."""

    mode: str
    scope: str
    amount: float
    pruned_inputs: List[Pair] = field(default_factory=list)
    # consumer weight -> (input channels, input channels removed)
    layers: Dict[str, Tuple[int, int]] = field(default_factory=dict)
    # constrained: the ids of the removed channel groups
    removed_groups: List[int] = field(default_factory=list)
    # constrained: segment id -> (removable groups, removed groups)
    segments: Dict[int, Tuple[int, int]] = field(default_factory=dict)

    @property
    def fraction(self) -> float:
        """Removed fraction of the channels in scope (input columns or groups)."""
        units = self.segments if self.mode == "constrained" else self.layers
        total = sum(n for n, _ in units.values())
        return sum(k for _, k in units.values()) / total if total else 0.0


def count_for(amount: float, n: int) -> int:
    """Channels to remove out of ``n``, rounded half up.

    >>> count_for(0.3, 10), count_for(0.25, 10), count_for(0.7, 3)
    (3, 3, 2)
    """
    return int(math.floor(amount * n + 0.5 + 1e-9))


def round_width(k: int, width: int, round_to: Optional[int], max_remove: int) -> int:
    """Adjust a removal count so the remaining width is a multiple of ``round_to``.

    >>> round_width(3, 32, 8, 31), round_width(5, 32, 8, 31), round_width(2, 6, 8, 5)
    (0, 8, 0)
    """
    k = max(0, min(k, max_remove))
    if not round_to or round_to <= 1 or k == 0:
        return k
    if width < round_to:
        return 0
    kept = int(math.floor((width - k) / round_to + 0.5)) * round_to
    kept = max(kept, round_to)
    if kept > width:
        kept = (width // round_to) * round_to
    k = width - kept
    while k > max_remove:
        k -= round_to
    return max(k, 0)


def _argsort(scores: torch.Tensor) -> List[int]:
    return torch.argsort(scores.double(), stable=True).tolist()


# ---------------------------------------------------------------------------
# unconstrained: each consumer picks its own input channels
# ---------------------------------------------------------------------------


def select_unconstrained(
    st: Structure,
    scores: Dict[str, torch.Tensor],
    zero: Dict[str, torch.Tensor],
    normalize: Callable[[torch.Tensor], torch.Tensor],
    amount: float,
    scope: str,
    round_to: Optional[int],
    protected_producers: Set[str],
) -> Selection:
    """``scores``: consumer weight -> score per input channel (only layers in
    scope); ``zero``: consumer weight -> bool per input channel already zero."""
    sel = Selection("unconstrained", scope, amount)
    ranked: Dict[str, torch.Tensor] = {}
    for name, s in scores.items():
        r = (normalize(s) if scope == "global" else s.detach()).double().clone()
        r[zero[name]] = -math.inf
        ranked[name] = r
    counts: Dict[str, int] = {}
    if scope == "local":
        for name, r in ranked.items():
            n = r.numel()
            counts[name] = round_width(count_for(amount, n), n, round_to, n - 1)
    else:
        total = sum(r.numel() for r in ranked.values())
        target = count_for(amount, total)
        flat = torch.cat([r for r in ranked.values()]) if ranked else torch.zeros(0)
        owner = [name for name, r in ranked.items() for _ in range(r.numel())]
        taken: Dict[str, int] = defaultdict(int)
        got = 0
        for i in _argsort(flat):
            if got >= target:
                break
            name = owner[i]
            if taken[name] < ranked[name].numel() - 1:
                taken[name] += 1
                got += 1
        for name, r in ranked.items():
            n = r.numel()
            counts[name] = round_width(taken.get(name, 0), n, round_to, n - 1)
    chosen: Dict[str, Set[int]] = {}
    for name, r in ranked.items():
        n = r.numel()
        k = max(counts[name], min(int(zero[name].sum()), n - 1))
        chosen[name] = set(_argsort(r)[:k])
    if st.graph is not None:
        _repair(st, chosen, ranked, protected_producers)
    for name, r in ranked.items():
        sel.layers[name] = (r.numel(), len(chosen[name]))
        sel.pruned_inputs.extend((name, c) for c in sorted(chosen[name]))
    return sel


def _repair(st: Structure, chosen: Dict[str, Set[int]], ranked: Dict[str, torch.Tensor], protected: Set[str]) -> None:
    """Keep every producer non-empty and protected producers' outputs whole."""
    entries: Dict[int, List[Pair]] = defaultdict(list)
    for name, gs in st.input_groups.items():
        for pos, g in enumerate(gs):
            if g >= 0:
                entries[g].append((name, pos))
    pinned = {grp.id for grp in st.groups if grp.pinned is not None}
    outputs: Dict[str, List[int]] = defaultdict(list)
    for grp in st.groups:
        for name, _ in grp.producers:
            outputs[name].append(grp.id)

    def removed(g: int) -> bool:
        es = entries.get(g)
        return bool(es) and g not in pinned and all(p in chosen.get(c, ()) for c, p in es)

    def restore(g: int) -> None:
        es = [(c, p) for c, p in entries[g] if c in ranked]
        c, p = max(es, key=lambda e: float(ranked[e[0]][e[1]]))
        chosen[c].discard(p)

    for name, gs in outputs.items():
        gone = [g for g in dict.fromkeys(gs) if removed(g)]
        if not gone:
            continue
        if name in protected:
            for g in gone:
                restore(g)
        elif len(gone) == len(set(gs)):
            best = max(gone, key=lambda g: max(float(ranked[c][p]) for c, p in entries[g] if c in ranked))
            restore(best)


# ---------------------------------------------------------------------------
# constrained: whole channel groups, scored over all their layers
# ---------------------------------------------------------------------------


def select_constrained(
    st: Structure,
    scores_in: Dict[str, torch.Tensor],
    scores_out: Dict[str, torch.Tensor],
    zero: Dict[str, torch.Tensor],
    normalize: Callable[[torch.Tensor], torch.Tensor],
    amount: float,
    scope: str,
    round_to: Optional[int],
    in_scope: Set[str],
    protected_producers: Set[str],
) -> Tuple[Selection, List[str]]:
    """Returns the selection and the names of layers that could not be scored."""
    sel = Selection("constrained", scope, amount)
    norm_in = {k: normalize(v).double() for k, v in scores_in.items()}
    norm_out = {k: normalize(v).double() for k, v in scores_out.items()}
    # group -> score; only removable groups whose every consumer is in scope
    score: Dict[int, float] = {}
    unscored: List[str] = []
    by_seg: Dict[int, List[int]] = defaultdict(list)
    for grp in st.groups:
        if grp.pinned is not None or not grp.consumers:
            continue
        if any(c not in in_scope for c, _ in grp.consumers) or any(p in protected_producers for p, _ in grp.producers):
            continue
        vals = [float(norm_in[c][p]) for c, p in grp.consumers if c in norm_in]
        if not vals:
            unscored.extend(c for c, _ in grp.consumers)
            continue
        vals += [float(norm_out[p][ch]) for p, ch in grp.producers if p in norm_out]
        s = sum(vals) / len(vals)
        if all(bool(zero[c][p]) for c, p in grp.consumers if c in zero):
            s = -math.inf
        score[grp.id] = s
        by_seg[st.segment_of[grp.id]].append(grp.id)
    group_by_id = {grp.id: grp for grp in st.groups}
    # how much of each layer a group takes
    remaining: Dict[Tuple[str, str], int] = {}
    for name, ref in st.consumers.items():
        remaining[("in", name)] = ref.channels
    for name, ref in st.producers.items():
        remaining[("out", name)] = ref.channels
    cost: Dict[int, Dict[Tuple[str, str], int]] = {}
    for g in score:
        grp = group_by_id[g]
        c: Dict[Tuple[str, str], int] = defaultdict(int)
        for name, _ in grp.consumers:
            c[("in", name)] += 1
        for name, _ in grp.producers:
            c[("out", name)] += 1
        cost[g] = c

    def fits(g: int) -> bool:
        return all(remaining.get(key, n + 1) - n >= 1 for key, n in cost[g].items())

    def take(g: int) -> None:
        for key, n in cost[g].items():
            if key in remaining:
                remaining[key] -= n

    def pick(groups: Sequence[int], k: int) -> List[int]:
        out = []
        for g in sorted(groups, key=lambda g: score[g]):
            if len(out) >= k:
                break
            if fits(g):
                take(g)
                out.append(g)
        return out

    counts: Dict[int, int] = {}
    if scope == "local":
        for s, gs in by_seg.items():
            counts[s] = count_for(amount, len(gs))
    else:
        target = count_for(amount, len(score))
        saved = dict(remaining)
        chosen = pick(list(score), target)
        remaining.clear()
        remaining.update(saved)
        for g in chosen:
            counts[st.segment_of[g]] = counts.get(st.segment_of[g], 0) + 1
    for s, gs in by_seg.items():
        width = st.segments[s].width
        n_zero = sum(1 for g in gs if score[g] == -math.inf)
        k = round_width(counts.get(s, 0), width, round_to, len(gs))
        k = max(k, n_zero)
        got = pick(gs, k)
        sel.removed_groups.extend(got)
        sel.segments[s] = (len(gs), len(got))
    for g in sel.removed_groups:
        sel.pruned_inputs.extend(group_by_id[g].consumers)
    per_layer: Dict[str, int] = defaultdict(int)
    for name, _ in sel.pruned_inputs:
        per_layer[name] += 1
    for name in in_scope:
        sel.layers[name] = (st.consumers[name].channels, per_layer.get(name, 0))
    sel.pruned_inputs.sort()
    return sel, sorted(set(unscored))
