"""Channel orders (``channelcut.pruning.reorder``), checked against brute force.

``consecutive_order`` is an exact consecutive-ones test: it must find an order
exactly when one exists (every permutation is tried on small instances), and
``order_segment`` must then reorder with zero copies, however many membership
classes the segment has.
"""

from __future__ import annotations

import itertools
import random
from typing import FrozenSet, List, Optional, Sequence, Tuple

import pytest

from channelcut.pruning.reorder import LEFT, RIGHT, consecutive_order, order_segment

SEED = 20261126


def _consecutive(order: Sequence[int], x: FrozenSet[int]) -> bool:
    pos = [i for i, e in enumerate(order) if e in x]
    return not pos or pos[-1] - pos[0] + 1 == len(pos)


def _valid(order: Sequence[int], sets: List[FrozenSet[int]], first: Optional[int], last: Optional[int]) -> bool:
    return ((first is None or order[0] == first) and (last is None or order[-1] == last)
            and all(_consecutive(order, x) for x in sets))


def _hidden_intervals(rng: random.Random, elements: List[int], count: int) -> List[Tuple[int, FrozenSet[int]]]:
    """``count`` random intervals (start, members) of a random order of ``elements``."""
    hidden = elements[:]
    rng.shuffle(hidden)
    out = []
    for _ in range(count):
        a = rng.randrange(len(hidden))
        b = rng.randrange(a, len(hidden))
        out.append((a, frozenset(hidden[a:b + 1])))
    return out


def _random_instance(rng: random.Random, n: int):
    elements = list(range(n))
    if rng.random() < 0.5:  # intervals of a hidden order: always feasible
        sets = [x for _, x in _hidden_intervals(rng, elements, rng.randint(1, 6))]
    else:
        sets = [frozenset(e for e in elements if rng.random() < 0.5) for _ in range(rng.randint(2, 7))]
    first = rng.choice([None, None, rng.randrange(n)])
    last = rng.choice([None, None, rng.randrange(n)])
    if first is not None and first == last:
        last = None
    return elements, sets, first, last


def test_consecutive_order_is_exact_against_brute_force():
    rng = random.Random(SEED)
    found = missing = 0
    for case in range(700):
        n = rng.randint(1, 7 if case % 4 == 0 else 6)
        elements, sets, first, last = _random_instance(rng, n)
        got = consecutive_order(elements, sets, first, last)
        exists = any(_valid(p, sets, first, last) for p in itertools.permutations(elements))
        msg = f"seed {SEED} case {case}: elements={elements} sets={[sorted(x) for x in sets]} first={first} last={last} -> {got}"
        assert (got is not None) == exists, msg
        if got is not None:
            assert sorted(got) == elements and _valid(got, sets, first, last), msg
            found += 1
        else:
            missing += 1
    assert found > 200 and missing > 100  # both answers are exercised


def test_consecutive_order_on_many_elements():
    """Intervals of a hidden order of 300 elements (far past any exhaustive
    search): found; one crossing set more makes it infeasible."""
    rng = random.Random(SEED)
    hidden = list(range(300))
    rng.shuffle(hidden)
    sets = []
    for _ in range(60):
        a = rng.randrange(300)
        b = rng.randrange(a, min(300, a + 80))
        sets.append(frozenset(hidden[a:b + 1]))
    got = consecutive_order(sorted(hidden), sets)
    assert got is not None and all(_consecutive(got, x) for x in sets)
    # three sets pairwise sharing one element around a centre: no order
    c, a, b, d = hidden[10], hidden[100], hidden[200], hidden[250]
    assert consecutive_order(sorted(hidden), sets + [frozenset({c, a}), frozenset({c, b}), frozenset({c, d})]) is None


def _copies(order: Sequence[int], keeps: List[FrozenSet[int]]) -> int:
    """Channels copied: consumers whose kept groups are not consecutive."""
    items = ([LEFT] if any(LEFT in k for k in keeps) else []) + list(order) + (
        [RIGHT] if any(RIGHT in k for k in keeps) else [])
    return sum(len(k - {LEFT, RIGHT}) for k in keeps if not _consecutive(items, k))


@pytest.mark.parametrize("n_groups", [6, 40])
def test_order_segment_copies_nothing_whenever_an_order_exists(n_groups):
    """Consumers keeping intervals of a hidden order, with many membership
    classes (the branch-and-bound alone stops at 12): zero copies."""
    rng = random.Random(SEED + n_groups)
    for case in range(60):
        groups = list(range(100, 100 + n_groups))
        keeps = [x | {LEFT} if a == 0 and rng.random() < 0.3 else x
                 for a, x in _hidden_intervals(rng, groups, rng.randint(2, 12))]
        order = order_segment(groups, keeps)
        assert sorted(order) == groups
        assert _copies(order, keeps) == 0, f"seed {SEED + n_groups} case {case}: {keeps} -> {order}"


def test_order_segment_never_copies_more_than_the_given_order():
    rng = random.Random(SEED)
    for case in range(200):
        groups = list(range(rng.randint(3, 30)))
        keeps = [frozenset(g for g in groups if rng.random() < 0.6) for _ in range(rng.randint(1, 8))]
        order = order_segment(groups, keeps)
        assert sorted(order) == groups
        assert _copies(order, keeps) <= _copies(groups, keeps), f"seed {SEED} case {case}"


def _copied(seq: Sequence[int], sizes: List[int]) -> int:
    """Channels copied by a class order: the size of every consumer whose
    classes are not consecutive in ``seq``."""
    return sum(size for i, size in enumerate(sizes) if not _consecutive(seq, frozenset(s for s in seq if s >> i & 1)))


def test_branch_and_bound_finds_the_fewest_copies():
    """``_branch_and_bound`` (exact when it finishes) against every
    permutation, with and without a forced first / last class."""
    from channelcut.pruning.reorder import _branch_and_bound

    rng = random.Random(SEED + 2)
    for case in range(300):
        n_cons = rng.randint(2, 6)
        sigs = sorted({rng.randrange(1, 1 << n_cons) for _ in range(rng.randint(3, 7))})
        if len(sigs) < 3:
            continue
        sizes = [rng.randint(1, 64) for _ in range(n_cons)]
        first = rng.choice([None, None, rng.choice(sigs)])
        last = rng.choice([None, None, rng.choice([s for s in sigs if s != first])])
        perms = [p for p in itertools.permutations(sigs)
                 if (first is None or p[0] == first) and (last is None or p[-1] == last)]
        best = min(_copied(p, sizes) for p in perms)
        found = _branch_and_bound(list(sigs), sizes, sum(sizes) + 1, budget=10 ** 6, first=first, last=last)
        where = f"case {case} (seed {SEED + 2}): sigs={sigs} sizes={sizes} first={first} last={last}"
        assert found is not None and sorted(found) == sigs, where
        assert (first is None or found[0] == first) and (last is None or found[-1] == last), where
        assert _copied(found, sizes) == best, where
        # asked to beat the optimum, it finds nothing
        assert _branch_and_bound(list(sigs), sizes, best, budget=10 ** 6, first=first, last=last) is None, where


def test_one_consumer_segment_is_ordered_by_the_class_search():
    from channelcut.pruning.reorder import _order_classes

    rng = random.Random(SEED + 3)
    for case in range(500):
        present = rng.sample(range(1000), rng.randint(2, 40))
        keep = frozenset(g for g in present if rng.random() < rng.random())
        if not 0 < len(keep) < len(present):
            continue
        got = order_segment(present, [keep])
        assert got == _order_classes(present, [keep]), f"case {case} (seed {SEED + 3}): {present} {sorted(keep)}"
        pos = [got.index(g) for g in keep]
        assert max(pos) - min(pos) + 1 == len(keep)
