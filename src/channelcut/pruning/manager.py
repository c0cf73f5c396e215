"""High-level API: :class:`PruningManager` (``compute`` -> ``get_mock_model`` -> ``prune``).

>>> import torch
>>> from torch import nn
>>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
>>> x = torch.rand(1, 3, 16, 16)
>>> manager = PruningManager(net).compute([x], pruned_inputs=[("3.weight", 5), ("3.weight", 6)])
>>> manager.spec.kept()["0.weight"]
(8, 6)
>>> y_mock = manager.get_mock_model()(x)
>>> _ = manager.prune()
>>> net[0].out_channels, net[1].num_features, net[3].in_channels
(6, 6, 6)
>>> torch.allclose(net(x), y_mock, atol=1e-6)
True
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from operator import itemgetter
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..errors import ExportError, StateError, TracingError
from ..moe import split_experts
from .mock import make_mock
from .prepare import add_prefix_aliases, refuse_offloaded, refuse_reparametrized, reparametrized_weights, unwrap_model
from .pruner import Rollback, prune_model
from .request import export_mode, normalize_request
from .resolve import DEFAULT_COPY_COST, DEFAULT_OP_COST, resolve
from .graph import TracedGraph
from .model_run import flatten_tensors, gc_paused
from .spec import PruningSpec
from .tracing import trace
from .verify import check, default_rtol, reference_outputs, run_deterministic
from .zeros import find_zero_channels

Inputs = Union[Sequence[Any], Dict[str, Any]]


@dataclass
class ChannelGroup:
    """Channels that are always kept or removed together."""

    id: int
    producers: List[Tuple[str, int]]  # (producer weight name, output channel)
    consumers: List[Tuple[str, int]]  # (consumer weight name, input channel)
    pinned: Optional[str]  # why it can never be removed, or None


class PruningManager:
    """Export channel-pruned models: trace once, resolve a spec, mock or prune.

    Args:
        net: the model to prune. It is only modified by :meth:`prune`. A
            DataParallel or ``torch.compile`` wrapper is unwrapped: the module
            inside is ``self.net``, traced and pruned in place (the wrapper
            keeps holding it), and names with the wrapper's prefix work too.
            One change is made up front: a mixture-of-experts block whose
            experts are fused 3-D weights is rewritten as one MLP per expert
            (:func:`channelcut.moe.split_experts`), which computes the same
            function; its names are then ``<block>.<e>.gate_proj.weight``.
            The names of the blocks rewritten are in :attr:`split_blocks`.
    """

    def __init__(self, net: nn.Module) -> None:
        if not isinstance(net, nn.Module):
            raise TypeError(f"PruningManager needs a torch.nn.Module, got {type(net).__name__}")
        self.net, self._name_prefix = unwrap_model(net)
        #: mixture-of-experts blocks rewritten as one module per expert
        self.split_blocks: List[str] = split_experts(self.net)
        self.graph: Optional[TracedGraph] = None
        self.spec: Optional[PruningSpec] = None
        self._inputs: Optional[Inputs] = None
        self._pruned = False
        self._rollback: Optional[Rollback] = None

    # ------------------------------------------------------------------
    def trace(self, inputs: Inputs, shapes_only: bool = True) -> TracedGraph:
        """Trace the model on ``inputs`` (done by :meth:`compute` when needed).

        ``shapes_only``: trace on meta tensors (no arithmetic, no activation
        memory), handing over to a pass with real values when the model needs
        one; False always computes the pass for real (your forward hooks then
        see real activations). The graph is the same."""
        inputs = _check_inputs(inputs)
        _check_torch_prune(self.net)
        recomputed = reparametrized_weights(self.net)
        if recomputed:
            warnings.warn(
                f"channelcut: {len(set(recomputed.values()))} weight(s) are recomputed on every call "
                f"({next(iter(recomputed.values()))}, ...): their layers keep their channels. Remove the "
                "parametrization (torch.nn.utils.parametrize.remove_parametrizations) to prune them.",
                stacklevel=2)
        self.graph, _ = trace(self.net, inputs, shapes_only=shapes_only)
        add_prefix_aliases(self.graph, self._name_prefix)
        self._inputs = inputs
        return self.graph

    @gc_paused()
    def compute(
        self,
        inputs: Inputs,
        pruned_inputs: Optional[Iterable[Tuple[str, int]]] = None,
        pruned_outputs: Optional[Iterable[Tuple[str, int]]] = None,
        constrained: bool = False,
        reorder: bool = True,
        baseline: bool = False,
        copy_cost: Optional[float] = None,
        shapes_only: bool = True,
        op_cost: Optional[float] = None,
    ) -> "PruningManager":
        """Trace the model and compute the pruning spec.

        Args:
            inputs: example inputs: a list/tuple of positional arguments, or a
                dict of keyword arguments.
            pruned_inputs: ``(consumer weight name, input channel)`` pairs;
                also a dict ``{name: channels}``, one pair, or pairs holding a
                list of channels (see :mod:`channelcut.pruning.request`).
            pruned_outputs: ``(producer weight name, output channel)`` pairs;
                removes that channel group everywhere it flows.
            constrained: grow the pruned set until consumers of each channel
                agree (zero copies at inference; prunes channels not asked for).
            reorder: reorder channels so subsets are contiguous views.
            baseline: unconstrained export with no reordering and one gather
                per disagreeing consumer (for comparison).
            copy_cost: what copying one value costs, in multiply-accumulates
                (default ``resolve.DEFAULT_COPY_COST``; measure this machine's
                with :func:`channelcut.pruning.costs.calibrate_copy_cost`). A
                consumer whose kept channels stay scattered after reordering
                reads the smallest contiguous range as a view, with zero
                weight columns for the channels it drops, when the extra MACs
                cost less than the copy. 0 always gathers.
            op_cost: the fixed cost of one view or gather (a kernel launch and
                a module call), in multiply-accumulates, spread over the
                example input's positions (default 0: not counted). Where it
                costs more than the zero columns would, a consumer reads its
                whole input (no op at all): what a GPU at batch 1 wants.
                :func:`channelcut.pruning.costs.calibrate_costs` measures both
                costs on a device; export with the batch you deploy.
            shapes_only: see :meth:`trace`.

        With neither ``pruned_inputs`` nor ``pruned_outputs``, the channels
        the model's weights already remove are pruned (zero input columns;
        zero output rows where the channel is zero, or a constant that folds
        exactly into the reader's bias: see ``zeros.py``), and the model as it
        is becomes the reference that :meth:`prune` verifies against.
        """
        if self._pruned:
            raise StateError("this model was already pruned by this manager; create a new PruningManager to prune it again")
        mode = export_mode(constrained, baseline)
        pruned_inputs = normalize_request(pruned_inputs, "pruned_inputs")
        pruned_outputs = normalize_request(pruned_outputs, "pruned_outputs")
        named = set(map(itemgetter(0), (pruned_inputs or []) + (pruned_outputs or [])))
        refuse_reparametrized(reparametrized_weights(self.net), [n[len(self._name_prefix):] if n.startswith(self._name_prefix) else n for n in named])
        graph = self.trace(inputs, shapes_only=shapes_only)
        zeros = None
        if pruned_inputs is None and pruned_outputs is None:
            zeros = find_zero_channels(self.net, graph, self._inputs)
            pruned_inputs = zeros.pruned_inputs
        spec = resolve(
            graph,
            list(pruned_inputs or ()),
            list(pruned_outputs or ()),
            mode=mode,
            reorder=reorder and not baseline,
            copy_cost=DEFAULT_COPY_COST if copy_cost is None else float(copy_cost),
            op_cost=DEFAULT_OP_COST if op_cost is None else float(op_cost),
        )
        if zeros is not None:  # the model's own zeros: the model itself is the reference
            spec.reference = "model"
            spec.folds = zeros.folds
            spec.kept_zeros = zeros.kept
        self.spec = spec
        return self

    # -- what can be pruned ------------------------------------------------
    def _need_graph(self) -> TracedGraph:
        if self.graph is None:
            raise StateError("call trace(inputs) or compute(inputs, ...) first")
        return self.graph

    def consumers(self) -> Dict[str, int]:
        """Consumer weight name -> number of input channels (for ``pruned_inputs``)."""
        g = self._need_graph()
        return {p: len(g.consumers[ops[0]].in_ids) for p, ops in g.consumers_by_param.items()}

    def producers(self) -> Dict[str, int]:
        """Producer weight name -> number of output channels (for ``pruned_outputs``)."""
        g = self._need_graph()
        return {p: len(g.producers[ops[0]].out_ids) for p, ops in g.producers_by_param.items()}

    def channel_groups(self) -> List[ChannelGroup]:
        """The channel groups of the traced model: channels that are always kept
        or removed together (e.g. channel ``c`` of every layer summed into one
        residual stream), with the producers that emit them, the consumer
        inputs that read them and, if they can never be removed, why."""
        g = self._need_graph()
        find = g.sources.find
        groups: Dict[int, ChannelGroup] = {}

        def get(root: int) -> ChannelGroup:
            grp = groups.get(root)
            if grp is None:
                grp = groups[root] = ChannelGroup(root, [], [], g.sources.pinned_reason(root))
            return grp

        for param, ops in g.producers_by_param.items():
            for j, a in enumerate(g.producers[ops[0]].out_ids):
                get(find(a)).producers.append((param, j))
        for param, ops in g.consumers_by_param.items():
            seen = set()
            for op in ops:
                for i, a in enumerate(g.consumers[op].in_ids):
                    if a >= 0 and i not in seen:
                        seen.add(i)
                        get(find(a)).consumers.append((param, i))
        return list(groups.values())

    def _need_spec(self) -> PruningSpec:
        if self.spec is None:
            raise StateError("call compute(inputs, pruned_inputs=...) before get_mock_model() or prune()")
        return self.spec

    def get_mock_model(self) -> nn.Module:
        """A copy of the model with the pruned channels masked (weights untouched)."""
        return make_mock(self.net, self._need_spec())

    def summary(self) -> str:
        return self._need_spec().summary()

    @gc_paused()
    def prune(self, verify: bool = True, rtol: Optional[float] = None) -> "PruningManager":
        """Prune the model in place. All-or-nothing: on failure it is restored.

        With ``verify`` (the default), the pruned model is run on the example
        inputs and compared with a reference that does not come from the plan:
        the unpruned model with the requested channels (and the additions the
        spec reports) zeroed by hand, or, for channels found zeroed in the
        model, the model as it is (``verify.py``). A mismatch restores the
        model and raises :class:`~channelcut.errors.ExportError`. ``rtol``
        overrides the relative tolerance (default 1e-9 in float64, 1e-3 in
        float32; bfloat16/float16 are checked against a float64 run).
        """
        spec = self._need_spec()
        if self._pruned:
            raise StateError("prune() was already called; the model is pruned")
        refuse_offloaded(self.net, [*spec.slices, *(z.param for z in spec.zeros), *(f.bias for f in spec.folds)])
        if not verify:
            rb = prune_model(self.net, spec)
        # the reference's shortcuts follow the trace: a mismatch is confirmed
        # against weights zeroed in place before it is reported
        for shortcuts in ((True, False) if verify else ()):
            reference = reference_outputs(self.net, self._inputs, spec, self._need_graph(), shortcuts=shortcuts)
            rb = prune_model(self.net, spec)
            try:
                out = run_deterministic(self.net, self._inputs)
                problem = check(out, reference, rtol=rtol if rtol is not None else default_rtol(spec))
                confirmed = not shortcuts
            except Exception as exc:  # the pruned model does not run, whatever the reference
                problem, confirmed = f"the pruned model raised {type(exc).__name__}: {exc}", True
            if problem is None:
                break
            rb.undo()
            if confirmed:
                raise ExportError(
                    f"verification failed, the model was restored: {problem}. Some op in the model "
                    "probably depends on a channel count in a way the tracer can not see; please "
                    "report the model (prune(verify=False) skips this check at your own risk)."
                )
        self._rollback = rb
        self._pruned = True
        return self

    def undo(self) -> None:
        """Restore the model as it was before :meth:`prune`."""
        if self._rollback is None:
            raise StateError("nothing to undo: prune() has not been called")
        self._rollback.undo()
        self._rollback = None
        self._pruned = False


def _check_torch_prune(net: nn.Module) -> None:
    """``torch.nn.utils.prune`` leaves ``weight_orig``/``weight_mask`` and a
    hook that recomputes ``weight`` each call; export needs plain weights."""
    from torch.nn.utils import prune as tprune

    found = [
        f"{name}.{hook._tensor_name}" if name else hook._tensor_name
        for name, m in net.named_modules()
        for hook in m._forward_pre_hooks.values()
        if isinstance(hook, tprune.BasePruningMethod)
    ]
    if found:
        raise TracingError(
            f"the model still carries torch.nn.utils.prune masks ({', '.join(found[:5])}"
            f"{', ...' if len(found) > 5 else ''}); convert them first with "
            "channelcut.masking.from_torch_prune(model) (or torch.nn.utils.prune.remove), "
            "then export: zeroed channels are found automatically"
        )


def _check_inputs(inputs: Inputs) -> Inputs:
    if isinstance(inputs, torch.Tensor):
        raise TracingError("inputs must be a list of positional inputs, e.g. compute([x]), not a bare tensor")
    if isinstance(inputs, dict):
        return inputs
    if not isinstance(inputs, (list, tuple)):
        raise TracingError(f"inputs must be a list/tuple of positional inputs or a dict of keyword inputs, got {type(inputs).__name__}")
    if not flatten_tensors(list(inputs)):
        raise TracingError("inputs contain no tensor; pass example tensors, e.g. compute([torch.rand(1, 3, 224, 224)])")
    return list(inputs)
