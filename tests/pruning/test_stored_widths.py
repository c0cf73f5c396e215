"""Width attributes on every code path (issue 16): attributes the model checks
a width against, attributes only an untraced code path reads, and functional
multi-head attention with its own projection weights.

Every export is compared in float64 with the independent reference (the
original model with the request zeroed by hand, ``tests/support/reference.py``).
"""

from __future__ import annotations

import copy
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from channelcut import PruningManager
from support.compare import assert_close
from support.reference import by_param, zeroed_reference

MODES = ["unconstrained", "constrained"]


def _request(m: PruningManager, seed: int, amount: float = 0.3):
    rng = random.Random(seed)
    return [(k, c) for k, n in sorted(m.consumers().items()) for c in rng.sample(range(n), int(amount * n))]


def _export(net: nn.Module, x: torch.Tensor, mode: str, seed: int = 0):
    """Prune ``net`` with a random 30% request; return (manager, reference output, request)."""
    m = PruningManager(net)
    m.trace([x])
    pairs = _request(m, seed)
    m.compute([x], pruned_inputs=pairs, constrained=(mode == "constrained"))
    removed = m.spec.removed_inputs()
    with torch.no_grad():
        ref = zeroed_reference(net, removed)(x)
    assert set(by_param(pairs)) <= set(removed), f"seed {seed}"
    m.prune()
    return m, ref, pairs


class SplitBlock(nn.Module):
    """ultralytics' C2f in small: ``forward`` chunks, ``forward_split`` (what
    its ONNX exporter swaps in) splits by the stored width ``self.c``."""

    def __init__(self, c1: int = 8, c2: int = 8) -> None:
        super().__init__()
        self.c = c2 // 2
        self.cv1 = nn.Conv2d(c1, 2 * self.c, 1)
        self.m = nn.Conv2d(self.c, self.c, 3, padding=1)
        self.cv2 = nn.Conv2d(3 * self.c, c2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x).chunk(2, 1))
        y.append(self.m(y[-1]))
        return self.cv2(torch.cat(y, 1))

    def forward_split(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x).split((self.c, self.c), 1))
        y.append(self.m(y[-1]))
        return self.cv2(torch.cat(y, 1))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seed", range(4))
def test_width_read_only_by_an_untraced_path_follows_the_channels(mode: str, seed: int) -> None:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 8, 1), SplitBlock(), nn.ReLU(), nn.Conv2d(8, 4, 1)).double().eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    m, ref, _ = _export(net, x, mode, seed)
    block = net[1]
    assert 2 * block.c == block.cv1.out_channels, f"seed {seed}"
    with torch.no_grad():
        assert_close(net(x), ref, what=f"seed {seed}")
        assert_close(block.forward_split(net[0](x)), block(net[0](x)), what=f"forward_split, seed {seed}")
    if block.c != 4:
        assert ("1", "c") in m.spec.inferred_attributes


class Checked(nn.Module):
    """diffusers' Upsample2D in small: asserts its input width against
    ``self.channels``; ``self.out_channels`` holds the same value but is
    another width (so neither may be guessed from the value alone)."""

    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = channels
        self.conv = nn.Conv2d(channels, self.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1] == self.channels
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seed", range(4))
def test_attribute_the_model_asserts_against_is_rewritten(mode: str, seed: int) -> None:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), Checked(), nn.ReLU(), nn.Conv2d(8, 4, 1)).double().eval()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    m, ref, _ = _export(net, x, mode, seed)
    up = net[2]
    assert up.channels == up.conv.in_channels, f"seed {seed}"
    with torch.no_grad():
        assert_close(net(x), ref, what=f"seed {seed}")
    # out_channels had the same value: not guessed (the conv holds its own width)
    assert ("2", "out_channels") not in m.spec.inferred_attributes


def test_attribute_whose_name_counts_something_else_is_left_alone() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.num_groups = 6  # same value as the width, but a count of groups
            self.conv1 = nn.Conv2d(3, 6, 1)
            self.conv2 = nn.Conv2d(6, 6, 1)

        def forward(self, x):
            return self.conv2(torch.relu(self.conv1(x)))

    net = Block().double().eval()
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    PruningManager(net).compute([x], pruned_inputs=[("conv2.weight", 0), ("conv2.weight", 3)]).prune()
    assert net.conv2.in_channels == 4 and net.num_groups == 6


def test_ambiguous_stored_width_is_reported_not_rewritten() -> None:
    class Two(nn.Module):
        """``self.width`` matches two tensors that end with different widths."""

        def __init__(self) -> None:
            super().__init__()
            self.width = 6
            self.a = nn.Conv2d(3, 6, 1)
            self.b = nn.Conv2d(3, 6, 1)
            self.ca = nn.Conv2d(6, 2, 1)
            self.cb = nn.Conv2d(6, 2, 1)

        def forward(self, x):
            return self.ca(torch.relu(self.a(x))) + self.cb(torch.tanh(self.b(x)))

    net = Two().double().eval()
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    m = PruningManager(net).compute([x], pruned_inputs=[("ca.weight", 0), ("cb.weight", 1), ("cb.weight", 2)])
    assert m.spec.stale_attributes == [("", "width", 6, [4, 5])]
    m.prune()
    assert net.width == 6


class AttentionPool(nn.Module):
    """CLIP's ResNet attention pooling in small: ``F.multi_head_attention_forward``
    with separate projection weights and the width taken from the input."""

    def __init__(self, dim: int = 16, heads: int = 4, out: int = 6) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.randn(5, dim) / dim ** 0.5)
        self.k_proj, self.q_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.c_proj = nn.Linear(dim, out)
        self.num_heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(2).permute(2, 0, 1)  # (HW, N, C)
        x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0) + self.pos[:, None, :]
        x, _ = F.multi_head_attention_forward(
            query=x[:1], key=x, value=x, embed_dim_to_check=x.shape[-1], num_heads=self.num_heads,
            q_proj_weight=self.q_proj.weight, k_proj_weight=self.k_proj.weight, v_proj_weight=self.v_proj.weight,
            in_proj_weight=None, in_proj_bias=torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]),
            bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0, out_proj_weight=self.c_proj.weight,
            out_proj_bias=self.c_proj.bias, use_separate_proj_weight=True, training=self.training, need_weights=False)
        return x.squeeze(0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seed", range(3))
def test_functional_attention_with_its_own_weights_is_exact(mode: str, seed: int) -> None:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 16, 1), nn.ReLU(), nn.Conv2d(16, 16, 1), AttentionPool(), nn.Linear(6, 3))
    net = net.double().eval()
    x = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    m, ref, _ = _export(net, x, mode, seed)
    with torch.no_grad():
        assert_close(net(x), ref, what=f"seed {seed}")
    reasons = {g.pinned for g in m.channel_groups() if g.pinned}
    assert any("multi_head_attention_forward" in r for r in reasons), reasons
    # the output projection's rows stay free: the classifier reads fewer
    assert net[4].in_features == 6 - len(m.spec.requested.get("4.weight", []))


class _ReshapesToItsWidth(nn.Module):
    """A router that reshapes its input to ``self.hidden_dim`` before its own
    linear (Mixtral's ``MixtralTopKRouter``)."""

    def __init__(self, hidden: int, experts: int) -> None:
        super().__init__()
        self.hidden_dim = hidden
        self.weight = nn.Parameter(torch.randn(experts, hidden, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, self.hidden_dim)
        return F.linear(x, self.weight)


class _StreamWithRouter(nn.Module):
    """A stream read by the router and by another linear that keeps every channel."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.router = _ReshapesToItsWidth(8, 3)
        self.other = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return torch.cat([self.router(h), self.other(h).reshape(-1, 2)], -1)


def test_a_consumer_whose_module_reshapes_to_a_stored_width_reads_zero_columns():
    """The router's input can not be narrowed (its reshape reads the stream's
    width, which another reader keeps): its dropped inputs become zero
    columns instead of a subset read, and the export is verified (it failed
    verification with "shape '[-1, 8]' is invalid", as tiny Mixtral and
    Qwen2-MoE did)."""
    torch.manual_seed(4)
    net = _StreamWithRouter().double()
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    with torch.no_grad():
        hand = copy.deepcopy(net)
        hand.router.weight[:, [0, 5]] = 0
        want = hand(x)
    pm = PruningManager(net).compute([x], pruned_inputs=[("router.weight", 0), ("router.weight", 5)])
    assert pm.spec.copy_ops == 0
    pm.prune()
    assert torch.allclose(net(x), want, rtol=1e-12, atol=1e-12)
    assert net.router.hidden_dim == 8 and net.a.out_features == 8
