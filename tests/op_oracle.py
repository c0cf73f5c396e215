"""The op-rule oracle: compare what the tracer claims with measured truth.

Used by ``tests/test_op_rules.py`` (read its docstring first for the internal
representation). Start at :func:`run_case`.

One :class:`Case` wraps one torch call ``fn(m, *xs)`` in a tiny module ``m``
(which holds the call's parameters). :func:`trace_case` runs it once under a
:class:`~channelcut.pruning.tracing.Tracer` with every tracked input given
fresh, unpinned atoms along its channel dim, and returns the claims: the atom
of every output element, the union-find groups, pins and "needs" edges,
consumers and parameter alignments. :func:`run_case` then measures the truth
by perturbation and reports:

- **bugs** (claims less than the truth):
  * *dependency*: an output element changes when input channel ``i`` changes,
    yet its atom is not in ``i``'s group, does not "need" ``i``'s group, and
    ``i`` is not pinned. Pruning ``i`` would silently change a kept output.
  * *consumer column*: for a consumer (conv/linear/matmul with a weight),
    zeroing input channel ``i`` must equal zeroing the weight entries the mock
    zeroes for input position ``i``; and ``in_ids[i]`` must be ``i``'s atom.
  * *parameter alignment*: perturbing the slice of a parameter recorded as
    aligned with atom ``a`` may only change outputs in ``a``'s group (or that
    need it): the slice is removed exactly when that group is.
  * *removal* (parameter-free cases): physically dropping one removable
    group's channels from the inputs, the call must still run and give the
    original output with that group's positions dropped.
  * a rule that raises (instead of ``_Unsupported`` -> barrier).
- **info** (claims more than the truth = lost pruning opportunity): input
  channels the rule pins, input channels put in one group although no output
  mixes them, output elements claimed to depend on a group they never change
  with, and barriers.

Truth is measured with several perturbations of each channel (fresh values
from the input's domain, and a NaN for float inputs), so an observed change is
a real dependency; a dependency that no perturbation reveals can only hide a
bug, never invent one.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple, Union

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from channelcut.pruning import rules
from channelcut.pruning.mock import zero_input_channels
from channelcut.pruning.spec import MaskEntry
from channelcut.pruning.graph import NO_SOURCE, TracedGraph
from channelcut.pruning.recorder import CompactTrace
from channelcut.pruning.tracing import Tracer, module_hooks

D = torch.float64
Track = Union[int, None, str]  # channel dim | None (an untracked constant) | "pin" (a pinned model input)


@dataclass
class In:
    """One input: shape, value domain, and which dim carries the atoms."""

    shape: Tuple[int, ...]
    track: Track = 1
    dom: str = "real"  # real | pos | unit (-1, 1) | prob (0, 1) | gt1 | int | bool | long_idx:<n>


@dataclass
class Case:
    rule: str  # the RULES key this case must exercise
    fn: Callable[..., Any]  # fn(m, *xs)
    ins: List[In]
    params: Dict[str, torch.Tensor] = field(default_factory=dict)
    buffers: Dict[str, torch.Tensor] = field(default_factory=dict)
    removal: bool = True  # run the removal oracle (only without params)
    note: str = ""
    id: str = ""


class OpModule(nn.Module):
    def __init__(self, fn, params, buffers) -> None:
        super().__init__()
        self.fn = fn
        for k, v in params.items():
            self.register_parameter(k, nn.Parameter(v.clone(), requires_grad=v.is_floating_point()))
        for k, v in buffers.items():
            self.register_buffer(k, v.clone())

    def forward(self, *xs):
        return self.fn(self, *xs)


# ---------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------


def sample(shape: Sequence[int], dom: str, gen: torch.Generator) -> torch.Tensor:
    shape = tuple(shape)
    if dom == "real":
        return torch.randn(shape, generator=gen, dtype=D)
    if dom == "pos":
        return torch.rand(shape, generator=gen, dtype=D) * 2 + 0.1
    if dom == "unit":
        return torch.rand(shape, generator=gen, dtype=D) * 1.8 - 0.9
    if dom == "prob":
        return torch.rand(shape, generator=gen, dtype=D) * 0.9 + 0.05
    if dom == "gt1":
        return torch.rand(shape, generator=gen, dtype=D) * 2 + 1.1
    if dom == "int":
        return torch.randint(-5, 6, shape, generator=gen)
    if dom == "bool":
        return torch.rand(shape, generator=gen) < 0.5
    if dom.startswith("long_idx:"):
        return torch.randint(0, int(dom.split(":")[1]), shape, generator=gen)
    raise ValueError(dom)


def is_float_dom(dom: str) -> bool:
    return dom in ("real", "pos", "unit", "prob", "gt1")


def make_inputs(case: Case, seed: int) -> List[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [sample(i.shape, i.dom, gen) for i in case.ins]


def perturbations(x: torch.Tensor, spec: In, ch: int, gen: torch.Generator) -> List[torch.Tensor]:
    """Copies of ``x`` with channel ``ch`` (along ``spec.track``) changed."""
    d = spec.track
    out = []
    n_trials = 2 if is_float_dom(spec.dom) else 3
    for _ in range(n_trials):
        y = x.clone()
        sl = y.select(d, ch)
        fresh = sample(sl.shape, spec.dom, gen)
        if spec.dom == "bool":
            fresh = ~sl
        sl.copy_(fresh)
        out.append(y)
    if is_float_dom(spec.dom):
        y = x.clone()
        y.select(d, ch).fill_(float("nan"))
        out.append(y)
    return out


# ---------------------------------------------------------------------------
# tracing one case
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def record_rule_hits(hits: Set[str]):
    """Temporarily wrap the trace rule of every entry of ``rules.RULES`` to
    record which keys run."""
    saved = dict(rules.RULES)

    def wrap(key, fn):
        def recorded(*a, **k):
            hits.add(key)
            return fn(*a, **k)

        return recorded

    for k, entry in saved.items():
        if entry.trace is not None:
            rules.RULES[k] = dataclasses.replace(entry, trace=wrap(k, entry.trace))
    try:
        yield
    finally:
        rules.RULES.clear()
        rules.RULES.update(saved)


@dataclass
class Traced:
    graph: TracedGraph
    module: OpModule
    xs: List[torch.Tensor]
    atoms: List[Optional[torch.Tensor]]  # per input: its atoms along the tracked dim
    outs: List[torch.Tensor]  # flattened outputs
    claims: List[torch.Tensor]  # per output: atom of every element (NO_SOURCE: a constant)
    vdims: List[Optional[int]]
    hits: Set[str]


def call(module: nn.Module, xs: Sequence[torch.Tensor], seed: int = 0) -> List[torch.Tensor]:
    """Run the case on copies of its inputs (in-place ops), deterministically."""
    xs = [x.clone() for x in xs]
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = module(*xs)
    leaves, _ = tree_flatten(out)
    return [y for y in leaves if isinstance(y, torch.Tensor)]


def trace_case(case: Case, seed: int = 0) -> Traced:
    module = OpModule(case.fn, case.params, case.buffers).eval()
    xs = make_inputs(case, seed)
    graph = TracedGraph()
    for name, p in list(module.named_parameters()) + list(module.named_buffers()):
        graph.param_shapes[name] = tuple(p.shape)
        graph.param_modules[name] = ""
    tracer = Tracer(module, graph)
    rec = tracer.recorder
    atoms: List[Optional[torch.Tensor]] = []
    run_xs = [x.clone() for x in xs]
    for k, (x, spec) in enumerate(zip(run_xs, case.ins)):
        if spec.track is None:
            atoms.append(None)
        elif spec.track == "pin":
            rec.set(x, rec.fresh_pinned(f"<input{k}>", x.dim(), "is a model input"))
            atoms.append(None)
        else:
            a = torch.tensor(list(graph.sources.new_atoms(f"in{k}", x.shape[spec.track])), dtype=torch.long)
            rec.set(x, CompactTrace.along(a, spec.track, x.dim()))
            atoms.append(a)
    hits: Set[str] = set()
    hooks = module_hooks(rec)
    try:
        with record_rule_hits(hits), torch.no_grad(), torch.random.fork_rng(devices=[]), tracer:
            torch.manual_seed(seed)
            out = module(*run_xs)
    finally:
        for h in hooks:
            h.remove()
    leaves, _ = tree_flatten(out)
    outs = [y for y in leaves if isinstance(y, torch.Tensor)]
    claims, vdims = [], []
    for y in outs:
        t = rec.get(y)
        if t is None:
            claims.append(torch.full(tuple(y.shape), NO_SOURCE, dtype=torch.long))
            vdims.append(None)
        else:
            claims.append(t.atoms.expand(tuple(y.shape)).contiguous())
            vdims.append(t.vdim)
    return Traced(graph, module, xs, atoms, outs, claims, vdims, hits)


# ---------------------------------------------------------------------------
# comparing
# ---------------------------------------------------------------------------


def changed(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise "differs" (NaN equals NaN)."""
    if a.shape != b.shape:
        return torch.ones(b.shape, dtype=torch.bool)
    if a.is_floating_point() or a.is_complex():
        same = (a == b) | (torch.isnan(a) & torch.isnan(b))
        return ~same
    return a != b


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-12) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    nan = torch.isnan(a) | torch.isnan(b)
    if not torch.equal(torch.isnan(a), torch.isnan(b)):
        return False
    a, b = a[~nan], b[~nan]
    if a.numel() == 0:
        return True
    inf = torch.isinf(a) | torch.isinf(b)
    if not torch.equal(a[inf], b[inf]):
        return False
    a, b = a[~inf], b[~inf]
    if a.numel() == 0:
        return True
    return float((a - b).abs().max()) <= rtol * max(float(b.abs().max()), 1.0)


@dataclass
class Report:
    case: Case
    bugs: List[str] = field(default_factory=list)
    info: List[str] = field(default_factory=list)
    hits: Set[str] = field(default_factory=set)


class Groups:
    """Roots, pins and needs-reachability of one traced graph."""

    def __init__(self, g: TracedGraph) -> None:
        self.src = g.sources
        self.adj: Dict[int, Set[int]] = {}
        for a, b in g.needs:
            self.adj.setdefault(self.root(a), set()).add(self.root(b))
        self._reach: Dict[int, Set[int]] = {}

    def root(self, a: int) -> int:
        return self.src.find(a) if a >= 0 else -1

    def reach(self, r: int) -> Set[int]:
        """Groups that must be kept whenever group ``r`` is."""
        if r not in self._reach:
            seen = {r}
            stack = [r]
            while stack:
                for h in self.adj.get(stack.pop(), ()):
                    if h not in seen:
                        seen.add(h)
                        stack.append(h)
            self._reach[r] = seen
        return self._reach[r]

    def covers(self, claimed_atom: int, dep_root: int) -> bool:
        """Is a dependency of an element with atom ``claimed_atom`` on group
        ``dep_root`` accounted for by the claims?"""
        if claimed_atom < 0:
            return False
        return dep_root in self.reach(self.root(claimed_atom))


def run_case(case: Case, seed: int = 0) -> Report:
    rep = Report(case)
    try:
        t = trace_case(case, seed)
    except Exception as exc:  # a rule crashed (it should raise _Unsupported -> barrier)
        rep.bugs.append(f"tracing raised {type(exc).__name__}: {exc}")
        return rep
    rep.hits = t.hits
    g = t.graph
    G = Groups(g)
    base = call(t.module, t.xs, seed)
    if len(base) != len(t.outs):
        rep.bugs.append("the traced call returned a different number of tensors")
        return rep
    gen = torch.Generator().manual_seed(seed + 99)

    # measured dependencies: per (input k, channel i) -> per output: changed mask
    truth: Dict[Tuple[int, int], List[torch.Tensor]] = {}
    for k, (spec, a) in enumerate(zip(case.ins, t.atoms)):
        if a is None:
            continue
        for i in range(a.numel()):
            masks = [torch.zeros(y.shape, dtype=torch.bool) for y in base]
            for xk in perturbations(t.xs[k], spec, i, gen):
                xs = list(t.xs)
                xs[k] = xk
                try:
                    ys = call(t.module, xs, seed)
                except Exception:
                    continue  # this perturbation is outside the op's domain: no measurement
                for j, y in enumerate(ys):
                    masks[j] |= changed(y, base[j])
            truth[(k, i)] = masks

    # consumers: input channel i may be cut by zeroing the weight's column i
    explained: Set[Tuple[int, int]] = set()
    for (k, i) in truth:
        a = int(t.atoms[k][i])
        ra = G.root(a)
        for c in g.consumers.values():
            if _reads_tracked_dim(c, case.ins[k], t.xs[k]) and i < len(c.in_ids) and G.root(c.in_ids[i]) == ra:
                err = _consumer_column_check(t, case, k, i, c, seed)
                if err:
                    rep.bugs.append(err)
                else:
                    explained.add((k, i))
                break
            if c.in_ids and all(G.root(x) == ra for x in c.in_ids):
                explained.add((k, i))  # removing ra would empty this consumer: it is never removed alone
                break
    for op, c in g.consumers.items():
        for k, a in enumerate(t.atoms):
            if a is None or not _reads_tracked_dim(c, case.ins[k], t.xs[k]) or a.numel() != len(c.in_ids):
                continue
            if G.root(c.in_ids[0]) == G.root(int(a[0])):
                bad = [p for p in range(len(c.in_ids)) if G.root(c.in_ids[p]) != G.root(int(a[p]))]
                if bad:
                    rep.bugs.append(f"consumer {op}: in_ids do not follow input {k}'s channels at positions {bad}")

    # dependency check
    for (k, i), masks in truth.items():
        if (k, i) in explained:
            continue
        a = int(t.atoms[k][i])
        if G.src.is_pinned(a):
            continue
        ra = G.root(a)
        for j, m in enumerate(masks):
            if not bool(m.any()):
                continue
            claimed = torch.unique(t.claims[j][m]).tolist()
            bad = [c for c in claimed if not G.covers(c, ra)]
            if bad:
                where = torch.nonzero(m & _atoms_in(t.claims[j], bad))[:3].tolist()
                rep.bugs.append(
                    f"output {j} elements {where} change with input {k} channel {i} (atom {a}, group {ra}) but claim "
                    f"atoms {bad[:4]} (groups {[G.root(b) for b in bad[:4]]}) that neither are nor need that group"
                )

    # parameter alignment
    rep.bugs += _param_alignment_check(t, case, G, base, seed)

    # removal
    if case.removal and not case.params and not case.buffers:
        rep.bugs += _removal_check(t, case, G, base, seed)

    # info: over-claims
    rep.info += _overclaims(t, case, G, truth)
    for name, _module, reason in g.barriers:
        rep.info.append(f"barrier: {name}: {reason}")
    return rep


def _reads_tracked_dim(c, spec: In, x: torch.Tensor) -> bool:
    return isinstance(spec.track, int) and c.activation_dim % x.dim() == spec.track % x.dim()


def _atoms_in(claims: torch.Tensor, atoms: List[int]) -> torch.Tensor:
    m = torch.zeros(claims.shape, dtype=torch.bool)
    for a in atoms:
        m |= claims == a
    return m


def _consumer_column_check(t: Traced, case: Case, k: int, i: int, c, seed: int) -> Optional[str]:
    """Zeroing input channel i == zeroing what the mock zeroes for position i."""
    xs = list(t.xs)
    xk = xs[k].clone()
    xk.select(case.ins[k].track, i).zero_()
    xs[k] = xk
    y_in = call(t.module, xs, seed)
    m2 = copy.deepcopy(t.module)
    w = dict(m2.named_parameters()).get(c.param)
    if w is None:
        return f"consumer {c.op}: weight {c.param!r} is not a parameter of the case"
    with torch.no_grad():
        zero_input_channels(w.data, MaskEntry(c.param, c.weight_dim, c.groups, [i]))
    y_w = call(m2, t.xs, seed)
    for j, (a, b) in enumerate(zip(y_in, y_w)):
        if not close(a, b, 1e-10):
            return (f"consumer {c.op}: zeroing input {k} channel {i} differs from zeroing weight {c.param} "
                    f"dim {c.weight_dim} index {i} (groups={c.groups}) in output {j}")
    return None


def _param_alignment_check(t: Traced, case: Case, G: Groups, base, seed: int) -> List[str]:
    bugs = []
    gen = torch.Generator().manual_seed(seed + 7)
    seen = set()
    for u in t.graph.param_uses:
        for pos, a in zip(u.positions, u.ids):
            key = (u.param, u.dim, pos, a)
            if key in seen:
                continue
            seen.add(key)
            m2 = copy.deepcopy(t.module)
            p = dict(list(m2.named_parameters()) + list(m2.named_buffers()))[u.param]
            with torch.no_grad():
                sl = p.data.select(u.dim, pos)
                if p.is_floating_point():
                    sl.add_(torch.randn(sl.shape, generator=gen, dtype=p.dtype) + 0.5)
                else:
                    sl.add_(1)
            ys = call(m2, t.xs, seed)
            ra = G.root(a)
            bad_out = []
            for j, (y, y0) in enumerate(zip(ys, base)):
                m = changed(y, y0)
                if not bool(m.any()):
                    continue
                claimed = torch.unique(t.claims[j][m]).tolist()
                if a < 0 or G.src.is_pinned(a):
                    bad = [c for c in claimed if c < 0 or not G.src.is_pinned(c)] if a < 0 else []
                else:
                    bad = [c for c in claimed if not G.covers(c, ra)]
                if bad:
                    bad_out.append((j, bad))
            if bad_out and a >= 0 and _input_side_aligned(t, case, G, m2, ra, seed):
                bad_out = []  # a weight column: it only multiplies the (removed) input channels of group ra
            for j, bad in bad_out[:1]:
                bugs.append(
                    f"parameter {u.param} dim {u.dim} index {pos} is aligned with atom {a} (group {ra}), "
                    f"but changing it moves output {j} elements claiming atoms {bad[:4]}"
                )
    return bugs


def _input_side_aligned(t: Traced, case: Case, G: Groups, perturbed: nn.Module, ra: int, seed: int) -> bool:
    """With every input channel of group ``ra`` zeroed, the perturbed
    parameter slice makes no difference: it only acts on those channels."""
    xs = list(t.xs)
    any_zeroed = False
    for k, a in enumerate(t.atoms):
        if a is None:
            continue
        idx = [i for i in range(a.numel()) if G.root(int(a[i])) == ra]
        if idx:
            xk = xs[k].clone()
            xk.index_fill_(case.ins[k].track, torch.tensor(idx), 0)
            xs[k] = xk
            any_zeroed = True
    if not any_zeroed:
        return False
    for y0, y1 in zip(call(t.module, xs, seed), call(perturbed, xs, seed)):
        if not close(y0, y1, 1e-12):
            return False
    return True


def _removal_check(t: Traced, case: Case, G: Groups, base, seed: int) -> List[str]:
    """Drop one removable group from every input; the call must give the
    original output with that group's positions dropped."""
    bugs = []
    roots: Set[int] = set()
    for a in t.atoms:
        if a is not None:
            roots |= {G.root(int(x)) for x in a}
    all_roots = set(roots)
    for c in t.claims:
        all_roots |= {G.root(int(x)) for x in torch.unique(c).tolist() if x >= 0}
    for r in sorted(roots):
        if G.src.is_pinned(r) or any(r in G.reach(o) for o in all_roots if o != r):
            continue
        xs = list(t.xs)
        ok = True
        for k, a in enumerate(t.atoms):
            if a is None:
                continue
            keep = [i for i in range(a.numel()) if G.root(int(a[i])) != r]
            if not keep:
                ok = False
                break
            if len(keep) != a.numel():
                xs[k] = xs[k].index_select(case.ins[k].track, torch.tensor(keep))
        expected = []
        for y, c, vd in zip(base, t.claims, t.vdims):
            if vd is None:
                if bool((_roots_of(G, c) == r).any()):
                    ok = False
                expected.append(y)
                continue
            ids = _along(c, vd)
            keep = [p for p in range(ids.numel()) if G.root(int(ids[p])) != r]
            if not keep:
                ok = False
                break
            expected.append(y.index_select(vd, torch.tensor(keep)))
        if not ok:
            continue
        try:
            got = call(t.module, xs, seed)
        except Exception as exc:
            bugs.append(f"removing group {r} (a removable group) makes the call fail: {type(exc).__name__}: {exc}")
            continue
        for j, (a, b) in enumerate(zip(got, expected)):
            if not close(a, b):
                bugs.append(f"removing group {r}: output {j} is not the original output without that group's "
                            f"positions (shapes {tuple(a.shape)} vs {tuple(b.shape)})")
                break
    return bugs


def _roots_of(G: Groups, c: torch.Tensor) -> torch.Tensor:
    u = torch.unique(c).tolist()
    lut = {x: G.root(x) for x in u}
    return c.clone().apply_(lambda v: lut[v])


def _along(c: torch.Tensor, vd: int) -> torch.Tensor:
    idx = [0] * c.dim()
    idx[vd] = slice(None)
    return c[tuple(idx)]


def _overclaims(t: Traced, case: Case, G: Groups, truth) -> List[str]:
    info = []
    pinned = [(k, i) for (k, i) in truth if G.src.is_pinned(int(t.atoms[k][i]))]
    if pinned:
        reasons = sorted({G.src.pinned_reason(int(t.atoms[k][i])) for k, i in pinned})
        info.append(f"pins {len(pinned)} of {len(truth)} input channels: {reasons[:2]}")
    if t.graph.consumers:
        return info
    # true partition of input channels: channels that change one output element together
    parent = {key: key for key in truth}

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    keys = list(truth)
    for j in range(len(t.outs)):
        if not keys:
            break
        # channels that change one slice of the output along its channel dim belong
        # together (same position of a rectangular tensor), even if no single
        # element mixes them (cat along space, elementwise max, ...)
        vd = t.vdims[j]
        per_key = []
        for key in keys:
            m = truth[key][j]
            if vd is not None and m.dim():
                m = m.movedim(vd, 0).reshape(m.shape[vd], -1).any(1)
            else:
                m = m.reshape(-1).any().reshape(1)
            per_key.append(m)
        stack = torch.stack(per_key)  # channels x slices
        for e in torch.nonzero(stack.any(0)).flatten().tolist():
            ks = [keys[q] for q in torch.nonzero(stack[:, e]).flatten().tolist()]
            for other in ks[1:]:
                parent[find(other)] = find(ks[0])
    over = 0
    for x in range(len(keys)):
        for y in range(x + 1, len(keys)):
            kx, ky = keys[x], keys[y]
            same_claim = G.root(int(t.atoms[kx[0]][kx[1]])) == G.root(int(t.atoms[ky[0]][ky[1]]))
            if same_claim and find(kx) != find(ky):
                over += 1
    if over:
        info.append(f"couples {over} pairs of input channels that no output element mixes")
    # output elements claimed to depend on a group that never changes them
    for j, c in enumerate(t.claims):
        if not t.outs[j].is_floating_point():
            continue  # discrete outputs change too rarely to measure
        false = 0
        for r in {G.root(int(a)) for a in torch.unique(c).tolist() if a >= 0}:
            src_keys = [key for key in truth if G.root(int(t.atoms[key[0]][key[1]])) == r]
            if not src_keys:
                continue
            claimed = _roots_of(G, c) == r
            moved = torch.zeros(c.shape, dtype=torch.bool)
            for key in src_keys:
                moved |= truth[key][j]
            false += int((claimed & ~moved).sum())
        if false:
            info.append(f"output {j}: {false} of {c.numel()} elements claim a group that never changes them")
    return info
