"""Bad requests get a clear ChannelcutError, and leave the model exactly as before.

Each test snapshots the model (values, parameter objects, attributes, hooks,
structure), provokes one error through ``PruningManager`` and checks both the
error (type, what the message names) and that the snapshot still holds.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from channelcut import (
    ChannelRangeError,
    EmptyLayerError,
    ExportError,
    NotPrunableError,
    PruningManager,
    StateError,
    TracingError,
    UnknownParameterError,
)

from ._helpers import assert_unchanged, call, n_params, prepare, rand_inputs, snapshot
from support.unchanged import global_hook_counts, raises_unchanged


class Net(nn.Module):
    """conv -> BN -> relu -> depthwise conv -> pointwise conv -> pool -> linear."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.pw(self.dw(x)))
        return self.fc(x.mean((2, 3)))


@pytest.fixture
def net():
    return prepare(Net(), seed=11)


@pytest.fixture
def x():
    return rand_inputs([(2, 3, 6, 6)], seed=12)


# -- unknown names -------------------------------------------------------------


def test_unknown_consumer_name_suggests_close_names(net, x):
    msg = str(raises_unchanged(net, UnknownParameterError,
                  lambda: PruningManager(net).compute(x, pruned_inputs=[("pw.wieght", 1)]),
                  "'pw.wieght'", "Did you mean", "'pw.weight'"))
    assert "fc.weight" in msg  # lists valid names


def test_unknown_producer_name_suggests_close_names(net, x):
    m = PruningManager(net)
    with pytest.raises(UnknownParameterError) as info:
        m.compute(x, pruned_outputs=[("conv1.weights", 0)])
    assert "conv1.weight" in info.value.suggestions
    assert "Did you mean" in str(info.value)
    # it is also a KeyError, and still printable as a plain message
    assert isinstance(info.value, KeyError) and not str(info.value).startswith('"')


def test_unknown_name_without_close_match(net, x):
    msg = str(raises_unchanged(net, UnknownParameterError,
                  lambda: PruningManager(net).compute(x, pruned_inputs=[("zzzz", 0)]), "'zzzz'"))
    assert "Did you mean" not in msg
    assert "pw.weight" in msg


# -- channel out of range ---------------------------------------------------------


@pytest.mark.parametrize("channel", [6, 100, -1, -6])
def test_input_channel_out_of_range(net, x, channel):
    raises_unchanged(net, ChannelRangeError,
            lambda: PruningManager(net).compute(x, pruned_inputs=[("pw.weight", 1), ("fc.weight", channel)]),
            str(channel), "'fc.weight'", "0..5")


@pytest.mark.parametrize("channel", [8, -1])
def test_output_channel_out_of_range(net, x, channel):
    raises_unchanged(net, ChannelRangeError,
            lambda: PruningManager(net).compute(x, pruned_outputs=[("conv1.weight", channel)]),
            str(channel), "'conv1.weight'", "0..7")


@pytest.mark.parametrize("channel", [1.5, "2", None, True])
def test_channel_that_is_not_an_integer(net, x, channel):
    """Floats, strings, None and bools are not channel indices (True would
    silently mean channel 1)."""
    raises_unchanged(net, ChannelRangeError,
            lambda: PruningManager(net).compute(x, pruned_inputs=[("pw.weight", channel)]),
            "'pw.weight'", "0..7")


def test_integer_like_channels_are_accepted(net, x):
    """numpy-style integers and 0-d tensors name a channel like an int."""
    a = PruningManager(net).compute(x, pruned_inputs=[("pw.weight", torch.tensor(3))]).spec
    b = PruningManager(net).compute(x, pruned_inputs=[("pw.weight", 3)]).spec
    assert a.kept() == b.kept() and a.kept()["conv1.weight"] == (8, 7)


def test_request_entry_that_is_not_a_pair(net, x):
    before = snapshot(net)
    with pytest.raises(TypeError, match="pair"):
        PruningManager(net).compute(x, pruned_inputs=["pw.weight"])
    assert_unchanged(net, before)


# -- neither producer nor consumer ----------------------------------------------------


@pytest.mark.parametrize("name", ["bn1.weight", "bn1.bias", "conv1.bias", "dw.weight"])
def test_param_that_is_not_a_consumer(net, x, name):
    raises_unchanged(net, NotPrunableError, lambda: PruningManager(net).compute(x, pruned_inputs=[(name, 0)]),
            repr(name), "pw.weight")


@pytest.mark.parametrize("name", ["bn1.weight", "bn1.running_mean", "dw.weight"])
def test_param_that_is_not_a_producer(net, x, name):
    raises_unchanged(net, NotPrunableError, lambda: PruningManager(net).compute(x, pruned_outputs=[(name, 0)]),
            repr(name))


def test_output_channel_that_reaches_the_model_output(net, x):
    raises_unchanged(net, NotPrunableError, lambda: PruningManager(net).compute(x, pruned_outputs=[("fc.weight", 2)]),
            "'fc.weight'", "output")


# -- emptying a layer -------------------------------------------------------------


def test_pruning_every_input_channel_of_a_layer(net, x):
    raises_unchanged(net, EmptyLayerError,
            lambda: PruningManager(net).compute(x, pruned_inputs=[("pw.weight", c) for c in range(8)]),
            "'pw.weight'", "8")


def test_pruning_every_output_channel_of_a_producer(net, x):
    raises_unchanged(net, EmptyLayerError,
            lambda: PruningManager(net).compute(x, pruned_outputs=[("pw.weight", c) for c in range(6)]),
            "'fc.weight'")


@pytest.mark.parametrize("constrained", [False, True])
def test_all_but_one_channel_is_fine(net, x, constrained):
    m = PruningManager(net).compute(x, pruned_inputs=[("pw.weight", c) for c in range(7)], constrained=constrained)
    y_mock = call(m.get_mock_model(), x)
    m.prune()
    assert net.conv1.out_channels == 1 and net.dw.groups == 1 and net.pw.in_channels == 1
    torch.testing.assert_close(call(net, x), y_mock, rtol=1e-10, atol=1e-12)


# -- inputs ----------------------------------------------------------------------


def test_inputs_that_do_not_run_the_model(net):
    msg = str(raises_unchanged(net, TracingError,
                  lambda: PruningManager(net).compute([torch.rand(2, 4, 6, 6, dtype=torch.float64)], pruned_inputs=[]),
                  "RuntimeError"))
    assert "compute([" in msg  # says how to call it


def test_bare_tensor_instead_of_a_list(net, x):
    raises_unchanged(net, TracingError, lambda: PruningManager(net).compute(x[0], pruned_inputs=[("pw.weight", 1)]),
            "list")


@pytest.mark.parametrize("inputs", [[], [3], (None,), "x"], ids=["empty", "int", "none", "str"])
def test_inputs_without_tensors(net, inputs):
    raises_unchanged(net, TracingError, lambda: PruningManager(net).compute(inputs, pruned_inputs=[]))


def test_model_that_returns_no_tensor(x):
    class NoTensor(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            self.c(x)
            return None

    net = NoTensor().double()
    raises_unchanged(net, TracingError, lambda: PruningManager(net).compute(x, pruned_inputs=[]), "NoneType")


def test_not_a_module():
    with pytest.raises(TypeError, match="nn.Module"):
        PruningManager(lambda x: x)


# -- call order --------------------------------------------------------------------


def test_prune_before_compute(net):
    m = PruningManager(net)
    raises_unchanged(net, StateError, m.prune, "compute")
    raises_unchanged(net, StateError, m.get_mock_model, "compute")
    raises_unchanged(net, StateError, m.consumers)


def test_prune_twice(net, x):
    m = PruningManager(net).compute(x, pruned_inputs=[("pw.weight", 1)])
    m.prune()
    y = call(net, x)
    raises_unchanged(net, StateError, m.prune, "already")
    raises_unchanged(net, StateError, lambda: m.compute(x, pruned_inputs=[("pw.weight", 2)]), "already")
    assert torch.equal(call(net, x), y)


def test_failed_compute_keeps_the_previous_spec_usable(net, x):
    """An error in a second compute() must not leave a half-built state: the
    manager can still compute and prune afterwards."""
    m = PruningManager(net)
    with pytest.raises(ChannelRangeError):
        m.compute(x, pruned_inputs=[("pw.weight", 99)])
    m.compute(x, pruned_inputs=[("pw.weight", 1)])
    y_mock = call(m.get_mock_model(), x)
    m.prune()
    torch.testing.assert_close(call(net, x), y_mock, rtol=1e-10, atol=1e-12)
    assert net.pw.in_channels == 7


# -- verification failure: all or nothing -----------------------------------------------


class Drifting(nn.Module):
    """Its output depends on hidden global state (how often any instance ran),
    which no tracer can see: the pruned model always disagrees with the mock."""

    calls = [0]  # class-level: outside the model's parameters and attributes

    def __init__(self):
        super().__init__()
        self.c1, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.c3 = nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        Drifting.calls[0] += 1
        y = F.relu(self.bn(self.c1(x)))
        return (self.c2(y) + self.c3(y)) * Drifting.calls[0]


@pytest.mark.parametrize("constrained", [False, True])
def test_failed_verification_restores_the_model(constrained):
    net = prepare(Drifting(), seed=13)
    x = rand_inputs([(1, 3, 5, 5)], seed=14)
    m = PruningManager(net).compute(x, pruned_inputs=[("c2.weight", 0), ("c2.weight", 1), ("c3.weight", 1)],
                                    constrained=constrained)
    # the spec is fine: it slices c1 / bn and (unconstrained) makes c2 read a subset
    assert m.spec.kept()["c1.weight"] == ((8, 6) if constrained else (8, 7))
    assert len(m.spec.subselections) == (0 if constrained else 1)
    msg = str(raises_unchanged(net, ExportError, m.prune, "restored"))
    assert "differs" in msg  # says what failed
    assert net.c1.out_channels == 8 and net.bn.num_features == 8 and net.c2.in_channels == 8
    # the manager did not count the failed prune: undo has nothing to undo
    with pytest.raises(StateError):
        m.undo()


def test_prune_without_verification_skips_the_check():
    net = prepare(Drifting(), seed=13)
    x = rand_inputs([(1, 3, 5, 5)], seed=14)
    PruningManager(net).compute(x, pruned_inputs=[("c3.weight", 2), ("c2.weight", 2)]).prune(verify=False)
    assert net.c1.out_channels == 7 and net.c2.in_channels == 7


def test_undo_restores_the_model(net, x):
    before = snapshot(net)
    m = PruningManager(net).compute(x, pruned_inputs=[("pw.weight", 1), ("fc.weight", 0)])
    m.prune()
    assert n_params(net) < sum(t[1].numel() for k, t in before["tensors"].items() if k in dict(net.named_parameters()))
    m.undo()
    assert_unchanged(net, before, "after undo()")
    with pytest.raises(StateError):
        m.undo()


# -- compute() leaves nothing on the model --------------------------------------------


class Everything(nn.Module):
    """Train-mode BatchNorm, a buffer, a module called twice, layer scale."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 1)
        self.gamma = nn.Parameter(torch.rand(1, 8, 1, 1))
        self.register_buffer("offset", torch.rand(1, 8, 1, 1))
        self.ln = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = F.relu(self.bn(self.c1(x))) + self.offset
        x = x + self.gamma * self.c2(x)
        x = x + self.gamma * self.c2(x)
        return self.head(self.ln(x.mean((2, 3))))


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_compute_leaves_nothing_on_the_model(train):
    net = prepare(Everything(), seed=15).train(train)
    x = rand_inputs([(2, 3, 5, 5)], seed=16)
    net.c1.weight.grad = torch.ones_like(net.c1.weight)  # an existing grad survives untouched
    before = snapshot(net)
    hooks = global_hook_counts()
    m = PruningManager(net)
    m.compute(x, pruned_inputs=[("c2.weight", 1), ("head.weight", 2)])
    m.compute(x, pruned_inputs=[("c2.weight", 3)], constrained=True)
    m.channel_groups(), m.consumers(), m.producers(), m.summary()
    mock = m.get_mock_model()
    call(mock, x)
    assert_unchanged(net, before, "after compute()/get_mock_model()")  # incl. BN running stats in train mode
    assert global_hook_counts() == hooks
    for name, mod in net.named_modules():
        for d in ("_forward_pre_hooks", "_forward_hooks", "_backward_hooks", "_backward_pre_hooks",
                  "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs"):
            assert not getattr(mod, d), f"{name or '<model>'}.{d} is not empty"
        assert not type(mod).__name__.startswith("Parametrized"), f"{name}: parametrization left on the user's model"
    for name, p in net.named_parameters():
        assert vars(p) == {}, f"attributes {sorted(vars(p))} left on parameter {name}"
    assert torch.equal(net.c1.weight.grad, torch.ones_like(net.c1.weight))


def test_trace_errors_do_not_leave_global_hooks(net):
    hooks = global_hook_counts()
    with pytest.raises(TracingError):
        PruningManager(net).compute([torch.rand(2, 5, 6, 6, dtype=torch.float64)], pruned_inputs=[])
    assert global_hook_counts() == hooks
