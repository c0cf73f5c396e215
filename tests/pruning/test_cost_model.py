"""The cost model's fixed cost per op (``compute(..., op_cost=...)``):
where one view or gather costs more than the zero columns that reading the
whole input would add, the consumer reads its whole input (no op at all);
``op_cost=0`` (the default) is today's model exactly."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from channelcut import PruningManager
from channelcut.pruning.resolve import _cheaper_superset

torchvision = pytest.importorskip("torchvision")


def test_cheaper_read_choices():
    order = list(range(8))
    w = (4, 8, 1, 1)  # 4 MACs per input channel per position
    # scattered kept channels {0, 2, 3}: a view of [0, 4) costs 1 x 4 MACs, a gather 3 x copy_cost
    assert _cheaper_superset(order, {1, 4, 5, 6, 7}, w, 1, copy_cost=4.0) == (0, 4)
    assert _cheaper_superset(order, {1, 4, 5, 6, 7}, w, 1, copy_cost=1.0) is None
    # a contiguous kept range is a view, unless an op costs more than reading all of it
    assert _cheaper_superset(order, {6, 7}, w, 1, copy_cost=4.0) is None
    assert _cheaper_superset(order, {6, 7}, w, 1, copy_cost=4.0, op_cost=1e3, positions=10) == (0, 8)
    assert _cheaper_superset(order, {6, 7}, w, 1, copy_cost=4.0, op_cost=1e3, positions=1000) is None


def _resnet_request(seed=0):
    torch.manual_seed(seed)
    net = torchvision.models.resnet18(num_classes=10).double().eval()
    x = torch.rand(1, 3, 64, 64, dtype=torch.float64)
    pm = PruningManager(net)
    pm.trace([x])
    rng = random.Random(seed)
    req = [(p, c) for p, n in pm.consumers().items() for c in rng.sample(range(n), int(0.3 * n))]
    return net, x, req


def test_zero_op_cost_is_the_default_model():
    net, x, req = _resnet_request()
    a = PruningManager(copy.deepcopy(net)).compute([x], pruned_inputs=req).spec
    b = PruningManager(copy.deepcopy(net)).compute([x], pruned_inputs=req, op_cost=0).spec
    assert a.to_dict() == b.to_dict()


def test_a_costly_op_reads_whole_inputs_exactly():
    net, x, req = _resnet_request()
    ref = copy.deepcopy(net)
    pm = PruningManager(net).compute([x], pruned_inputs=req, op_cost=1e12)
    assert not pm.spec.subselections and pm.spec.superset_reads and pm.spec.zeros
    pm.prune()
    with torch.no_grad():
        for name, chans in pm.spec.requested.items():
            ref.get_parameter(name)[:, chans] = 0
        y, y_ref = net(x), ref(x)
    assert float((y - y_ref).abs().max() / y_ref.abs().max()) <= 1e-10
