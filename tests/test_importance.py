"""Each heuristic ranks a hand-built case the way its paper says it should."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from channelcut import MaskingManager
from channelcut.importance import FPGM, L1, L2, LAMP, ActivationNorm, BNScale, HRank, Taylor, Wanda, lamp_normalize

torch.set_num_threads(1)


def two_linear(cols: list) -> nn.Sequential:
    """Linear(4 -> n) then Linear(n -> m) whose input columns are ``cols``."""
    w = torch.tensor(cols, dtype=torch.float64).t().contiguous()  # (m, n)
    net = nn.Sequential(nn.Linear(4, w.shape[1]), nn.ReLU(), nn.Linear(w.shape[1], w.shape[0])).double()
    with torch.no_grad():
        net[2].weight.copy_(w)
    return net


def dropped(mm: MaskingManager, amount: float, **kw) -> list:
    return sorted(c for _, c in mm.select(amount, layers=["2"], ignore=[], **kw))


# magnitude ------------------------------------------------------------------

MAGNITUDE_COLS = [[1, 1, 1], [2.5, 0, 0], [0.1, 0.1, 0.1], [2, 2, 2], [0, 0, 2.9]]


def test_l1_and_l2_disagree_where_they_should():
    net = two_linear(MAGNITUDE_COLS)
    l1 = MaskingManager(net).importance(L1()).scores()["2.weight"]
    l2 = MaskingManager(net).importance(L2()).scores()["2.weight"]
    assert torch.allclose(l1, torch.tensor([3, 2.5, 0.3, 6, 2.9], dtype=torch.float64))
    assert torch.allclose(l2, torch.tensor([math.sqrt(3), 2.5, math.sqrt(0.03), math.sqrt(12), 2.9], dtype=torch.float64))
    # many small weights (column 0) beat one large one under L1, not under L2
    assert dropped(MaskingManager(net).importance(L1()), 0.4) == [1, 2]
    assert dropped(MaskingManager(net).importance(L2()), 0.4) == [0, 2]


def test_lamp_scores():
    assert lamp_normalize(torch.tensor([3.0, 1.0, 2.0])).tolist() == pytest.approx([1.0, 1 / 14, 4 / 13])
    net = two_linear(MAGNITUDE_COLS)
    lamp = MaskingManager(net).importance(LAMP()).scores()["2.weight"]
    l2 = MaskingManager(net).importance(L2()).scores()["2.weight"]
    assert torch.argsort(lamp).tolist() == torch.argsort(l2).tolist()  # same order within a layer
    assert float(lamp.max()) == 1.0
    sq = l2 ** 2  # ascending: 2, 0, 1, 4, 3
    assert float(lamp[0]) == pytest.approx(float(sq[0] / (sq[0] + sq[1] + sq[4] + sq[3])))


def test_lamp_global_is_scale_invariant_per_layer():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).double()
    x = torch.randn(3, 8, dtype=torch.float64)
    pick = lambda n: sorted(MaskingManager(n, [x]).importance(LAMP()).select(0.4, scope="global"))
    before = pick(net)
    with torch.no_grad():
        net[2].weight.mul_(1e-3)  # a layer of tiny weights: raw magnitudes would empty it first
    after = pick(net)
    assert before == after
    raw = sorted(c for n, c in MaskingManager(net, [x]).importance(L1()).select(0.4, scope="global") if n == "2.weight")
    assert len(raw) == len([c for n, c in after if n == "2.weight"])  # L1 global is LAMP-normalised too


# FPGM -------------------------------------------------------------------------


def test_fpgm_prunes_the_geometric_median_not_the_smallest():
    cols = [[20, 10], [10, 20], [0, 10], [10, 0], [10, 10]]  # column 4 is the median
    net = two_linear(cols)
    fpgm = MaskingManager(net).importance(FPGM()).scores()["2.weight"]
    assert int(torch.argmin(fpgm)) == 4
    assert dropped(MaskingManager(net).importance(FPGM()), 0.2) == [4]
    assert dropped(MaskingManager(net).importance(L2()), 0.2) == [2]  # L2 takes a short one


# HRank ------------------------------------------------------------------------


def rank_input(n: int = 4, size: int = 6) -> torch.Tensor:
    torch.manual_seed(0)
    x = torch.zeros(n, 4, size, size, dtype=torch.float64)
    for b in range(n):
        u, v = torch.randn(size, 3, dtype=torch.float64), torch.randn(3, size, dtype=torch.float64)
        x[b, 0] = u[:, :1] @ v[:1]  # rank 1
        x[b, 1] = torch.randn(size, size, dtype=torch.float64)  # full rank
        x[b, 2] = 100 * (u @ v)  # rank 3, large
        # channel 3 stays zero: rank 0
    return x


def test_hrank_ranks_feature_maps():
    x = rank_input()
    net = nn.Sequential(nn.Conv2d(4, 2, 1)).double()
    scores = MaskingManager(net).importance(HRank(data=[x])).scores()["0.weight"]
    assert torch.floor(scores).tolist() == [1, 6, 3, 0]
    assert torch.argsort(scores).tolist() == [3, 0, 2, 1]  # the large rank-3 map still loses to rank 6
    mm = MaskingManager(net, [x]).importance(HRank())  # example inputs as data
    assert sorted(c for _, c in mm.select(0.5, layers=["0"], ignore=[])) == [0, 3]


def test_hrank_on_tokens_breaks_ties_by_activation():
    x = torch.zeros(2, 5, 3, dtype=torch.float64)
    x[..., 0] = 1.0
    x[..., 1] = 0.1
    net = nn.Sequential(nn.Linear(3, 2)).double()
    scores = MaskingManager(net).importance(HRank([x])).scores()["0.weight"]
    assert torch.argsort(scores).tolist() == [2, 1, 0]
    assert float(scores[2]) == 0.0 and 1.0 <= float(scores[1]) < float(scores[0]) < 1.5


def test_hrank_needs_data():
    net = nn.Sequential(nn.Conv2d(3, 2, 1))
    with pytest.raises(ValueError, match="HRank needs example data"):
        MaskingManager(net).importance(HRank()).select(0.3)
    with pytest.raises(ValueError, match="max_batches"):
        HRank(max_batches=0)


# activations (Minitron) and Wanda ----------------------------------------------


def test_activation_norm_is_the_rms_of_what_each_layer_reads_over_every_position():
    """Two calibration batches of tokens; channel scales 3, 0.5, 0 (+ noise-free):
    the RMS over all positions of both batches, and the smallest goes first."""
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, 5, 3, generator=g, dtype=torch.float64) * torch.tensor([3.0, 0.5, 0.0], dtype=torch.float64)
               for _ in range(2)]
    net = nn.Sequential(nn.Linear(3, 2)).double()
    scores = MaskingManager(net).importance(ActivationNorm(data=batches)).scores()["0.weight"]
    flat = torch.cat([b.reshape(-1, 3) for b in batches])
    assert torch.allclose(scores, flat.pow(2).mean(0).sqrt())
    one = MaskingManager(net).importance(ActivationNorm(data=batches, max_batches=1)).scores()["0.weight"]
    assert torch.allclose(one, batches[0].reshape(-1, 3).pow(2).mean(0).sqrt())
    mm = MaskingManager(net, [batches[0]]).importance(ActivationNorm())  # example inputs as data
    assert sorted(c for _, c in mm.select(0.34, layers=["0"], ignore=[])) == [2]


def test_activation_norm_reads_conv_channels_over_batch_and_pixels():
    x = torch.ones(2, 3, 4, 4, dtype=torch.float64) * torch.tensor([1.0, 4.0, 2.0], dtype=torch.float64).view(1, 3, 1, 1)
    net = nn.Sequential(nn.Conv2d(3, 2, 1)).double()
    scores = MaskingManager(net).importance(ActivationNorm([x])).scores()["0.weight"]
    assert torch.allclose(scores, torch.tensor([1.0, 4.0, 2.0], dtype=torch.float64))


def test_wanda_weighs_a_column_by_its_activation_norm():
    """Column magnitudes 3, 1, 1 and activation RMS 0.1, 1, 2: Wanda keeps
    what carries signal through large weights (1*2 > 3*0.1), where L1 keeps
    the large column."""
    net = two_linear([[1, 1, 1], [0.5, 0.5, 0], [1, 0, 0]])
    net[0].weight.data.zero_()
    net[0].bias.data.copy_(torch.tensor([0.1, 1.0, 2.0], dtype=torch.float64))
    x = torch.randn(4, 4, dtype=torch.float64)
    wanda = MaskingManager(net).importance(Wanda([x])).scores()["2.weight"]
    assert torch.allclose(wanda, torch.tensor([3 * 0.1, 1 * 1.0, 1 * 2.0], dtype=torch.float64))
    assert torch.argsort(wanda).tolist() == [0, 1, 2]
    assert torch.argsort(MaskingManager(net).importance(L1()).scores()["2.weight"]).tolist()[-1] == 0


def test_activation_importances_need_data():
    net = nn.Sequential(nn.Linear(3, 2))
    for cls in (ActivationNorm, Wanda):
        with pytest.raises(ValueError, match=f"{cls.__name__} needs calibration data"):
            MaskingManager(net).importance(cls()).select(0.3)
    with pytest.raises(ValueError, match="max_batches"):
        Wanda(max_batches=0)


# Taylor -----------------------------------------------------------------------


def test_taylor_matches_first_order_formula():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double().train()
    x = torch.randn(5, 3, dtype=torch.float64)
    y = torch.randn(5, 2, dtype=torch.float64)
    loss_fn = lambda out, target: (out * target).sum()
    scores = MaskingManager(net).importance(Taylor(loss_fn, [(x, y)])).scores()
    # by hand: d loss / d W2[i, c] = sum_b y[b, i] h[b, c]
    h = torch.tanh(net[0](x)).detach()
    grad = y.t() @ h
    expected = (grad * net[2].weight.detach()).sum(0) ** 2
    assert torch.allclose(scores["2.weight"], expected)
    # the model is left as it was
    assert net.training and all(p.grad is None for p in net.parameters())
    # the channel whose removal changes the loss least goes first
    mm = MaskingManager(net).importance(Taylor(loss_fn, [(x, y)]))
    assert sorted(c for _, c in mm.select(0.25, layers=["2"], ignore=[])) == [int(torch.argmin(expected))]


def test_taylor_averages_batches_and_scores_outputs():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(3, 4)).double()
    batches = [(torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)) for _ in range(3)]
    loss_fn = lambda out, t: ((out - t) ** 2).sum()
    t = Taylor(loss_fn, batches)
    mm = MaskingManager(net).importance(t)
    got = mm.scores()["0.weight"]
    w, b = net[0].weight.detach(), net[0].bias.detach()
    exp = torch.zeros(3, dtype=torch.float64)
    exp_rows = torch.zeros(4, dtype=torch.float64)
    for xb, yb in batches:
        r = 2 * (xb @ w.t() + b - yb)  # d loss / d out
        gw = r.t() @ xb
        exp += (gw * w).sum(0) ** 2
        exp_rows += ((gw * w).sum(1) + r.sum(0) * b) ** 2
    assert torch.allclose(got, exp / 3)
    assert torch.allclose(t.score_outputs(mm._context())["0.weight"], exp_rows / 3)


def test_taylor_needs_loss_and_data():
    with pytest.raises(ValueError, match="loss function"):
        Taylor()
    with pytest.raises(ValueError, match="needs data"):
        Taylor(F.cross_entropy)


# BN scale ---------------------------------------------------------------------


def test_bnscale_reads_batchnorm_gamma():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1)).double().eval()
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([0.1, -2.0, 0.5, 1.0]))
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    mm = MaskingManager(net, [x]).importance(BNScale())
    assert mm.scores()["3.weight"].tolist() == pytest.approx([0.1, 2.0, 0.5, 1.0])
    assert sorted(c for _, c in mm.select(0.5, ignore=[])) == [0, 2]  # "3" is the head: ignored by default


def test_bnscale_sums_batchnorms_on_a_residual_stream():
    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 3, 1, bias=False), nn.Conv2d(3, 3, 1, bias=False)
            self.bna, self.bnb = nn.BatchNorm2d(3), nn.BatchNorm2d(3)
            self.c = nn.Conv2d(3, 2, 1)

        def forward(self, x):
            return self.c(self.bna(self.a(x)) + self.bnb(self.b(x)))

    net = Res().double().eval()
    with torch.no_grad():
        net.bna.weight.copy_(torch.tensor([1.0, 0.2, 3.0]))
        net.bnb.weight.copy_(torch.tensor([1.0, 0.3, -0.5]))
    mm = MaskingManager(net, [torch.randn(1, 3, 2, 2, dtype=torch.float64)]).importance(BNScale())
    assert mm.scores()["c.weight"].tolist() == pytest.approx([2.0, 0.5, 3.5])


def test_bnscale_needs_a_trace_and_a_batchnorm():
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="example inputs"):
        MaskingManager(net).importance(BNScale()).select(0.3)
    with pytest.raises(ValueError, match="no BatchNorm"):
        MaskingManager(net, [torch.randn(1, 3)]).importance(BNScale()).select(0.3)


def test_bnscale_without_inputs_reads_the_sequential_structure():
    """Where a Sequential says it unambiguously (conv, BatchNorm, activations,
    consumer), BNScale needs no example inputs and agrees with the traced
    scores; consumers it can not tie to one BatchNorm are not scored."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 5, 3), nn.BatchNorm2d(5), nn.ReLU(), nn.Dropout(0.1),
        nn.Conv2d(5, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    ).double().eval()
    with torch.no_grad():
        for bn in (net[1], net[5]):
            bn.weight.uniform_(-2, 2)
    untraced = MaskingManager(net).importance(BNScale()).scores()
    traced = MaskingManager(net, [torch.randn(1, 3, 12, 12, dtype=torch.float64)]).importance(BNScale()).scores()
    assert sorted(untraced) == ["4.weight", "8.weight"]
    for name, s in untraced.items():
        assert torch.allclose(s, traced[name]), name
    assert torch.equal(untraced["4.weight"], net[1].weight.detach().abs())


def test_importance_with_no_argument_is_l1():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
    a = MaskingManager(net).importance().select(0.25)
    b = MaskingManager(net).importance(L1()).select(0.25)
    assert a == b and a
