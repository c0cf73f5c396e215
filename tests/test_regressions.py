"""Named regression tests: minimal networks reduced from random-network failures.

Each test states the seed it came from (``tests/test_random_networks.py`` /
``benchmarks/soak.py``), the observed behaviour and the expected one. The rule
they all hold: an export request is either rejected at ``compute`` with a
ChannelcutError (model unchanged), or it is exported and ``prune(verify=True)``
succeeds with the pruned model equal to the mock in float64. An explicitly
requested channel is never silently kept.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from channelcut import ChannelcutError, PruningManager
from support.compare import compare
from support.unchanged import diff_snapshot, snapshot

D = torch.float64


def export_is_sound(net: nn.Module, xs, **kw) -> str:
    """Run one export; return "rejected" or "pruned"; assert the invariants."""
    net = net.to(D).eval()
    before = snapshot(net)
    m = PruningManager(net)
    try:
        m.compute(xs, **kw)
    except ChannelcutError:
        assert diff_snapshot(net, before) == []
        return "rejected"
    with torch.no_grad():
        y_mock = m.get_mock_model()(*xs)
    try:
        m.prune(verify=True)
    except ChannelcutError as exc:
        assert diff_snapshot(net, before) == []
        raise AssertionError(f"compute accepted the request but prune failed: {exc}") from exc
    with torch.no_grad():
        y = net(*xs)
    assert compare(y, y_mock) is None
    return "pruned"


def _seeded(cls, *args):
    torch.manual_seed(0)
    return cls(*args)


# ---------------------------------------------------------------------------
# a tensor whose channels all carry one atom is treated as a broadcast scalar
# ---------------------------------------------------------------------------


class InputResidual(nn.Module):
    """``x + conv(x)`` where ``x`` is the model input (4 channels)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(x + self.conv(x))


def test_residual_from_model_input_is_not_pruned_on_one_side():
    """Seed 1885 (and others). Observed: compute accepts removing
    ``conv.weight`` output 0, then ``prune`` fails verification ("size of tensor
    a (4) must match b (3)"): the input's trace is one pinned atom for all 4
    channels, compressed to a scalar, so ``x + conv(x)`` records "needs"
    instead of unioning conv's channels with the (pinned) input. Expected:
    NotPrunableError at compute (the channel is added to a model input)."""
    net = _seeded(InputResidual)
    x = torch.randn(1, 4, 5, 5, dtype=D)
    export_is_sound(net, [x], pruned_outputs=[("conv.weight", 0)])


class CoupledThenReshaped(nn.Module):
    """A stream coupled into one group (LayerNorm over channels) and then
    reshaped (a channel shuffle) is added to a fresh linear output."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 6)
        self.ln = nn.LayerNorm(6)
        self.b = nn.Linear(6, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        y = self.ln(self.a(x))
        n, c = y.shape
        y = y.reshape(n, 2, c // 2).transpose(1, 2).reshape(n, c)
        return self.head(y + self.b(y))


def test_coupled_stream_after_reshape_unions_with_residual():
    """Seed 1000435 (constrained). Observed: ``b`` output 0 is sliced away
    while the residual ``y`` keeps 6 channels; prune fails verification
    ("size of tensor a (6) must match b (5)"). Same root cause as above: the
    reshape turns a fully coupled trace into a scalar trace. Expected: ``b``'s
    outputs join the group of ``y`` (so the request is rejected or applied to
    both sides)."""
    net = _seeded(CoupledThenReshaped)
    x = torch.randn(3, 3, dtype=D)
    export_is_sound(net, [x], pruned_outputs=[("b.weight", 0)])
    export_is_sound(net, [x], pruned_inputs=[("head.weight", 0)], constrained=True)


# ---------------------------------------------------------------------------
# channel shuffle with one channel per group
# ---------------------------------------------------------------------------


class ShuffleOnePerGroup(nn.Module):
    def __init__(self, how: str):
        super().__init__()
        self.a = nn.Conv1d(3, 2, 1)
        self.head = nn.Conv1d(2, 3, 1)
        self.how = how

    def forward(self, x):
        y = self.a(x)
        if self.how == "fn":
            y = F.channel_shuffle(y, 2)
        else:
            b, c, n = y.shape
            y = y.view(b, 2, c // 2, n).transpose(1, 2).reshape(b, c, n)
        return self.head(y)


def test_view_channel_shuffle_with_one_channel_per_group():
    """Seeds 682, 1354. ``view(b, 2, c // 2, n)`` on 2 channels: the fast
    reshape path treats the size-1 ``c // 2`` dim as absorbed and does not
    couple the two channels; compute accepts removing one, prune fails
    verification ("shape '[1, 2, 0, 5]' is invalid"). Expected: the shuffle's
    channels coupled like any other group count (request rejected)."""
    x = torch.randn(1, 3, 5, dtype=D)
    export_is_sound(_seeded(ShuffleOnePerGroup, "view"), [x], pruned_outputs=[("a.weight", 0)])


def test_functional_channel_shuffle_with_one_channel_per_group():
    """Seed 2008. ``F.channel_shuffle(y, 2)`` on 2 channels: compute accepts
    removing one, prune fails ("Number of channels must be divisible by
    groups. Got 1 channels and 2 groups"). Expected: coupled, rejected."""
    x = torch.randn(1, 3, 5, dtype=D)
    export_is_sound(_seeded(ShuffleOnePerGroup, "fn"), [x], pruned_outputs=[("a.weight", 0)])


# ---------------------------------------------------------------------------
# requested channels silently kept
# ---------------------------------------------------------------------------


class OneChannelGate(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 1, 1)
        self.b = nn.Conv2d(3, 1, 1)
        self.head = nn.Conv2d(1, 2, 1)

    def forward(self, x):
        return self.head(self.a(x) * torch.sigmoid(self.b(x)))


def test_requested_output_channel_is_never_silently_kept():
    """Seeds 200, 582, 764, 890, 2018, 1000327. Observed: ``compute`` accepts
    ``pruned_outputs=[("b.weight", 0)]`` and returns an empty spec (nothing
    removed, no error, no warning): both one-channel tensors are scalar traces,
    so the product records "a needs b" and the request is dropped by the
    needs-closure in resolve. Expected: NotPrunableError naming the channel
    (or the channel removed)."""
    net = _seeded(OneChannelGate).to(D).eval()
    x = torch.randn(1, 3, 4, 4, dtype=D)
    m = PruningManager(net)
    try:
        m.compute([x], pruned_outputs=[("b.weight", 0)])
    except ChannelcutError as exc:
        assert "b.weight" in str(exc)
        return
    kept = m.spec.slices.get("b.weight", {}).get(0, [0])
    assert 0 not in kept, f"request silently ignored: spec slices {m.spec.slices}, removed {m.spec.removed_groups}"


# ---------------------------------------------------------------------------
# found by the op-rule oracle (tests/test_op_rules.py), reduced to end-to-end
# ---------------------------------------------------------------------------


class WithUnfold(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.unfold = nn.Unfold(2)
        self.head = nn.Linear(9, 2)

    def forward(self, x):
        return self.head(self.unfold(self.a(x)).mean(1))


def test_model_with_nn_unfold_can_be_traced():
    """Oracle case ``unfold-*-F.unfold``. Observed: ``compute`` raises
    TracingError "the model raised NotImplementedError ... "im2col_out_cpu" not
    implemented for 'Long'": the movement rule replays F.unfold (im2col) on
    int64 atom tensors, which has no integer kernel, and the exception is not
    turned into a barrier. Expected: traced (a rule, or at least a barrier)."""
    net = _seeded(WithUnfold)
    x = torch.randn(1, 3, 4, 4, dtype=D)
    assert export_is_sound(net, [x], pruned_inputs=[]) == "pruned"


class WriteIntoSlice(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = self.a(x)
        y[:, 1] = 0.0
        return self.head(y)


def test_setitem_on_a_traced_tensor_is_seen():
    """Oracle cases ``__setitem__-*``. ``Tensor.__setitem__`` returns None, so
    ``rules.dispatch`` returns before the ``write_into`` rule runs: the write is
    invisible. Observed: removing ``head`` input 0 (channel 0 of ``a``) is
    accepted, the pruned model then zeroes original channel 2 instead of 1 and
    verification fails (ExportError). Expected: the written channels pinned
    (request rejected or exported correctly)."""
    net = _seeded(WriteIntoSlice)
    x = torch.randn(1, 3, 4, 4, dtype=D)
    export_is_sound(net, [x], pruned_inputs=[("head.weight", 0)])


class NewOnesLikeShape(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.head = nn.Conv2d(4, 2, 1)
        self.head2 = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = self.a(x)
        return self.head(y) + self.head2(y.new_ones(y.shape))


def test_new_ones_with_the_shape_of_a_traced_tensor():
    """Oracle cases ``new_zeros-*``/``new_empty-*``. The creation rule marks
    ``y.new_ones(y.shape)`` as a fixed-size constant, but its channel count
    follows ``y``. Observed: removing ``a`` output 0 is accepted; ``head2``
    keeps 4 input columns and the pruned model raises (ExportError at verify).
    Expected: the new tensor's channels follow ``y`` (like ``ones_like``) or
    are pinned."""
    net = _seeded(NewOnesLikeShape)
    x = torch.randn(1, 3, 4, 4, dtype=D)
    export_is_sound(net, [x], pruned_outputs=[("a.weight", 0)])


# ---------------------------------------------------------------------------
# found by benchmarks/soak.py
# ---------------------------------------------------------------------------


def test_group_norm_without_affine_gets_its_group_count_fixed():
    """Seed 2435 (constrained). ``nn.GroupNorm(4, 8, affine=False)``: the
    pruner only updates ``num_groups``/``num_channels`` when the module has a
    weight. Removing one GN group's worth of channels per group (8 -> 4) keeps
    ``num_groups=4``: every channel becomes its own group and the outputs
    change. Observed: ExportError at verify; with ``verify=False`` a silently
    wrong model (max diff 0.28). Expected: ``num_groups=2``, exact."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.GroupNorm(4, 8, affine=False), nn.Conv2d(8, 2, 1))
    x = torch.randn(2, 3, 4, 4, dtype=D)
    assert export_is_sound(net, [x], pruned_outputs=[("0.weight", c) for c in range(4)]) == "pruned"
    assert net[1].num_groups == 2 and net[1].num_channels == 4


class SDPAResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(4, 2), nn.Linear(4, 2), nn.Linear(4, 2)
        self.o = nn.Linear(2, 4)

    def forward(self, x):
        return x + self.o(F.scaled_dot_product_attention(self.q(x), self.k(x), self.v(x)))


def test_sdpa_query_key_channels_are_not_silently_kept():
    """Seeds 919, 1438, 2099, 2485, 2909 (attention), 2780, 2889 (SE gate).
    ``pruned_outputs=[("q.weight", 0)]`` returns an empty spec: the sdpa rule
    couples q and k into one group and records "v needs it", and the
    needs-closure in resolve drops the request without a word. Expected: an
    error (EmptyLayerError: the q/k group is all of q; or NotPrunableError) or
    the channel removed."""
    torch.manual_seed(0)
    net = SDPAResidual().to(D).eval()
    x = torch.randn(2, 3, 4, dtype=D)
    m = PruningManager(net)
    try:
        m.compute([x], pruned_outputs=[("q.weight", 0)])
    except ChannelcutError as exc:
        assert "q.weight" in str(exc)
        return
    kept = m.spec.slices.get("q.weight", {}).get(0, [0, 1])
    assert 0 not in kept, f"request silently ignored: spec slices {m.spec.slices}"


class WideAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(3, 6), nn.Linear(3, 6), nn.Linear(3, 6)
        self.o = nn.Linear(6, 3)

    def forward(self, x):
        a = torch.softmax(self.q(x) @ self.k(x).transpose(-2, -1), -1)
        return x + self.o(a @ self.v(x))


def test_rejection_names_the_requested_channel():
    """Seed 22015 (soak). ``pruned_outputs=[("k.weight", 0)]`` is rejected
    (q and k form one channel group: EmptyLayerError here, NotPrunableError
    in the soak network), but the message lists only the first six channels
    of the group -- all of ``q.weight`` -- never the channel asked for. Expected: the
    error names ``k.weight`` (invariant 5: name the parameter and channel)."""
    net = _seeded(WideAttention).to(D).eval()
    x = torch.randn(2, 3, 3, dtype=D)
    m = PruningManager(net)
    try:
        m.compute([x], pruned_outputs=[("k.weight", 0)])
    except ChannelcutError as exc:
        assert "k.weight" in str(exc), str(exc)
        return
    assert 0 not in m.spec.slices.get("k.weight", {}).get(0, [0])


class _GroupedTail(nn.Module):
    """Soak seeds 200384 / 201970 / 202177 (a grouped conv whose outputs the
    request removes entirely): must be an EmptyLayerError, as before the
    depthwise-branch rule, never a restored channel the request removed."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 1)
        self.g = nn.Conv2d(16, 4, 3, padding=1, groups=2, bias=False)
        self.b = nn.Conv2d(16, 3, 1)
        self.c = nn.Conv2d(7, 2, 1)

    def forward(self, x):
        h = self.a(x)
        return self.c(torch.cat([self.b(h), self.g(h)], 1))


def test_removing_every_output_of_a_grouped_conv_is_an_empty_layer():
    from channelcut import EmptyLayerError

    net = _seeded(_GroupedTail)
    x = torch.rand(1, 3, 5, 5)
    before = snapshot(net)
    # groups couple outputs (0, 2) and (1, 3): removing 0, 1, 2 removes all four
    with pytest.raises(EmptyLayerError):
        PruningManager(net).compute([x], pruned_outputs=[("g.weight", 0), ("g.weight", 1), ("g.weight", 2)])
    assert not diff_snapshot(net, before)


class _ScoresAndTail(nn.Module):
    """Soak seed 800955: attention scores need every channel of ``q``, and a
    second branch ``p`` reads ``z``."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = nn.Linear(6, 4), nn.Linear(6, 4), nn.Linear(6, 3), nn.Linear(3, 5)
        self.z, self.p = nn.Linear(6, 3), nn.Linear(3, 2)

    def forward(self, x):
        s = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2), -1)
        return self.o(s @ self.v(x)), self.p(self.z(x))


def test_a_request_that_empties_a_layer_says_so_first():
    """The request removes a ``q`` channel the scores need (NotPrunableError
    on its own) and every input channel of ``p``: the emptied layer is the
    error reported (the engine said NotPrunableError), without blaming the
    pruned_outputs for it."""
    from channelcut import EmptyLayerError, NotPrunableError

    net = _seeded(_ScoresAndTail)
    x = torch.rand(2, 7, 6)
    before = snapshot(net)
    with pytest.raises(NotPrunableError, match="q.weight"):
        PruningManager(net).compute([x], pruned_outputs=[("q.weight", 1)])
    with pytest.raises(EmptyLayerError, match="every input channel of 'p.weight'") as info:
        PruningManager(net).compute([x], pruned_outputs=[("q.weight", 1)], pruned_inputs=[("p.weight", i) for i in range(3)])
    assert "pruned_outputs" not in str(info.value)
    assert not diff_snapshot(net, before)
