"""The pruning spec: plain data describing one export, printable and serialisable.

Produced by :func:`channelcut.pruning.resolve.resolve`, consumed by the mock
(``mock.py``) and the pruner (``pruner.py``). No torch in here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, List, Optional, Tuple


@dataclass
class Subselection:
    """A consumer that reads only some channels of its (physical) input.

    ``indices`` are positions in the physical input; when they form one
    contiguous range, ``start``/``length`` are set and the read is a view.
    """

    op: str
    module: str
    param: str
    activation_dim: int
    indices: List[int]
    input_channels: int  # physical channels of the input tensor
    allow_view: bool = True  # False in the baseline export: always gather

    @property
    def contiguous(self) -> bool:
        idx = self.indices
        return self.allow_view and bool(idx) and idx == list(range(idx[0], idx[0] + len(idx)))

    @property
    def start(self) -> int:
        return self.indices[0]

    @property
    def length(self) -> int:
        return len(self.indices)

    @property
    def copied_channels(self) -> int:
        """Channels gathered (copied) per inference by this read."""
        return 0 if self.contiguous else len(self.indices)


@dataclass
class MaskEntry:
    """Input channels of a consumer's weight that are masked (zeroed).

    ``channels`` index the consumer's activation input (original layout for the
    mock; physical layout after pruning for the pruner's zero columns).
    """

    param: str
    weight_dim: int
    groups: int
    channels: List[int]


@dataclass
class MaskAddition:
    """Input channels of a consumer that the export masks beyond the request,
    and why: a ``pruned_outputs`` channel group that flows into them, or
    constrained export's coupling with another reader of the same group.

    The request plus every addition is exactly what the export removes: the
    independent reference (the original model with those weight columns
    zeroed by hand) is built from them, never from :attr:`PruningSpec.masks`.
    """

    param: str
    channels: List[int]
    reason: str
    # None: input channels of a consumer weight (its own layout); an int:
    # the indices along that dim (a producer's output rows, a bias's entries)
    dim: Optional[int] = None


@dataclass
class NormRescale:
    """An RMS norm that lost channels (``rmsnorm.py``): ``eps`` (attribute
    ``eps_attr`` of ``module``) becomes ``eps``, and the sliced ``weight`` is
    multiplied by ``factor`` (``1 + weight`` for ``plus_one`` norms)."""

    module: Optional[str]
    weight: Optional[str]
    eps_attr: str
    eps: float
    factor: float
    plus_one: bool = False
    float32: bool = False  # the norm computes in float32: the export is exact to float32 rounding


@dataclass
class ConstantFold:
    """Input channels of a consumer that carry one constant each (a zeroed
    filter followed by a bias, a norm shift, ...): their contribution,
    ``delta`` (one value per output channel of the consumer), is added to the
    consumer's ``bias``, and the channels are removed. Exact: the consumer is
    a linear map of its input, and a constant input adds a constant output."""

    param: str  # the consumer weight
    bias: str  # the bias parameter that absorbs the constants
    channels: List[int]
    values: List[float]
    delta: List[float]


@dataclass
class LayerStat:
    name: str
    kind: str
    before: int
    after: int


@dataclass
class PruningSpec:
    """Everything needed to mock or apply one export."""

    mode: str  # "unconstrained" | "constrained" | "baseline"
    # parameter name -> {dim: kept indices of the original tensor, in new order}
    slices: Dict[str, Dict[int, List[int]]] = field(default_factory=dict)
    # what the mock masks (original indexing), one entry per consumer weight
    masks: List[MaskEntry] = field(default_factory=list)
    # zero columns the pruned model keeps (physical indexing, after slicing)
    zeros: List[MaskEntry] = field(default_factory=list)
    subselections: List[Subselection] = field(default_factory=list)
    # module name -> {attribute: new int value} for modules without parameters
    # that describe a channel count (e.g. GroupNorm(affine=False).num_groups)
    attributes: Dict[str, Dict[str, int]] = field(default_factory=dict)
    producers: List[LayerStat] = field(default_factory=list)
    consumers: List[LayerStat] = field(default_factory=list)
    barriers: List[Tuple[str, Optional[str], str]] = field(default_factory=list)
    removed_groups: int = 0
    total_groups: int = 0
    pinned_groups: int = 0
    reordered_segments: int = 0
    segments: int = 0
    # consumers that read a contiguous superset of their channels with zero
    # weight columns instead of gathering them (the cost model chose it)
    superset_reads: int = 0
    # consumer weight -> the input channels the request named (validated)
    requested: Dict[str, List[int]] = field(default_factory=dict)
    # input channels masked beyond the request, with the reason
    additions: List[MaskAddition] = field(default_factory=list)
    # what the export is checked against: "request" (the original model with
    # the requested channels and the additions zeroed), or "model" (the
    # model as it is: its own zeros were found and removed)
    reference: str = "request"
    # constants folded into a consumer's bias (channels found zeroed)
    folds: List[ConstantFold] = field(default_factory=list)
    # zeroed channels that stay, with the reason
    kept_zeros: List[str] = field(default_factory=list)
    # RMS norms over fewer channels, rescaled to stay exact
    rescales: List[NormRescale] = field(default_factory=list)
    # (module, attribute) of ``attributes`` rewritten because they held the
    # old width of tensors the module's own code made
    # (no traced op read them: ``C2f.c``, read only by ultralytics' export path)
    inferred_attributes: List[Tuple[str, str]] = field(default_factory=list)
    # (module, attribute, its value, the new widths of the tensors it matched):
    # attributes that held an old width but whose tensors now differ in
    # width, so no one value is right; left as they are and reported
    stale_attributes: List[Tuple[str, str, int, List[int]]] = field(default_factory=list)

    def removed_inputs(self) -> Dict[str, List[int]]:
        """Consumer weight -> every input channel the export removes: the
        request plus the reported additions (what a reference model zeroes).

        >>> s = PruningSpec("constrained", requested={"a.weight": [1]},
        ...                 additions=[MaskAddition("b.weight", [1], "coupled")])
        >>> s.removed_inputs()
        {'a.weight': [1], 'b.weight': [1]}
        """
        out: Dict[str, set] = {p: set(c) for p, c in self.requested.items()}
        for a in self.additions:
            if a.dim is None:
                out.setdefault(a.param, set()).update(a.channels)
        return {p: sorted(c) for p, c in out.items() if c}

    # -- summaries -----------------------------------------------------------
    @property
    def copied_channels(self) -> int:
        """Channels gathered by memory copies per inference (0 = all views)."""
        return sum(s.copied_channels for s in self.subselections)

    @property
    def copy_ops(self) -> int:
        return sum(1 for s in self.subselections if not s.contiguous)

    @property
    def view_ops(self) -> int:
        return sum(1 for s in self.subselections if s.contiguous)

    def kept(self) -> Dict[str, Tuple[int, int]]:
        """Producer op -> (output channels before, after)."""
        return {p.name: (p.before, p.after) for p in self.producers}

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["slices"] = {k: {str(dim): v for dim, v in dims.items()} for k, dims in self.slices.items()}
        d["copied_channels"] = self.copied_channels
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "PruningSpec":
        """Rebuild a spec from :meth:`to_dict` output (also after a JSON round trip).

        >>> spec = PruningSpec("unconstrained", slices={"fc.weight": {1: [0, 2]}},
        ...                    subselections=[Subselection("fc", "fc", "fc.weight", 1, [0, 2], 3)])
        >>> PruningSpec.from_dict(spec.to_dict()) == spec
        True

        Raises ValueError (naming the field) for data that is not a spec.
        """
        if not isinstance(d, dict):
            raise ValueError(f"a pruning spec must be a dict, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        if "mode" not in kw:
            raise ValueError("pruning spec has no 'mode' field")
        try:
            kw["slices"] = {str(p): {int(dim): [int(i) for i in kept] for dim, kept in dims.items()} for p, dims in kw.get("slices", {}).items()}
            kw["requested"] = {str(p): [int(c) for c in chans] for p, chans in kw.get("requested", {}).items()}
            for name, typ in (("masks", MaskEntry), ("zeros", MaskEntry), ("subselections", Subselection), ("producers", LayerStat),
                              ("consumers", LayerStat), ("additions", MaskAddition), ("folds", ConstantFold),
                              ("rescales", NormRescale)):
                kw[name] = [e if isinstance(e, typ) else typ(**e) for e in kw.get(name, [])]
            kw["barriers"] = [tuple(b) for b in kw.get("barriers", [])]
            kw["inferred_attributes"] = [(str(m), str(a)) for m, a in kw.get("inferred_attributes", [])]
            kw["stale_attributes"] = [(str(m), str(a), int(v), [int(n) for n in new])
                                      for m, a, v, new in kw.get("stale_attributes", [])]
        except (TypeError, AttributeError, ValueError) as exc:
            raise ValueError(f"malformed pruning spec: {exc}") from exc
        return cls(**kw)

    def summary(self, max_rows: int = 40) -> str:
        """A readable report: per layer channels before -> after, subsets read, copies."""
        lines = [
            f"PruningSpec ({self.mode}): {self.removed_groups} of {self.total_groups} channel groups removed, "
            f"{self.pinned_groups} pinned; {len(self.subselections)} consumers read a subset "
            f"({self.view_ops} views, {self.copy_ops} copies, {self.copied_channels} channels copied per inference); "
            f"{self.reordered_segments} of {self.segments} segments reordered"
            + (f"; {self.superset_reads} consumers read a wider view with zero columns instead of a copy." if self.superset_reads else "."),
        ]
        if self.additions:
            n = sum(len(a.channels) for a in self.additions)
            lines.append(f"input channels removed beyond the request: {n} in {len({a.param for a in self.additions})} consumers")
            for a in self.additions[:max_rows]:
                lines.append(f"  {a.param} {_short(a.channels)}: {a.reason}")
            if len(self.additions) > max_rows:
                lines.append(f"  ... {len(self.additions) - max_rows} more")
        for f in self.folds[:max_rows]:
            lines.append(f"  constant inputs {_short(f.channels)} of {f.param} folded into {f.bias}")
        for r in self.rescales[:max_rows]:
            lines.append(f"  RMS norm {r.module or r.weight}: over fewer channels, eps -> {r.eps:.3g}, weight x {r.factor:.4f}")
        for note in self.kept_zeros[:max_rows]:
            lines.append(f"  kept: {note}")
        for m, a in self.inferred_attributes[:max_rows]:
            lines.append(f"  width attribute {m or '<model>'}.{a} -> {self.attributes[m][a]} (the width it held)")
        for m, a, v, new in self.stale_attributes[:max_rows]:
            lines.append(f"  left as it was: {m or '<model>'}.{a} = {v} held a width that is now {' or '.join(map(str, new))}")
        changed = [p for p in self.producers if p.after != p.before]
        lines.append(f"producers with removed outputs: {len(changed)} of {len(self.producers)}")
        w = max([len(p.name) for p in changed[:max_rows]] + [10])
        for p in changed[:max_rows]:
            lines.append(f"  {p.name:<{w}}  out {p.before:>5} -> {p.after:<5} ({p.kind})")
        if len(changed) > max_rows:
            lines.append(f"  ... {len(changed) - max_rows} more")
        cchanged = [c for c in self.consumers if c.after != c.before]
        lines.append(f"consumers with removed inputs: {len(cchanged)} of {len(self.consumers)}")
        for c in cchanged[:max_rows]:
            lines.append(f"  {c.name:<{w}}  in  {c.before:>5} -> {c.after:<5} ({c.kind})")
        if len(cchanged) > max_rows:
            lines.append(f"  ... {len(cchanged) - max_rows} more")
        for s in self.subselections[:max_rows]:
            how = f"view [{s.start}:{s.start + s.length}]" if s.contiguous else f"gather {s.length}"
            lines.append(f"  subset: {s.module} reads {s.length} of {s.input_channels} channels ({how})")
        if self.barriers:
            names = sorted({f"{b[0]} in {b[1] or '<model>'}" for b in self.barriers})
            lines.append(f"barrier ops (channels kept around them): {', '.join(names[:10])}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def _short(chans: List[int]) -> str:
    return "[" + ", ".join(map(str, chans[:8])) + (", ...]" if len(chans) > 8 else "]")
