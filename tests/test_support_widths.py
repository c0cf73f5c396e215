"""The widths oracle (``support.widths.check_widths``, invariant 8) itself: it
passes real pruned models and names every stale width attribute it is shown,
in particular those a forward pass never reads."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from channelcut import PruningManager
from support.widths import check_widths

D = torch.float64


class AttnNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.att = nn.MultiheadAttention(8, 4, batch_first=True)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.att(x, x, x, need_weights=False)[0])


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.bn, self.c2 = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1)
        self.gn, self.head = nn.GroupNorm(2, 4), nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.gn(self.c2(torch.relu(self.bn(self.c1(x))))))


def _pruned_attention():
    torch.manual_seed(0)
    net = AttnNet().to(D).eval()
    x = torch.randn(2, 5, 8, dtype=D)
    # out_proj reads heads 1 (channels 2, 3): the head goes
    PruningManager(net).compute([x], pruned_inputs=[("att.out_proj.weight", 2), ("att.out_proj.weight", 3)]).prune()
    return net, x


def test_a_pruned_attention_layer_is_consistent_and_a_stale_head_count_is_named():
    net, x = _pruned_attention()
    assert net.att.num_heads == 3 and check_widths(net, [x]) == []
    net.att.num_heads = 4  # what the layer had: the forward never reads it
    y = net(x)
    assert y.shape == (2, 5, 3)
    problems = check_widths(net, [x])
    assert any(p.startswith("att: ") and "num_heads * head_dim = 4 * 2 = 8" in p for p in problems), problems
    net.att.num_heads, net.att.embed_dim = 3, 9
    assert any("embed_dim=9: out_proj writes 8" in p for p in check_widths(net)), check_widths(net)


@pytest.mark.parametrize("attr,value,expected", [
    ("bn.num_features", 8, "num_features=8"),
    ("c2.in_channels", 8, "in_channels=8"),
    ("gn.num_channels", 6, "num_channels=6"),
    ("c1.out_channels", 8, "out_channels=8"),
])
def test_a_stale_attribute_after_pruning_is_named(attr, value, expected):
    torch.manual_seed(0)
    net = ConvNet().to(D).eval()
    x = torch.randn(2, 3, 6, 6, dtype=D)
    PruningManager(net).compute([x], pruned_outputs=[("c1.weight", 1)], pruned_inputs=[("head.weight", 0)]).prune()
    assert check_widths(net, [x]) == []
    mod, _, name = attr.rpartition(".")
    setattr(net.get_submodule(mod), name, value)
    problems = check_widths(net)
    assert any(p.startswith(f"{mod}: ") and expected in p for p in problems), problems


def test_group_norm_groups_must_divide_its_channels():
    gn = nn.GroupNorm(2, 4)
    gn.num_groups = 3
    assert any("does not divide" in p for p in check_widths(gn))


class TwoReaders(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.stem(x))
        return self.a(y) + self.b(y)


def test_subselect_layers_are_checked_against_their_selection_and_their_input():
    torch.manual_seed(0)
    net = TwoReaders().to(D).eval()
    x = torch.randn(1, 3, 4, 4, dtype=D)
    # b keeps stem channel 1, so it stays; a reads the other three (a view of 1..3)
    PruningManager(net).compute([x], pruned_inputs=[("a.weight", 0)], copy_cost=0).prune()
    assert net.a.subselect_indices == [1, 2, 3] and check_widths(net, [x]) == []
    net.a.subselect_input_channels = 5  # its input has 4 channels
    problems = check_widths(net, [x])
    assert any("a: subselect_input_channels=5, but its input has 4 channels" in p for p in problems), problems
    net.a.subselect_input_channels = 4
    net.a.subselect_start += 1  # the range no longer starts at the first index
    assert any(p.startswith("a: subselect_start=2") for p in check_widths(net)), check_widths(net)
