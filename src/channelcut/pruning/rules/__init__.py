"""The one table of op rules: how output traces follow from input traces.

Every torch function the tracer understands is one entry in ``RULES`` (keyed by
function name; in-place variants share the rule of their base op), registered
with :func:`~.registry.rule` next to its trace rule, in one module per family:

- ``elementwise.py``: arithmetic, comparisons, activations, dropout, casts,
  positions of nonzeros (``torch.where(cond)``);
- ``reductions.py``: sum, mean, max, norm, softmax, cumsum, normalize, topk, sort;
- ``spatial.py``: pooling, interpolation, padding, grid sampling;
- ``norms.py``: batch, instance, layer, RMS, group and local response norms;
- ``layers.py``: conv, linear, embedding, matmul, addmm, einsum;
- ``attention.py``: scaled dot product and multi-head attention;
- ``movement.py``: permute, index, cat, stack, gather, shuffles, unfold;
- ``reshape.py``: reshape, view, flatten, expand, chunk, split;
- ``creation.py`` and ``writes.py``: new tensors, metadata, in-place writes
  (``index_add_`` of routed tokens along a non-channel dim);
- ``provenance.py``: ops on constants made from parameters.

Start reading at :func:`dispatch`. A rule gets the tracer's
:class:`~channelcut.pruning.recorder.Recorder` and one
:class:`~.registry.OpCall`. An op with tracked inputs and no rule is a
**barrier** (:func:`barrier`): its inputs are pinned, its outputs are fresh
pinned sources, and the user is warned once. Ops whose tensor inputs are all
untracked (constants, parameters) produce constants (``provenance.py``).

Adding an op means adding one entry in the module of its family and one case
to the op-rule tests (``tests/test_op_rules.py``).
"""

from __future__ import annotations

from ..recorder import Recorder, TooBigToMaterialize
from ..shape_only import NeedsValues
from . import attention, creation, elementwise, layers, movement, norms, reductions, reshape, spatial  # noqa: F401
from .provenance import untracked
from .registry import RULES, OpCall, OpRule, Unsupported, base_name, declare, facts, func_name, rule, trace_rule
from .writes import WRITES

__all__ = ["RULES", "OpCall", "OpRule", "Unsupported", "barrier", "base_name", "declare", "dispatch", "facts",
           "func_name", "rule", "trace_rule"]


def dispatch(rec: Recorder, call: OpCall) -> None:
    """Derive the traces of ``call.out`` by the rule for the call's op."""
    name = call.name
    if name in WRITES:  # in-place writes return None or their target
        if any(rec.get(x) is not None for x in call.tensors):
            trace_rule(name)(rec, call)
        return
    outs = call.outs
    if not outs:
        return  # sizes, dtypes, bools, None: nothing to trace
    tensors = call.tensors
    tracked = [x for x in tensors if rec.get(x) is not None]
    if not tracked:
        untracked(rec, call)
        return
    r = trace_rule(name)
    if r is None:
        barrier(rec, call, "no rule for this op")
        return
    try:
        r(rec, call)
    except TooBigToMaterialize:
        raise
    except Unsupported as exc:
        barrier(rec, call, str(exc))
    except Exception as exc:  # a rule that cannot handle these arguments
        if rec.shapes_only:  # perhaps it read a meta tensor's values
            raise NeedsValues(f"rule for {name}: {exc}") from exc
        barrier(rec, call, f"rule failed ({type(exc).__name__}: {exc})")
    positions, rec.positions = rec.positions, set()
    for y in outs:  # any output a rule forgot is a fresh, safe barrier output
        if rec.get(y) is None and id(y) not in positions and not any(y is x for x in tensors):
            rec.set(y, rec.fresh_pinned(rec.new_op(name), y.dim(), f"output of {name}"))


def barrier(rec: Recorder, call: OpCall, reason: str) -> None:
    """Keep every channel flowing in; outputs become fresh pinned sources."""
    name = call.name
    op = rec.new_op(name)
    where = rec.module or "<model>"
    msg = f"op '{name}' in {where}: {reason}"
    rec.graph.barriers.append((name, rec.module, reason))
    rec.pin_all(call.tensors, f"flows into unsupported op '{name}' ({where})")
    for y in call.outs:
        rec.set(y, rec.fresh_pinned(op, y.dim(), f"output of unsupported op '{name}' ({where})"))
    rec.warn_once(
        name,
        f"channelcut: {msg}. Treated as a barrier: channels flowing into it are kept, "
        "the model stays correct but prunes less there.",
    )
