"""Check an export against a reference that does not come from the plan.

Start at :func:`reference_outputs` (run before pruning) and :func:`check`
(after). The reference is the user's model, unpruned, run once on the
example inputs:

- when the export removes channels the model had zeroed itself
  (``spec.reference == "model"``): the model as it is;
- otherwise: the model with the requested input channels zeroed by hand in
  the consumer weights.

In both cases the channels the spec reports it removes beyond the request
(:attr:`PruningSpec.additions`: constrained coupling, ``pruned_outputs``
groups) are zeroed too. Columns are zeroed in place for the duration of that
one run and restored bit for bit; they come from the request and the traced
weight layout, never from ``spec.masks``, so a plan that removes a channel it
does not report fails verification. Where it is cheaper and the same
computation (a plain ``nn.Linear``/``nn.Conv*d`` that owns the weight alone,
whose input is smaller than its weight: a linear layer on a few tokens), the
channels are zeroed in the layer's input instead, by a forward pre-hook
removed after the run; a call the hook does not fit makes the reference run
again with columns only. Likewise an ``nn.MultiheadAttention`` gets its
packed q/k/v columns zeroed in its query, key and value, and its out_proj
columns as the value rows of the packed weight (those attention channels
are then zero: three strided passes over its weight columns saved). These
shortcuts follow the trace; should the real run read a weight where the trace did not see it,
the check fails and :meth:`PruningManager.prune` runs it again against
weights zeroed in place before it reports anything. No copy of the model is
made (two forward passes in all: this one and the pruned model's).

Reduced precision (bfloat16, float16): the reference also runs in float64,
without a float64 copy of the model: each module's own parameters and
buffers are upcast while it runs (:func:`run_in_float64`), so the memory it
takes is about the largest module's tensors in float64; a large plain
embedding is looked up first and its rows upcast, a large plain linear layer
upcasts its weight a chunk of rows at a time (an LLM's 128k-token embedding
and head would take 4 GiB each in float64). The pruned model passes when its distance to the
float64 result is within three times the distance of the unpruned model in
its own dtype, plus four epsilons of the dtype times the output's scale: a
bound derived from the dtype's rounding, with no absolute floor.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn
import torch.nn.functional as F

from . import spill
from .mock import zero_input_channels
from .graph import TracedGraph
from .model_run import compare_outputs, flatten_tensors, long_tensor, run_model
from .spec import MaskEntry, PruningSpec

REDUCED = (torch.bfloat16, torch.float16)


@dataclass
class Reference:
    """Outputs of the reference run: in the model's dtype and, for reduced
    precision, in float64."""

    outputs: Any
    outputs64: Any = None


def removed_entries(spec: PruningSpec) -> List[Tuple[str, Optional[int], List[int]]]:
    """What the reference zeroes, as ``(tensor, dim, indices)``: the
    additions, plus the request unless the model's own zeros are the request.
    ``dim`` None: input channels of a consumer weight (in its own layout);
    else indices along that dim (a producer's rows, a bias's entries)."""
    cols: Dict[str, set] = {}
    if spec.reference != "model":
        for p, chans in spec.requested.items():
            cols.setdefault(p, set()).update(chans)
    rows: Dict[Tuple[str, int], set] = {}
    for a in spec.additions:
        if a.dim is None:
            cols.setdefault(a.param, set()).update(a.channels)
        else:
            rows.setdefault((a.param, a.dim), set()).update(a.channels)
    out: List[Tuple[str, Optional[int], List[int]]] = [(p, None, sorted(c)) for p, c in cols.items() if c]
    return out + [(p, d, sorted(c)) for (p, d), c in rows.items() if c]


def _layout(graph: TracedGraph, param: str) -> Tuple[int, int]:
    """(weight dim of the input channels, groups) of consumer weight ``param``."""
    c = graph.consumers[graph.consumers_by_param[param][0]]
    return c.weight_dim, c.groups


#: modules whose forward multiplies its first argument by its weight and
#: nothing else: zeroing that argument's channel ``c`` is zeroing weight column ``c``
_PLAIN_FORWARDS = (nn.Linear.forward, nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward)


class _NotPlain(Exception):
    """A module chosen for input zeroing was called in a way that does not
    allow it; the reference is run again with the weight columns zeroed."""


def _input_zeroable(model: nn.Module, graph: TracedGraph, param: str, aliased: set) -> Optional[Tuple[nn.Module, int]]:
    """``(module, activation dim)`` when input channels of consumer weight
    ``param`` can be zeroed in the module's input instead of the weight: a
    plain conv/linear module (:data:`_PLAIN_FORWARDS`) owns it under that name
    alone, its one traced use is that module's own op, and its input is
    smaller than its weight (the cheaper of the two to zero)."""
    ops = graph.consumers_by_param.get(param, [])
    if len(ops) != 1 or param in aliased or graph.producers_by_param.get(param, ops) != ops:
        return None
    c = graph.consumers[ops[0]]
    if c.module is None or not c.physical or param != (f"{c.module}.weight" if c.module else "weight"):
        return None
    m = model.get_submodule(c.module)
    if getattr(type(m), "forward", None) not in _PLAIN_FORWARDS or m._forward_pre_hooks or m._forward_hooks:
        return None
    w = m.weight
    if c.positions * w.shape[1] * c.groups > w.numel():
        return None
    return m, c.activation_dim


def _zero_input_hook(dim: int, chans: Sequence[int], width: int):
    index: Dict[torch.device, torch.Tensor] = {}

    def hook(_m: nn.Module, args: Tuple[Any, ...]) -> Tuple[Any, ...]:
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or x.dim() <= (dim if dim >= 0 else -dim - 1) or x.shape[dim] != width:
            raise _NotPlain()
        idx = index.get(x.device)
        if idx is None:
            idx = index[x.device] = long_tensor(chans, x.device)
        return (x.index_fill(dim, idx, 0), *args[1:])

    return hook


#: the weights of an ``nn.MultiheadAttention`` the reference zeroes elsewhere
_ATTENTION_WEIGHTS = ("in_proj_weight", "out_proj.weight")


def _attention_of(model: nn.Module, graph: TracedGraph, param: str, suffix: str, aliased: set,
                  op_modules: Dict[str, Optional[str]]) -> Optional[nn.MultiheadAttention]:
    """The ``nn.MultiheadAttention`` (stock forward, packed q/k/v weight, no
    hooks, no ``bias_v``) that weight ``param`` (``<attention>.<suffix>``)
    belongs to, when every traced read of it is in that module's call
    (``op_modules``: op -> the module that called it) and no other name holds
    it or the packed q/k/v weight; else None."""
    if not param.endswith("." + suffix) and param != suffix:
        return None
    name = param[: -len(suffix)].rstrip(".")
    try:
        m = model.get_submodule(name)
    except AttributeError:
        return None
    if (type(m).forward is not nn.MultiheadAttention.forward or not m._qkv_same_embed_dim or m.bias_v is not None
            or m._forward_hooks or m._forward_pre_hooks or param in aliased
            or (f"{name}.in_proj_weight" if name else "in_proj_weight") in aliased):
        return None
    ops = [*graph.consumers_by_param.get(param, ()), *graph.producers_by_param.get(param, ())]
    if not ops or any(op_modules.get(op) != name for op in ops):
        return None
    return m


def _zero_qkv_hook(chans: Sequence[int], width: int):
    """Forward pre-hook (with kwargs) of an ``nn.MultiheadAttention``: input
    channels ``chans`` of query, key and value zeroed, which is zeroing those
    columns of its packed q/k/v weight (a tensor passed as several of them
    stays one tensor)."""
    index: Dict[torch.device, torch.Tensor] = {}
    names = ("query", "key", "value")

    def hook(_m: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Tuple[Tuple[Any, ...], Dict[str, Any]]:
        args = list(args)
        kwargs = dict(kwargs)
        values = [args[i] if i < len(args) else kwargs.get(n) for i, n in enumerate(names)]
        zeroed: Dict[int, torch.Tensor] = {}
        for i, v in enumerate(values):
            if not isinstance(v, torch.Tensor) or v.is_nested or v.dim() == 0 or v.shape[-1] != width:
                raise _NotPlain()
            if id(v) not in zeroed:
                idx = index.get(v.device)
                if idx is None:
                    idx = index[v.device] = long_tensor(chans, v.device)
                zeroed[id(v)] = v.index_fill(-1, idx, 0)
            if i < len(args):
                args[i] = zeroed[id(v)]
            else:
                kwargs[names[i]] = zeroed[id(v)]
        return tuple(args), kwargs

    return hook


@contextlib.contextmanager
def columns_zeroed(model: nn.Module, graph: TracedGraph, removed: List[Tuple[str, Optional[int], List[int]]],
                   inputs_too: bool = False) -> Iterator[None]:
    """The model with the ``removed`` entries (:func:`removed_entries`)
    zeroed, for the duration of the block; every tensor is restored bit for
    bit after.

    ``inputs_too``: where it is cheaper and provably the same, the input
    channels of a plain conv/linear module are zeroed in its input (a
    forward pre-hook, one activation at a time) instead of in its weight
    (saved, zeroed, restored); an attention's packed weight likewise (see
    the module docstring). A call that does not fit raises
    ``_NotPlain`` from the hook: run again without ``inputs_too``."""
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    saved: List[Tuple[torch.Tensor, int, Optional[torch.Tensor], torch.Tensor]] = []  # (tensor, dim, index, values)
    hooks: List[Any] = []
    pending: List[Tuple[nn.Module, Any, bool]] = []  # (module, pre-hook, with kwargs): installed after the checks
    aliased: set = set()
    op_modules: Dict[str, Optional[str]] = {}
    if inputs_too:
        seen: Dict[int, str] = {}
        for name, t in tensors.items():
            if id(t) in seen:
                aliased.update((name, seen[id(t)]))
            seen.setdefault(id(t), name)
        for alias, name in graph.param_aliases.items():
            if alias != name:
                aliased.update((alias, name))
        if any(p.endswith(_ATTENTION_WEIGHTS) for p, _, _ in removed):
            op_modules = {r.op: r.module for r in graph.ops}

    def zero_in_place(w: torch.Tensor, dim: int, groups: int, chans: Sequence[int]) -> None:
        if groups == 1:  # keep only the columns it changes
            idx = long_tensor(chans, w.device)
            saved.append((w, dim, idx, spill.keep(w.index_select(dim, idx))))
            w.index_fill_(dim, idx, 0)
        else:
            saved.append((w, 0, None, spill.keep(w.clone())))
            zero_input_channels(w, MaskEntry("", dim, groups, list(chans)))

    def shortcut(param: str, w: torch.Tensor, chans: Sequence[int]) -> bool:
        """Zero consumer weight ``param``'s columns ``chans`` another way where
        the trace shows it is the same computation; False where none applies."""
        plain = _input_zeroable(model, graph, param, aliased)
        if plain is not None:  # in the module's input
            m, act_dim = plain
            pending.append((m, _zero_input_hook(act_dim, chans, w.shape[1] * getattr(m, "groups", 1)), False))
            return True
        attention = _attention_of(model, graph, param, "in_proj_weight", aliased, op_modules)
        if attention is not None:  # in its q, k, v inputs
            pending.append((attention, _zero_qkv_hook(chans, attention.embed_dim), True))
            return True
        attention = _attention_of(model, graph, param, "out_proj.weight", aliased, op_modules)
        if attention is not None:
            # the value rows of the packed weight and bias: those attention
            # output channels are then 0
            rows = [2 * attention.embed_dim + c for c in chans]
            for t in (attention.in_proj_weight, attention.in_proj_bias):
                if t is not None:
                    zero_in_place(t.data, 0, 1, rows)
            return True
        return False

    try:
        with torch.no_grad():
            for param, dim, chans in removed:
                w = tensors[param].data
                if dim is not None:
                    zero_in_place(w, dim, 1, chans)
                elif not (inputs_too and shortcut(param, w, chans)):
                    zero_in_place(w, *_layout(graph, param), chans)
            for m, hook, with_kwargs in pending:
                hooks.append(m.register_forward_pre_hook(hook, with_kwargs=with_kwargs))
        yield
    finally:
        for h in hooks:
            h.remove()
        with torch.no_grad():
            for w, dim, idx, old in reversed(saved):
                if idx is None:
                    w.copy_(old)
                else:
                    w.index_copy_(dim, idx, old)


def _zeroed_run(model: nn.Module, graph: TracedGraph, removed: List[Tuple[str, Optional[int], List[int]]], run: Any,
                shortcuts: bool = True) -> Any:
    """``run()`` with the ``removed`` entries zeroed: with ``shortcuts``,
    input zeroing where it applies, else (a module called in a way it does
    not fit) weights only."""
    if shortcuts:
        try:
            with columns_zeroed(model, graph, removed, inputs_too=True):
                return run()
        except _NotPlain:
            pass
    with columns_zeroed(model, graph, removed):
        return run()


def run_deterministic(model: nn.Module, inputs: Any) -> Any:
    """Run ``model`` for verification. A model in train mode is run in eval
    mode (then put back): dropout and friends draw new random masks on every
    call, so train-mode outputs can not be compared; per-channel layers such as
    BatchNorm are exported the same way in both modes."""
    training = [m for m in model.modules() if m.training]
    try:
        if training:
            model.eval()
        with torch.no_grad():
            return run_model(model, inputs)
    finally:
        for m in training:
            m.training = True


def _to64(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.double() if obj.is_floating_point() else obj
    if isinstance(obj, dict):
        return {k: _to64(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to64(v) for v in obj)
    return obj


def reference_outputs(model: nn.Module, inputs: Any, spec: PruningSpec, graph: TracedGraph,
                      shortcuts: bool = True) -> Reference:
    """Run the reference (see the module docstring); the model is unchanged.

    ``shortcuts``: zero inputs or value rows where the trace shows that is
    the same computation; False zeroes every weight
    in place (what :meth:`PruningManager.prune` runs again before it
    reports a failed verification, in case the real run differs from the
    trace)."""
    removed = removed_entries(spec)
    zeroed = functools.partial(_zeroed_run, model, graph, removed, shortcuts=shortcuts)
    ref = Reference(zeroed(lambda: run_deterministic(model, inputs)))
    if any(t.dtype in REDUCED for t in flatten_tensors(ref.outputs)):
        try:
            ref.outputs64 = zeroed(lambda: run_in_float64(model, inputs))
        except Exception:  # a module that reads another's weights itself: a float64 copy
            ref.outputs64 = None
        if ref.outputs64 is None:
            hi = copy.deepcopy(model).double()
            with columns_zeroed(hi, graph, removed):
                ref.outputs64 = run_deterministic(hi, _to64(inputs))
            del hi
    return ref


def run_in_float64(model: nn.Module, inputs: Any) -> Any:
    """Run ``model`` in float64 with each module's own floating-point
    parameters and buffers upcast only while that module runs (a tensor
    shared by several modules once, until the last of them returns); every
    tensor is put back as it was after. Raises if some op still meets a
    tensor of the model's dtype (a module that reads another module's
    weights in its own code)."""
    ours = {id(m) for m in model.modules()}
    active: Dict[int, List[Any]] = {}  # id(tensor) -> [tensor, original data, users]
    stack: List[List[int]] = []
    large = _install_large_float64(model)

    def pre(m: nn.Module, _args: Any) -> None:
        ids: List[int] = []
        if id(m) in ours and id(m) not in large:
            for t in (*m._parameters.values(), *m._buffers.values()):
                if t is None or not t.is_floating_point():
                    continue
                entry = active.get(id(t))
                if entry is None:
                    active[id(t)] = entry = [t, t.data, 0]
                    t.data = t.data.double()
                entry[2] += 1
                ids.append(id(t))
        stack.append(ids)

    def post(_m: nn.Module, _args: Any, _out: Any) -> None:
        for i in stack.pop() if stack else ():
            entry = active[i]
            entry[2] -= 1
            if entry[2] == 0:
                entry[0].data = entry[1]
                del active[i]

    h1 = torch.nn.modules.module.register_module_forward_pre_hook(pre)
    h2 = torch.nn.modules.module.register_module_forward_hook(post, always_call=True)
    try:
        return run_deterministic(model, _to64(inputs))
    finally:
        h1.remove()
        h2.remove()
        for t, data, _ in active.values():
            t.data = data
        for m in large.values():
            m.__dict__.pop("forward", None)


#: a plain nn.Linear / nn.Embedding whose weight takes more than this in
#: float64 is not upcast whole by :func:`run_in_float64` (an LLM's 128k-token
#: embedding and head: 4 GiB each in float64)
LARGE_FLOAT64_BYTES = 256 << 20
#: rows of such a weight upcast at a time (bytes in float64)
CHUNK_FLOAT64_BYTES = 64 << 20


def _install_large_float64(model: nn.Module) -> Dict[int, nn.Module]:
    """Give each large plain ``nn.Linear`` and ``nn.Embedding`` of ``model``
    a float64 forward that never holds its weight in float64 whole: the
    embedding looks its rows up in the weight's dtype and upcasts them (the
    same values); the linear layer upcasts ``CHUNK_FLOAT64_BYTES`` of rows at
    a time and fills its output in slices. Returns them by id; the caller
    removes the instance ``forward`` after."""
    out: Dict[int, nn.Module] = {}
    for m in model.modules():
        w = m._parameters.get("weight") if type(m) in (nn.Linear, nn.Embedding) else None
        if w is None or not w.is_floating_point() or w.dtype == torch.float64 or w.numel() * 8 <= LARGE_FLOAT64_BYTES:
            continue
        if type(m) is nn.Embedding:
            if m.max_norm is not None:
                continue  # renormalises its weight in place: leave it to the plain path

            def embed(ids: torch.Tensor, m: nn.Embedding = m) -> torch.Tensor:
                return F.embedding(ids, m.weight, m.padding_idx, None, m.norm_type, m.scale_grad_by_freq,
                                   m.sparse).double()

            m.forward = embed  # type: ignore[method-assign]
        else:
            def linear(x: torch.Tensor, m: nn.Linear = m) -> torch.Tensor:
                w, b = m.weight, m.bias
                x = x.double()
                rows = max(1, CHUNK_FLOAT64_BYTES // max(1, w.shape[1] * 8))
                y = x.new_empty(x.shape[:-1] + (w.shape[0],))
                for r in range(0, w.shape[0], rows):
                    e = min(w.shape[0], r + rows)
                    y[..., r:e] = F.linear(x, w[r:e].double(), None if b is None else b[r:e].double())
                return y

            m.forward = linear  # type: ignore[method-assign]
        out[id(m)] = m
    return out


def default_rtol(spec: PruningSpec) -> Optional[float]:
    """The relative tolerance an export can be held to, when its own
    arithmetic sets one: an RMS norm that computes in float32 whatever the
    model's dtype (Hugging Face's) and is rescaled is exact to float32
    rounding, 1e-5; else None (the output dtype's default)."""
    return 1e-5 if any(r.float32 for r in spec.rescales) else None


def check(out: Any, ref: Reference, rtol: Optional[float] = None) -> Optional[str]:
    """None if the pruned model's outputs ``out`` match the reference, else
    what differs."""
    if ref.outputs64 is None or rtol is not None:
        return compare_outputs(out, ref.outputs, rtol=rtol)
    a, lo, hi = flatten_tensors(out), flatten_tensors(ref.outputs), flatten_tensors(ref.outputs64)
    if len(a) != len(hi):
        return f"the pruned model returned {len(a)} tensors, the reference {len(hi)}"
    for i, (x, y, z) in enumerate(zip(a, lo, hi)):
        if x.shape != z.shape:
            return f"output {i} has shape {tuple(x.shape)}, expected {tuple(z.shape)}"
        if x.dtype not in REDUCED:
            problem = compare_outputs(x, y)
            if problem is not None:
                return problem
            continue
        if not x.numel():
            continue
        scale = float(z.abs().max())
        err = float((x.double() - z).abs().max())
        budget = float((y.double() - z).abs().max())
        tol = 3 * budget + 4 * torch.finfo(x.dtype).eps * scale
        if not err <= tol:  # also catches NaN
            return (f"output {i} ({x.dtype}) differs from the float64 reference by {err:.3g}; the unpruned model in "
                    f"{x.dtype} differs by {budget:.3g} (max |y| = {scale:.3g}, allowed {tol:.3g})")
    return None
