"""The independent reference: what a pruned model must compute, built without
the plan. Start at :func:`zeroed_reference` and :func:`check_removal`.

Every equality test used to compare the pruned model with the *mock*, and the
mock is built from the resolved masks (``spec.masks``): the same plan as the
pruned model, so a resolve bug that masks a channel nobody asked for was
invisible. The reference here is the ORIGINAL model with exactly the removed
consumer weight columns set to zero *by hand* (DESIGN.md, invariant 7):

- the columns come from the request itself plus ``spec.additions`` (what the
  export reports it removes beyond the request), never from ``spec.masks``;
- the additions are checked against what the request implies, computed from
  the trace-level channel groups (:meth:`PruningManager.channel_groups`):
  a ``pruned_outputs`` channel removes every consumer input of its group
  (exactly that, in unconstrained export); constrained export may also
  remove the consumer inputs of the group of a requested input, the whole
  group or nothing beyond the request, and nothing else;
- no consumer ends with every input column removed (resolve's own rule);
- a column is zeroed in the module's own weight layout (:func:`zero_columns_`),
  not with channelcut's masking code; only a weight used functionally (not a
  conv or linear module's ``weight``) falls back to the traced graph's
  ``Consumer.weight_dim`` / ``groups`` (trace data, not the plan).
"""

from __future__ import annotations

import copy
from typing import Any, Dict, Iterable, List, Mapping, Optional, Set, Tuple

import torch
from torch import nn

Removed = Mapping[str, Iterable[int]]


# ---------------------------------------------------------------------------
# zeroing columns by hand
# ---------------------------------------------------------------------------


def _owner(net: nn.Module, name: str) -> Tuple[nn.Module, str]:
    mod_name, _, attr = name.rpartition(".")
    return (net.get_submodule(mod_name) if mod_name else net), attr


def _zero_grouped(w: torch.Tensor, channels: List[int], groups: int) -> None:
    """Grouped (not transposed) conv layout: weight ``(out, in // groups, *k)``;
    activation input channel ``c`` is column ``c % per_group`` of the output
    rows of group ``c // per_group``."""
    per_group = w.shape[1]
    rows = w.shape[0] // groups
    for c in channels:
        g, local = divmod(c, per_group)
        w[g * rows:(g + 1) * rows, local] = 0


def zero_columns_(w: torch.Tensor, channels: Iterable[int], module: Optional[nn.Module] = None,
                  attr: str = "weight", consumer: Any = None) -> None:
    """Zero the weight entries that read the given activation input channels.

    Layout from ``module`` when ``w`` is a conv's or linear's ``weight``
    (conv: dim 1, grouped as above; transposed conv: dim 0; linear: dim 1);
    otherwise from ``consumer`` (a traced ``Consumer``: ``weight_dim``,
    ``groups``). Raises ValueError when neither says how."""
    chans = sorted({int(c) for c in channels})
    if not chans:
        return
    if isinstance(module, nn.modules.conv._ConvNd) and attr == "weight":
        n_in = module.in_channels
        bad = [c for c in chans if not 0 <= c < n_in]
        if bad:
            raise ValueError(f"input channels {bad} out of range for {module} ({n_in} input channels)")
        if module.transposed:  # (in, out // groups, *k): input channels are rows, any groups
            w[chans] = 0
        elif module.groups == 1:
            w[:, chans] = 0
        else:
            _zero_grouped(w, chans, module.groups)
        return
    if isinstance(module, nn.Linear) and attr == "weight":
        w[:, chans] = 0
        return
    if consumer is None:
        raise ValueError(f"no conv/linear module owns this weight ({type(module).__name__}.{attr}) "
                         "and no traced consumer says which dim holds its input channels")
    wd, groups = consumer.weight_dim, consumer.groups
    if groups == 1 or wd == 0:
        w.index_fill_(wd, torch.tensor(chans, dtype=torch.long, device=w.device), 0)
    else:
        _zero_grouped(w, chans, groups)


@torch.no_grad()
def zero_inputs_(net: nn.Module, removed: Removed, graph: Any = None) -> nn.Module:
    """Zero, in place, exactly the given consumer weight input columns of
    ``net`` (``{weight name: input channels}``). A tied weight is zeroed
    everywhere it is used: that is what removing its columns means."""
    for name, channels in removed.items():
        module, attr = _owner(net, name)
        w = getattr(module, attr)
        consumer = None
        if graph is not None and name in graph.consumers_by_param:
            consumer = graph.consumers[graph.consumers_by_param[name][0]]
        zero_columns_(w.data if isinstance(w, nn.Parameter) else w, channels, module, attr, consumer)
    return net


def zeroed_reference(net: nn.Module, removed: Removed, graph: Any = None) -> nn.Module:
    """A deep copy of ``net`` (the ORIGINAL model) with exactly the removed
    consumer weight input columns set to zero by hand (see the module doc).
    ``graph`` (a ``TracedGraph``) is only read for weights used functionally."""
    return zero_inputs_(copy.deepcopy(net), removed, graph)


# ---------------------------------------------------------------------------
# what a request removes, from the channel groups
# ---------------------------------------------------------------------------


def by_param(pairs: Iterable[Tuple[str, int]]) -> Dict[str, Set[int]]:
    """``[(name, channel), ...]`` -> ``{name: {channels}}``."""
    out: Dict[str, Set[int]] = {}
    for name, ch in pairs:
        out.setdefault(name, set()).add(int(ch))
    return out


def _union(*maps: Mapping[str, Iterable[int]]) -> Dict[str, Set[int]]:
    out: Dict[str, Set[int]] = {}
    for m in maps:
        for k, v in m.items():
            out.setdefault(k, set()).update(v)
    return {k: v for k, v in out.items() if v}


def _minus(a: Mapping[str, Set[int]], b: Mapping[str, Set[int]]) -> Dict[str, Set[int]]:
    out = {k: set(v) - set(b.get(k, ())) for k, v in a.items()}
    return {k: v for k, v in out.items() if v}


def _not_within(a: Mapping[str, Set[int]], b: Mapping[str, Set[int]]) -> Dict[str, List[int]]:
    return {k: sorted(v) for k, v in _minus(a, b).items()}


def group_closure(groups: Iterable[Any], pruned_inputs: Iterable[Tuple[str, int]] = (),
                  pruned_outputs: Iterable[Tuple[str, int]] = ()) -> Tuple[Dict[str, Set[int]], Dict[str, Set[int]]]:
    """From trace-level channel groups (``PruningManager.channel_groups()``):
    ``(outputs, inputs)``: every consumer input in the group of a requested
    output channel, and every consumer input in the group of a requested
    input channel (a channel that no group holds, a constant, adds nothing)."""
    of_producer: Dict[Tuple[str, int], Any] = {}
    of_consumer: Dict[Tuple[str, int], Any] = {}
    for g in groups:
        for p in g.producers:
            of_producer[tuple(p)] = g
        for c in g.consumers:
            of_consumer[tuple(c)] = g

    def closure(keys: Iterable[Tuple[str, int]], table: Dict[Tuple[str, int], Any]) -> Dict[str, Set[int]]:
        seen: Set[int] = set()
        out: Dict[str, Set[int]] = {}
        for key in keys:
            g = table.get((key[0], int(key[1])))
            if g is None or g.id in seen:
                continue
            seen.add(g.id)
            for name, ch in g.consumers:
                out.setdefault(name, set()).add(ch)
        return out

    return closure(pruned_outputs, of_producer), closure(pruned_inputs, of_consumer)


def _partial_groups(groups: List[Any], removed: Mapping[str, Set[int]], request: Mapping[str, Set[int]]) -> List[str]:
    """Constrained export removes whole channel groups: within each group, the
    removed consumer inputs are either just the requested ones (the group
    stays: always so for a pinned group) or all of them. The groups where
    that fails."""
    out = []
    for g in groups:
        cons = {(p, c) for p, c in g.consumers}
        rem = {(p, c) for p, c in cons if c in removed.get(p, ())}
        req = {(p, c) for p, c in cons if c in request.get(p, ())}
        if rem != req and (rem != cons or g.pinned is not None):
            extra = sorted(rem - req)
            out.append(f"group {g.id} ({len(cons)} consumer inputs{', pinned' if g.pinned else ''}): "
                       f"removes {extra[:4]}{' ...' if len(extra) > 4 else ''} beyond the request but not the whole group")
    return out


def check_removal(spec: Any, groups: Iterable[Any], pruned_inputs: Iterable[Tuple[str, int]],
                  pruned_outputs: Iterable[Tuple[str, int]] = (),
                  widths: Optional[Mapping[str, int]] = None) -> Tuple[Dict[str, List[int]], List[str]]:
    """What the reference must zero, and every way the spec's report disagrees
    with the request and the channel groups.

    Returns ``(removed, problems)``: ``removed`` is the request plus
    ``spec.additions`` (``{consumer weight: sorted channels}``); ``problems``
    is empty when

    - ``spec.requested`` is the request, and no addition repeats it;
    - unconstrained / baseline: the additions are exactly the consumer
      inputs of the groups of the requested outputs (none without
      ``pruned_outputs``: nothing is pruned that was not asked for);
    - constrained: they include those, and lie within them plus the groups
      of the requested inputs; within each channel group, either just the
      requested inputs or all of the group's consumer inputs are removed
      (constrained export removes whole groups, never a pinned one);
    - ``spec.removed_inputs()`` and ``spec.masks`` say the same as ``removed``;
    - no consumer ends with every input column removed or masked (resolve's
      own rule: a request that empties a layer is an EmptyLayerError, and
      constrained growth never empties one). ``widths`` is each consumer
      weight's number of input channels, from the trace
      (``PruningManager.consumers()``); without it, the widths the spec
      lists for its consumers (``spec.consumers``, also copied from the trace).
    """
    problems: List[str] = []
    request = by_param(pruned_inputs)
    pruned_outputs = list(pruned_outputs)
    groups = list(groups)
    requested = {p: set(c) for p, c in spec.requested.items() if c}
    if requested != request:
        problems.append(f"spec.requested {_fmt(requested)} is not the request {_fmt(request)}")
    additions = by_param((a.param, c) for a in spec.additions for c in a.channels)
    again = {p: sorted(set(c) & request.get(p, set())) for p, c in additions.items()}
    again = {p: c for p, c in again.items() if c}
    if again:
        problems.append(f"spec.additions repeat requested channels: {again}")
    removed = _union(request, additions)
    out_closure, in_closure = group_closure(groups, request_pairs(request), pruned_outputs)
    must = _union(request, out_closure)
    if spec.mode == "constrained":
        may = _union(must, in_closure)
        missing, beyond = _not_within(must, removed), _not_within(removed, may)
        if missing:
            problems.append(f"constrained: channels of the requested outputs' groups not removed: {_fmt(missing)}")
        if beyond:
            problems.append("constrained: removed beyond the groups of the request (and not reported as such): "
                            f"{_fmt(beyond)}; additions {_fmt_additions(spec)}")
        partial = _partial_groups(groups, removed, request)
        if partial:
            problems.append("constrained: " + "; ".join(partial[:3]) + (" ..." if len(partial) > 3 else ""))
    elif removed != must:
        extra, missing = _not_within(removed, must), _not_within(must, removed)
        what = "the request" if not pruned_outputs else "the request and its pruned_outputs' channel groups"
        problems.append(f"{spec.mode}: removes {_fmt(extra) or 'nothing'} beyond {what} and misses "
                        f"{_fmt(missing) or 'nothing'}; additions {_fmt_additions(spec)}")
    reported = {p: set(c) for p, c in spec.removed_inputs().items()}
    if reported != removed:
        problems.append(f"spec.removed_inputs() {_fmt(reported)} is not request + additions {_fmt(removed)}")
    masks = _union(*({e.param: set(e.channels)} for e in spec.masks))
    if masks != removed:
        problems.append(f"spec.masks mask {_fmt(_not_within(masks, removed)) or 'nothing'} beyond request + additions "
                        f"and miss {_fmt(_not_within(removed, masks)) or 'nothing'}")
    problems += emptied_consumers(spec, _union(removed, masks), widths)
    return {p: sorted(c) for p, c in removed.items()}, problems


def emptied_consumers(spec: Any, removed: Mapping[str, Iterable[int]],
                      widths: Optional[Mapping[str, int]] = None) -> List[str]:
    """The consumers that ``removed`` (``{weight: input channels}``) leaves
    with no input column at all, one line each (see :func:`check_removal`)."""
    if widths is None:
        widths = {s.name: s.before for s in spec.consumers}
    out = []
    for p, chans in sorted(removed.items()):
        n = widths.get(p)
        if n is None:
            out.append(f"{p!r} has removed input columns {sorted(chans)[:8]} but is not a consumer of the trace")
        elif set(range(n)) <= set(chans):
            out.append(f"{spec.mode}: consumer {p!r} ends with every input column masked ({n} of {n}): "
                       "a layer that reads nothing (resolve never empties a consumer)")
    return out


def request_pairs(request: Mapping[str, Iterable[int]]) -> List[Tuple[str, int]]:
    return [(p, c) for p, cs in request.items() for c in cs]


def _fmt(m: Mapping[str, Iterable[int]], limit: int = 6) -> str:
    items = sorted((k, sorted(v)) for k, v in m.items())
    s = ", ".join(f"{k}{v}" for k, v in items[:limit])
    return "{" + s + (", ..." if len(items) > limit else "") + "}" if items else ""


def _fmt_additions(spec: Any, limit: int = 4) -> str:
    adds = spec.additions
    s = "; ".join(f"{a.param}{a.channels}: {a.reason}" for a in adds[:limit])
    return "[" + s + ("; ..." if len(adds) > limit else "") + "]"
