"""What can be masked in a model: layers, channel groups, segments, the head.

Start at :func:`build_structure`. With example inputs the model is traced
once (:meth:`channelcut.PruningManager.trace`) and everything comes from the
trace; without them only conv/linear modules are known (enough for
unconstrained masks of weight-based heuristics).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Set

import torch
from torch import nn

from ..importance import LayerRef
from ..pruning import ChannelGroup, PruningManager


@dataclass
class Segment:
    """Channel groups that share one channel space.

    Every group one producer emits belongs to one segment, so does everything
    summed into one residual stream, and all inputs of one consumer (e.g. a
    concat). Constrained selection with ``scope="local"`` removes ``amount``
    of the removable groups of each segment.
    """

    id: int
    groups: List[ChannelGroup]
    producers: List[str]  # producer weight names emitting these channels
    consumers: List[str]  # consumer weight names reading them

    @property
    def width(self) -> int:
        """Number of channel groups (the channel count of its tensors)."""
        return len(self.groups)

    @property
    def removable(self) -> List[ChannelGroup]:
        """Groups that are not pinned and are read by at least one consumer."""
        return [g for g in self.groups if g.pinned is None and g.consumers]


@dataclass
class Structure:
    model: nn.Module
    consumers: Dict[str, LayerRef]
    producers: Dict[str, LayerRef]
    head: Optional[str]
    graph: Any = None
    groups: List[ChannelGroup] = field(default_factory=list)
    # consumer weight -> group id of each input position (-1: no source)
    input_groups: Dict[str, List[int]] = field(default_factory=dict)
    segments: List[Segment] = field(default_factory=list)
    segment_of: Dict[int, int] = field(default_factory=dict)  # group id -> segment id
    # consumers that read only model inputs (the stem): not masked unless asked for
    input_layers: Set[str] = field(default_factory=set)

    def names(self) -> Dict[str, str]:
        """Every valid layer name (weight or module name) -> weight name."""
        out: Dict[str, str] = {}
        for d in (self.producers, self.consumers):
            for name, ref in d.items():
                out[name] = name
                if ref.module_name:
                    out.setdefault(ref.module_name, name)
        return out


def _is_layer(m: nn.Module) -> bool:
    return isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and isinstance(getattr(m, "weight", None), nn.Parameter)


def _from_modules(model: nn.Module) -> Structure:
    consumers: Dict[str, LayerRef] = {}
    producers: Dict[str, LayerRef] = {}
    head = None
    for mname, m in model.named_modules():
        if not _is_layer(m):
            continue
        wname = f"{mname}.weight" if mname else "weight"
        transposed = bool(getattr(m, "transposed", False))
        groups = int(getattr(m, "groups", 1))
        cin = m.in_features if isinstance(m, nn.Linear) else m.in_channels
        cout = m.out_features if isinstance(m, nn.Linear) else m.out_channels
        bias = m.bias if isinstance(getattr(m, "bias", None), torch.Tensor) else None
        consumers[wname] = LayerRef(wname, mname, m, m.weight, 0 if transposed else 1, cin, groups)
        producers[wname] = LayerRef(wname, mname, m, m.weight, 1 if transposed else 0, cout, groups, bias)
        head = wname
    return Structure(model, consumers, producers, head)


def _from_graph(model: nn.Module, inputs: Any) -> Structure:
    pm = PruningManager(model)
    graph = pm.trace(inputs)
    params = dict(model.named_parameters(remove_duplicate=False))
    find = graph.sources.find

    def module_of(name: str, mname: Optional[str]) -> "tuple[str, Optional[nn.Module]]":
        mname = mname if mname is not None else graph.param_modules.get(name, "")
        try:
            return mname, model.get_submodule(mname) if mname else model
        except AttributeError:
            return mname, None

    consumers: Dict[str, LayerRef] = {}
    input_groups: Dict[str, List[int]] = {}
    for name, ops in graph.consumers_by_param.items():
        c = graph.consumers[ops[0]]
        w = params.get(name)
        if w is None:
            continue
        mname, mod = module_of(name, c.module)
        consumers[name] = LayerRef(name, mname, mod, w, c.weight_dim, len(c.in_ids), c.groups)
        input_groups[name] = [find(a) if a >= 0 else -1 for a in c.in_ids]
    producers: Dict[str, LayerRef] = {}
    for name, ops in graph.producers_by_param.items():
        p = graph.producers[ops[0]]
        w = params.get(name)
        if w is None:
            continue
        if p.kind == "embedding":
            dim, groups = 1, 1
        elif name in consumers:
            dim, groups = 1 - consumers[name].channel_dim, consumers[name].groups
        else:
            dim, groups = 0, 1
        if w.dim() <= dim or w.shape[dim] != len(p.out_ids):
            continue
        mname, mod = module_of(name, None)
        bname = name[: -len("weight")] + "bias" if name.endswith("weight") else None
        bias = params.get(bname) if bname else None
        producers[name] = LayerRef(name, mname, mod, w, dim, len(p.out_ids), groups, bias)

    # the head: the last producer (in execution order) whose outputs reach the model output
    out_groups = {find(a) for ids in graph.output_ids for a in ids if a >= 0}
    head = None
    for name in reversed(list(graph.producers_by_param)):
        p = graph.producers[graph.producers_by_param[name][0]]
        if name in consumers and any(find(a) in out_groups for a in p.out_ids):
            head = name
            break

    groups = pm.channel_groups()
    st = Structure(model, consumers, producers, head, graph, groups, input_groups)
    # a group's root is its oldest atom, so groups fed by a model input have an input's atom as root
    for name, gs in input_groups.items():
        if gs and all(g >= 0 and graph.sources.source(g).op.startswith("<input") for g in gs):
            st.input_layers.add(name)
    _build_segments(st)
    return st


def _build_segments(st: Structure) -> None:
    parent: Dict[int, int] = {}

    def sfind(x: int) -> int:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    first_of: Dict[tuple, int] = {}
    for grp in st.groups:
        sfind(grp.id)
        keys = [("out", n) for n, _ in grp.producers] + [("in", n) for n, _ in grp.consumers]
        for key in keys:
            other = first_of.setdefault(key, grp.id)
            a, b = sfind(other), sfind(grp.id)
            if a != b:
                parent[max(a, b)] = min(a, b)
    by_root: Dict[int, List[ChannelGroup]] = {}
    for grp in st.groups:
        by_root.setdefault(sfind(grp.id), []).append(grp)
    segs: List[Segment] = []
    for i, (_root, gs) in enumerate(sorted(by_root.items())):
        prods: List[str] = []
        cons: List[str] = []
        for grp in gs:
            for name, _ in grp.producers:
                if name not in prods:
                    prods.append(name)
            for name, _ in grp.consumers:
                if name not in cons:
                    cons.append(name)
            st.segment_of[grp.id] = i
        segs.append(Segment(i, gs, prods, cons))
    st.segments = segs


def build_structure(model: nn.Module, inputs: Any = None) -> Structure:
    """Trace ``model`` on ``inputs`` (or, without inputs, list its conv/linear modules)."""
    if inputs is None:
        return _from_modules(model)
    return _from_graph(model, inputs)
