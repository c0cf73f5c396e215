"""Record traces with one forward pass. Start at :func:`trace`.

A :class:`Tracer` is a :class:`torch.overrides.TorchFunctionMode`: it sees
every torch function the model calls. Tensors stay ordinary tensors: their
traces live in the side tables of a :class:`~channelcut.pruning.recorder.Recorder`,
so nothing is ever attached to the user's model, its parameters or its
activations. Each call is computed (on ``meta`` tensors when shapes are all
the pass needs, see ``shape_only.py``; else for real), then the op's rule
(``rules/``) derives the output traces from the input traces.
"""

from __future__ import annotations

import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch.overrides import TorchFunctionMode

from ..errors import TracingError
from . import rules, shape_only
from . import counts
from .counts import HEAD_COUNT_ATTRS, ChannelCount, HeadCount, StoredInt
from .graph import TracedGraph
from .model_run import call_model, flatten_tensors, mismatch_hint, preserve_buffers
from .recorder import CompactTrace, Recorder, TooBigToMaterialize
from .rmsnorm import rms_norm_modules


class Tracer(TorchFunctionMode):
    """The tracing mode: computes each torch call and hands it to its rule,
    which records into :attr:`recorder`."""

    def __init__(self, model: torch.nn.Module, graph: TracedGraph, shapes_only: bool = False) -> None:
        super().__init__()
        self.recorder = Recorder(model, graph, shapes_only)
        #: compute ops on meta tensors (see ``shape_only.py``)
        self.shapes_only = shapes_only
        self.meta_cache: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}
        first = next(model.parameters(), None)
        self.device = first.device if first is not None else torch.device("cpu")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        # only the model's own comparisons of channel counts are watched, not
        # those of torch's functions, of rules or of a decomposition
        hook, use, counts.on_compare, counts.on_use = counts.on_compare, counts.on_use, None, None
        try:
            if use is not None:
                _note_stored_args(self.recorder, args, kwargs)
            return self._call(func, args, kwargs or {})
        finally:
            counts.on_compare, counts.on_use = hook, use

    def _call(self, func, args, kwargs):
        if self.recorder.opaque:  # inside a module traced as one op (an RMS norm)
            if self.shapes_only:
                return shape_only.run(func, rules.func_name(func), args, kwargs, self.meta_cache, self.device, rules.facts)
            return func(*args, **kwargs)
        name = rules.func_name(func)
        facts = rules.facts(name)
        if facts is not None and facts.decompose is not None:
            # an op run as the ops it is made of, each traced (attention)
            run = facts.decompose(rules.OpCall(func, name, args, kwargs, None), self.recorder)
            if run is not None:
                with self:
                    return run()
        if self.shapes_only:
            out = shape_only.run(func, name, args, kwargs, self.meta_cache, self.device, rules.facts)
        else:
            out = func(*args, **kwargs)

        if isinstance(out, int) or type(out) is torch.Size:
            return self._mark_sizes(func, args, kwargs, out)

        call = rules.OpCall(func, name, args, kwargs, out)
        rec = self.recorder
        try:
            rules.dispatch(rec, call)
        except TooBigToMaterialize:
            rules.barrier(rec, call, "tensor too large to trace by materialising")
        if rec.module in rec.width_attrs:
            rec.note_widths(rec.module, call.outs)
        return out

    def _mark_sizes(self, func, args, kwargs, out):
        """``x.shape`` / ``x.size(d)``: mark the channel dim's size."""
        name = getattr(func, "__name__", "")
        if name == "__get__":
            name = getattr(getattr(func, "__self__", None), "__name__", "")
        if name not in ("shape", "size") or not args or not isinstance(args[0], torch.Tensor):
            return out
        t = self.recorder.get(args[0])
        if t is None or t.vdim is None:
            return out
        base = tuple(t.ids.tolist())
        if isinstance(out, torch.Size):
            return torch.Size([ChannelCount(v, base) if d == t.vdim else v for d, v in enumerate(out)])
        d = kwargs.get("dim", args[1] if len(args) > 1 else None)
        if isinstance(d, int) and d % args[0].dim() == t.vdim:
            return ChannelCount(out, base)
        return out


def module_hooks(rec: Recorder):
    """Global module hooks that keep ``rec.modules.stack`` current, and run
    an RMS norm module (``rec.rms_forms``) as one op (remove them after)."""
    modules = rec.modules

    def pre(module, inputs):
        modules.stack.append(modules.names.get(id(module)))
        if id(module) in rec.rms_forms and not rec.opaque and inputs and isinstance(inputs[0], torch.Tensor):
            t = rec.get(inputs[0])
            if t is not None and t.vdim == inputs[0].dim() - 1:
                rec.opaque.append((module, inputs[0]))

    def post(module, _inputs, output):
        if rec.opaque and rec.opaque[-1][0] is module:
            _, x = rec.opaque.pop()
            if isinstance(output, torch.Tensor):
                rms_norm_module(rec, module, x, output)
        if modules.stack:
            modules.stack.pop()

    h1 = torch.nn.modules.module.register_module_forward_pre_hook(pre)
    h2 = torch.nn.modules.module.register_module_forward_hook(post, always_call=True)
    return h1, h2


def _note_stored_args(rec: Recorder, args: tuple, kwargs: Optional[dict]) -> None:
    """Module attributes (:class:`StoredInt`) passed to a torch function
    (``x.view(b, -1, self.head_dim)``): read by the traced code."""
    for a in (*args, *(kwargs.values() if kwargs else ())):
        if isinstance(a, StoredInt):
            rec.graph.read_attributes.add((a.module, a.attr))
        elif isinstance(a, (list, tuple)):
            for b in a:
                if isinstance(b, StoredInt):
                    rec.graph.read_attributes.add((b.module, b.attr))


def compared_with_attribute(rec: Recorder, count: ChannelCount, stored: StoredInt) -> None:
    """The model's code found channel count ``count`` equal to a module's int
    attribute (``assert x.shape[1] == self.channels``): the attribute counts
    those channels and is rewritten with them."""
    if count.base is not None and len(count.base) == int(stored):
        rec.add_module_size((stored.module, stored.attr, list(count.base), 1))


def rms_norm_module(rec: Recorder, module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """An RMS norm module ran as one op: its channels pass through, its
    weight is sliced with them, and it is rescaled when some are removed."""
    form = rec.rms_forms[id(module)]
    t = rec.get(x)
    ids = rec.ids_along(x, -1)
    wname = rec.param_name(module.weight)
    if wname is not None:
        rec.record_param_use(wname, 0, list(range(module.weight.numel())), ids)
    else:
        rec.pin_ids(ids, "an RMS norm with a computed weight")
    rec.note_rms_norm(rec.modules.names.get(id(module)), wname, form.eps_attr, float(getattr(module, form.eps_attr)),
                      form.plus_one, ids.tolist(), form.float32)
    rec.set(y, CompactTrace(t.atoms, t.vdim))


def _mark_attributes(rec: Recorder) -> List[Tuple[torch.nn.Module, str, int, int]]:
    """For the traced pass, replace every module's head-count attribute by a
    :class:`HeadCount`, and every other plain int attribute of the model's own
    modules (``rec.width_attrs``) by a :class:`StoredInt`; return what to put
    back."""
    marked: List[Tuple[torch.nn.Module, str, int, int]] = []
    for name, m in rec.model.named_modules():
        d = m.__dict__
        for attr in HEAD_COUNT_ATTRS:
            v = d.get(attr)
            if type(v) is int and v > 1:
                d[attr] = HeadCount(v, name, attr)
                marked.append((m, attr, v, d[attr]))
        for attrs in rec.width_attrs.get(name, {}).values():
            for attr in attrs:
                v = d.get(attr)
                if type(v) is int:
                    d[attr] = StoredInt(v, name, attr)
                    marked.append((m, attr, v, d[attr]))
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
    rec = tracer.recorder
    if shapes_only:
        inputs = shape_only.inputs_to_meta(inputs)
    leaves = list(inputs.values()) if isinstance(inputs, dict) else list(inputs)
    for i, x in enumerate(flatten_tensors(leaves)):
        if rec.get(x) is None:
            rec.set(x, rec.fresh_pinned(f"<input{i}>", x.dim(), "is a model input"))
    rec.rms_forms = rms_norm_modules(model)
    hooks = module_hooks(rec)
    marked = _mark_attributes(rec)
    counts.on_compare = lambda count, value: compared_with_attribute(rec, count, value)
    counts.on_use = lambda stored: graph.read_attributes.add((stored.module, stored.attr))
    try:
        # buffers are saved and restored outside the tracer: those copies are
        # not the model's ops
        with preserve_buffers(model), torch.no_grad(), tracer:
            out = call_model(model, inputs)
    except (TracingError, shape_only.NeedsValues):
        raise
    except Exception as exc:  # the model itself failed on these inputs
        hint = mismatch_hint(model, inputs)
        raise TracingError(
            f"the model raised {type(exc).__name__} on the example inputs: {exc}. "
            + (hint or "Pass inputs that run the model, e.g. compute([torch.rand(1, 3, 224, 224)]).")
        ) from exc
    finally:
        counts.on_compare = counts.on_use = None
        for h in hooks:
            h.remove()
        for m, attr, value, mark in marked:
            if m.__dict__.get(attr) is mark:  # (unless the model set it meanwhile)
                m.__dict__[attr] = value
    outs = flatten_tensors(out)
    if not outs:
        raise TracingError(
            f"the model returned {type(out).__name__} with no tensor in it; channelcut needs "
            "a tensor, or a tuple/list/dict of tensors, to compare the pruned model against."
        )
    for y in outs:
        t = rec.get(y)
        if t is None:
            continue
        rec.pin_ids(t.ids, "reaches the model output")
        graph.output_ids.append(t.ids.tolist())
    return graph, out
