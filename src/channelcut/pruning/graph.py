"""Traces: where every channel of every tensor comes from. Plain data, no torch.

Start reading at :class:`SourceTable`, then :class:`TracedGraph`.

A **source** is one output channel of a producer (a conv, linear or embedding),
or a pinned pseudo-channel that stands for anything we must not shrink (a model
input, a barrier op's output). Sources are plain integers ("atoms") owned by a
:class:`SourceTable`.

A **trace** is the list of atoms of one tensor's channel dimension: position
``c`` holds one representative atom of the channels mixed into channel ``c``,
or ``-1`` for a channel that no source feeds (a constant). Whenever an op mixes
channels (a residual add, a norm over channels, ...), the tracer *unions* their
atoms. Atoms in one union-find class (a **group**) are always kept or removed
together, so every tensor of the pruned model can be laid out as a plain,
rectangular tensor. One representative atom per channel is therefore enough.

Groups that must never be removed are **pinned** (model outputs, barrier ops,
slicing with literal bounds, ...); the reason is kept for the report.

:func:`is_tiling` tells whether one trace repeats another's channels (as a
``flatten`` or ``repeat`` does), which the rules and the reordering both ask.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple

NO_SOURCE = -1


@dataclass(frozen=True)
class ChannelSource:
    """Where a channel comes from: ``(op id, channel index)``.

    >>> ChannelSource("layer1.0.conv1", 3)
    ChannelSource(op='layer1.0.conv1', channel=3)
    """

    op: str
    channel: int


class SourceTable:
    """All atoms of one trace, with union-find groups and pins.

    >>> t = SourceTable()
    >>> a = t.new_atoms("conv_a", 3)
    >>> b = t.new_atoms("conv_b", 3)
    >>> t.union(a[1], b[1])
    >>> t.find(a[1]) == t.find(b[1]), t.find(a[0]) == t.find(b[0])
    (True, False)
    >>> t.source(b[2])
    ChannelSource(op='conv_b', channel=2)
    >>> t.pin(a[1], "reaches the model output")
    >>> t.pinned_reason(b[1])
    'reaches the model output'
    """

    def __init__(self) -> None:
        self._owner: List[str] = []
        self._channel: List[int] = []
        self._parent: List[int] = []
        self._pins: Dict[int, str] = {}  # root -> reason (kept current on union)

    def __len__(self) -> int:
        return len(self._parent)

    def new_atoms(self, owner: str, count: int) -> range:
        """Create ``count`` fresh atoms owned by ``owner`` (channels 0..count-1)."""
        start = len(self._parent)
        self._owner.extend([owner] * count)
        self._channel.extend(range(count))
        self._parent.extend(range(start, start + count))
        return range(start, start + count)

    def source(self, atom: int) -> ChannelSource:
        return ChannelSource(self._owner[atom], self._channel[atom])

    def find(self, atom: int) -> int:
        parent = self._parent
        root = atom
        while parent[root] != root:
            root = parent[root]
        while parent[atom] != root:  # path compression
            parent[atom], atom = root, parent[atom]
        return root

    def union(self, a: int, b: int) -> None:
        """Merge the groups of atoms ``a`` and ``b`` (``-1`` is ignored)."""
        if a < 0 or b < 0:
            return
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self._link(ra, rb)

    def _link(self, ra: int, rb: int) -> None:
        """Merge two different roots: the older atom stays the root
        (deterministic groups) and inherits the pin."""
        if ra > rb:
            ra, rb = rb, ra
        self._parent[rb] = ra
        reason = self._pins.pop(rb, None)
        if reason is not None and ra not in self._pins:
            self._pins[ra] = reason

    def union_zip(self, xs: Iterable[int], ys: Iterable[int]) -> None:
        """``union(x, y)`` for each pair of ``zip(xs, ys)``, in one loop."""
        parent = self._parent
        for a, b in zip(xs, ys):
            if a == b or a < 0 or b < 0:
                continue
            while parent[a] != a:
                parent[a] = a = parent[parent[a]]  # path halving
            while parent[b] != b:
                parent[b] = b = parent[parent[b]]
            if a != b:
                self._link(a, b)

    def union_all(self, atoms: Iterable[int]) -> Optional[int]:
        """Merge all given atoms into one group; return one of them (or None).

        >>> t = SourceTable(); a = t.new_atoms("x", 4)
        >>> t.union_all([-1, a[3], a[1], a[3]]), t.find(a[1]) == t.find(a[3]) != t.find(a[0])
        (3, True)
        """
        first = None
        root = -1
        parent = self._parent
        for a in atoms:
            if a < 0:
                continue
            if first is None:
                first, root = a, self.find(a)
                continue
            while parent[a] != a:  # path halving
                parent[a] = a = parent[parent[a]]
            if a != root:
                self._link(root, a)
                root = min(root, a)  # _link keeps the older root
        return first

    def pin(self, atom: int, reason: str) -> None:
        """Mark the group of ``atom`` as never removable."""
        if atom < 0:
            return
        root = self.find(atom)
        self._pins.setdefault(root, reason)

    def pinned_reason(self, atom: int) -> Optional[str]:
        if atom < 0:
            return None
        return self._pins.get(self.find(atom))

    def is_pinned(self, atom: int) -> bool:
        return atom >= 0 and self.find(atom) in self._pins

    def roots(self) -> List[int]:
        """The group (root atom) of every atom, as one list: a fast ``find``
        for code that no longer unions.

        >>> t = SourceTable(); a = t.new_atoms("x", 3); t.union(a[2], a[0])
        >>> t.roots()
        [0, 1, 0]
        """
        roots = self._parent[:]
        for a in range(len(roots)):  # a parent is never newer than its child:
            roots[a] = roots[roots[a]]  # roots[parent] is final already
        return roots

    def pinned_roots(self) -> Set[int]:
        """Roots of all pinned groups."""
        return {self.find(r) for r in self._pins}


@dataclass
class Producer:
    """An op whose output channels are fresh sources (conv, linear, embedding)."""

    op: str
    param: Optional[str]  # weight parameter name, if any
    out_ids: List[int]  # one atom per output channel
    kind: str
    out_dim: int = 0  # the weight dim that holds the output channels
    bias: Optional[str] = None  # the bias parameter added to them, if any


@dataclass
class RmsNormUse:
    """An RMS norm over channels ``ids`` (see ``rmsnorm.py``): its channels
    pass through; when some are removed, ``eps`` (attribute ``eps_attr`` of
    ``module``) and ``weight`` are rescaled so the output stays exact."""

    module: Optional[str]
    weight: Optional[str]
    eps_attr: Optional[str]  # None: eps is not an attribute (it can not be rescaled)
    eps: Optional[float]
    plus_one: bool  # the weight enters as 1 + w (Gemma)
    ids: List[int]
    float32: bool = False  # it computes in float32 whatever its input's dtype


@dataclass
class Consumer:
    """An op whose input channels can be cut by slicing its weight.

    ``in_ids`` has one atom per *activation* input channel. ``weight_dim`` is the
    weight dimension that holds input channels (1 for conv/linear, 0 for
    transposed conv). ``groups > 1`` (grouped conv) and ``physical=False``
    (the weight is also used elsewhere, or is read outside its module) mean the
    consumer can not read a subset of its input: pruned channels that stay
    present are kept as zero weight columns instead.
    """

    op: str
    param: str
    module: Optional[str]
    in_ids: List[int]
    weight_dim: int
    groups: int = 1
    activation_dim: int = 1  # dim of the input activation that holds channels
    physical: bool = True
    kind: str = "conv"
    positions: int = 1  # output positions per call on the example input (batch x spatial, or tokens)


@dataclass
class ParamUse:
    """A parameter or buffer whose dimension ``dim`` is aligned with a tensor's
    channels: entry ``c`` of the aligned tensor uses index ``positions[c]`` of
    the parameter and has atom ``ids[c]``. Sliced by presence of those atoms."""

    param: str
    dim: int
    positions: List[int]
    ids: List[int]


@dataclass
class OpRecord:
    op: str  # unique op id
    func: str  # readable function name
    module: Optional[str]  # innermost module that called it


@dataclass
class TracedGraph:
    """Everything export needs to know about one model, as plain data."""

    sources: SourceTable = field(default_factory=SourceTable)
    ops: List[OpRecord] = field(default_factory=list)
    producers: Dict[str, Producer] = field(default_factory=dict)
    consumers: Dict[str, Consumer] = field(default_factory=dict)
    param_uses: List[ParamUse] = field(default_factory=list)
    # (func name, module, reason) for every op the tracer could not understand
    barriers: List[Tuple[str, Optional[str], str]] = field(default_factory=list)
    # parameter name -> its shape, for every parameter of the model
    param_shapes: Dict[str, Tuple[int, ...]] = field(default_factory=dict)
    # parameter name -> owning module name
    param_modules: Dict[str, str] = field(default_factory=dict)
    # every other name of a shared parameter or buffer (a tied weight, a module
    # registered twice, a wrapper's prefix) -> the name the graph uses for it
    param_aliases: Dict[str, str] = field(default_factory=dict)
    # weight parameter name -> op ids of consumers / producers using it
    consumers_by_param: Dict[str, List[str]] = field(default_factory=dict)
    producers_by_param: Dict[str, List[str]] = field(default_factory=dict)
    output_ids: List[List[int]] = field(default_factory=list)
    # (a, b): whenever atom a's group is kept, atom b's group must be kept too
    needs: List[Tuple[int, int]] = field(default_factory=list)
    # (module, attribute, channel atoms, divisor): module.attribute must become
    # (number of kept channels) // divisor, e.g. GroupNorm.num_groups
    module_sizes: List[Tuple[str, str, List[int], int]] = field(default_factory=list)
    # (module, attribute, channels of each section, is a tuple): a list of
    # section sizes (``torch.split(x, self.splits)``) rewritten when pruning
    module_lists: List[Tuple[str, str, List[List[int]], bool]] = field(default_factory=list)
    # (module, int attribute) -> (its value, the channel atoms of each distinct
    # tensor of that width that the module's own code made):
    # an attribute that may hold a width, rewritten after pruning when all
    # those tensors keep one same count (``Recorder.note_widths``)
    stored_widths: Dict[Tuple[str, str], Tuple[int, List[Tuple[int, ...]]]] = field(default_factory=dict)
    # (module, int attribute) that the traced code computed with or passed to
    # a torch function: the rules saw those uses, so it is not a stored width
    read_attributes: Set[Tuple[str, str]] = field(default_factory=set)
    # (weight, channels) of every depthwise conv: channels pass through it,
    # and it must keep at least one (torch has no conv with zero groups)
    depthwise: List[Tuple[str, List[int]]] = field(default_factory=list)
    # (atoms, reason): the number of kept channels among these atoms must not
    # change; resolve pins them unless they form a single group
    fixed_counts: List[Tuple[List[int], str]] = field(default_factory=list)
    # RMS norms over channels, rescaled when channels are removed
    rms_norms: List[RmsNormUse] = field(default_factory=list)
    # (norm, an atom of the channels it couples): norms over channels that
    # no rescaling makes exact (LayerNorm's mean subtraction), for messages
    coupling_norms: List[Tuple[str, int]] = field(default_factory=list)

    def add_consumer(self, c: Consumer) -> None:
        """Register a consumer. A weight read by several calls reads the same
        columns each time: their input channels are coupled position-wise."""
        earlier = self.consumers_by_param.get(c.param)
        if earlier:
            first = self.consumers[earlier[0]].in_ids
            if len(first) == len(c.in_ids):
                for a, b in zip(first, c.in_ids):
                    if a >= 0 and b >= 0:
                        self.sources.union(a, b)
                    elif a >= 0 or b >= 0:
                        self.sources.pin(max(a, b), f"read by {c.param} together with a constant input")
        self.consumers[c.op] = c
        self.consumers_by_param.setdefault(c.param, []).append(c.op)

    def add_producer(self, p: Producer) -> None:
        self.producers[p.op] = p
        if p.param is not None:
            self.producers_by_param.setdefault(p.param, []).append(p.op)


def is_tiling(out: Sequence[int], base: Sequence[int]) -> bool:
    """``out`` is ``base`` with every entry repeated m times, tiled k times.

    >>> is_tiling([1, 1, 2, 2, 1, 1, 2, 2], [1, 2])
    True
    >>> is_tiling([2, 1], [1, 2])
    False
    """
    n = len(base)
    if n == 0 or len(out) % n:
        return False
    out, base = list(out), list(base)
    if len(out) == n:  # the common case: the block is the segment itself (m = k = 1)
        return out == base
    for m in range(1, len(out) // n + 1):
        if (len(out) // n) % m:
            continue
        unit = base if m == 1 else [g for g in base for _ in range(m)]
        if unit * (len(out) // len(unit)) == out:
            return True
    return False
