"""Bad or unusual input: each case gets a clear ChannelcutError or a documented,
tested behaviour, and after any error the model is exactly as before
(parameters, buffers, structure, hooks and attributes compared by
``support.unchanged.snapshot``).

Basic errors (unknown names, channels out of range, prune before compute)
live in ``tests/pruning/test_errors.py``. Here:

- duplicates in the request: idempotent (a set of channels), documented;
- non-tensor / malformed example inputs: TracingError naming what to pass;
- wrong input shapes or dtypes for the model: TracingError quoting the
  model's own error;
- models in train mode: exported as they are (batch statistics are per
  channel); buffers are not updated by compute/verify; dropout in train mode
  makes verification meaningless -> must not pass silently;
- models in float32 / bfloat16 / float16: exported in their dtype;
- tied weights (one Parameter in two layers): both layers drop the same
  columns; the parameter is listed under its first name, and any of its names
  (``b.weight`` tied to ``a.weight``, an LM head tied to the embedding, a
  module registered twice) means the same channels;
- one module called twice in a forward: both calls drop the same columns;
- in-place ops (relu_, +=, mul_, clamp_, F.relu(inplace=True), x[...] = v);
- buffers sized by the channel count: sliced with the channels;
- data-dependent control flow: the branch taken by the example inputs is
  exported; layers only on other branches are not prunable (clear error);
- compute called twice: the second request replaces the first;
- prune called twice / compute after prune: StateError, model unchanged.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from channelcut import (ChannelcutError, ChannelRangeError, EmptyLayerError, ExportError, NotPrunableError,
                        PruningManager, RequestError, StateError, TracingError, UnknownParameterError)
from support.compare import compare, n_params
from support.unchanged import diff_snapshot, raises_unchanged, snapshot

D = torch.float64


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _x(*shape, dtype=D, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def seq(dtype=D, train=False):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 1)).to(dtype)
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 1.5)
    return net.train(train)


def export_ok(net, xs, **kw):
    """compute + mock + prune(verify) succeed; pruned == mock (float64 1e-10)."""
    m = PruningManager(net).compute(xs, **kw)
    with torch.no_grad():
        y_mock = m.get_mock_model()(*xs)
    p0 = n_params(net)
    m.prune(verify=True)
    with torch.no_grad():
        y = net(*xs)
    rtol = 1e-10 if y.dtype == D else {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}[y.dtype]
    assert compare(y, y_mock, rtol=rtol) is None
    assert n_params(net) <= p0
    return m


# ---------------------------------------------------------------------------
# duplicates
# ---------------------------------------------------------------------------


def _spec_key(m):
    s = m.spec
    return (s.slices, [(e.param, e.channels) for e in s.masks], [(x.param, x.indices) for x in s.subselections])


@pytest.mark.parametrize("constrained", [False, True])
def test_duplicate_pruned_inputs_are_idempotent(constrained):
    x = _x(2, 3, 5, 5)
    once = PruningManager(seq().eval()).compute([x], pruned_inputs=[("3.weight", 1), ("3.weight", 4)], constrained=constrained)
    twice = PruningManager(seq().eval()).compute(
        [x], pruned_inputs=[("3.weight", 4), ("3.weight", 1), ("3.weight", 1), ("3", 4)], constrained=constrained)
    assert _spec_key(once) == _spec_key(twice)
    export_ok(seq().eval(), [x], pruned_inputs=[("3.weight", 1), ("3.weight", 1)])


def test_duplicate_pruned_outputs_and_overlap_with_inputs():
    x = _x(2, 3, 5, 5)
    a = PruningManager(seq().eval()).compute([x], pruned_outputs=[("0.weight", 2)])
    b = PruningManager(seq().eval()).compute([x], pruned_outputs=[("0.weight", 2), ("0.weight", 2)],
                                             pruned_inputs=[("3.weight", 2)])
    assert a.spec.slices == b.spec.slices
    assert a.spec.slices["0.weight"][0] == [0, 1, 3, 4, 5]


def test_duplicates_do_not_hide_an_empty_layer():
    net = seq().eval()
    req = [("3.weight", c) for c in range(6)] + [("3.weight", 0)] * 3
    raises_unchanged(net, EmptyLayerError, lambda: PruningManager(net).compute([_x(2, 3, 5, 5)], pruned_inputs=req),
                     "3.weight")


# ---------------------------------------------------------------------------
# example inputs that are not what the model takes
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("inputs, words", [
    ([3.0], ["no tensor"]),
    ([], ["no tensor"]),
    (None, ["list/tuple", "NoneType"]),
    ("abc", ["list/tuple", "str"]),
    (torch.zeros(2, 3, 5, 5, dtype=D), ["bare tensor"]),
    ([[1, 2], "x"], ["no tensor"]),
])
def test_non_tensor_inputs(inputs, words):
    net = seq().eval()
    raises_unchanged(net, TracingError, lambda: PruningManager(net).compute(inputs, pruned_inputs=[("3.weight", 1)]),
                     *words)


def test_non_tensor_arguments_next_to_tensors_are_passed_through():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 6)
            self.b = nn.Linear(6, 2)

        def forward(self, x, scale: float, mode: str = "relu", extra=None):
            y = self.a(x) * scale
            y = F.relu(y) if mode == "relu" else y
            return self.b(y)

    torch.manual_seed(0)
    net = Scaled().to(D).eval()
    export_ok(net, [_x(3, 4), 0.5, "relu", None], pruned_inputs=[("b.weight", 2)])
    assert net.a.out_features == 5
    net2 = Scaled().to(D).eval()
    m = PruningManager(net2).compute({"x": _x(3, 4), "scale": 2.0, "mode": "none"}, pruned_outputs=[("a.weight", 0)])
    m.prune()
    assert net2.a.out_features == 5


@pytest.mark.parametrize("shape", [(2, 5, 5, 5), (2, 3, 5), (3, 5, 5)])
def test_wrong_input_shape(shape):
    net = seq().eval()
    err = raises_unchanged(net, TracingError,
                           lambda: PruningManager(net).compute([_x(*shape)], pruned_inputs=[("3.weight", 1)]),
                           "the model raised", "on the example inputs")
    assert "compute([" in str(err)  # says what to pass instead


def test_inputs_in_another_dtype_than_the_model():
    net = seq().eval()
    raises_unchanged(net, TracingError,
                     lambda: PruningManager(net).compute([_x(2, 3, 5, 5, dtype=torch.float32)], pruned_inputs=[("3.weight", 1)]),
                     "the model raised")


# ---------------------------------------------------------------------------
# train mode and dtypes
# ---------------------------------------------------------------------------


def test_train_mode_model_is_exported_in_train_mode_and_buffers_are_untouched():
    """Documented: the model is traced and verified in the mode it is in;
    BatchNorm in train mode normalises with batch statistics, per channel, so
    the export is exact; compute/mock/verify do not update running stats; the
    training flag is kept."""
    net = seq(train=True)
    x = _x(4, 3, 5, 5)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    m = PruningManager(net).compute([x], pruned_inputs=[("3.weight", 1), ("3.weight", 4)])
    mock = m.get_mock_model()
    assert mock.training and net.training
    with torch.no_grad():
        y_mock = mock(x)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    m.prune(verify=True)
    assert net.training
    keep = [0, 2, 3, 5]
    assert torch.equal(net[1].running_mean, before["1.running_mean"][keep])
    assert torch.equal(net[1].running_var, before["1.running_var"][keep])
    assert torch.equal(net[1].num_batches_tracked, before["1.num_batches_tracked"])
    with torch.no_grad():
        y = net(x)
    assert compare(y, y_mock) is None


def test_train_mode_with_dropout_does_not_verify_by_luck():
    """Dropout in train mode draws new masks on every call, so the mock and
    the pruned model can not be compared. Expected: a clear error that says
    so (or a deterministic comparison, e.g. in eval mode / with a fixed seed);
    never a silent success and never a wrong model. (Found: ExportError
    "verification failed ... depends on a channel count", misleading; the
    engine now verifies deterministically.)"""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3)).to(D).train()
    x = _x(16, 4)
    before = snapshot(net)
    m = PruningManager(net).compute([x], pruned_inputs=[("2.weight", 3)])
    mock = m.get_mock_model().eval()  # the mock is built from the unpruned model
    try:
        m.prune(verify=True)
    except ChannelcutError as exc:
        assert diff_snapshot(net, before) == []
        msg = str(exc).lower()
        assert "train" in msg or "dropout" in msg or "random" in msg or "determin" in msg, (
            f"the error does not say the model is in train mode / random: {exc}")
        return
    # accepted: then it must really be equal to the mock in eval mode
    net.eval()
    with torch.no_grad():
        assert compare(net(x), mock(x)) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_models_in_other_dtypes(dtype):
    net = seq(dtype=dtype).eval()
    x = _x(2, 3, 5, 5, dtype=dtype)
    export_ok(net, [x], pruned_inputs=[("3.weight", 1)], pruned_outputs=[("0.weight", 4)])
    assert net[0].weight.dtype == dtype and net[1].running_mean.dtype == dtype
    assert net[0].out_channels == 4 and net[1].num_features == 4


# ---------------------------------------------------------------------------
# shared parameters and modules
# ---------------------------------------------------------------------------


class Tied(nn.Module):
    """``b`` reuses ``a``'s weight (tied), with its own bias."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(4, 6)
        self.b.weight = self.a.weight
        self.head = nn.Linear(12, 2)

    def forward(self, x):
        return self.head(torch.cat([self.a(x), self.b(x)], 1))


def _tied():
    torch.manual_seed(0)
    return Tied().to(D).eval()


def test_tied_weights_are_listed_once_under_their_first_name():
    """consumers()/producers() list a tied weight under its first name; its
    other names are aliases that mean the same channels (until issue #14 an
    alias was refused: NotPrunableError 'not one of the consumers')."""
    m = PruningManager(_tied())
    m.trace([_x(3, 4)])
    assert "a.weight" in m.consumers() and "b.weight" not in m.consumers()
    assert m.graph.param_aliases == {"b.weight": "a.weight"}
    by_alias = PruningManager(_tied()).compute([_x(3, 4)], pruned_inputs=[("b.weight", 1)])
    by_name = PruningManager(_tied()).compute([_x(3, 4)], pruned_inputs=[("a.weight", 1)])
    assert _spec_key(by_alias) == _spec_key(by_name)
    export_ok(_tied(), [_x(3, 4)], pruned_inputs=[("b.weight", 1)], pruned_outputs=[("b.weight", 2)])


def test_tied_weights_prune_output_rows_in_both_layers():
    net = _tied()
    export_ok(net, [_x(3, 4)], pruned_outputs=[("a.weight", 1)])
    assert net.a.weight is net.b.weight and net.a.weight.shape == (5, 4)
    assert net.a.out_features == net.b.out_features == 5
    assert net.a.bias.shape == net.b.bias.shape == (5,)
    assert net.head.weight.shape == (2, 10)


def test_tied_weights_prune_input_columns():
    """Pruning an input column of a weight used by two layers drops it in
    both. Observed: the mock masks only module ``a`` (the parametrisation is
    registered on one owner, ``b.weight`` still reads the raw tensor) while
    the pruner zeroes the shared tensor, so verification fails (ExportError,
    model restored). Expected: mock and pruned model agree."""
    net = _tied()
    export_ok(net, [_x(3, 4)], pruned_inputs=[("a.weight", 1)])


class CalledTwiceInParallel(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 4, 1)
        self.shared = nn.Conv2d(4, 4, 1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(torch.cat([self.shared(self.a(x)), self.shared(self.b(x))], 1))


class CalledTwiceInSeries(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.shared = nn.Conv2d(4, 4, 1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.shared(F.relu(self.shared(self.a(x)))))


@pytest.mark.parametrize("req", [
    dict(pruned_inputs=[("shared.weight", 1)]),
    dict(pruned_outputs=[("a.weight", 1)]),
    dict(pruned_outputs=[("shared.weight", 2)]),
    dict(pruned_inputs=[("head.weight", 1)]),
    dict(pruned_inputs=[("head.weight", 5)], constrained=True),
])
def test_module_called_twice_on_parallel_branches(req):
    torch.manual_seed(0)
    net = CalledTwiceInParallel().to(D).eval()
    export_ok(net, [_x(2, 3, 4, 4)], **req)
    assert net.shared.weight.shape[1] == net.shared.in_channels


@pytest.mark.parametrize("req", [
    dict(pruned_inputs=[("shared.weight", 1)]),
    dict(pruned_outputs=[("a.weight", 1)]),
    dict(pruned_outputs=[("shared.weight", 2)]),
    dict(pruned_inputs=[("head.weight", 1)]),
])
def test_module_called_twice_in_series(req):
    """``shared(shared(a(x)))``: the shared weight's input columns see two
    different channel spaces. Expected: exported (same columns dropped in
    both calls, or zero columns), or a NotPrunable/EmptyLayer error that names
    the shared layer. (Found for the first two: ExportError "internal
    inconsistency: 'shared.weight' dim 1 is sliced two different ways
    (consumer input); please report this model"; fixed in the engine since.)"""
    torch.manual_seed(0)
    net = CalledTwiceInSeries().to(D).eval()
    before = snapshot(net)
    try:
        export_ok(net, [_x(2, 3, 4, 4)], **req)
    except (NotPrunableError, EmptyLayerError) as exc:
        assert "shared" in str(exc)
        assert diff_snapshot(net, before) == []


# ---------------------------------------------------------------------------
# in-place ops
# ---------------------------------------------------------------------------


class InPlace(nn.Module):
    def __init__(self, how: str):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 4, 1)
        self.g = nn.Parameter(torch.rand(4) + 0.5)
        self.head = nn.Conv2d(4, 2, 1)
        self.how = how

    def forward(self, x):
        y = self.a(x)
        if self.how == "relu_":
            y.relu_()
        elif self.how == "iadd":
            y += self.b(x)
        elif self.how == "mul_":
            y.mul_(self.g.view(-1, 1, 1))
        elif self.how == "clamp_":
            y.clamp_(min=0)
        elif self.how == "F.relu(inplace)":
            y = F.relu(y, inplace=True)
        elif self.how == "setitem_const":
            y[:, 1] = 0.0
        elif self.how == "setitem_tensor":
            y[:, 1:3] = self.b(x)[:, :2]
        return self.head(y)


INPLACE = ["relu_", "iadd", "mul_", "clamp_", "F.relu(inplace)", "setitem_const", "setitem_tensor"]
REQS = [dict(pruned_inputs=[("head.weight", 0)]), dict(pruned_inputs=[("head.weight", 2)]),
        dict(pruned_outputs=[("a.weight", 0)]), dict(pruned_outputs=[("b.weight", 1)])]


@pytest.mark.parametrize("how", INPLACE)
@pytest.mark.parametrize("req", REQS, ids=["head_in0", "head_in2", "a_out0", "b_out1"])
def test_in_place_ops(how, req):
    """Each request is either rejected at compute (model unchanged) or
    exported exactly. ``x[:, 1] = v`` (``__setitem__``) returns None, so the
    tracer never sees the write: observed for setitem_*: compute accepts
    requests that shift or remove the written channels and prune fails
    verification (ExportError, model restored)."""
    torch.manual_seed(0)
    net = InPlace(how).to(D).eval()
    if how not in ("iadd", "setitem_tensor") and "b.weight" in str(req):
        req = dict(pruned_outputs=[("a.weight", 3)])  # b is unused there
    before = snapshot(net)
    try:
        m = PruningManager(net).compute([_x(2, 3, 4, 4)], **req)
    except (NotPrunableError, EmptyLayerError):
        assert diff_snapshot(net, before) == []
        return
    with torch.no_grad():
        y_mock = m.get_mock_model()(_x(2, 3, 4, 4))
    m.prune(verify=True)
    with torch.no_grad():
        assert compare(net(_x(2, 3, 4, 4)), y_mock) is None


# ---------------------------------------------------------------------------
# buffers sized by the channel count
# ---------------------------------------------------------------------------


class Buffers(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.register_buffer("scale", torch.rand(4) + 0.5)  # (C,), used per channel
        self.register_buffer("mask", torch.ones(1, 4, 1, 1))  # (1, C, 1, 1)
        self.register_buffer("unused", torch.arange(4.0))  # (C,), never read in forward
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.a(x) * self.scale.view(1, -1, 1, 1) * self.mask)


def test_channel_sized_buffers_are_sliced_with_the_channels():
    torch.manual_seed(0)
    net = Buffers().to(D).eval()
    scale = net.scale.clone()
    export_ok(net, [_x(2, 3, 4, 4)], pruned_outputs=[("a.weight", 2)])
    assert torch.equal(net.scale, scale[[0, 1, 3]])
    assert net.mask.shape == (1, 3, 1, 1)
    assert net.unused.shape == (4,)  # not aligned with anything traced: left alone
    assert set(net.state_dict()) == {"a.weight", "a.bias", "scale", "mask", "unused", "head.weight", "head.bias"}


class CountBuffer(nn.Module):
    """A buffer holding the channel count, used as a literal shape."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.register_buffer("c", torch.tensor(4))
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.a(x).mean((2, 3)).view(-1, int(self.c)))


def test_buffer_holding_the_channel_count():
    """Documented: a count read with ``int()`` is a literal to the tracer.
    Requests that keep the channel count export. Removing channels of ``a``
    is rejected: at compute (NotPrunableError: the view has a hard-coded
    channel size) or, at the latest, by verification (ExportError); the model
    is unchanged either way, never a wrong model."""
    torch.manual_seed(0)
    export_ok(CountBuffer().to(D).eval(), [_x(2, 3, 4, 4)], pruned_inputs=[("head.weight", 1)])
    net = CountBuffer().to(D).eval()
    before = snapshot(net)
    try:
        m = PruningManager(net).compute([_x(2, 3, 4, 4)], pruned_outputs=[("a.weight", 1)])
    except NotPrunableError as exc:
        assert "a.weight" in str(exc)
        assert diff_snapshot(net, before) == []
        return
    raises_unchanged(net, ExportError, lambda: m.prune(verify=True), "restored")


# ---------------------------------------------------------------------------
# data-dependent control flow
# ---------------------------------------------------------------------------


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 4, 1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = self.a(x) if x.sum() > 0 else self.b(x)
        return self.head(y)


def test_data_dependent_control_flow_exports_the_traced_branch():
    """Documented: export follows the branch the example inputs take. Layers
    only on other branches are not consumers/producers (clear error listing
    the valid names) and are left unchanged. An input that takes the other
    branch after pruning raises (shapes disagree) instead of returning a
    wrong result."""
    torch.manual_seed(0)
    x_pos, x_neg = _x(2, 3, 4, 4).abs(), -_x(2, 3, 4, 4).abs()
    net = Branchy().to(D).eval()
    m = PruningManager(net)
    m.trace([x_pos])
    assert set(m.consumers()) == {"a.weight", "head.weight"}
    raises_unchanged(net, NotPrunableError,
                     lambda: PruningManager(net).compute([x_pos], pruned_inputs=[("b.weight", 1)]), "a.weight")
    b_weight = net.b.weight.clone()
    export_ok(net, [x_pos], pruned_outputs=[("a.weight", 1)])
    assert torch.equal(net.b.weight, b_weight)
    with pytest.raises(RuntimeError):
        net(x_neg)


# ---------------------------------------------------------------------------
# call order: compute twice, prune twice
# ---------------------------------------------------------------------------


def test_compute_twice_replaces_the_request():
    net = seq().eval()
    x = _x(2, 3, 5, 5)
    m = PruningManager(net)
    m.compute([x], pruned_inputs=[("3.weight", 1)])
    m.compute([x], pruned_inputs=[("3.weight", 4)], constrained=True)
    assert m.spec.mode == "constrained"
    assert [e.channels for e in m.spec.masks] == [[4]]
    with torch.no_grad():
        y_mock = m.get_mock_model()(x)
    m.prune()
    assert net[0].out_channels == 5 and net[3].in_channels == 5
    with torch.no_grad():
        assert compare(net(x), y_mock) is None


def test_failed_second_compute_keeps_the_model_unchanged():
    net = seq().eval()
    x = _x(2, 3, 5, 5)
    m = PruningManager(net).compute([x], pruned_inputs=[("3.weight", 1)])
    raises_unchanged(net, EmptyLayerError,
                     lambda: m.compute([x], pruned_inputs=[("3.weight", c) for c in range(6)]), "3.weight")


def test_prune_twice_and_compute_after_prune():
    net = seq().eval()
    x = _x(2, 3, 5, 5)
    m = PruningManager(net).compute([x], pruned_inputs=[("3.weight", 1)])
    m.prune()
    raises_unchanged(net, StateError, lambda: m.prune(), "already")
    raises_unchanged(net, StateError, lambda: m.compute([x], pruned_inputs=[("3.weight", 2)]), "already pruned")
    # a new manager on the pruned model works from its new shape
    m2 = PruningManager(net).compute([x], pruned_inputs=[("3.weight", 0)])
    m2.prune()
    assert net[3].in_channels == 4


def test_undo_then_prune_again():
    net = seq().eval()
    x = _x(2, 3, 5, 5)
    before = snapshot(net)
    m = PruningManager(net).compute([x], pruned_inputs=[("3.weight", 1)])
    m.prune()
    m.undo()
    assert diff_snapshot(net, before) == []
    m.prune()
    assert net[3].in_channels == 5


# ---------------------------------------------------------------------------
# issue #14, "inputs users really pass": each case exports exactly (float64:
# the pruned model equals the original with exactly the requested weight
# columns zeroed by hand) or raises a clear ChannelcutError, model unchanged
# ---------------------------------------------------------------------------


def export_exact(make, xs, zero, wrap=None, **req):
    """Export ``make()`` (through ``wrap``, e.g. nn.DataParallel, if given)
    with ``req`` and compare it with another ``make()`` whose input columns
    ``zero`` ({weight name: [channels]}) are zeroed by hand: float64, 1e-10.
    Returns (pruned model, manager)."""
    net, ref = make(), make()
    m = PruningManager(wrap(net) if wrap else net).compute(xs, **req)
    m.prune(verify=True)
    with torch.no_grad():
        for name, cols in zero.items():
            ref.get_parameter(name)[:, cols] = 0
        y, y_ref = net(*xs), ref(*xs)
    assert compare(y, y_ref, rtol=1e-10) is None, compare(y, y_ref, rtol=1e-10)
    return net, m


# -- 1. request forms: dicts, one pair, numpy integers, channel lists --------


SEQ_X = [_x(2, 3, 5, 5)]
SAME_AS_1_4 = {  # every form names input channels 1 and 4 of '3.weight'
    "list of pairs": [("3.weight", 1), ("3.weight", 4)],
    "dict of lists": {"3.weight": [1, 4]},
    "dict of tuple": {"3.weight": (4, 1)},
    "dict of range": {"3.weight": range(1, 5, 3)},
    "dict of numpy array": {"3.weight": np.array([1, 4])},
    "dict of tensor": {"3.weight": torch.tensor([4, 1])},
    "dict, module name": {"3": [1, 4]},
    "numpy integers": [("3.weight", np.int64(1)), ("3.weight", np.int32(4))],
    "0-d array and tensor": [("3.weight", np.array(1)), ("3.weight", torch.tensor(4))],
    "pair of a list": ("3.weight", [1, 4]),
    "lists, not tuples": [["3.weight", 1], ["3.weight", 4]],
    "duplicates": [("3.weight", 1), ("3.weight", 4), ("3.weight", 1), ("3", np.int64(4)), ("3.weight", [1, 1])],
    "generator": (("3.weight", c) for c in (1, 4)),
}


@pytest.mark.parametrize("form", list(SAME_AS_1_4))
def test_request_forms_name_the_same_channels(form):
    """A dict, one pair, numpy integers, 0-d arrays/tensors, a list of
    channels per name and duplicates all mean the list of pairs."""
    want = PruningManager(seq().eval()).compute(SEQ_X, pruned_inputs=[("3.weight", 1), ("3.weight", 4)])
    got = PruningManager(seq().eval()).compute(SEQ_X, pruned_inputs=SAME_AS_1_4[form])
    assert _spec_key(got) == _spec_key(want)


@pytest.mark.parametrize("req", [
    dict(pruned_inputs=("3.weight", 1)),
    dict(pruned_inputs={"3.weight": np.int64(1)}),
    dict(pruned_outputs={"0.weight": 1}),
    dict(pruned_outputs=("0.weight", torch.tensor(1))),
    dict(pruned_outputs=[("0.weight", np.int16(1)), ("0.weight", 1)], pruned_inputs={"3.weight": [1]}),
], ids=["input pair", "input dict", "output dict", "output pair", "both, duplicated"])
def test_request_forms_export_exactly(req):
    """Each means input channel 1 of '3.weight' (the only reader of output
    channel 1 of '0.weight'): equal to zeroing that column by hand."""
    net, _ = export_exact(lambda: seq().eval(), SEQ_X, {"3.weight": [1]}, **req)
    assert net[0].out_channels == 5 and net[3].in_channels == 5


@pytest.mark.parametrize("req, words", [
    ("3.weight", ["pruned_inputs is the string '3.weight'", "pairs", "{'fc.weight': [3, 5]}"]),
    (3, ["pruned_inputs must be a list of (parameter name, channel) pairs or a dict, got int 3"]),
    (["3.weight"], ["pruned_inputs[0] is '3.weight'", "(parameter name, channel) pair"]),
    (["3.weight", "0.weight"], ["pruned_inputs[0] is '3.weight'"]),
    ([("3.weight", 1), "3.weight"], ["pruned_inputs[1] is '3.weight'"]),
    ([("3.weight", 1, 2)], ["pruned_inputs[0] is ('3.weight', 1, 2)"]),
    ([(1, "3.weight")], ["pruned_inputs[0] is (1, '3.weight')"]),
    ({3: 1}, ["pruned_inputs key 3 is not a parameter name (int)", "model.named_parameters()"]),
    ({"3.weight": np.zeros((2, 2), dtype=int)}, ["channels for '3.weight' are a 2-d array", "1-d list"]),
], ids=["string", "int", "bare name", "two names", "one bad entry", "triple", "swapped", "int key", "2-d array"])
def test_malformed_requests(req, words):
    """Malformed requests: RequestError (a ChannelcutError, and a TypeError and
    ValueError as before) saying what is expected, before anything runs."""
    net = seq().eval()
    err = raises_unchanged(net, RequestError, lambda: PruningManager(net).compute(SEQ_X, pruned_inputs=req), *words)
    assert isinstance(err, TypeError) and isinstance(err, ValueError)


@pytest.mark.parametrize("channel", [torch.tensor(1.5), torch.tensor(True), np.float64(1.0), [1.5], np.array([1.0])],
                         ids=["float tensor", "bool tensor", "numpy float", "list of float", "float array"])
def test_channels_that_are_not_integers_in_any_form(channel):
    """(A float 0-d tensor used to be truncated to channel 1.)"""
    net = seq().eval()
    raises_unchanged(net, ChannelRangeError,
                     lambda: PruningManager(net).compute(SEQ_X, pruned_inputs={"3.weight": channel}),
                     "'3.weight'", "not an integer", "0..5")


# -- 2. contradicting options ------------------------------------------------------


def test_constrained_and_baseline_together():
    """Used to export constrained silently."""
    net = seq().eval()
    err = raises_unchanged(net, RequestError, lambda: PruningManager(net).compute(
        SEQ_X, pruned_inputs=[("3.weight", 1)], constrained=True, baseline=True),
        "constrained=True and baseline=True", "pick one")
    assert isinstance(err, ValueError)


# -- 3. dtype and device of the inputs -------------------------------------------------


@pytest.mark.parametrize("model_dtype, input_dtype", [(D, torch.float32), (torch.float32, D)])
def test_inputs_in_another_dtype_name_both_and_the_fix(model_dtype, input_dtype):
    net = seq(dtype=model_dtype).eval()
    raises_unchanged(net, TracingError, lambda: PruningManager(net).compute(
        [_x(2, 3, 5, 5, dtype=input_dtype)], pruned_inputs=[("3.weight", 1)]),
        "the model raised", f"inputs are {input_dtype}", f"parameters are {model_dtype}", f"x.to({model_dtype})")


def test_inputs_on_another_device_name_both_and_the_fix():
    """Simulated with a model on the meta device traced for real (CPU-only
    machine); the hint is only given when the model fails."""
    net = seq().to("meta")
    params = [(k, v, v.shape) for k, v in net.state_dict(keep_vars=True).items()]
    with pytest.raises(TracingError) as info:  # (snapshot() can not compare meta tensors)
        PruningManager(net).compute(SEQ_X, pruned_inputs=[("3.weight", 1)], shapes_only=False)
    for words in ("the model raised", "inputs are on cpu", "model is on meta", "x.to('meta')"):
        assert words in str(info.value)
    assert [(k, v, v.shape) for k, v in net.state_dict(keep_vars=True).items()] == params


class CastsItsInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 2)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x.to(self.a.weight.dtype))))


def test_model_that_casts_its_inputs_exports():
    def make():
        torch.manual_seed(0)
        return CastsItsInput().to(D).eval()

    net, _ = export_exact(make, [_x(3, 4, dtype=torch.float32)], {"b.weight": [2]}, pruned_inputs=[("b.weight", 2)])
    assert net.a.out_features == 5


# -- 4. channels_last --------------------------------------------------------------------


class BasicBlock(nn.Module):
    def __init__(self, c_in, c, stride=1):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c_in, c, 3, stride, 1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)
        self.down = None
        if stride != 1 or c_in != c:
            self.down = nn.Sequential(nn.Conv2d(c_in, c, 1, stride, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + (x if self.down is None else self.down(x)))


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8)
        self.layer1 = BasicBlock(8, 8)
        self.layer2 = BasicBlock(8, 12, stride=2)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = self.layer2(self.layer1(F.relu(self.bn(self.stem(x)))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def tiny_resnet(memory_format=torch.contiguous_format):
    torch.manual_seed(0)
    net = TinyResNet().to(D)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 1.5)
    return net.to(memory_format=memory_format).eval()


@pytest.mark.parametrize("req, zero", [
    (dict(pruned_inputs=[("layer1.conv2.weight", 2), ("layer2.conv2.weight", 7)]),
     {"layer1.conv2.weight": [2], "layer2.conv2.weight": [7]}),
    (dict(pruned_inputs=[("fc.weight", 3), ("layer2.conv1.weight", 5)]), {"fc.weight": [3], "layer2.conv1.weight": [5]}),
    (dict(pruned_outputs=[("layer1.conv1.weight", 4)]), {"layer1.conv2.weight": [4]}),
    (dict(pruned_inputs=[("fc.weight", 3), ("layer2.conv1.weight", 5)], constrained=True), None),
], ids=["block inputs", "stream subsets", "block output", "constrained"])
def test_channels_last_models_export_exactly(req, zero):
    x = _x(2, 3, 8, 8).to(memory_format=torch.channels_last)
    if zero is None:  # constrained: the reference zeroes what the spec reports as removed
        m = PruningManager(tiny_resnet(torch.channels_last)).compute([x], **req)
        zero = m.spec.removed_inputs()
    net, _ = export_exact(lambda: tiny_resnet(torch.channels_last), [x], zero, **req)
    with torch.no_grad():  # still runs on channels_last and on contiguous inputs, with the same result
        y_cl, y = net(x), net(x.contiguous())
    assert compare(y_cl, y, rtol=1e-12) is None
    assert n_params(net) < n_params(tiny_resnet())


# -- 5. DataParallel and torch.compile wrappers ------------------------------------------


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2)).to(D).eval()


@pytest.mark.parametrize("req", [
    dict(pruned_inputs=[("module.2.weight", 1), ("4.weight", 3)]),
    dict(pruned_inputs={"module.2": 1, "4": [3]}),
    dict(pruned_inputs=[("2.weight", 1)], pruned_outputs=[("module.2.weight", 3)]),
], ids=["mixed names", "module names", "outputs"])
def test_data_parallel_is_unwrapped(req):
    """The module inside is traced and pruned in place (the wrapper keeps
    holding it); names work with and without the wrapper's 'module.' prefix;
    consumers() lists the inner names."""
    holder = {}

    def wrap(inner):
        holder["dp"] = nn.DataParallel(inner)
        return holder["dp"]

    net, m = export_exact(mlp, [_x(3, 4)], {"2.weight": [1], "4.weight": [3]}, wrap=wrap, **req)
    assert m.net is net and holder["dp"].module is net
    assert set(m.consumers()) == {"0.weight", "2.weight", "4.weight"}
    assert net[2].in_features == 5 and net[2].out_features == 4
    with torch.no_grad():
        assert torch.equal(holder["dp"](_x(3, 4)), net(_x(3, 4)))


def test_unknown_name_through_a_wrapper():
    dp = nn.DataParallel(mlp())
    raises_unchanged(dp, UnknownParameterError,
                     lambda: PruningManager(dp).compute([_x(3, 4)], pruned_inputs=[("module.2.wieght", 1)]),
                     "'module.2.wieght'", "2.weight")


def test_torch_compile_is_unwrapped_and_recompiles():
    """``torch.compile(model)`` returns an OptimizedModule around the model:
    the model inside is pruned, and the compiled wrapper, already run once,
    recompiles on its next call (dynamo guards on the parameter shapes) and
    gives the pruned outputs."""
    x = _x(3, 4)
    inner = mlp()
    compiled = torch.compile(inner)
    with torch.no_grad():
        compiled(x)
    m = PruningManager(compiled).compute([x], pruned_inputs=[("_orig_mod.2.weight", 1)], pruned_outputs={"2.weight": 3})
    assert m.net is inner
    m.prune()
    ref = mlp()
    with torch.no_grad():
        ref[2].weight[:, 1] = 0
        ref[4].weight[:, 3] = 0
        y_ref, y_eager, y_compiled = ref(x), inner(x), compiled(x)
    assert inner[2].weight.shape == (4, 5)
    assert compare(y_eager, y_ref) is None
    assert compare(y_compiled, y_ref) is None


def test_module_compiled_in_place_is_refused():
    net = mlp()
    net[2].compile()
    raises_unchanged(net, TracingError, lambda: PruningManager(net).compute([_x(3, 4)], pruned_inputs=[("2.weight", 1)]),
                     "compiled in place", "2", "prune before calling .compile()", "torch.compile(model)")


# -- 6. weights computed on every call (parametrize, weight_norm hooks) ---------------------


class Double(nn.Module):
    def forward(self, w):
        return 2 * w


def _reparametrize(how):
    from torch.nn.utils import parametrizations, parametrize

    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2)).to(D).eval()
    if how == "parametrizations.weight_norm":
        parametrizations.weight_norm(net[2])
    elif how == "orthogonal":
        parametrizations.orthogonal(net[2])
    elif how == "custom":
        parametrize.register_parametrization(net[2], "weight", Double())
    elif how == "old weight_norm":
        torch.nn.utils.weight_norm(net[2])
    elif how == "old spectral_norm":
        torch.nn.utils.spectral_norm(net[2])
    return net


@pytest.mark.parametrize("how, words", [
    ("parametrizations.weight_norm", ["2.weight (parametrized: _WeightNorm)", "remove_parametrizations(module, 'weight')"]),
    ("orthogonal", ["2.weight (parametrized: _Orthogonal)", "remove_parametrizations(module, 'weight')"]),
    ("custom", ["2.weight (parametrized: Double)", "remove_parametrizations(module, 'weight')"]),
    ("old weight_norm", ["2.weight (WeightNorm hook)", "torch.nn.utils.remove_weight_norm(module)"]),
    ("old spectral_norm", ["2.weight (SpectralNorm hook)", "torch.nn.utils.remove_spectral_norm(module)"]),
])
def test_reparametrized_weights_are_kept_and_named_requests_refused(how, words):
    """Such weights are recomputed from other tensors on every call: export
    can not slice them. Their layers keep their channels (with a warning) and
    the rest of the model exports; a request that names one is refused, naming
    the tensor and how to bake it into a plain weight; after that it exports."""
    torch.manual_seed(0)
    net = _reparametrize(how)
    x = _x(3, 4)
    raises_unchanged(net, NotPrunableError, lambda: PruningManager(net).compute([x], pruned_inputs=[("2.weight", 1)]),
                     "recomputed on every call", *words)
    with pytest.warns(UserWarning, match="recomputed on every call"):
        export_exact(lambda: (torch.manual_seed(0), _reparametrize(how))[1], [x], {"0.weight": [1]},
                     pruned_inputs=[("0.weight", 1)])
    if how.startswith("old"):
        (torch.nn.utils.remove_weight_norm if "weight" in how else torch.nn.utils.remove_spectral_norm)(net[2])
    else:
        torch.nn.utils.parametrize.remove_parametrizations(net[2], "weight")
    baked = {k: v.detach().clone() for k, v in net.state_dict().items()}

    def make():
        n = _reparametrize("")
        n.load_state_dict(baked)
        return n

    export_exact(make, [x], {"2.weight": [3]}, pruned_inputs=[("2.weight", 3)])


# -- 7. buffers written during forward ---------------------------------------------------------


class WritesBuffers(nn.Module):
    """Counts its calls and keeps a per-channel running mean of ``a``'s output,
    written in place or by rebinding the buffer, used in the output or not."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.a = nn.Conv2d(3, 4, 1)
        self.head = nn.Conv2d(4, 2, 1)
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self.register_buffer("running", torch.linspace(-1, 1, 4))

    def forward(self, x):
        y = self.a(x)
        mean = y.detach().mean((0, 2, 3))
        if self.how == "count +=":
            self.count += 1
        elif self.how == "count = count + 1":
            self.count = self.count + 1
        elif self.how == "running in place":
            self.running.mul_(0.9).add_(0.1 * mean)
        elif self.how == "running rebound":
            self.running = 0.9 * self.running + 0.1 * mean
        elif self.how == "running in place, used":
            self.running.mul_(0.9).add_(0.1 * mean)
            y = y - self.running.view(1, -1, 1, 1)
        return self.head(torch.relu(y)) * (1 + self.count)


BUFFER_CASES = ["count +=", "count = count + 1", "running in place", "running rebound", "running in place, used"]


@pytest.mark.parametrize("how", BUFFER_CASES)
def test_buffers_written_in_forward(how):
    """compute/mock/prune leave the buffers as they were (values and the
    tensor objects, also when forward rebinds them); the per-channel buffer
    is sliced with the channels of ``a``; the export is exact."""
    def make():
        torch.manual_seed(0)
        return WritesBuffers(how).to(D).eval()

    x = _x(2, 3, 4, 4)
    net = make()
    before = snapshot(net)
    m = PruningManager(net).compute([x], pruned_outputs=[("a.weight", 1)])
    m.get_mock_model()
    assert diff_snapshot(net, before) == []
    net, m = export_exact(make, [x], {"head.weight": [1]}, pruned_outputs=[("a.weight", 1)])
    assert net.a.out_channels == 3
    ref = make()  # export_exact ran the pruned model once: run the reference once too
    with torch.no_grad():
        ref(x)
    assert torch.equal(net.count, ref.count)
    if how.startswith("running"):
        assert torch.allclose(net.running, ref.running[[0, 2, 3]], rtol=1e-12, atol=1e-15)
    else:  # not aligned with anything traced: left alone
        assert torch.equal(net.running, ref.running)


def test_batchnorm_in_train_mode_exports_exactly_and_keeps_its_statistics():
    """Train mode: batch statistics are per channel, so the export is exact;
    compute and prune do not update the running statistics; they are sliced."""
    def make():
        return seq(train=True)

    x = _x(4, 3, 5, 5)
    stats = {k: v.clone() for k, v in make().state_dict().items()}
    net, _ = export_exact(make, [x], {"3.weight": [2, 5]}, pruned_outputs=[("0.weight", 2)], pruned_inputs={"3.weight": 5})
    assert net.training
    # export_exact ran net once in train mode: compare with a reference run once too
    ref = make()
    with torch.no_grad():
        ref(x)
    keep = [0, 1, 3, 4]
    assert torch.allclose(net[1].running_mean, ref[1].running_mean[keep], rtol=1e-12, atol=0)
    assert torch.allclose(net[1].running_var, ref[1].running_var[keep], rtol=1e-12, atol=0)
    assert int(net[1].num_batches_tracked) == int(stats["1.num_batches_tracked"]) + 1


# -- 8. torch.nn.utils.prune masks still on the model -----------------------------------------


def test_torch_prune_masks_are_refused():
    """``torch.nn.utils.prune`` recomputes ``weight`` from ``weight_orig *
    weight_mask`` in a hook: refused, naming the weights and the conversion."""
    from torch.nn.utils import prune as tprune

    net = seq().eval()
    tprune.ln_structured(net[3], "weight", amount=0.5, n=1, dim=1)
    tprune.l1_unstructured(net[0], "weight", amount=0.2)
    raises_unchanged(net, TracingError, lambda: PruningManager(net).compute(SEQ_X),
                     "torch.nn.utils.prune masks (0.weight, 3.weight)", "channelcut.masking.from_torch_prune(model)",
                     "torch.nn.utils.prune.remove")


# -- 9. tied weights by any name ------------------------------------------------------------


class TinyLM(nn.Module):
    """HF-style: ``lm_head.weight`` is the Parameter ``model.embed_tokens.weight``."""

    class Body(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_tokens = nn.Embedding(11, 8)
            self.up = nn.Linear(8, 12)
            self.down = nn.Linear(12, 8)

        def forward(self, ids):
            h = self.embed_tokens(ids)
            return h + self.down(F.gelu(self.up(h)))

    def __init__(self):
        super().__init__()
        self.model = TinyLM.Body()
        self.lm_head = nn.Linear(8, 11, bias=False)
        self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, ids):
        return self.lm_head(self.model(ids))


def tiny_lm():
    torch.manual_seed(0)
    return TinyLM().to(D).eval()


LM_IDS = [torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(0))]


def test_tied_lm_head_names_are_aliases():
    m = PruningManager(tiny_lm())
    graph = m.trace(LM_IDS)
    assert graph.param_aliases == {"lm_head.weight": "model.embed_tokens.weight"}
    assert "lm_head.weight" not in m.consumers() and "model.embed_tokens.weight" in m.consumers()  # canonical


@pytest.mark.parametrize("name", ["lm_head.weight", "lm_head", "model.embed_tokens.weight"])
def test_tied_lm_head_input_channels_by_any_name(name):
    """Input column 3 of the LM head (= column 3 of the embedding table, the
    same tensor): every name means the same channel and the same spec."""
    want = PruningManager(tiny_lm()).compute(LM_IDS, pruned_inputs=[("model.embed_tokens.weight", 3)])
    got = PruningManager(tiny_lm()).compute(LM_IDS, pruned_inputs=[(name, 3)])
    assert _spec_key(got) == _spec_key(want)
    net, _ = export_exact(tiny_lm, LM_IDS, {"lm_head.weight": [3]}, pruned_inputs={name: 3})
    assert net.lm_head.weight is net.model.embed_tokens.weight


def test_tied_lm_head_output_channels_follow_the_named_layer():
    """A tensor tied across an embedding and a linear layer has different
    output channels in each: 'model.embed_tokens.weight' names a hidden
    channel (removed everywhere it flows, both uses of the table sliced),
    'lm_head.weight' a vocabulary logit (reaches the model output: refused)."""
    net, _ = export_exact(tiny_lm, LM_IDS, {"lm_head.weight": [3], "model.up.weight": [3]},
                          pruned_outputs=[("model.embed_tokens.weight", 3)])
    assert net.lm_head.weight is net.model.embed_tokens.weight and net.lm_head.weight.shape == (11, 7)
    assert net.model.embed_tokens.embedding_dim == 7 and net.lm_head.in_features == 7
    assert net.model.up.in_features == 7 and net.model.down.out_features == 7
    lm = tiny_lm()
    raises_unchanged(lm, NotPrunableError,
                     lambda: PruningManager(lm).compute(LM_IDS, pruned_outputs=[("lm_head.weight", 3)]),
                     "'lm_head.weight'", "reaches the model output")


def test_tied_alias_that_is_not_a_consumer_names_its_first_name():
    lm = tiny_lm()
    raises_unchanged(lm, UnknownParameterError,
                     lambda: PruningManager(lm).compute(LM_IDS, pruned_inputs=[("lm_head.wieght", 3)]),
                     "'lm_head.wieght'", "model.embed_tokens.weight")


class RegisteredTwice(nn.Module):
    """One conv registered under two names (``self.a = self.b = conv``), called twice."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        conv = nn.Conv2d(4, 4, 1)
        self.a = conv
        self.b = conv
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(F.relu(self.b(F.relu(self.a(self.stem(x))))))


def registered_twice():
    torch.manual_seed(0)
    return RegisteredTwice().to(D).eval()


@pytest.mark.parametrize("req, canonical", [
    (dict(pruned_inputs=[("b.weight", 1)]), dict(pruned_inputs=[("a.weight", 1)])),
    (dict(pruned_inputs={"b": [1, 2]}), dict(pruned_inputs={"a.weight": [1, 2]})),
    (dict(pruned_outputs=[("b.weight", 1)]), dict(pruned_outputs=[("a.weight", 1)])),
], ids=["input", "module name", "output"])
def test_module_registered_twice_by_either_name(req, canonical):
    x = [_x(2, 3, 4, 4)]
    m = PruningManager(registered_twice())
    m.trace(x)
    assert m.graph.param_aliases == {"b.weight": "a.weight", "b.bias": "a.bias"}
    assert set(m.consumers()) == {"stem.weight", "a.weight", "head.weight"}
    got = PruningManager(registered_twice()).compute(x, **req)
    want = PruningManager(registered_twice()).compute(x, **canonical)
    assert _spec_key(got) == _spec_key(want)
    zero = {"a.weight": [1, 2]} if "module name" in str(req) or "[1, 2]" in str(req) else {"a.weight": [1]}
    if "pruned_outputs" in req:
        zero = {"a.weight": [1], "head.weight": [1]}  # channel 1 of the conv: read by itself and by head
    export_exact(registered_twice, x, zero, **req)


def test_alias_of_a_non_consumer_says_what_it_is():
    net = registered_twice()
    raises_unchanged(net, NotPrunableError,
                     lambda: PruningManager(net).compute([_x(2, 3, 4, 4)], pruned_inputs=[("b.bias", 1)]),
                     "'b.bias' (the same tensor as 'a.bias') is not one of the consumers", "a.weight")


def test_tied_gpt2_lm_head_by_alias():
    """A tiny transformers GPT-2 (``lm_head.weight`` tied to
    ``transformer.wte.weight``): the alias means the canonical channels and
    the export equals zeroing that column by hand."""
    transformers = pytest.importorskip("transformers")

    def make():
        torch.manual_seed(0)
        cfg = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2,
                                      bos_token_id=0, eos_token_id=0)
        return transformers.GPT2LMHeadModel(cfg).to(D).eval()

    class Logits(nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, ids):
            return self.lm(input_ids=ids).logits

    ids = [torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))]
    net = make()
    assert net.lm_head.weight is net.transformer.wte.weight
    m = PruningManager(net)
    m.trace(ids)
    assert m.graph.param_aliases["lm_head.weight"] == "transformer.wte.weight"
    got = PruningManager(make()).compute(ids, pruned_inputs={"lm_head.weight": [3, 7]})
    want = PruningManager(make()).compute(ids, pruned_inputs={"transformer.wte.weight": [3, 7]})
    assert _spec_key(got) == _spec_key(want)
    export_exact(lambda: Logits(make()), ids, {"lm.lm_head.weight": [3, 7]}, pruned_inputs={"lm.lm_head.weight": [3, 7]})


# -- an op without a rule ------------------------------------------------------------------------


class Unsupported(nn.Module):
    """``torch.fft.fft`` over the channels has no rule: a barrier."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(4, 4, 1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(torch.fft.fft(self.b(torch.relu(self.a(x))), dim=1).real)


def test_unsupported_op_is_a_barrier_warned_about_and_named():
    """Channels flowing into an op without a rule are kept: a request to
    remove one names the op; channels before it still export exactly."""
    def make():
        torch.manual_seed(0)
        return Unsupported().to(D).eval()

    x = [_x(2, 3, 4, 4)]
    net = make()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        raises_unchanged(net, NotPrunableError,
                         lambda: PruningManager(net).compute(x, pruned_outputs=[("b.weight", 1)]),
                         "output channel 1 of 'b.weight'", "unsupported op 'fft_fft'")
    assert any("fft_fft" in str(w.message) and "barrier" in str(w.message) for w in caught)
    export_exact(make, x, {"b.weight": [2]}, pruned_inputs=[("b.weight", 2)])
