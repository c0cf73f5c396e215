"""Reports about a model and its export, as plain data. Start at :func:`inspect_report`.

Three reports, one per question; each is a dataclass whose ``to_dict()`` is
plain JSON data (what ``channelcut <command> --json`` prints). The command
line only renders them (:mod:`channelcut.cli`):

- :func:`inspect_report`: what can be pruned in a model, and what stops the
  rest (producers, consumers, channel groups, barrier ops, prunable fractions);
- :func:`export_report`: what an export did (parameters and MACs before and
  after, per-producer widths, views and copies);
- :func:`bench_report`: a dense model against its pruned version (parameters,
  MACs, latency timed round-robin, copies per inference).

The numbers come from the public API only: :class:`~channelcut.PruningManager`
(``consumers()``, ``producers()``, ``channel_groups()``), the
:class:`~channelcut.PruningSpec` it computes, and :mod:`channelcut.stats`.
Builders that take several steps accept ``step``: a function that takes a
description and returns a context manager, called around each step (the
command line passes its progress display; the default does nothing).

>>> import torch
>>> from torch import nn
>>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
>>> rep = inspect_report(net, [torch.rand(1, 3, 8, 8)])
>>> rep.producers, rep.consumers, rep.prunable_consumer_input_channels
(2, 2, 8)
>>> [(l.name, l.in_channels, l.out_channels) for l in rep.layers]
[('0.weight', 3, 8), ('2.weight', 8, 4)]
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Dict, Iterator, List, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from .pruning import PruningManager, PruningSpec
from .stats import LatencyStats, compare_latency, count_copies, count_macs, count_parameters

__all__ = [
    "ModelSize",
    "model_size",
    "LayerChannels",
    "BarrierUse",
    "InspectReport",
    "inspect_report",
    "LayerWidth",
    "ExportReport",
    "export_report",
    "BenchReport",
    "bench_report",
    "input_shapes",
]

Inputs = Union[Sequence[Any], Mapping[str, Any]]
Step = Callable[[str], ContextManager[Any]]


@contextlib.contextmanager
def _quiet(what: str) -> Iterator[None]:
    yield


def input_shapes(inputs: Inputs) -> Any:
    """The shapes of the example inputs, as JSON data.

    >>> input_shapes([torch.zeros(1, 3, 8, 8)])
    [[1, 3, 8, 8]]
    >>> input_shapes({"input_ids": torch.zeros(1, 5, dtype=torch.long)})
    {'input_ids': [1, 5]}
    """
    def shape(x: Any) -> Any:
        return list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__

    if isinstance(inputs, Mapping):
        return {k: shape(v) for k, v in inputs.items()}
    return [shape(x) for x in inputs]


# ----------------------------------------------------------------------------
# size
# ----------------------------------------------------------------------------
@dataclass
class ModelSize:
    """Parameters and multiply-accumulates of one forward call (see :mod:`channelcut.stats`)."""

    params: int
    macs: int


def model_size(model: nn.Module, inputs: Inputs) -> ModelSize:
    """:func:`~channelcut.stats.count_parameters` and :func:`~channelcut.stats.count_macs` of ``model``."""
    return ModelSize(count_parameters(model), count_macs(model, inputs))


def _fraction(part: float, whole: float) -> float:
    return part / whole if whole else 0.0


# ----------------------------------------------------------------------------
# inspect: what can be pruned
# ----------------------------------------------------------------------------
@dataclass
class LayerChannels:
    """One weight that produces and/or consumes channels (None where it does not)."""

    name: str
    kind: str
    in_channels: Optional[int]
    prunable_in: Optional[int]
    out_channels: Optional[int]
    prunable_out: Optional[int]

    def to_dict(self) -> Dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "in": self.in_channels,
            "prunable_in": self.prunable_in,
            "out": self.out_channels,
            "prunable_out": self.prunable_out,
        }


@dataclass
class BarrierUse:
    """An op the tracer has no rule for (channels around it are kept), and how often it ran."""

    op: str
    module: str
    reason: str
    count: int

    def to_dict(self) -> Dict[str, Any]:
        return {"op": self.op, "module": self.module, "reason": self.reason, "count": self.count}


@dataclass
class InspectReport:
    """What can be pruned in a model (built by :func:`inspect_report`)."""

    model: str
    input_shape: Any
    parameters: int
    producers: int
    consumers: int
    channel_groups: int
    pinned_channel_groups: int
    #: why channel groups are pinned -> how many, in order of first appearance
    pinned_reasons: Dict[str, int]
    consumer_input_channels: int
    prunable_consumer_input_channels: int
    producer_output_channels: int
    prunable_producer_output_channels: int
    barriers: List[BarrierUse] = field(default_factory=list)
    #: producers first, then consumers that are not producers, in trace order
    layers: List[LayerChannels] = field(default_factory=list)

    @property
    def removable_channel_groups(self) -> int:
        return self.channel_groups - self.pinned_channel_groups

    @property
    def prunable_fraction(self) -> float:
        """Prunable share of all consumer input channels."""
        return _fraction(self.prunable_consumer_input_channels, self.consumer_input_channels)

    def to_dict(self) -> Dict[str, Any]:
        return {
            "model": self.model,
            "input_shape": self.input_shape,
            "parameters": self.parameters,
            "producers": self.producers,
            "consumers": self.consumers,
            "channel_groups": self.channel_groups,
            "pinned_channel_groups": self.pinned_channel_groups,
            "removable_channel_groups": self.removable_channel_groups,
            "pinned_reasons": dict(self.pinned_reasons),
            "consumer_input_channels": self.consumer_input_channels,
            "prunable_consumer_input_channels": self.prunable_consumer_input_channels,
            "prunable_fraction": self.prunable_fraction,
            "producer_output_channels": self.producer_output_channels,
            "prunable_producer_output_channels": self.prunable_producer_output_channels,
            "barriers": [b.to_dict() for b in self.barriers],
            "layers": [layer.to_dict() for layer in self.layers],
        }


def inspect_report(model: nn.Module, inputs: Inputs, name: str = "model", step: Step = _quiet) -> InspectReport:
    """Trace ``model`` on ``inputs`` and report what can be pruned.

    A channel is prunable when its channel group is not pinned; the kinds of
    the layers and the barrier ops come from the spec of an empty request
    (``compute(inputs, pruned_inputs=[])``, which prunes nothing). The model
    is not changed.
    """
    manager = PruningManager(model)
    with step("tracing"):
        spec = manager.compute(inputs, pruned_inputs=[]).spec
    assert spec is not None  # compute() always sets it
    consumers = manager.consumers()
    producers = manager.producers()
    groups = manager.channel_groups()
    prunable_in: Dict[str, int] = {n: 0 for n in consumers}
    prunable_out: Dict[str, int] = {n: 0 for n in producers}
    reasons: Dict[str, int] = {}
    for g in groups:
        if g.pinned is not None:
            reasons[str(g.pinned)] = reasons.get(str(g.pinned), 0) + 1
            continue
        for n, _ in g.consumers:
            prunable_in[n] = prunable_in.get(n, 0) + 1
        for n, _ in g.producers:
            prunable_out[n] = prunable_out.get(n, 0) + 1
    return InspectReport(
        model=name,
        input_shape=input_shapes(inputs),
        parameters=count_parameters(model),
        producers=len(producers),
        consumers=len(consumers),
        channel_groups=len(groups),
        pinned_channel_groups=sum(reasons.values()),
        pinned_reasons=reasons,
        consumer_input_channels=sum(consumers.values()),
        prunable_consumer_input_channels=sum(prunable_in.values()),
        producer_output_channels=sum(producers.values()),
        prunable_producer_output_channels=sum(prunable_out.values()),
        barriers=_barrier_uses(spec),
        layers=_layer_channels(spec, consumers, producers, prunable_in, prunable_out),
    )


def _barrier_uses(spec: PruningSpec) -> List[BarrierUse]:
    counts = Counter((op, module or "<model>", reason) for op, module, reason in spec.barriers)
    return [BarrierUse(op, module, reason, n) for (op, module, reason), n in counts.items()]


def _layer_channels(
    spec: PruningSpec,
    consumers: Dict[str, int],
    producers: Dict[str, int],
    prunable_in: Dict[str, int],
    prunable_out: Dict[str, int],
) -> List[LayerChannels]:
    kinds = {c.name: c.kind for c in spec.consumers}
    producer_kinds = {p.name: p.kind for p in spec.producers}
    return [
        LayerChannels(
            name,
            kinds.get(name, producer_kinds.get(name, "?")),
            consumers.get(name),
            prunable_in.get(name),
            producers.get(name),
            prunable_out.get(name),
        )
        for name in dict.fromkeys([*producers, *consumers])
    ]


# ----------------------------------------------------------------------------
# export: what an export did
# ----------------------------------------------------------------------------
@dataclass
class LayerWidth:
    """Output channels of one producer before and after the export."""

    name: str
    kind: str
    before: int
    after: int

    def to_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "out_before": self.before, "out_after": self.after}


@dataclass
class ExportReport:
    """What one export did (built by :func:`export_report`)."""

    model: str
    mode: str
    #: how the channels were chosen, if the caller says so
    heuristic: Optional[str]
    requested_channels: int
    before: ModelSize
    after: ModelSize
    removed_channel_groups: int
    total_channel_groups: int
    views: int
    copies: int
    copied_channels: int
    verified: bool
    layers: List[LayerWidth] = field(default_factory=list)

    def changed_layers(self) -> List[LayerWidth]:
        """The producers that lost output channels."""
        return [layer for layer in self.layers if layer.after != layer.before]

    def to_dict(self) -> Dict[str, Any]:
        return {
            "model": self.model,
            "mode": self.mode,
            "heuristic": self.heuristic,
            "requested_channels": self.requested_channels,
            "params": {"before": self.before.params, "after": self.after.params},
            "macs": {"before": self.before.macs, "after": self.after.macs},
            "removed_channel_groups": self.removed_channel_groups,
            "total_channel_groups": self.total_channel_groups,
            "subselections": {"views": self.views, "copies": self.copies},
            "copied_channels_per_inference": self.copied_channels,
            "verified": self.verified,
            "layers": [layer.to_dict() for layer in self.layers],
        }


def export_report(
    manager: PruningManager,
    inputs: Inputs,
    before: ModelSize,
    *,
    name: str = "model",
    heuristic: Optional[str] = None,
    verified: bool = True,
) -> ExportReport:
    """Report the export ``manager`` computed (and, usually, applied with ``prune()``).

    ``before`` is :func:`model_size` of the model before ``prune()``; the size
    after is measured on ``manager.net`` now. ``verified`` says whether
    ``prune()`` checked the result (``prune(verify=False)`` did not).
    """
    spec = manager.spec
    if spec is None:
        raise ValueError("export_report needs a computed export: call manager.compute(inputs, ...) first")
    return ExportReport(
        model=name,
        mode=spec.mode,
        heuristic=heuristic,
        requested_channels=sum(len(c) for c in spec.requested.values()),
        before=before,
        after=model_size(manager.net, inputs),
        removed_channel_groups=spec.removed_groups,
        total_channel_groups=spec.total_groups,
        views=spec.view_ops,
        copies=spec.copy_ops,
        copied_channels=spec.copied_channels,
        verified=verified,
        layers=[LayerWidth(p.name, p.kind, p.before, p.after) for p in spec.producers],
    )


# ----------------------------------------------------------------------------
# bench: dense against pruned
# ----------------------------------------------------------------------------
@dataclass
class BenchReport:
    """A dense model against its pruned version (built by :func:`bench_report`)."""

    source: str
    model: str
    input_shape: Any
    threads: int
    repeats: int
    dense: ModelSize
    pruned: ModelSize
    #: "dense" / "pruned" -> latency of one forward call
    latency: Dict[str, LatencyStats]
    views: int
    copies: int
    copied_channels: int

    @property
    def speedup(self) -> float:
        """Dense median latency over pruned median latency (nan if the pruned one is 0)."""
        pruned = self.latency["pruned"]["median_ms"]
        return self.latency["dense"]["median_ms"] / pruned if pruned > 0 else float("nan")

    def to_dict(self) -> Dict[str, Any]:
        return {
            "source": self.source,
            "model": self.model,
            "input_shape": self.input_shape,
            "threads": self.threads,
            "repeats": self.repeats,
            "params": {"dense": self.dense.params, "pruned": self.pruned.params},
            "macs": {"dense": self.dense.macs, "pruned": self.pruned.macs},
            "latency_ms": self.latency,
            "speedup": self.speedup,
            "subselections": {"views": self.views, "copies": self.copies},
            "copied_channels_per_inference": self.copied_channels,
        }


def bench_report(
    dense: nn.Module,
    pruned: nn.Module,
    inputs: Inputs,
    *,
    repeats: int = 20,
    warmup: int = 3,
    threads: Optional[int] = 1,
    name: str = "model",
    source: str = "",
    step: Step = _quiet,
) -> BenchReport:
    """Count parameters, MACs and copies of ``dense`` and ``pruned``, and time
    them round-robin (:func:`~channelcut.stats.compare_latency`) on ``inputs``
    with ``threads`` torch threads (None: as set now)."""
    threads = torch.get_num_threads() if threads is None else threads
    with step("counting parameters and MACs"):
        dense_size, pruned_size = model_size(dense, inputs), model_size(pruned, inputs)
    with step(f"timing 2 models x {repeats} calls, {threads} thread(s)"):
        latency = compare_latency({"dense": dense, "pruned": pruned}, inputs, repeats=repeats, warmup=warmup, threads=threads)
    copies = count_copies(pruned)
    return BenchReport(
        source=source,
        model=name,
        input_shape=input_shapes(inputs),
        threads=threads,
        repeats=repeats,
        dense=dense_size,
        pruned=pruned_size,
        latency=latency,
        views=copies.views,
        copies=copies.copies,
        copied_channels=copies.copied_channels,
    )
