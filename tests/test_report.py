"""The reports ``channelcut inspect / prune / bench`` print, built by the library
(:mod:`channelcut.report`) from the public API, and the copy count in
:mod:`channelcut.stats`."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from channelcut import PruningManager
from channelcut.report import bench_report, export_report, inspect_report, model_size
from channelcut.stats import count_copies, count_macs, count_parameters


class Net(nn.Module):
    def __init__(self, barrier: bool = False) -> None:
        super().__init__()
        self.barrier = barrier
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.stem(x))
        if self.barrier:
            s = torch.kthvalue(s, 2, dim=1, keepdim=True).values * s  # no rule: a barrier
        y = torch.relu(self.a(s)) + self.b(s)
        return self.fc(y.mean((2, 3)))


def _net(barrier: bool = False) -> nn.Module:
    torch.manual_seed(0)
    return Net(barrier).eval()


X = [torch.rand(2, 3, 8, 8)]


@pytest.mark.filterwarnings("ignore:channelcut. op 'kthvalue'")
def test_inspect_report_counts_what_the_manager_says():
    net = _net(barrier=True)
    rep = inspect_report(net, X, name="net")
    manager = PruningManager(net)
    manager.trace(X)
    groups = manager.channel_groups()
    assert rep.producers == len(manager.producers()) and rep.consumers == len(manager.consumers())
    assert rep.channel_groups == len(groups)
    assert rep.pinned_channel_groups == sum(g.pinned is not None for g in groups) == sum(rep.pinned_reasons.values())
    assert [(b.op, b.module, b.count) for b in rep.barriers] == [("kthvalue", "<model>", 1)]
    layers = {layer.name: layer for layer in rep.layers}
    assert layers["stem.weight"].prunable_out == 0 and layers["stem.weight"].prunable_in == 0
    assert layers["fc.weight"].prunable_in == 8 and layers["fc.weight"].out_channels == 4
    assert layers["a.weight"].kind == "conv2d" and layers["fc.weight"].kind == "linear"
    assert 0 < rep.prunable_fraction < 1
    d = json.loads(json.dumps(rep.to_dict()))
    assert d["input_shape"] == [[2, 3, 8, 8]] and d["parameters"] == count_parameters(net)
    assert d["removable_channel_groups"] == rep.channel_groups - rep.pinned_channel_groups
    # nothing left on the model: it still has its widths
    assert net.a.in_channels == 8


def test_export_report_before_and_after():
    net = _net()
    before = model_size(net, X)
    manager = PruningManager(net).compute(X, pruned_inputs=[("a.weight", 1), ("a.weight", 2), ("fc.weight", 5)])
    manager.prune()
    rep = export_report(manager, X, before, name="net", heuristic="by hand")
    assert rep.requested_channels == 3 and rep.mode == "unconstrained" and rep.verified
    assert rep.after.params == count_parameters(net) < before.params
    assert rep.after.macs == count_macs(net, X) < before.macs
    spec = manager.spec
    assert (rep.views, rep.copies, rep.copied_channels) == (spec.view_ops, spec.copy_ops, spec.copied_channels)
    assert (rep.views, rep.copies, rep.copied_channels) == tuple(count_copies(net))
    assert {layer.name: (layer.before, layer.after) for layer in rep.changed_layers()} == {
        n: ba for n, ba in spec.kept().items() if ba[0] != ba[1]
    }
    d = rep.to_dict()
    assert d["params"] == {"before": before.params, "after": rep.after.params}
    assert d["layers"][0].keys() == {"name", "kind", "out_before", "out_after"}


def test_bench_report_and_steps():
    dense, pruned = _net(), _net()
    PruningManager(pruned).compute(X, pruned_inputs=[("a.weight", 0), ("b.weight", 3)]).prune()
    seen = []

    class Step:
        def __init__(self, what: str) -> None:
            seen.append(what)

        def __enter__(self) -> None:
            return None

        def __exit__(self, *exc: object) -> None:
            return None

    rep = bench_report(dense, pruned, X, repeats=2, warmup=0, threads=1, name="net", source="here", step=Step)
    assert len(seen) == 2 and "timing" in seen[1]
    assert rep.latency["dense"]["repeats"] == 2 and rep.speedup > 0
    assert rep.pruned.params < rep.dense.params
    assert (rep.views, rep.copies, rep.copied_channels) == tuple(count_copies(pruned))
    d = json.loads(json.dumps(rep.to_dict()))
    assert d["subselections"] == {"views": rep.views, "copies": rep.copies}
    assert d["copied_channels_per_inference"] == rep.copied_channels


def test_count_copies_of_a_dense_model():
    assert tuple(count_copies(_net())) == (0, 0, 0)
