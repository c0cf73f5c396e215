"""Channels the model zeroed itself, and the constants they leave behind.

A producer's zeroed output row is a zero channel only right after the
producer: a BatchNorm shift, a bias or ``sigmoid(0)`` makes it a non-zero
constant further on. Exported from the model's own zeros
(``compute([x])`` with no request), the pruned model must equal the user's
model as it is, in float64 — never the model with those readers zeroed.
Every model here has randomised norms and biases.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from support.compare import rel_error
from channelcut import ExportError, PruningManager
from channelcut.masking import from_torch_prune

RTOL = 1e-10


def _randomize(net: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)

    def u(t, lo, hi):
        with torch.no_grad():
            t.copy_(torch.rand(t.shape, generator=g, dtype=t.dtype) * (hi - lo) + lo)

    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            u(m.weight, 0.5, 1.5), u(m.bias, -1, 1), u(m.running_mean, -1, 1), u(m.running_var, 0.5, 2)
        elif isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
            u(m.bias, -0.5, 0.5)
    return net




def _params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def _export_own_zeros(net: nn.Module, x: torch.Tensor, **kw) -> PruningManager:
    """Export the model's own zeros; the pruned model (and the mock) must be
    the user's model, to float64 rounding."""
    with torch.no_grad():
        ref = net(x)
    before = copy.deepcopy(net)
    pm = PruningManager(net).compute([x], **kw)
    assert pm.spec.reference == "model"
    with torch.no_grad():
        assert rel_error(pm.get_mock_model()(x), ref) <= RTOL
    pm.prune()
    with torch.no_grad():
        assert rel_error(net(x), ref) <= RTOL
        assert rel_error(before(x), ref) == 0.0
    return pm


class ZeroThenBN(nn.Module):
    """conv (a filter zeroed) -> BatchNorm -> ReLU -> a 1x1 conv with a bias
    -> padded 3x3 conv -> pooled -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 6, 1)
        self.bn2 = nn.BatchNorm2d(6)
        self.conv3 = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(self.conv3(x).mean((2, 3)))


@pytest.fixture
def x():
    return torch.rand(2, 3, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def test_zeroed_filter_then_batchnorm_is_folded_and_removed(x):
    """The issue's case: a zeroed filter before a BatchNorm with a shift is a
    constant; its reader (a 1x1 conv with a bias) absorbs it exactly."""
    net = _randomize(ZeroThenBN().double().eval())
    with torch.no_grad():
        net.conv1.weight[[2, 5]] = 0
        net.bn1.bias[[2, 5]] = torch.tensor([0.8, 0.3], dtype=torch.float64)  # relu keeps the constants
        net.bn1.running_mean[[2, 5]] = torch.tensor([-0.2, -0.4], dtype=torch.float64)
    n0 = _params(net)
    pm = _export_own_zeros(net, x)
    assert [(f.param, f.channels) for f in pm.spec.folds] == [("conv2.weight", [2, 5])]
    assert net.conv1.out_channels == 6 and net.bn1.num_features == 6 and net.conv2.in_channels == 6
    assert _params(net) < n0


def test_constant_before_a_zero_padded_conv_is_kept_and_reported(x):
    net = _randomize(ZeroThenBN().double().eval())
    with torch.no_grad():
        net.conv2.weight[1] = 0  # then bn2's shift, relu: a constant read by a padded conv without bias
        net.bn2.bias[1] = 0.9
    pm = _export_own_zeros(net, x)
    assert not pm.spec.folds
    assert any("conv3.weight" in k and "zero-padded" in k for k in pm.spec.kept_zeros), pm.spec.kept_zeros
    assert net.conv2.out_channels == 6 and net.conv3.in_channels == 6
    assert "kept: conv3.weight" in pm.spec.summary()


def test_a_zero_channel_is_removed_without_a_fold(x):
    """BatchNorm with zero shift and zero running mean keeps a zero channel zero."""
    net = _randomize(ZeroThenBN().double().eval())
    with torch.no_grad():
        net.conv1.weight[3] = 0
        net.bn1.bias[3] = 0
        net.bn1.running_mean[3] = 0
    pm = _export_own_zeros(net, x)
    assert not pm.spec.folds
    assert net.conv2.in_channels == 7


def test_sigmoid_of_a_zero_channel_is_a_constant(x):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 5, 3)
            self.b = nn.Conv2d(5, 4, 1)

        def forward(self, x):
            return self.b(torch.sigmoid(self.a(x)))

    net = _randomize(Net().double().eval())
    with torch.no_grad():
        net.a.weight[1] = 0
        net.a.bias[1] = 0  # sigmoid(0) = 0.5
    pm = _export_own_zeros(net, x)
    assert pm.spec.folds[0].values == [0.5]
    assert net.a.out_channels == 4


def test_linear_row_with_a_bias_is_a_constant():
    net = _randomize(nn.Sequential(nn.Linear(6, 5), nn.GELU(), nn.Linear(5, 3)).double().eval())
    with torch.no_grad():
        net[0].weight[[0, 3]] = 0  # bias stays: gelu(bias) is read by the second layer
    x = torch.rand(4, 6, dtype=torch.float64)
    pm = _export_own_zeros(net, x)
    assert pm.spec.folds[0].param == "2.weight" and pm.spec.folds[0].channels == [0, 3]
    assert net[0].out_features == 3 and net[2].in_features == 3


def test_zero_filter_added_to_a_live_stream_is_not_removed(x):
    """A zeroed filter summed into a residual stream does not make the
    stream's channel zero (the old detection removed it everywhere)."""

    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 6, 3, padding=1)
            self.branch = nn.Conv2d(6, 6, 3, padding=1)
            self.head = nn.Conv2d(6, 4, 1)

        def forward(self, x):
            h = self.stem(x)
            return self.head(h + self.branch(h))

    net = _randomize(Res().double().eval())
    with torch.no_grad():
        net.branch.weight[2] = 0
        net.branch.bias[2] = 0
    _export_own_zeros(net, x)
    assert net.head.in_channels == 6 and net.stem.out_channels == 6


def test_torch_prune_filters_before_batchnorm_export_exactly(x):
    """torch.nn.utils.prune.ln_structured(dim=0) on resnet-like convs with
    real BatchNorm statistics, made permanent by from_torch_prune, then
    exported from the zeros: equal to the user's model."""
    torchvision = pytest.importorskip("torchvision")
    net = _randomize(torchvision.models.resnet18(num_classes=10).double().eval(), seed=3)
    for conv in (net.layer1[0].conv1, net.layer2[1].conv1, net.layer3[0].conv2):
        torch_prune.ln_structured(conv, "weight", amount=0.25, n=1, dim=0)
    masks = from_torch_prune(net)
    assert masks.pruned_outputs
    x = torch.rand(1, 3, 64, 64, dtype=torch.float64)
    pm = _export_own_zeros(net, x)
    # resnet's readers are padded convs without bias: the constants are kept, and said so
    assert pm.spec.kept_zeros


def test_verification_is_against_the_users_model(x, monkeypatch):
    """A wrong fold (the plan and the mock agree on it) fails verification,
    and the model is restored."""
    from channelcut.pruning import zeros

    real = zeros._fold_delta
    monkeypatch.setattr(zeros, "_fold_delta", lambda *a: [v * 0.5 for v in real(*a)])
    net = _randomize(ZeroThenBN().double().eval())
    with torch.no_grad():
        net.conv1.weight[2] = 0
        net.bn1.bias[2] = 0.8
    state = {k: v.clone() for k, v in net.state_dict().items()}
    pm = PruningManager(net).compute([x])
    with pytest.raises(ExportError, match="verification failed"):
        pm.prune()
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    assert net.conv1.out_channels == 8


def test_constrained_export_of_own_zeros_reports_what_it_adds(x):
    """Constrained export grows the removed set beyond the model's zeros:
    the additions are reported and the reference zeroes exactly those."""

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 6, 3)
            self.b = nn.Conv2d(6, 4, 1)
            self.c = nn.Conv2d(6, 4, 1)

        def forward(self, x):
            h = self.a(x)
            return self.b(h) + self.c(h)

    net = _randomize(Two().double().eval())
    with torch.no_grad():
        net.b.weight[:, 1] = 0  # b ignores channel 1; c reads it
    ref_net = copy.deepcopy(net)
    pm = PruningManager(net).compute([x], constrained=True)
    assert [(a.param, a.channels) for a in pm.spec.additions] == [("c.weight", [1])]
    assert "b.weight[1]" in pm.spec.additions[0].reason
    pm.prune()
    with torch.no_grad():
        ref_net.c.weight[:, 1] = 0
        assert rel_error(net(x), ref_net(x)) <= RTOL
    assert net.a.out_channels == 5


class _FourierFeatures(nn.Module):
    """A conv reading the image concatenated with a positional encoding that
    forward computes from constants (sines and cosines of the row position)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3 + 8, 16, 3, padding=1)
        self.out = nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        rows = torch.linspace(-1, 1, h, dtype=x.dtype).view(1, 1, h, 1).expand(b, 1, h, w)
        freqs = torch.arange(1, 5, dtype=x.dtype).view(1, 4, 1, 1)
        enc = torch.cat([torch.sin(freqs * math.pi * rows), torch.cos(freqs * math.pi * rows)], 1)
        return self.out(torch.relu(self.conv(torch.cat([x, enc], 1))))


@pytest.mark.parametrize("constrained", [False, True], ids=["unconstrained", "constrained"])
def test_a_conv_reading_a_tensor_computed_from_constants(constrained):
    """Unconstrained: the requested encoding channels are dropped by a gather
    of the conv's input; constrained: they are pinned (their producer is no
    layer) and reported, the columns stay. Exact against the model with the
    request zeroed by hand either way."""
    torch.manual_seed(5)
    net = _FourierFeatures().double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    request = [("conv.weight", 1), ("conv.weight", 5), ("conv.weight", 9), ("out.weight", 2)]
    hand = copy.deepcopy(net)
    with torch.no_grad():
        hand.conv.weight[:, [1, 5, 9]] = 0
        hand.out.weight[:, 2] = 0
        want = hand(x)
    pm = PruningManager(net).compute([x], pruned_inputs=request, constrained=constrained)
    pm.prune()
    assert torch.allclose(net(x), want, rtol=1e-12, atol=1e-12)
    assert net.out.weight.shape[1] == 15
    if constrained:
        assert net.conv.weight.shape[1] == 11 and pm.spec.pinned_groups > 0
    else:
        assert net.conv.weight.shape[1] == 8 and pm.spec.copy_ops == 1
