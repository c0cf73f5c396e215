"""Record traces with one forward pass. Start at :func:`trace`.

A :class:`torch.overrides.TorchFunctionMode` sees every torch function the
model calls. Tensors stay ordinary tensors: their traces live in a side table
keyed by tensor identity, so nothing is ever attached to the user's model, its
parameters or its activations. Each call is computed (on ``meta`` tensors when
shapes are all the pass needs, see ``shape_only.py``; else for real), then the op's
rule (``rules.py``) derives the output traces from the input traces.

Inside the tracer a trace is a :class:`Tr`: an int64 tensor with the same
number of dims as the activation, of size 1 everywhere except (at most) one
"varying" dim holding one atom per channel. When an op makes atoms vary along
two dims, the smaller one is coupled away (its atoms are unioned), which keeps
the pruned model rectangular.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..errors import TracingError
from . import shape_only
from .counts import HEAD_COUNT_ATTRS, ChannelCount, HeadCount
from .graph import NO_SOURCE, SourceTable, TracedGraph
from .model_run import call_model, flatten_tensors, preserve_buffers


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


class Tr:
    """Compressed trace of one tensor (see module docstring)."""

    __slots__ = ("t", "vdim")

    def __init__(self, t: torch.Tensor, vdim: Optional[int]) -> None:
        self.t = t
        self.vdim = vdim

    @staticmethod
    def scalar(atom: int, ndim: int) -> "Tr":
        return Tr(torch.full((1,) * ndim, atom, dtype=torch.long), None)

    @staticmethod
    def along(ids: torch.Tensor, dim: int, ndim: int) -> "Tr":
        shape = [1] * ndim
        shape[dim] = ids.numel()
        if ids.numel() == 1:
            return Tr(ids.reshape(shape), None)
        return Tr(ids.reshape(shape), dim)

    @property
    def ids(self) -> torch.Tensor:
        """The atoms along the varying dim (1 element when none varies)."""
        return self.t.reshape(-1)

    @property
    def ndim(self) -> int:
        return self.t.dim()


def _unravel(flat: torch.Tensor, shape: Sequence[int]) -> List[torch.Tensor]:
    coords = []
    for s in reversed(shape):
        coords.append(flat % s)
        flat = torch.div(flat, s, rounding_mode="floor")
    return list(reversed(coords))


class Tracer(TorchFunctionMode):
    """The tracing context: side tables, op ids, module stack, rule dispatch."""

    MAX_MATERIALIZE = 30_000_000

    def __init__(self, model: torch.nn.Module, graph: TracedGraph, shapes_only: bool = False) -> None:
        super().__init__()
        self.model = model
        self.graph = graph
        #: compute ops on meta tensors (see ``shape_only.py``)
        self.shapes_only = shapes_only
        self.meta_cache: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}
        first = next(model.parameters(), None)
        self.device = first.device if first is not None else torch.device("cpu")
        self.src: SourceTable = graph.sources
        self.table = IdTable()
        self.prov = IdTable()
        self.param_names: Dict[int, str] = {}
        self.module_size_ids: Dict[Tuple[Optional[str], str], List[int]] = {}
        self.module_names: Dict[int, str] = {}
        # one walk over the modules: names of modules, parameters and buffers
        # (the first name of a shared one), shapes and owners for the graph
        for mname, m in model.named_modules(remove_duplicate=False):
            self.module_names[id(m)] = mname
            for table in (m._parameters, m._buffers):
                for pname, p in table.items():
                    if p is None:
                        continue
                    full = f"{mname}.{pname}" if mname else pname
                    graph.param_shapes[full] = tuple(p.shape)
                    graph.param_modules[full] = mname
                    self.param_names.setdefault(id(p), full)
        self.module_stack: List[Optional[str]] = []
        self.op_counts: Dict[str, int] = {}
        self.warned: set = set()
        # (param name, dim) -> the (positions, atoms) of its first use; from a
        # second use on, every distinct use and {position: first atom aligned}
        self.param_first_use: Dict[Tuple[str, int], Tuple[List[int], List[int]]] = {}
        self.param_use_keys: Dict[Tuple[str, int], set] = {}
        self.param_alignment: Dict[Tuple[str, int], Dict[int, int]] = {}

    # -- op ids and module context ------------------------------------------
    @property
    def module(self) -> Optional[str]:
        return self.module_stack[-1] if self.module_stack else None

    def new_op(self, func_name: str, preferred: Optional[str] = None) -> str:
        base = preferred if preferred is not None else f"{self.module or '<model>'}/{func_name}"
        n = self.op_counts.get(base, 0)
        self.op_counts[base] = n + 1
        op = base if n == 0 else f"{base}#{n + 1}"
        from .graph import OpRecord

        self.graph.ops.append(OpRecord(op, func_name, self.module))
        return op

    # -- trace lookup --------------------------------------------------------
    def get(self, x: Any) -> Optional[Tr]:
        if isinstance(x, torch.Tensor):
            return self.table.get(x)
        return None

    def set(self, x: torch.Tensor, tr: Tr) -> None:
        if tr.t.dim() != x.dim():
            raise AssertionError(f"internal: trace ndim {tr.t.dim()} != tensor ndim {x.dim()}")
        self.table[x] = tr

    def param_ref(self, x: Any) -> Optional[List[Tuple[str, torch.Tensor]]]:
        """For parameters and tensors computed from parameters alone (by data
        movement or position-wise arithmetic): the list of (parameter name,
        index tensor shaped like ``x`` holding flat indices into it); else None."""
        if not isinstance(x, torch.Tensor):
            return None
        name = self.param_names.get(id(x))
        if name is not None:
            return [(name, torch.arange(x.numel()).reshape(x.shape))]
        return self.prov.get(x)

    def param_name(self, x: Any) -> Optional[str]:
        if isinstance(x, torch.Tensor):
            return self.param_names.get(id(x))
        return None

    def ids_along(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """One atom per index of ``dim`` of ``x`` (coupling other dims away)."""
        dim = dim % x.dim()
        tr = self.get(x)
        size = x.shape[dim]
        if tr is None:
            return torch.full((size,), NO_SOURCE, dtype=torch.long)
        if tr.vdim == dim:
            return tr.ids
        if tr.vdim is None:
            return tr.ids.expand(size).clone()
        rep = self.couple(tr.ids)
        return torch.full((size,), rep, dtype=torch.long)

    # -- union-find helpers -------------------------------------------------
    def couple(self, ids: torch.Tensor) -> int:
        """Union all atoms of ``ids``; return the representative (or -1)."""
        vals = torch.unique(ids)
        rep = self.src.union_all(vals.tolist())
        return NO_SOURCE if rep is None else rep

    def union_pairs(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Position-wise union of two broadcastable id tensors; returns merged ids."""
        a, b = torch.broadcast_tensors(a, b)
        if a.numel() <= 4096:  # a plain loop beats the vectorised filter on small tensors
            self.src.union_zip(a.reshape(-1).tolist(), b.reshape(-1).tolist())
        else:
            mask = (a >= 0) & (b >= 0) & (a != b)
            if bool(mask.any()):
                xs, ys = torch.unique(torch.stack([a[mask], b[mask]], 1), dim=0).T.tolist()
                self.src.union_zip(xs, ys)
        return torch.where(a >= 0, a, b)

    def add_module_size(self, entry: Tuple[Optional[str], str, List[int], int]) -> None:
        """Module attribute ``entry[1]`` counts channels ``entry[2]`` (divided by
        ``entry[3]``) and is rewritten when pruning. One attribute has one
        value: every use of it (a module called twice, one size attribute used
        by several heads) keeps the same count, by coupling position by position."""
        module, attr, ids, divisor = entry
        self.couple_attribute_uses(module, attr, ids)
        self.graph.module_sizes.append((module, attr, ids, divisor))

    def couple_attribute_uses(self, module: Optional[str], attr: str, ids: List[int]) -> None:
        """Channels ``ids`` are counted by attribute ``attr`` of ``module``:
        couple them position by position with its earlier uses."""
        key = (module, attr)
        first = self.module_size_ids.get(key)
        if first is None:
            self.module_size_ids[key] = ids
        elif len(first) == len(ids):
            self.union_pairs(torch.tensor(first, dtype=torch.long), torch.tensor(ids, dtype=torch.long))
        else:
            self.pin_ids(torch.tensor(first + ids, dtype=torch.long),
                         f"attribute {attr!r} of {module or '<model>'} sizes tensors of different widths")

    def need(self, ids: torch.Tensor, target: int) -> None:
        """Whenever any atom of ``ids`` is kept, ``target`` must be kept."""
        if target < 0:
            return
        for a in torch.unique(ids).tolist():
            if a >= 0 and a != target:
                self.graph.needs.append((a, target))

    def pin_ids(self, ids: torch.Tensor, reason: str) -> None:
        for a in torch.unique(ids).tolist():
            self.src.pin(a, reason)

    def pin_all(self, tensors: Iterable[Any], reason: str) -> None:
        for x in tensors:
            tr = self.get(x)
            if tr is not None:
                self.pin_ids(tr.ids, reason)

    def fresh_pinned(self, op: str, ndim: int, reason: str) -> Tr:
        atom = self.src.new_atoms(op, 1)[0]
        self.src.pin(atom, reason)
        return Tr.scalar(atom, ndim)

    # -- materialised traces ------------------------------------------------
    def materialize(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() > self.MAX_MATERIALIZE:
            raise _TooBig()
        tr = self.get(x)
        if tr is None:
            return torch.full(tuple(x.shape), NO_SOURCE, dtype=torch.long)
        return tr.t.expand(tuple(x.shape)).contiguous()

    def compress(self, full: torch.Tensor) -> Tr:
        """Turn a full-shape id tensor into a :class:`Tr`, coupling extra dims."""
        ndim = full.dim()
        if full.numel() == 0:
            return Tr.scalar(NO_SOURCE, ndim)
        vary = []
        for d in range(ndim):
            if full.shape[d] > 1:
                first = full.narrow(d, 0, 1)
                if not torch.equal(full, first.expand_as(full)):
                    vary.append(d)
        if not vary:
            return Tr.scalar(int(full.reshape(-1)[0]), ndim)
        if len(vary) == 1:
            d = vary[0]
            idx = [0] * ndim
            idx[d] = slice(None)
            return Tr.along(full[tuple(idx)].clone(), d, ndim)
        p = max(vary, key=lambda d: (full.shape[d], d))
        rows = full.movedim(p, 0).reshape(full.shape[p], -1)
        reps = []
        for row in rows:
            reps.append(self.couple(row))
        return Tr.along(torch.tensor(reps, dtype=torch.long), p, ndim)

    # -- parameter alignment -----------------------------------------------
    def record_param_use(self, name: str, dim: int, positions: List[int], ids: torch.Tensor | List[int]) -> None:
        """Parameter ``name`` is sliced along ``dim`` with the channels ``ids``
        (a tensor or a list of atoms, one per entry of ``positions``)."""
        from .graph import ParamUse

        ids_l = ids if isinstance(ids, list) else ids.tolist()
        positions = list(positions)
        key = (name, dim)
        first_use = self.param_first_use.get(key)
        if first_use is None:  # the first use (most parameters have one): nothing to align with
            self.param_first_use[key] = (positions, ids_l)
        else:
            uses = self.param_use_keys.get(key)
            if uses is None:
                uses = self.param_use_keys[key] = {(tuple(first_use[0]), tuple(first_use[1]))}
            use = (tuple(positions), tuple(ids_l))
            if use in uses:
                return
            uses.add(use)
            align = self.param_alignment.get(key)
            if align is None:
                align = self.param_alignment[key] = dict(zip(*first_use))
            for pos, a in zip(positions, ids_l):
                first = align.get(pos)
                if first is None:
                    align[pos] = a
                elif first < 0 and a >= 0:
                    self.src.pin(a, f"parameter {name} is also used where it cannot be sliced")
                elif a < 0 and first >= 0:
                    self.src.pin(first, f"parameter {name} is also used where it cannot be sliced")
                else:
                    self.src.union(first, a)
        self.graph.param_uses.append(ParamUse(name, dim, positions, ids_l))

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
        uses = []
        for name, idx in refs:  # (entries -1 where the tensor is not from this parameter)
            pshape = self.graph.param_shapes.get(name)
            if pshape is None:
                self.pin_ids(out_ids, f"combined with tensor {name} in {what}")
                return
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
                self.pin_ids(out_ids, f"combined with a reshaped view of {name} in {what}")
                return
            uses.append((name, p, coords[p].tolist(), out_ids[covered]))
        for name, p, positions, ids in uses:
            self.record_param_use(name, p, positions, ids)

    def warn_once(self, key: str, msg: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            warnings.warn(msg, stacklevel=3)

    # -- dispatch -----------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.multi_head_attention_forward:
            from .attention import traced_multi_head_attention

            result = traced_multi_head_attention(self, args, kwargs)
            if result is not None:
                return result
        from . import rules

        name = rules.func_name(func)
        if self.shapes_only:
            out = shape_only.run(func, name, args, kwargs, self.meta_cache, self.device)
        else:
            out = func(*args, **kwargs)

        if isinstance(out, int) or type(out) is torch.Size:
            return self._mark_sizes(func, args, kwargs, out)

        try:
            rules.dispatch(self, func, args, kwargs, out, name)
        except _TooBig:
            rules.barrier(self, name, args, kwargs, out, "tensor too large to trace by materialising")
        return out


    def _mark_sizes(self, func, args, kwargs, out):
        """``x.shape`` / ``x.size(d)``: mark the channel dim's size."""
        name = getattr(func, "__name__", "")
        if name == "__get__":
            name = getattr(getattr(func, "__self__", None), "__name__", "")
        if name not in ("shape", "size") or not args or not isinstance(args[0], torch.Tensor):
            return out
        t = self.get(args[0])
        if t is None or t.vdim is None:
            return out
        base = tuple(t.ids.tolist())
        if isinstance(out, torch.Size):
            return torch.Size([ChannelCount(v, base) if d == t.vdim else v for d, v in enumerate(out)])
        d = kwargs.get("dim", args[1] if len(args) > 1 else None)
        if isinstance(d, int) and d % args[0].dim() == t.vdim:
            return ChannelCount(out, base)
        return out


class _TooBig(Exception):
    pass


def _module_hooks(tracer: Tracer):
    def pre(module, _inputs):
        tracer.module_stack.append(tracer.module_names.get(id(module)))

    def post(module, _inputs, _output):
        if tracer.module_stack:
            tracer.module_stack.pop()

    h1 = torch.nn.modules.module.register_module_forward_pre_hook(pre)
    h2 = torch.nn.modules.module.register_module_forward_hook(post, always_call=True)
    return h1, h2


def _mark_head_counts(model: torch.nn.Module) -> List[Tuple[torch.nn.Module, str, int]]:
    """Replace every module's head-count attribute by an :class:`HeadCount`
    for the traced pass; return what to put back."""
    marked: List[Tuple[torch.nn.Module, str, int]] = []
    for name, m in model.named_modules():
        for attr in HEAD_COUNT_ATTRS:
            v = m.__dict__.get(attr)
            if type(v) is int and v > 1:
                marked.append((m, attr, v))
                m.__dict__[attr] = HeadCount(v, name, attr)
    return marked


def trace(
    model: torch.nn.Module, inputs: Sequence[Any] | Dict[str, Any], shapes_only: bool = True
) -> Tuple[TracedGraph, Any]:
    """Run ``model`` once on ``inputs`` and return its :class:`TracedGraph`
    and the output. Nothing is left behind on the model.

    With ``shapes_only`` (the default) the pass first runs on meta tensors,
    which costs no arithmetic and no activation memory; if the model turns out
    to need real values (see ``shape_only.py``), that pass is discarded and the model
    is traced again for real. The graph is the same either way; the output is
    then a meta tensor, or meta tensors."""
    if shapes_only:
        state = shape_only.snapshot_state(model)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                result: Optional[Tuple[TracedGraph, Any]] = _trace_once(model, inputs, True)
            except Exception:  # needs values, or fails: the real pass decides
                result = None
        if shape_only.restore_state(state):  # the model changed itself: trace it for real
            result = None
        if result is not None:
            for w in caught:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
            return result
    return _trace_once(model, inputs, False)


def _trace_once(model: torch.nn.Module, inputs: Sequence[Any] | Dict[str, Any], shapes_only: bool) -> Tuple[TracedGraph, Any]:
    graph = TracedGraph()
    tracer = Tracer(model, graph, shapes_only)
    if shapes_only:
        inputs = shape_only.inputs_to_meta(inputs)
    leaves = list(inputs.values()) if isinstance(inputs, dict) else list(inputs)
    for i, x in enumerate(flatten_tensors(leaves)):
        if tracer.get(x) is None:
            tracer.set(x, tracer.fresh_pinned(f"<input{i}>", x.dim(), "is a model input"))
    hooks = _module_hooks(tracer)
    marked = _mark_head_counts(model)
    try:
        # buffers are saved and restored outside the tracer: those copies are
        # not the model's ops
        with preserve_buffers(model), torch.no_grad(), tracer:
            out = call_model(model, inputs)
    except (TracingError, shape_only.NeedsValues):
        raise
    except Exception as exc:  # the model itself failed on these inputs
        raise TracingError(
            f"the model raised {type(exc).__name__} on the example inputs: {exc}. "
            "Pass inputs that run the model, e.g. compute([torch.rand(1, 3, 224, 224)])."
        ) from exc
    finally:
        for h in hooks:
            h.remove()
        for m, attr, value in marked:
            m.__dict__[attr] = value
    outs = flatten_tensors(out)
    if not outs:
        raise TracingError(
            f"the model returned {type(out).__name__} with no tensor in it; channelcut needs "
            "a tensor, or a tuple/list/dict of tensors, to compare the pruned model against."
        )
    for y in outs:
        tr = tracer.get(y)
        if tr is None:
            continue
        tracer.pin_ids(tr.ids, "reaches the model output")
        graph.output_ids.append(tr.ids.tolist())
    return graph, out
