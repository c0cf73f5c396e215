"""MaskingManager: the API contract (amounts, safety, ignore, round_to) and
that masks export correctly (mock == pruned in float64, constrained = no copies)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune as torch_prune

from channelcut import MaskingManager, PruningManager
from channelcut.importance import FPGM, L1, L2, LAMP, BNScale, HRank, Importance, Taylor
from channelcut.masking import from_torch_prune

torch.set_num_threads(1)


def count_for(amount: float, n: int) -> int:
    """The expected number of channels removed: amount * n, rounded half up."""
    return int(math.floor(amount * n + 0.5))


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.down is None else self.down(x)))


class ResNetish(nn.Module):
    """Residual streams, a stride-2 downsample, a concat branch and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.layer1 = nn.Sequential(Block(16, 16), Block(16, 16))
        self.layer2 = nn.Sequential(Block(16, 24, 2), Block(24, 24))
        self.branch_a = nn.Conv2d(24, 12, 1)
        self.branch_b = nn.Conv2d(24, 20, 1)
        self.mix = nn.Conv2d(32, 24, 1)
        self.fc = nn.Linear(24, 10)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = self.layer2(self.layer1(x))
        x = self.mix(torch.cat([F.relu(self.branch_a(x)), F.relu(self.branch_b(x))], 1))
        return self.fc(x.mean((2, 3)))


def make_net(seed: int = 0) -> ResNetish:
    torch.manual_seed(seed)
    net = ResNetish().double().eval()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
            m.running_var.data.uniform_(0.5, 2.0)
    return net


@pytest.fixture
def x():
    torch.manual_seed(1)
    return torch.randn(2, 3, 8, 8, dtype=torch.float64)


def weight(net: nn.Module, name: str) -> torch.Tensor:
    return dict(net.named_parameters())[name]


def zero_cols(w: torch.Tensor) -> int:
    return int((w.detach() == 0).flatten(2).all(2).all(0).sum()) if w.dim() == 4 else int((w.detach() == 0).all(0).sum())


def export_and_check(net: nn.Module, x: torch.Tensor, **kw) -> PruningManager:
    """Export the zeroed channels; pruned == mock == masked model, in float64."""
    with torch.no_grad():
        masked = net(x)
        pm = PruningManager(net).compute([x], **kw)
        mock = pm.get_mock_model()(x)
        pm.prune()
        pruned = net(x)
    assert torch.allclose(mock, masked, rtol=0, atol=1e-12)
    assert torch.allclose(pruned, mock, rtol=0, atol=1e-12)
    return pm


# ---------------------------------------------------------------------------
# amounts
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("amount", [0.1, 0.3, 0.5, 0.7])
def test_unconstrained_local_amount_per_layer(x, amount):
    net = make_net()
    mm = MaskingManager(net, [x]).importance(L1()).mask(amount)
    sel = mm.selection
    assert set(sel.layers) == set(mm.layers()) - {"fc.weight", "stem.weight"}
    for name, (n, k) in sel.layers.items():
        assert k == min(count_for(amount, n), n - 1), name
        assert zero_cols(weight(net, name)) == k, name
    # head and stem untouched
    assert zero_cols(net.fc.weight) == 0 and zero_cols(net.stem.weight) == 0


@pytest.mark.parametrize("amount", [0.2, 0.5])
def test_unconstrained_global_amount_total(x, amount):
    net = make_net()
    mm = MaskingManager(net, [x]).importance(L2()).mask(amount, scope="global")
    total = sum(n for n, _ in mm.selection.layers.values())
    removed = sum(k for _, k in mm.selection.layers.values())
    assert removed == count_for(amount, total)
    per_layer = {k for _, k in mm.selection.layers.values()}
    assert len(per_layer) > 1  # global: layers lose different amounts


@pytest.mark.parametrize("scope", ["local", "global"])
def test_constrained_amount(x, scope):
    net = make_net()
    mm = MaskingManager(net, [x]).importance(LAMP())
    mm.mask(0.5, mode="constrained", scope=scope)
    sel = mm.selection
    if scope == "local":
        for seg, (n, k) in sel.segments.items():
            assert k == count_for(0.5, n), seg
    else:
        total = sum(n for n, _ in sel.segments.values())
        assert sum(k for _, k in sel.segments.values()) == count_for(0.5, total)
    assert sel.removed_groups


class Contrarian(Importance):
    """Ranks the largest columns lowest: zeroed columns look most important."""

    def score_inputs(self, ctx):
        return {n: -L1()._score(r.channel_matrix()) for n, r in ctx.consumers.items()}


def test_already_zero_channels_count_as_removed(x):
    net = make_net()
    mm = MaskingManager(net, [x]).importance(L1())
    mm.mask(0.25)
    first = set(mm.selection.pruned_inputs)
    mm.importance(Contrarian()).mask(0.5)  # iterative pruning: 50% in all, not 25% + 50%
    second = set(mm.selection.pruned_inputs)
    assert first <= second
    for name, (n, _k) in mm.selection.layers.items():
        assert zero_cols(weight(net, name)) == count_for(0.5, n)


def test_amount_zero_is_a_no_op(x):
    net = make_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    MaskingManager(net, [x]).mask(0.0)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


# ---------------------------------------------------------------------------
# safety: never empty, round_to, ignore
# ---------------------------------------------------------------------------


class Lopsided(Importance):
    """Scores one layer far below the rest, without normalisation: a global
    ranking would take that whole layer first."""

    def score_inputs(self, ctx):
        return {n: torch.arange(r.channels, dtype=torch.float64) + (0 if n == "layer1.0.conv2.weight" else 1e6) for n, r in ctx.consumers.items()}

    def normalize(self, scores):
        return scores.double()


@pytest.mark.parametrize("mode", ["unconstrained", "constrained"])
@pytest.mark.parametrize("scope", ["local", "global"])
def test_layers_never_empty(x, mode, scope):
    net = make_net()
    mm = MaskingManager(net, [x]).importance(Lopsided())
    mm.mask(0.95, mode=mode, scope=scope)
    pm = export_and_check(net, x)
    for name, (_before, after) in pm.spec.kept().items():
        assert after >= 1, name
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            assert m.in_channels >= 1 and m.out_channels >= 1
    if mode == "unconstrained" and scope == "global":
        assert mm.selection.layers["layer1.0.conv2.weight"] == (16, 15)


def test_global_takes_the_remainder_elsewhere(x):
    # the lopsided layer can give at most 15 of its 16 channels; the rest of the
    # global amount comes from other layers, so the total is still exact
    net = make_net()
    mm = MaskingManager(net, [x]).importance(Lopsided())
    mm.select(0.6, scope="global", ignore=["fc", "mix"])
    assert mm.selection.layers["layer1.0.conv2.weight"] == (16, 15)
    total = sum(n for n, _ in mm.selection.layers.values())
    assert sum(k for _, k in mm.selection.layers.values()) == count_for(0.6, total)


def test_producer_kept_non_empty_under_concat():
    # branch_a's outputs are only read by `mix`, through a concat: if mix drops all
    # of them, branch_a would be emptied; the selection must keep one.
    torch.manual_seed(0)
    net = make_net()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)

    class PreferB(Importance):
        def score_inputs(self, ctx):
            out = {n: torch.ones(r.channels, dtype=torch.float64) for n, r in ctx.consumers.items()}
            out["mix.weight"] = torch.cat([torch.zeros(12), torch.ones(20)]).double()
            return out

    mm = MaskingManager(net, [x]).importance(PreferB())
    mm.mask(0.5, ignore=["fc"], layers=["mix"])
    assert mm.selection.layers["mix.weight"][1] == 15  # 16 asked, one branch_a channel restored
    export_and_check(net, x)
    assert net.branch_a.out_channels == 1


@pytest.mark.parametrize("mode", ["unconstrained", "constrained"])
def test_round_to(x, mode):
    net = make_net()
    mm = MaskingManager(net, [x]).importance(L1())
    mm.mask(0.3, mode=mode, round_to=8)
    sel = mm.selection
    if mode == "unconstrained":
        for name, (n, k) in sel.layers.items():
            assert (n - k) % 8 == 0 and n - k >= 8, (name, n, k)
        assert any(k for _, k in sel.layers.values())
    else:
        segs = {s.id: s for s in mm.segments()}
        for sid, (_, k) in sel.segments.items():
            width = segs[sid].width
            assert k == 0 or (width - k) % 8 == 0, (sid, width, k)
        assert sel.removed_groups
    export_and_check(net, x)


def test_ignore_and_head(x):
    net = make_net()
    mm = MaskingManager(net, [x])
    assert mm.head == "fc.weight"
    mm.mask(0.5, ignore=["layer1.0.conv1", "layer2.1.conv2.weight"])
    assert zero_cols(net.layer1[0].conv1.weight) == 0
    assert zero_cols(net.layer2[1].conv2.weight) == 0
    # an explicit ignore list replaces the default (the head), so fc is pruned too
    assert mm.selection.layers["fc.weight"] == (24, 12) and zero_cols(net.fc.weight) == 12
    assert "layer1.0.conv1.weight" not in mm.selection.layers
    export_and_check(net, x)
    # ignored layers keep their width: inputs and outputs
    assert net.layer1[0].conv1.in_channels == 16 and net.layer1[0].conv1.out_channels == 16


def test_head_ignored_by_default(x):
    net = make_net()
    mm = MaskingManager(net, [x]).importance(L1()).mask(0.5)
    assert "fc.weight" not in mm.selection.layers and zero_cols(net.fc.weight) == 0
    MaskingManager(net, [x]).importance(L1()).mask(0.5, ignore=[])
    assert zero_cols(net.fc.weight) == 12


def test_unknown_ignore_name(x):
    mm = MaskingManager(make_net(), [x])
    with pytest.raises(ValueError, match=r"unknown layer 'layer1\.0\.conv3'.*Did you mean 'layer1\.0\.conv[12]'"):
        mm.mask(0.3, ignore=["layer1.0.conv3"])
    with pytest.raises(ValueError, match="Valid names"):
        mm.select(0.3, layers=["nope"])


# ---------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:BNScale.*could not score")  # `mix` reads no BatchNorm
@pytest.mark.parametrize("heuristic", [L1(), LAMP(), FPGM(), HRank(), BNScale()], ids=repr)
@pytest.mark.parametrize("scope", ["local", "global"])
def test_unconstrained_masks_export(x, heuristic, scope):
    net = make_net()
    params_before = sum(p.numel() for p in net.parameters())
    MaskingManager(net, [x]).importance(heuristic).mask(0.4, scope=scope)
    pm = export_and_check(net, x)
    assert sum(p.numel() for p in net.parameters()) < params_before
    assert any(after < before for before, after in pm.spec.kept().values())


@pytest.mark.filterwarnings("ignore:BNScale.*could not score")
@pytest.mark.parametrize("heuristic", [L2(), FPGM(), BNScale()], ids=repr)
@pytest.mark.parametrize("scope", ["local", "global"])
def test_constrained_masks_export_without_copies(x, heuristic, scope):
    net = make_net()
    mm = MaskingManager(net, [x]).importance(heuristic).mask(0.4, mode="constrained", scope=scope)
    removed = len(mm.selection.removed_groups)
    pm = export_and_check(net, x)
    assert pm.spec.copied_channels == 0
    assert not pm.spec.subselections
    assert pm.spec.removed_groups == removed
    pm2 = PruningManager(make_net()).compute([x], pruned_inputs=mm.selection.pruned_inputs, constrained=True)
    assert pm2.spec.removed_groups == removed


def test_select_does_not_touch_weights_and_matches_mask(x):
    net = make_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    pairs = MaskingManager(net, [x]).importance(L1()).select(0.3, mode="unconstrained")
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert pairs and all(isinstance(n, str) and isinstance(c, int) for n, c in pairs)
    by_pairs = PruningManager(net).compute([x], pruned_inputs=pairs).spec
    net2 = make_net()
    MaskingManager(net2, [x]).importance(L1()).mask(0.3)
    by_zeros = PruningManager(net2).compute([x]).spec
    assert by_pairs.kept() == by_zeros.kept()
    assert by_pairs.copied_channels == by_zeros.copied_channels


def test_taylor_masks_export(x):
    net = make_net()
    y = torch.tensor([1, 7])
    MaskingManager(net, [x]).importance(Taylor(F.cross_entropy, [(x, y)])).mask(0.3, mode="constrained")
    assert export_and_check(net, x).spec.copied_channels == 0


def test_segments(x):
    mm = MaskingManager(make_net(), [x])
    segs = mm.segments()
    ids = [g.id for s in segs for g in s.groups]
    assert len(ids) == len(set(ids))
    # the layer1 residual stream: stem and both blocks' conv2 emit the same channels
    stream = [s for s in segs if "stem.weight" in s.producers]
    assert len(stream) == 1
    assert {"layer1.0.conv2.weight", "layer1.1.conv2.weight"} <= set(stream[0].producers)
    assert stream[0].width == 16
    # a concat joins both branches into one segment, read by `mix`
    cat = [s for s in segs if "branch_a.weight" in s.producers]
    assert len(cat) == 1 and "branch_b.weight" in cat[0].producers and cat[0].width == 32
    # the head's outputs are pinned
    head = [s for s in segs if "fc.weight" in s.producers][0]
    assert not head.removable


def test_without_example_inputs():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 16, 10))
    mm = MaskingManager(net).importance(LAMP()).mask(amount=0.25)
    assert mm.head == "5.weight"
    assert mm.selection.layers["2.weight"] == (16, 4)
    assert "5.weight" not in mm.selection.layers
    x = torch.rand(1, 3, 8, 8)
    _ = PruningManager(net).compute([x]).prune()
    assert net[2].in_channels == 12 and net[0].out_channels == 12
    with pytest.raises(ValueError, match="example_inputs"):
        MaskingManager(net).select(0.3, mode="constrained")
    with pytest.raises(ValueError, match="example_inputs"):
        MaskingManager(net).segments()
    with pytest.raises(ValueError, match="example_inputs"):
        MaskingManager(net).importance(BNScale()).select(0.3)


def test_transformer_mlp_layers_only():
    torch.manual_seed(0)

    class MLPBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(16)
            self.up = nn.Linear(16, 64)
            self.down = nn.Linear(64, 16)

        def forward(self, h):
            return h + self.down(F.gelu(self.up(self.norm(h))))

    net = nn.Sequential(MLPBlock(), MLPBlock()).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    mm = MaskingManager(net, [x]).importance(L2())
    mm.mask(0.5, layers=["0.down", "1.down"], ignore=[])
    assert set(mm.selection.layers) == {"0.down.weight", "1.down.weight"}
    export_and_check(net, x)
    assert net[0].up.out_features == 32 and net[1].down.in_features == 32
    assert net[0].down.out_features == 16


def test_bad_arguments(x):
    mm = MaskingManager(make_net(), [x])
    for amount in (-0.1, 1.0, 1.5, "0.3", True, None):
        with pytest.raises(ValueError, match=r"amount must be a fraction in \[0, 1\)"):
            mm.select(amount)
    with pytest.raises(ValueError, match="'unconstrained', 'constrained'"):
        mm.select(0.3, mode="strict")
    with pytest.raises(ValueError, match="'local', 'global'"):
        mm.select(0.3, scope="layer")
    for r in (0, -8, 2.5):
        with pytest.raises(ValueError, match="round_to"):
            mm.select(0.3, round_to=r)
    with pytest.raises(TypeError, match=r"importance\(L1\(\)\)"):
        mm.importance(L1)
    with pytest.raises(TypeError):
        MaskingManager("not a model")


# ---------------------------------------------------------------------------
# torch.nn.utils.prune masks
# ---------------------------------------------------------------------------


def test_from_torch_prune_structured(x):
    net = make_net()
    torch_prune.ln_structured(net.layer1[0].conv2, "weight", amount=0.5, n=1, dim=1)  # inputs
    torch_prune.ln_structured(net.layer2[0].conv1, "weight", amount=0.25, n=2, dim=0)  # filters, no bias
    torch_prune.random_unstructured(net.layer2[1].conv1, "weight", amount=0.3)  # no whole channel
    with torch.no_grad():
        masked = net(x)
    masks = from_torch_prune(net)
    assert sorted({n for n, _ in masks.pruned_inputs}) == ["layer1.0.conv2.weight"]
    assert len(masks.pruned_inputs) == 8
    assert [n for n, _ in masks.pruned_outputs] == ["layer2.0.conv1.weight"] * 6
    assert not any(hasattr(m, "weight_orig") or hasattr(m, "weight_mask") for m in net.modules())
    assert isinstance(net.layer1[0].conv2.weight, nn.Parameter)
    with torch.no_grad():
        assert torch.equal(net(x), masked)
    pm = PruningManager(net).compute([x], pruned_inputs=masks.pruned_inputs, pruned_outputs=masks.pruned_outputs)
    mock = pm.get_mock_model()(x).detach()
    pm.prune()
    assert net.layer1[0].conv2.in_channels == 8 and net.layer1[0].conv1.out_channels == 8
    assert net.layer2[0].conv1.out_channels == 18 and net.layer2[0].conv2.in_channels == 18
    with torch.no_grad():
        assert torch.allclose(net(x), mock, rtol=0, atol=1e-12)


def test_from_torch_prune_zero_detection_and_bias(x):
    net = make_net()
    torch_prune.ln_structured(net.layer1[0].conv2, "weight", amount=0.5, n=1, dim=1)
    torch_prune.ln_structured(net.branch_a, "weight", amount=0.5, n=1, dim=0)  # has a bias
    with pytest.warns(UserWarning, match="non-zero bias"):
        masks = from_torch_prune(net, remove=False)
    assert hasattr(net.branch_a, "weight_orig")  # remove=False leaves the model alone
    assert not masks.pruned_outputs
    # pruning the bias with the same rows makes them removable
    torch_prune.custom_from_mask(net.branch_a, "bias", net.branch_a.weight_mask.flatten(1).any(1).double())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        masks = from_torch_prune(net)
    assert len(masks.pruned_outputs) == 6
    pm = export_and_check(net, x)  # plain zeroed weights: found by zero detection
    assert net.layer1[0].conv2.in_channels == 8 and net.branch_a.out_channels == 6
    assert pm.spec.kept()["branch_a.weight"] == (12, 6)


def test_from_torch_prune_needs_masks():
    with pytest.raises(ValueError, match="no torch.nn.utils.prune masks"):
        from_torch_prune(nn.Linear(3, 3))
