"""What the tracer knows while the model runs, and the operations rules use
to add to it. Start at :class:`Recorder`.

The op rules (``rules/``) read and write one :class:`Recorder`; the tracing
mode (``tracing.py``) owns it. Neither the rules nor this module import the
tracing mode, so the rules sit between the two.

Inside the tracer a trace is a :class:`CompactTrace`: an int64 tensor with the
same number of dims as the activation, of size 1 everywhere except (at most)
one "varying" dim holding one atom per channel. When an op makes atoms vary
along two dims, the smaller one is coupled away (its atoms are unioned),
which keeps the pruned model rectangular. Traces live in side tables keyed by
tensor identity (:class:`IdTable`), so nothing is attached to the user's
model, its parameters or its activations.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from .graph import NO_SOURCE, OpRecord, ParamUse, RmsNormUse, SourceTable, TracedGraph
from .counts import HEAD_COUNT_ATTRS, ChannelCount, HeadCount, StoredInt


class TooBigToMaterialize(Exception):
    """A rule needed every element's atom of a tensor larger than
    :attr:`Recorder.MAX_MATERIALIZE`: the op becomes a barrier instead."""


class IdTable:
    """Tensor identity -> value, holding no tensor alive: what
    ``WeakIdKeyDictionary`` does for the tracer's side tables, with a plain
    dict lookup per ``get`` (the tracer looks up every argument of every op).
    An entry whose tensor died is ignored, so a new tensor that reuses the
    id finds nothing."""

    __slots__ = ("_d",)

    def __init__(self) -> None:
        self._d: Dict[int, Tuple[Any, Any]] = {}

    def get(self, x: torch.Tensor, default: Any = None) -> Any:
        e = self._d.get(id(x))
        if e is not None and e[0]() is x:
            return e[1]
        return default

    def __setitem__(self, x: torch.Tensor, value: Any) -> None:
        self._d[id(x)] = (weakref.ref(x), value)


class CompactTrace:
    """The trace of one tensor (see module docstring).

    ``atoms``: int64, the tensor's number of dims, size 1 except along
    ``vdim`` (None: one atom for every element); ``ids``: the atoms along
    ``vdim``, flat.

    >>> t = CompactTrace.along(torch.tensor([4, 5, 6]), 1, 4)
    >>> tuple(t.atoms.shape), t.vdim, t.ids.tolist()
    ((1, 3, 1, 1), 1, [4, 5, 6])
    """

    __slots__ = ("atoms", "vdim")

    def __init__(self, atoms: torch.Tensor, vdim: Optional[int]) -> None:
        self.atoms = atoms
        self.vdim = vdim

    @staticmethod
    def scalar(atom: int, ndim: int) -> "CompactTrace":
        """Every element carries ``atom``."""
        return CompactTrace(torch.full((1,) * ndim, atom, dtype=torch.long), None)

    @staticmethod
    def along(ids: torch.Tensor, dim: int, ndim: int) -> "CompactTrace":
        """The atoms ``ids`` laid along ``dim`` of an ``ndim``-dim tensor."""
        shape = [1] * ndim
        shape[dim] = ids.numel()
        if ids.numel() == 1:
            return CompactTrace(ids.reshape(shape), None)
        return CompactTrace(ids.reshape(shape), dim)

    @property
    def ids(self) -> torch.Tensor:
        """The atoms along the varying dim (1 element when none varies)."""
        return self.atoms.reshape(-1)

    @property
    def ndim(self) -> int:
        return self.atoms.dim()


def _unravel(flat: torch.Tensor, shape: Sequence[int]) -> List[torch.Tensor]:
    coords = []
    for s in reversed(shape):
        coords.append(flat % s)
        flat = torch.div(flat, s, rounding_mode="floor")
    return list(reversed(coords))


ParamRefs = List[Tuple[str, torch.Tensor]]


class ParamAlignment:
    """Which entries of which parameter go with which channels.

    :meth:`record` notes that slicing a parameter along one dim follows a
    tensor's channels (a :class:`~channelcut.pruning.graph.ParamUse`). A
    parameter used twice is sliced once, so from its second use on every
    position is coupled with the atom of its first use (or pinned, where one
    use cannot be sliced). :meth:`operand_uses` works out the slices of a
    tensor computed from parameters (a reshaped layer scale, a concatenated
    bias) from its provenance."""

    def __init__(self, graph: TracedGraph) -> None:
        self.graph = graph
        self.sources = graph.sources
        # (param name, dim) -> the (positions, atoms) of its first use; from a
        # second use on, every distinct use and {position: first atom aligned}
        self.first_use: Dict[Tuple[str, int], Tuple[List[int], List[int]]] = {}
        self.use_keys: Dict[Tuple[str, int], set] = {}
        self.aligned: Dict[Tuple[str, int], Dict[int, int]] = {}

    def record(self, name: str, dim: int, positions: List[int], ids: torch.Tensor | List[int]) -> None:
        """Parameter ``name`` is sliced along ``dim`` with the channels ``ids``
        (a tensor or a list of atoms, one per entry of ``positions``)."""
        ids_l = ids if isinstance(ids, list) else ids.tolist()
        positions = list(positions)
        key = (name, dim)
        first_use = self.first_use.get(key)
        if first_use is None:  # the first use (most parameters have one): nothing to align with
            self.first_use[key] = (positions, ids_l)
        else:
            uses = self.use_keys.get(key)
            if uses is None:
                uses = self.use_keys[key] = {(tuple(first_use[0]), tuple(first_use[1]))}
            use = (tuple(positions), tuple(ids_l))
            if use in uses:
                return
            uses.add(use)
            align = self.aligned.get(key)
            if align is None:
                align = self.aligned[key] = dict(zip(*first_use))
            for pos, a in zip(positions, ids_l):
                first = align.get(pos)
                if first is None:
                    align[pos] = a
                elif first < 0 and a >= 0:
                    self.sources.pin(a, f"parameter {name} is also used where it cannot be sliced")
                elif a < 0 and first >= 0:
                    self.sources.pin(first, f"parameter {name} is also used where it cannot be sliced")
                else:
                    self.sources.union(first, a)
        self.graph.param_uses.append(ParamUse(name, dim, positions, ids_l))

    def operand_uses(
        self, x: torch.Tensor, refs: ParamRefs, d: int, out_ids: torch.Tensor, what: str
    ) -> Tuple[List[Tuple[str, int, List[int], torch.Tensor]], Optional[str]]:
        """The slices of the parameters behind ``x`` (its provenance ``refs``)
        that follow ``out_ids`` along dim ``d`` of ``x``: a list of (name,
        parameter dim, positions, atoms), or a reason why they cannot be sliced."""
        uses = []
        for name, idx in refs:  # (entries -1 where the tensor is not from this parameter)
            pshape = self.graph.param_shapes.get(name)
            if pshape is None:
                return [], f"combined with tensor {name} in {what}"
            sel = [0] * x.dim()
            sel[d] = slice(None)
            flat = idx[tuple(sel)]
            covered = flat >= 0
            if not bool(covered.any()):
                continue
            coords = _unravel(flat[covered], pshape)
            varying = [k for k, c in enumerate(coords) if c.numel() > 1 and bool((c != c[0]).any())]
            ok = len(varying) == 1 or (len(varying) == 0 and len(pshape) == 1)
            if ok:
                p = varying[0] if varying else 0
                full = _unravel(idx.clamp(min=0).reshape(-1), pshape)[p].reshape(idx.shape)
                shape = [1] * x.dim()
                shape[d] = x.shape[d]
                along = torch.full((x.shape[d],), -1, dtype=torch.long)
                along[covered] = coords[p]
                expected = along.reshape(shape).expand_as(full)
                ok = torch.equal(torch.where(idx >= 0, full, -1), torch.where(idx >= 0, expected, -1))
            if not ok:
                return [], f"combined with a reshaped view of {name} in {what}"
            uses.append((name, p, coords[p].tolist(), out_ids[covered]))
        return uses, None


class ModuleContext:
    """Which module of the model is running now, and its integer attributes
    (the sizes a module holds, which a rule may find it must rewrite)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        #: id of a module -> its name (filled by the Recorder's walk over the model)
        self.names: Dict[int, str] = {}
        #: names of the modules running now, innermost last (kept by ``tracing.module_hooks``)
        self.stack: List[Optional[str]] = []

    @property
    def current(self) -> Optional[str]:
        """Name of the innermost module running now (None: the model's own code)."""
        return self.stack[-1] if self.stack else None

    def running(self) -> Optional[torch.nn.Module]:
        """The innermost module running now, if any."""
        if self.current is None:
            return None
        try:
            return self.model.get_submodule(self.current)
        except AttributeError:
            return None

    def running_name_if(self, cls: type) -> Optional[str]:
        """Name of the module running now, if it is an instance of ``cls``."""
        name = self.current
        if name is None:
            return None
        try:
            m = self.model.get_submodule(name)
        except AttributeError:
            return None
        return name if isinstance(m, cls) else None

    def int_attrs_equal(self, value: Any) -> List[str]:
        """Plain int attributes of the running module equal to ``value``."""
        if not isinstance(value, int) or isinstance(value, (bool, ChannelCount)) or value <= 1:
            return []
        m = self.running()
        if m is None:
            return []
        # (plain ints, or the StoredInt marks they wear while tracing)
        return [k for k, v in vars(m).items() if type(v) in (int, StoredInt) and v == value and not k.startswith("_")]

    def head_count_attrs(self, value: int) -> List[str]:
        """Head-count attributes (:class:`HeadCount`) of the running module equal to ``value``."""
        m = self.running()
        if m is None:
            return []
        return [k for k, v in vars(m).items() if isinstance(v, HeadCount) and v == value]


class Recorder:
    """The tracer's state: traces of tensors, the sources, op ids, the module
    stack, and the unions, pins and parameter uses rules record.

    Rules get one as ``rec``: :meth:`get` / :meth:`set` a tensor's
    :class:`CompactTrace`; :meth:`new_op` and :meth:`new_atom_ids` for
    producers; :meth:`couple`, :meth:`union_pairs`, :meth:`need`,
    :meth:`pin_ids` to relate channels; :meth:`record_param_use` and
    :meth:`align_operand` for parameters sliced with channels (see
    :class:`ParamAlignment`); ``modules`` (:class:`ModuleContext`) for the
    module running now, and :meth:`add_module_size` for its integer
    attributes that count channels."""

    MAX_MATERIALIZE = 30_000_000

    def __init__(self, model: torch.nn.Module, graph: TracedGraph, shapes_only: bool = False) -> None:
        self.model = model
        self.graph = graph
        #: ops are computed on meta tensors (see ``shape_only.py``)
        self.shapes_only = shapes_only
        self.sources: SourceTable = graph.sources
        #: tensor -> its CompactTrace
        self.traces = IdTable()
        #: tensor computed from parameters alone -> [(param name, flat indices)]
        self.param_provenance = IdTable()
        self.param_names: Dict[int, str] = {}
        self.params = ParamAlignment(graph)
        self.modules = ModuleContext(model)
        #: (module, attribute) -> the channels its first use counted
        self.attribute_uses: Dict[Tuple[Optional[str], str], List[int]] = {}
        #: module name -> {value: [its plain int attributes of that value]}, for
        #: modules not from torch (whose widths the pruner knows): attributes
        #: that may hold a width of the module's tensors (see :meth:`note_widths`)
        self.width_attrs: Dict[str, Dict[int, List[str]]] = {}
        # one walk over the modules: names of modules, parameters and buffers
        # (the first name of a shared one), shapes and owners for the graph
        for mname, m in model.named_modules(remove_duplicate=False):
            self.modules.names[id(m)] = mname
            if not type(m).__module__.startswith("torch."):
                ints: Dict[int, List[str]] = {}
                for k, v in vars(m).items():
                    if type(v) is int and v > 1 and not k.startswith("_") and k not in HEAD_COUNT_ATTRS:
                        ints.setdefault(v, []).append(k)
                if ints:
                    self.width_attrs[mname] = ints
            for table in (m._parameters, m._buffers):
                for pname, p in table.items():
                    if p is None:
                        continue
                    full = f"{mname}.{pname}" if mname else pname
                    graph.param_shapes[full] = tuple(p.shape)
                    graph.param_modules[full] = mname
                    first = self.param_names.setdefault(id(p), full)
                    if first != full:  # a shared tensor's other names are its aliases
                        graph.param_aliases[full] = first
        self.op_counts: Dict[str, int] = {}
        self.warned: set = set()
        #: id of a module computing an RMS norm in Python -> its form (``rmsnorm.py``)
        self.rms_forms: Dict[int, Any] = {}
        #: such modules running now as one op: (module, its input), innermost last
        self.opaque: List[Tuple[torch.nn.Module, torch.Tensor]] = []
        #: ids of the current call's outputs that hold positions, not channels
        #: (``topk``'s indices): left untraced (see :meth:`leave_untraced`)
        self.positions: set = set()

    # -- op ids and module context ------------------------------------------
    @property
    def module(self) -> Optional[str]:
        """Name of the innermost module running now (None: the model's own code)."""
        return self.modules.current

    def new_op(self, func_name: str, preferred: Optional[str] = None) -> str:
        base = preferred if preferred is not None else f"{self.module or '<model>'}/{func_name}"
        n = self.op_counts.get(base, 0)
        self.op_counts[base] = n + 1
        op = base if n == 0 else f"{base}#{n + 1}"
        self.graph.ops.append(OpRecord(op, func_name, self.module))
        return op

    def new_atom_ids(self, owner: str, count: int) -> torch.Tensor:
        """``count`` fresh atoms (consecutive ids) as a tensor."""
        r = self.sources.new_atoms(owner, count)
        return torch.arange(r.start, r.stop, dtype=torch.long)

    # -- trace lookup --------------------------------------------------------
    def get(self, x: Any) -> Optional[CompactTrace]:
        if isinstance(x, torch.Tensor):
            return self.traces.get(x)
        return None

    def set(self, x: torch.Tensor, trace: CompactTrace) -> None:
        if trace.atoms.dim() != x.dim():
            raise AssertionError(f"internal: trace ndim {trace.atoms.dim()} != tensor ndim {x.dim()}")
        self.traces[x] = trace

    def param_ref(self, x: Any) -> Optional[ParamRefs]:
        """For parameters and tensors computed from parameters alone (by data
        movement or position-wise arithmetic): the list of (parameter name,
        index tensor shaped like ``x`` holding flat indices into it); else None."""
        if not isinstance(x, torch.Tensor):
            return None
        name = self.param_name(x)
        if name is not None:
            return [(name, torch.arange(x.numel()).reshape(x.shape))]
        return self.param_provenance.get(x)

    def param_name(self, x: Any) -> Optional[str]:
        """The name of parameter (or buffer) ``x``: the one it had when
        tracing began, or, for a tensor a hook put in its module's place
        since (accelerate loads offloaded weights into a fresh Parameter
        before each forward), its name in the module running now."""
        if not isinstance(x, torch.Tensor):
            return None
        name = self.param_names.get(id(x))
        if name is None and self.traces.get(x) is None:
            m = self.modules.running()
            if m is not None:
                for pname, p in m._parameters.items():
                    if p is x:
                        full = f"{self.modules.current}.{pname}" if self.modules.current else pname
                        return full if full in self.graph.param_shapes else None
        return name

    def ids_along(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """One atom per index of ``dim`` of ``x`` (coupling other dims away)."""
        dim = dim % x.dim()
        t = self.get(x)
        size = x.shape[dim]
        if t is None:
            return torch.full((size,), NO_SOURCE, dtype=torch.long)
        if t.vdim == dim:
            return t.ids
        if t.vdim is None:
            return t.ids.expand(size).clone()
        rep = self.couple(t.ids)
        return torch.full((size,), rep, dtype=torch.long)

    # -- unions, needs and pins ----------------------------------------------
    def couple(self, ids: torch.Tensor) -> int:
        """Union all atoms of ``ids``; return the representative (or -1)."""
        vals = torch.unique(ids)
        rep = self.sources.union_all(vals.tolist())
        return NO_SOURCE if rep is None else rep

    def union_pairs(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Position-wise union of two broadcastable id tensors; returns merged ids."""
        a, b = torch.broadcast_tensors(a, b)
        if a.numel() <= 4096:  # a plain loop beats the vectorised filter on small tensors
            self.sources.union_zip(a.reshape(-1).tolist(), b.reshape(-1).tolist())
        else:
            mask = (a >= 0) & (b >= 0) & (a != b)
            if bool(mask.any()):
                xs, ys = torch.unique(torch.stack([a[mask], b[mask]], 1), dim=0).T.tolist()
                self.sources.union_zip(xs, ys)
        return torch.where(a >= 0, a, b)

    def need(self, ids: torch.Tensor, target: int) -> None:
        """Whenever any atom of ``ids`` is kept, ``target`` must be kept."""
        if target < 0:
            return
        for a in torch.unique(ids).tolist():
            if a >= 0 and a != target:
                self.graph.needs.append((a, target))

    def pin_ids(self, ids: torch.Tensor, reason: str) -> None:
        for a in torch.unique(ids).tolist():
            self.sources.pin(a, reason)

    def pin_all(self, tensors: Iterable[Any], reason: str) -> None:
        for x in tensors:
            t = self.get(x)
            if t is not None:
                self.pin_ids(t.ids, reason)

    def fresh_pinned(self, op: str, ndim: int, reason: str) -> CompactTrace:
        atom = self.sources.new_atoms(op, 1)[0]
        self.sources.pin(atom, reason)
        return CompactTrace.scalar(atom, ndim)

    def note_rms_norm(self, module: Optional[str], weight: Optional[str], eps_attr: Optional[str],
                      eps: Optional[float], plus_one: bool, ids: List[int], float32: bool = False) -> None:
        """An RMS norm over channels ``ids`` whose ``eps`` (attribute
        ``eps_attr`` of ``module``) and weight are rescaled when channels are
        removed. Every call of one module keeps the same count (coupled
        position by position, as for any attribute that counts channels)."""
        if eps_attr is not None:
            self.couple_attribute_uses(module, eps_attr, ids)
        self.graph.rms_norms.append(RmsNormUse(module, weight, eps_attr, eps, plus_one, ids, float32))

    # -- module attributes that count channels ---------------------------------
    def add_module_size(self, entry: Tuple[Optional[str], str, List[int], int]) -> None:
        """Module attribute ``entry[1]`` counts channels ``entry[2]`` (divided by
        ``entry[3]``) and is rewritten when pruning. One attribute has one
        value: every use of it (a module called twice, one size attribute used
        by several heads) keeps the same count, by coupling position by position."""
        module, attr, ids, divisor = entry
        self.couple_attribute_uses(module, attr, ids)
        self.graph.module_sizes.append((module, attr, ids, divisor))

    def note_widths(self, module: Optional[str], tensors: Iterable[Any]) -> None:
        """Tensors that ``module``'s own code made (outputs of the torch calls
        it makes itself, not its submodules' or its inputs): remember
        the channels of each whose channel width equals one of the module's
        plain int attributes (``graph.stored_widths``), so that the attribute
        follows them when pruning even if only an untraced code path reads it."""
        ints = self.width_attrs.get(module)
        if not ints:
            return
        for x in tensors:
            t = self.get(x)
            if t is None or t.vdim is None:
                continue
            names = ints.get(x.shape[t.vdim])
            if not names:
                continue
            ids = tuple(t.ids.tolist())
            for attr in names:
                entry = self.graph.stored_widths.setdefault((module, attr), (x.shape[t.vdim], []))
                if ids not in entry[1]:
                    entry[1].append(ids)

    def couple_attribute_uses(self, module: Optional[str], attr: str, ids: List[int]) -> None:
        """Channels ``ids`` are counted by attribute ``attr`` of ``module``:
        couple them position by position with its earlier uses."""
        key = (module, attr)
        first = self.attribute_uses.get(key)
        if first is None:
            self.attribute_uses[key] = ids
        elif len(first) == len(ids):
            self.union_pairs(torch.tensor(first, dtype=torch.long), torch.tensor(ids, dtype=torch.long))
        else:
            self.pin_ids(torch.tensor(first + ids, dtype=torch.long),
                         f"attribute {attr!r} of {module or '<model>'} sizes tensors of different widths")

    # -- materialised traces ------------------------------------------------
    def materialize(self, x: torch.Tensor) -> torch.Tensor:
        """The atom of every element of ``x``, as a tensor of its shape."""
        if x.numel() > self.MAX_MATERIALIZE:
            raise TooBigToMaterialize()
        t = self.get(x)
        if t is None:
            return torch.full(tuple(x.shape), NO_SOURCE, dtype=torch.long)
        return t.atoms.expand(tuple(x.shape)).contiguous()

    def compress(self, full: torch.Tensor) -> CompactTrace:
        """Turn a full-shape id tensor into a :class:`CompactTrace`, coupling extra dims."""
        ndim = full.dim()
        if full.numel() == 0:
            return CompactTrace.scalar(NO_SOURCE, ndim)
        vary = []
        for d in range(ndim):
            if full.shape[d] > 1:
                first = full.narrow(d, 0, 1)
                if not torch.equal(full, first.expand_as(full)):
                    vary.append(d)
        if not vary:
            return CompactTrace.scalar(int(full.reshape(-1)[0]), ndim)
        if len(vary) == 1:
            d = vary[0]
            idx = [0] * ndim
            idx[d] = slice(None)
            return CompactTrace.along(full[tuple(idx)].clone(), d, ndim)
        p = max(vary, key=lambda d: (full.shape[d], d))
        rows = full.movedim(p, 0).reshape(full.shape[p], -1)
        reps = []
        for row in rows:
            reps.append(self.couple(row))
        return CompactTrace.along(torch.tensor(reps, dtype=torch.long), p, ndim)

    # -- parameters sliced with channels ---------------------------------------
    def record_param_use(self, name: str, dim: int, positions: List[int], ids: torch.Tensor | List[int]) -> None:
        """See :meth:`ParamAlignment.record`."""
        self.params.record(name, dim, positions, ids)

    def align_operand(self, x: torch.Tensor, out_ndim: int, vdim: int, out_ids: torch.Tensor, what: str) -> None:
        """An untracked operand of an elementwise op, sized along the output's
        channel dim: record the parameter slice, or pin if it cannot be sliced."""
        d = vdim - (out_ndim - x.dim())
        if d < 0 or x.shape[d] == 1:
            return
        refs = self.param_ref(x)
        if refs is None:
            self.pin_ids(out_ids, f"combined with a constant tensor of fixed size in {what}")
            return
        uses, failure = self.params.operand_uses(x, refs, d, out_ids, what)
        if failure is not None:
            self.pin_ids(out_ids, failure)
            return
        for name, p, positions, ids in uses:
            self.params.record(name, p, positions, ids)

    def leave_untraced(self, y: torch.Tensor) -> None:
        """Output ``y`` of the current call holds positions (indices along a
        dim), not channels: it stays untraced, so ops that index with it use
        its values (``x[idx]``) rather than treat it as data."""
        self.positions.add(id(y))

    def warn_once(self, key: str, msg: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            warnings.warn(msg, stacklevel=3)
