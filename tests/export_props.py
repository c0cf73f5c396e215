"""Properties every export must hold, checked on one seeded random example.

Start at :func:`run_example`: ``seed`` -> network (``randnet.make_net``), a
random request (pruned inputs/outputs, mode, reorder) -> export -> checks.
Used by ``tests/test_random_networks.py`` (CI) and ``benchmarks/soak.py``.

Properties (each violation is one line in ``Outcome.problems``):

1. The request is either exported, or rejected with a ChannelcutError of the
   expected kind (EmptyLayerError / NotPrunableError), and a rejected model is
   exactly as before (state_dict, parameter objects, structure, hooks).
   NotPrunableError is expected only for ``pruned_outputs`` (a pinned group,
   or one that kept channels depend on) and must name the channel.
   Requests we can classify are held to it: nothing pruned must succeed; all
   input channels of one layer must raise EmptyLayerError; an output channel
   the engine reports as pinned must raise NotPrunableError.
2. The spec honours the request: every requested input channel is masked;
   every requested output channel is sliced away; constrained export reads
   no subsets.
3. ``get_mock_model()`` leaves the user's model untouched.
4. After ``prune(verify=True)``: pruned outputs equal mock outputs in float64
   to 1e-10 relative (same output structure), and the model has no more
   parameters than before. Nothing pruned: the model is bit-identical.
5. A second ``compute`` on the pruned model with ``pruned_inputs=[]`` gives a
   spec with no slices, subselections, masks or zero columns, and pruning
   with it changes nothing (outputs bit-identical).
6. The shape-only trace (ops computed on meta tensors), when it does not hand
   over to a real pass, is the same graph as a trace with real values
   (:func:`graph_fingerprint`), and leaves the model as it was.
7. The independent reference (DESIGN.md, invariant 7; ``support.reference``):
   the pruned model and the mock both equal the ORIGINAL model with exactly
   the removed consumer weight columns zeroed by hand, in float64 to 1e-10
   relative. The removed columns are the request plus ``spec.additions``,
   never ``spec.masks``; the additions are checked against the trace-level
   channel groups: unconstrained / baseline, exactly the consumer inputs of
   the groups of the requested outputs (none with only ``pruned_inputs``:
   nothing is pruned that was not asked for); constrained, at least those
   and at most those plus the groups of the requested inputs. The spec's
   ``requested``, ``removed_inputs()`` and ``masks`` agree with it, and no
   consumer ends with every input column masked (resolve's own rule:
   constrained growth never empties a layer).
8. Widths stay consistent (DESIGN.md, invariant 8; ``support.widths``):
   after every ``prune()`` (the export, and the second one of property 5),
   every module's width attributes agree with its tensors (conv/linear
   channels and groups, norms' ``num_features`` / ``num_channels`` /
   ``normalized_shape``, ``nn.MultiheadAttention``'s ``embed_dim``,
   ``num_heads``, ``head_dim``, ``kdim``, ``vdim``), and each Subselect
   layer's selection is well formed and its recorded input width is the
   width of the input it gets.

Every network has random norms (affine parameters, running statistics),
layer scales and biases (``randnet``), so a per-channel tensor sliced at the
wrong index or in the wrong order changes the output.
"""

from __future__ import annotations

import random
import time
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from channelcut import ChannelcutError, EmptyLayerError, NotPrunableError, PruningManager
from randnet import make_net
from support.compare import compare, n_params  # noqa: F401  (re-exported: one comparison for all tests)
from support.reference import check_removal, zeroed_reference
from support.unchanged import assert_unchanged, diff_snapshot, raises_unchanged, snapshot  # noqa: F401
from support.widths import check_widths

RTOL = 1e-10
MODES = ("unconstrained", "constrained", "baseline")
REQUESTS = {  # kind -> weight
    "empty": 0.07, "single_in": 0.2, "single_out": 0.15, "few": 0.2, "nearly_all_in": 0.1,
    "nearly_all_out": 0.07, "all_in": 0.05, "pinned_out": 0.04, "mixed": 0.12,
}


# ---------------------------------------------------------------------------
# traced graphs: "the same graph"
# ---------------------------------------------------------------------------


def graph_fingerprint(graph: Any) -> Dict[str, Any]:
    """Everything a :class:`TracedGraph` tells resolve, as comparable data:
    atoms (owner, channel), groups, pins with their reasons, and every list
    of consumers, producers, parameter uses, needs and attribute records."""
    src = graph.sources
    atoms = [(src.source(a).op, src.source(a).channel) for a in range(len(src))]
    pins = {r: src.pinned_reason(r) for r in sorted(src.pinned_roots())}
    fields = ("ops", "producers", "consumers", "param_uses", "barriers", "output_ids", "needs",
              "module_sizes", "module_lists", "depthwise", "fixed_counts", "consumers_by_param",
              "producers_by_param")
    fp: Dict[str, Any] = {"atoms": atoms, "groups": src.roots(), "pins": pins}
    fp.update({f: getattr(graph, f) for f in fields})
    return fp


def fingerprint_diff(a: Dict[str, Any], b: Dict[str, Any]) -> List[str]:
    """The fields where two fingerprints differ (with the first difference)."""
    out = []
    for k in a:
        if a[k] != b[k]:
            x, y = a[k], b[k]
            if isinstance(x, (list, dict)) and isinstance(y, (list, dict)):
                xs = list(x.items()) if isinstance(x, dict) else list(x)
                ys = list(y.items()) if isinstance(y, dict) else list(y)
                i = next((i for i, (p, q) in enumerate(zip(xs, ys)) if p != q), min(len(xs), len(ys)))
                out.append(f"{k}: lengths {len(xs)} / {len(ys)}, first difference at {i}: "
                           f"{xs[i] if i < len(xs) else '-'} / {ys[i] if i < len(ys) else '-'}")
            else:
                out.append(f"{k}: {x!r} / {y!r}")
    return out


def check_shape_only_trace(net: nn.Module, inputs: Any) -> Tuple[Optional[bool], List[str]]:
    """Trace ``net`` with values and shape-only; return (whether the
    shape-only pass was kept, problems). A shape-only pass that hands over to
    a real pass is fine (None problems), as long as the model is unchanged."""
    from channelcut.pruning import shape_only
    from channelcut.pruning.tracing import _trace_once

    real = graph_fingerprint(_trace_once(net, inputs, False)[0])
    before = snapshot(net)  # (after the real pass: a model may cache in forward)
    state = shape_only.snapshot_state(net)
    try:
        fake = graph_fingerprint(_trace_once(net, inputs, True)[0])
    except Exception:
        fake = None
    left = shape_only.restore_state(state)
    problems = [f"after the shape-only trace: {d}" for d in diff_snapshot(net, before)]
    if fake is not None and not left:
        problems += [f"shape-only trace differs from the real one in {d}" for d in fingerprint_diff(real, fake)]
        return True, problems
    return False, problems


# ---------------------------------------------------------------------------
# requests
# ---------------------------------------------------------------------------


@dataclass
class Request:
    kind: str
    mode: str
    reorder: bool
    pruned_inputs: List[Tuple[str, int]]
    pruned_outputs: List[Tuple[str, int]]
    expect: str  # "ok" | "ok_or_empty" | "EmptyLayerError" | "NotPrunableError"
    copy_cost: float = 4.0  # the cost model: 0 always gathers, 1e12 always reads wider views

    def kwargs(self) -> Dict[str, Any]:
        return dict(
            pruned_inputs=list(self.pruned_inputs), pruned_outputs=list(self.pruned_outputs),
            constrained=self.mode == "constrained", baseline=self.mode == "baseline", reorder=self.reorder,
            copy_cost=self.copy_cost,
        )


def make_request(seed: int, net: nn.Module, inputs: List[torch.Tensor]) -> Request:
    rng = random.Random(seed * 1_000_003 + 17)
    probe = PruningManager(net)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        probe.trace(inputs)
    cons = probe.consumers()
    prods = probe.producers()
    pinned = set()
    for g in probe.channel_groups():
        if g.pinned is not None:
            pinned.update(g.producers)
    free_out = [(p, j) for p, n in prods.items() for j in range(n) if (p, j) not in pinned]
    all_in = [(c, i) for c, n in cons.items() for i in range(n)]
    mode = rng.choice(MODES)
    reorder = rng.random() < 0.7
    kind = rng.choices(list(REQUESTS), list(REQUESTS.values()))[0]
    if kind in ("single_out", "nearly_all_out") and not free_out:
        kind = "single_in"
    if kind == "pinned_out" and not pinned:
        kind = "few"
    if not all_in and kind in ("single_in", "few", "mixed", "nearly_all_in", "all_in"):
        kind = "single_out" if free_out else "empty"  # no consumer at all (e.g. only grouped convs)
    pi: List[Tuple[str, int]] = []
    po: List[Tuple[str, int]] = []
    expect = "ok_or_empty"
    if kind == "empty":
        expect = "ok"
    elif kind == "single_in":
        pi = [rng.choice(all_in)]
    elif kind == "single_out":
        po = [rng.choice(free_out)]
    elif kind == "few":
        pi = rng.sample(all_in, min(len(all_in), rng.randint(2, 6)))
    elif kind == "mixed":
        pi = rng.sample(all_in, min(len(all_in), rng.randint(1, 4)))
        po = rng.sample(free_out, min(len(free_out), rng.randint(1, 3)))
    elif kind == "nearly_all_in":
        c = rng.choice([c for c, n in cons.items() if n >= 2] or list(cons))
        n = cons[c]
        keep = set(rng.sample(range(n), min(n, rng.choice([1, 1, 2]))))
        pi = [(c, i) for i in range(n) if i not in keep]
    elif kind == "nearly_all_out":
        by_p: Dict[str, List[int]] = {}
        for p, j in free_out:
            by_p.setdefault(p, []).append(j)
        p = rng.choice(sorted(by_p))
        chans = by_p[p]
        po = [(p, j) for j in chans[:-1]] if len(chans) > 1 else [(p, chans[0])]
    elif kind == "all_in":
        c = rng.choice(sorted(cons))
        pi = [(c, i) for i in range(cons[c])]
        expect = "EmptyLayerError"
    elif kind == "pinned_out":
        po = [rng.choice(sorted(pinned))]
        if rng.random() < 0.5 and all_in:
            pi = [rng.choice(all_in)]
        expect = "NotPrunableError"
    if kind != "all_in":
        # asking for every input channel of a layer is always an empty layer
        for c, n in cons.items():
            if {i for (cc, i) in pi if cc == c} >= set(range(n)):
                expect = "EmptyLayerError"
    if expect != "NotPrunableError" and any(o in pinned for o in po):
        expect = "NotPrunableError"
    rng.shuffle(pi)
    # (its own generator: the draws above stay those of earlier sessions' seeds)
    copy_cost = random.Random(seed + 99).choice([0.0, 4.0, 1e12])
    return Request(kind, mode, reorder, pi, po, expect, copy_cost)


# ---------------------------------------------------------------------------
# one example
# ---------------------------------------------------------------------------


@dataclass
class Outcome:
    seed: int
    request: Optional[Request] = None
    status: str = "?"  # "pruned" | "rejected:<ErrorName>" | "crashed"
    problems: List[str] = field(default_factory=list)
    barriers: List[str] = field(default_factory=list)
    seconds: float = 0.0
    removed_groups: int = 0
    shape_only: Optional[bool] = None  # the shape-only trace was kept (not handed to a real pass)

    @property
    def ok(self) -> bool:
        return not self.problems

    def report(self) -> str:
        r = self.request
        lines = [f"seed {self.seed}: {self.status}"]
        if r is not None:
            lines.append(f"  request: kind={r.kind} mode={r.mode} reorder={r.reorder} copy_cost={r.copy_cost} expect={r.expect}")
            lines.append(f"  pruned_inputs={r.pruned_inputs}")
            lines.append(f"  pruned_outputs={r.pruned_outputs}")
        lines += [f"  PROBLEM: {p}" for p in self.problems]
        lines.append(f"  reproduce: python -c \"import sys; sys.path.insert(0, 'tests'); import export_props as e; "
                     f"print(e.run_example({self.seed}).report())\"")
        return "\n".join(lines)


def run_example(seed: int, show_net: bool = False) -> Outcome:
    """Build network ``seed``, export a random request, check every property."""
    out = Outcome(seed)
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _run(seed, out)
    except Exception:  # the harness itself or the engine crashed outside the API's errors
        out.status = "crashed"
        out.problems.append("unexpected exception:\n" + traceback.format_exc(limit=8))
    out.seconds = time.perf_counter() - t0
    if show_net and out.problems:
        net, _ = make_net(seed)
        out.problems.append("network:\n" + net.describe())
    return out


def _run(seed: int, out: Outcome) -> None:
    torch.manual_seed(seed)
    net, xs = make_net(seed)
    req = make_request(seed, net, xs)
    out.request = req
    with torch.no_grad():
        y_orig = net(*xs)
    before = snapshot(net)
    params_before = n_params(net)
    problems = out.problems

    # --- the shape-only trace is the real trace ------------------------------
    out.shape_only, shape_problems = check_shape_only_trace(net, xs)
    problems += shape_problems

    # --- compute ------------------------------------------------------------
    m = PruningManager(net)
    try:
        m.compute(xs, **req.kwargs())
    except ChannelcutError as exc:
        out.status = f"rejected:{type(exc).__name__}"
        _check_rejection(req, exc, problems)
        problems += [f"after {type(exc).__name__} in compute: {d}" for d in diff_snapshot(net, before)]
        return
    if req.expect in ("EmptyLayerError", "NotPrunableError"):
        problems.append(f"expected {req.expect}, but compute accepted the request")
    spec = m.spec
    out.barriers = sorted({f"{b[0]} in {b[1]}" for b in spec.barriers})
    out.removed_groups = spec.removed_groups
    problems += [f"after compute: {d}" for d in diff_snapshot(net, before)]
    _check_spec(m, req, problems)

    # --- mock ---------------------------------------------------------------
    mock = m.get_mock_model()
    with torch.no_grad():
        y_mock = mock(*xs)
    del mock
    problems += [f"after get_mock_model: {d}" for d in diff_snapshot(net, before)]
    if req.kind == "empty":
        d = compare(y_mock, y_orig, rtol=None)
        if d:
            problems.append(f"nothing pruned, but the mock differs from the model: {d}")

    # --- the independent reference: the original model, columns zeroed by hand
    y_ref = _reference_outputs(m, net, xs, req, problems)
    d = compare(y_mock, y_ref)
    if d:
        problems.append(f"mock != independent reference: {d}")

    # --- prune --------------------------------------------------------------
    try:
        m.prune(verify=True)
    except ChannelcutError as exc:
        out.status = f"rejected:{type(exc).__name__}"
        problems.append(f"prune() raised {type(exc).__name__}: {exc}")
        problems += [f"after failed prune: {d}" for d in diff_snapshot(net, before)]
        return
    out.status = "pruned"
    with torch.no_grad():
        y_pruned = net(*xs)
    d = compare(y_pruned, y_mock)
    if d:
        problems.append(f"pruned model != mock: {d}")
    d = compare(y_pruned, y_ref)
    if d:
        problems.append(f"pruned model != independent reference: {d}")
    if n_params(net) > params_before:
        problems.append(f"pruned model has more parameters: {params_before} -> {n_params(net)}")
    problems += [f"after prune, widths: {w}" for w in check_widths(net, xs)]
    if req.kind == "empty":
        d = compare(y_pruned, y_orig, rtol=None)
        if d:
            problems.append(f"nothing pruned, but outputs changed: {d}")
        diffs = diff_snapshot(net, before)
        if diffs:
            problems.append(f"nothing pruned, but the model changed: {diffs[:3]}")

    # --- a second export of the pruned model prunes nothing -----------------
    m2 = PruningManager(net)
    try:
        m2.compute(xs, pruned_inputs=[])
    except ChannelcutError as exc:
        problems.append(f"second compute on the pruned model raised {type(exc).__name__}: {exc}")
        return
    s2 = m2.spec
    if s2.slices or s2.subselections or s2.masks or s2.zeros:
        problems.append(
            f"second compute with nothing pruned is not empty: slices={sorted(s2.slices)} "
            f"subselections={[s.param for s in s2.subselections]} masks={[e.param for e in s2.masks]} "
            f"zeros={[e.param for e in s2.zeros]}"
        )
    try:
        m2.prune(verify=True)
    except ChannelcutError as exc:
        problems.append(f"second prune (nothing pruned) raised {type(exc).__name__}: {exc}")
        return
    with torch.no_grad():
        y2 = net(*xs)
    d = compare(y2, y_pruned, rtol=None)
    if d:
        problems.append(f"second prune (nothing pruned) changed the outputs: {d}")
    problems += [f"after the second prune, widths: {w}" for w in check_widths(net, xs)]


def _reference_outputs(m: PruningManager, net: nn.Module, xs: List[torch.Tensor], req: Request,
                       problems: List[str]) -> Any:
    """Property 7: check what the spec says it removes against the request
    and the channel groups; return the outputs of the original model with
    the request plus the reported additions zeroed by hand."""
    removed, why = check_removal(m.spec, m.channel_groups(), req.pruned_inputs, req.pruned_outputs,
                                 widths=m.consumers())
    problems += why
    ref = zeroed_reference(net, removed, m.graph)
    with torch.no_grad():
        return ref(*xs)


def _check_rejection(req: Request, exc: ChannelcutError, problems: List[str]) -> None:
    name = type(exc).__name__
    if req.expect == "ok":
        problems.append(f"a valid request was rejected with {name}: {exc}")
    elif req.expect == "ok_or_empty":
        # an emptied layer is always a valid rejection; NotPrunableError only
        # for pruned_outputs (a group that kept channels depend on, e.g. a gate
        # or attention scores computed from it); pruned_inputs never pin
        ok = isinstance(exc, EmptyLayerError) or (isinstance(exc, NotPrunableError) and req.pruned_outputs)
        if not ok:
            problems.append(f"unexpected {name}: {exc}")
        elif isinstance(exc, NotPrunableError) and not any(p in str(exc) for p, _ in req.pruned_outputs):
            problems.append(f"NotPrunableError does not name the requested channel: {exc}")
    elif req.expect == "EmptyLayerError":
        if not isinstance(exc, EmptyLayerError):
            problems.append(f"expected EmptyLayerError, got {name}: {exc}")
    elif req.expect == "NotPrunableError":
        # a request can be invalid twice over (pinned output and an emptied layer)
        if not isinstance(exc, (NotPrunableError, EmptyLayerError)):
            problems.append(f"expected NotPrunableError, got {name}: {exc}")
    if not str(exc).strip():
        problems.append(f"{name} with an empty message")


def _check_spec(m: PruningManager, req: Request, problems: List[str]) -> None:
    spec = m.spec
    masked: Dict[str, set] = {}
    for e in spec.masks:
        masked.setdefault(e.param, set()).update(e.channels)
    for p, c in req.pruned_inputs:
        if c not in masked.get(p, set()):
            problems.append(f"requested input channel ({p!r}, {c}) is not masked in the spec")
    g = m.graph
    for p, j in req.pruned_outputs:
        for op in g.producers_by_param.get(p, []):
            prod = g.producers[op]
            for u in g.param_uses:
                if u.param == p and list(u.ids) == list(prod.out_ids) and list(u.positions) == list(range(len(u.ids))):
                    kept = spec.slices.get(p, {}).get(u.dim)
                    if kept is None or j in kept:
                        problems.append(f"requested output channel ({p!r}, {j}) is not sliced away")
                    break
    if req.mode == "constrained" and spec.subselections:
        problems.append(f"constrained export reads subsets: {[s.param for s in spec.subselections]}")
    if req.kind == "empty" and (spec.slices or spec.subselections or spec.masks or spec.zeros):
        problems.append(f"nothing requested, but the spec slices {sorted(spec.slices)}")
