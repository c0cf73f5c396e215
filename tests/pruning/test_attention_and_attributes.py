"""Head pruning through attention, attributes rewritten from literal sizes,
integer index buffers: mock == pruned in float64, and the shapes that change."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import channelcut
from channelcut import NotPrunableError, PruningManager

D = torch.float64


class Attn(nn.Module):
    """Heads split with -1 (as Hugging Face BERT does): heads can be removed."""

    def __init__(self, dim: int = 16, head_dim: int = 4, sdpa: bool = True) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.head_dim, self.sdpa = head_dim, sdpa

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (f(x).view(b, n, -1, self.head_dim).transpose(1, 2) for f in (self.q, self.k, self.v))
        if self.sdpa:
            o = F.scaled_dot_product_attention(q, k, v)
        else:
            o = (q @ k.transpose(-1, -2) * self.head_dim ** -0.5).softmax(-1) @ v
        return self.o(o.transpose(1, 2).reshape(b, n, -1))


@pytest.mark.parametrize("sdpa", [True, False], ids=["sdpa", "matmul"])
def test_removing_one_query_channel_removes_its_whole_head(sdpa: bool) -> None:
    torch.manual_seed(0)
    net = Attn(sdpa=sdpa).to(D).eval()
    x = torch.randn(2, 5, 16, dtype=D)
    m = PruningManager(net).compute([x], pruned_outputs=[("q.weight", 5)])
    # head 1 (channels 4..7) goes from q, k and v; o reads 12 channels
    assert m.spec.kept()["q.weight"] == (16, 12) == m.spec.kept()["k.weight"] == m.spec.kept()["v.weight"]
    y_mock = m.get_mock_model()(x)
    m.prune()
    assert net.o.in_features == 12
    assert torch.allclose(net(x), y_mock, rtol=1e-10, atol=1e-12)


def test_literal_head_count_keeps_attention_whole() -> None:
    """view(b, n, 4, 4) with literals: nothing tells which dim may shrink."""

    class Literal(Attn):
        def forward(self, x):
            b, n, _ = x.shape
            q, k, v = (f(x).view(b, n, 4, 4).transpose(1, 2) for f in (self.q, self.k, self.v))
            o = F.scaled_dot_product_attention(q, k, v)
            return self.o(o.transpose(1, 2).reshape(b, n, 16))

    net = Literal().to(D).eval()
    x = torch.randn(2, 5, 16, dtype=D)
    with pytest.raises(NotPrunableError, match="q.weight"):
        PruningManager(net).compute([x], pruned_outputs=[("q.weight", 5)])


class HeadCountAttn(nn.Module):
    """timm's ViT attention: heads split with the literal ``self.num_heads`` and
    merged with ``self.attn_dim`` (both plain int attributes)."""

    def __init__(self, dim: int = 12, num_heads: int = 3, head_dim: int = 4) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.attn_dim = num_heads, head_dim, num_heads * head_dim
        self.qkv = nn.Linear(dim, 3 * self.attn_dim)
        self.proj = nn.Linear(self.attn_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        o = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(o.transpose(1, 2).reshape(b, n, self.attn_dim))


@pytest.mark.parametrize("mode", ["unconstrained", "constrained"])
@pytest.mark.parametrize("heads", [3, 4], ids=["heads_equal_qkv_factor", "four_heads"])
def test_literal_num_heads_attribute_is_rewritten(mode: str, heads: int) -> None:
    """With 3 heads the reshape is (3, 3, 4): only the attribute's identity
    tells which 3 counts heads."""
    torch.manual_seed(heads)
    net = nn.Sequential(HeadCountAttn(num_heads=heads), nn.Linear(12, 2)).to(D).eval()
    x = torch.randn(2, 5, 12, dtype=D)
    m = PruningManager(net)
    m.trace([x])
    # drop head 1 from the output projection's input: it goes from q, k and v
    request = [("0.proj.weight", c) for c in range(4, 8)] + [("1.weight", 0)]
    m.compute([x], pruned_inputs=request, constrained=(mode == "constrained"))
    y_mock = m.get_mock_model()(x)
    m.prune()
    att = net[0]
    assert (att.num_heads, att.attn_dim, att.head_dim) == (heads - 1, 4 * (heads - 1), 4)
    assert att.qkv.weight.shape[0] == 3 * 4 * (heads - 1)
    assert type(att.num_heads) is int  # the tracing marker is gone
    assert torch.allclose(net(x), y_mock, rtol=1e-10, atol=1e-12)
    m.undo()
    assert (att.num_heads, att.attn_dim) == (heads, 4 * heads) and type(att.num_heads) is int


class StreamSizedAttn(nn.Module):
    """CaiT/Twins/NesT style: the head size is computed from the input's
    width (``C // self.num_heads``) and the heads are merged back to ``C``;
    BEiT style bias: ``cat((q_bias, k_bias, v_bias))`` with a zero buffer."""

    def __init__(self, dim: int = 12, num_heads: int = 3) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.randn(dim))
        self.v_bias = nn.Parameter(torch.randn(dim))
        self.register_buffer("k_bias", torch.zeros(dim), persistent=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(o.transpose(1, 2).reshape(b, n, c))


@pytest.mark.parametrize("mode", ["unconstrained", "constrained"])
def test_head_size_computed_from_the_stream_width(mode: str) -> None:
    torch.manual_seed(7)
    net = nn.Sequential(nn.Linear(5, 12), StreamSizedAttn(), nn.Linear(12, 2)).to(D).eval()
    x = torch.randn(2, 4, 5, dtype=D)
    m = PruningManager(net)
    m.trace([x])
    assert not m.graph.barriers
    # the stream is as wide as q, k and v: dropping head 2's channels from
    # everything that reads the stream removes the head and shrinks C
    request = [(p, c) for p in ("1.qkv.weight", "1.proj.weight", "2.weight") for c in range(8, 12)]
    m.compute([x], pruned_inputs=request, constrained=(mode == "constrained"))
    y_mock = m.get_mock_model()(x)
    m.prune()
    att = net[1]
    assert att.num_heads == 2 and att.qkv.weight.shape == (24, 8)
    assert att.q_bias.shape == att.k_bias.shape == att.v_bias.shape == (8,)
    assert torch.allclose(net(x), y_mock, rtol=1e-10, atol=1e-12)


class MixedConv(nn.Module):
    """MixNet: ``torch.split(x, self.splits, 1)``, a conv per section, cat."""

    def __init__(self) -> None:
        super().__init__()
        self.splits = [3, 5]
        self.convs = nn.ModuleList([nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.Conv2d(5, 6, 5, padding=2, bias=False)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([c(p) for c, p in zip(self.convs, torch.split(x, self.splits, 1))], 1)


class KeyValueSplit(nn.Module):
    """LeViT: ``view(B, N, heads, -1).split([self.key_dim, self.key_dim, self.val_dim], dim=3)``."""

    def __init__(self, dim: int = 8, num_heads: int = 2, key_dim: int = 3, val_dim: int = 5) -> None:
        super().__init__()
        self.num_heads, self.key_dim, self.val_dim = num_heads, key_dim, val_dim
        self.val_attn_dim = num_heads * val_dim
        self.qkv = nn.Linear(dim, num_heads * (2 * key_dim + val_dim))
        self.proj = nn.Linear(self.val_attn_dim, dim)
        self.scale = key_dim ** -0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, self.num_heads, -1).split([self.key_dim, self.key_dim, self.val_dim], dim=3)
        q, k, v = q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)
        attn = (q @ k.transpose(-2, -1) * self.scale).softmax(-1)
        return x + self.proj((attn @ v).transpose(1, 2).reshape(b, n, self.val_attn_dim))


@pytest.mark.parametrize("mode", ["unconstrained", "constrained"])
def test_split_sections_held_by_the_module_are_rewritten(mode: str) -> None:
    torch.manual_seed(8)
    net = nn.Sequential(nn.Conv2d(2, 8, 1), MixedConv(), nn.Conv2d(10, 2, 1)).to(D).eval()
    x = torch.randn(2, 2, 6, 6, dtype=D)
    request = [("1.convs.0.weight", 1), ("1.convs.1.weight", 0), ("1.convs.1.weight", 4), ("2.weight", 9)]
    m = PruningManager(net).compute([x], pruned_inputs=request, constrained=(mode == "constrained"))
    y_mock = m.get_mock_model()(x)
    m.prune()
    assert net[1].splits == [2, 3]
    assert net[0].out_channels == 5
    assert torch.allclose(net(x), y_mock, rtol=1e-10, atol=1e-12)
    m.undo()
    assert net[1].splits == [3, 5]


@pytest.mark.parametrize("mode", ["unconstrained", "constrained"])
def test_key_and_value_sections_shrink_with_their_attributes(mode: str) -> None:
    torch.manual_seed(9)
    net = nn.Sequential(KeyValueSplit(), nn.Linear(8, 2)).to(D).eval()
    x = torch.randn(2, 4, 8, dtype=D)
    m = PruningManager(net)
    m.trace([x])
    assert not m.graph.barriers
    # value channel 4 of every head (a -1 dim: channels are coupled across heads)
    request = [("0.proj.weight", 4), ("0.proj.weight", 9)]
    m.compute([x], pruned_inputs=request, constrained=(mode == "constrained"))
    y_mock = m.get_mock_model()(x)
    m.prune()
    att = net[0]
    assert (att.key_dim, att.val_dim, att.val_attn_dim) == (3, 4, 8)
    assert att.qkv.weight.shape[0] == 2 * (3 + 3 + 4)
    assert torch.allclose(net(x), y_mock, rtol=1e-10, atol=1e-12)


class Conv1D(nn.Module):
    """GPT-2 style: weight (in, out), addmm, output reshaped with ``self.nf``."""

    def __init__(self, nx: int, nf: int) -> None:
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.randn(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size_out = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


class GPTMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c_fc, self.c_proj = Conv1D(6, 10), Conv1D(10, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.c_proj(F.gelu(self.c_fc(x)))


def test_addmm_conv1d_prunes_and_rewrites_nf(tmp_path) -> None:
    torch.manual_seed(1)
    net = GPTMLP().to(D).eval()
    x = torch.randn(2, 3, 6, dtype=D)
    m = PruningManager(net).compute([x], pruned_inputs=[("c_proj.weight", 2), ("c_proj.weight", 7)])
    assert m.spec.kept()["c_fc.weight"] == (10, 8)
    y_mock = m.get_mock_model()(x)
    m.prune()
    assert net.c_fc.nf == 8 and net.c_fc.weight.shape == (6, 8) and net.c_proj.weight.shape == (8, 6)
    assert torch.allclose(net(x), y_mock, rtol=1e-10, atol=1e-12)
    # the rewritten attribute is part of the saved plan
    channelcut.save(net, tmp_path / "gpt", manager=m)
    fresh = channelcut.load(tmp_path / "gpt", GPTMLP().to(D).eval())
    assert fresh.c_fc.nf == 8 and torch.equal(fresh(x), net(x))


def test_index_buffer_is_an_index_not_data() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(4, 2, 1)
            self.register_buffer("idx", torch.tensor([0, 2, 5, 7]))

        def forward(self, x):
            return self.b(self.a(x).index_select(1, self.idx))

    net = Net().to(D).eval()
    x = torch.randn(1, 3, 4, 4, dtype=D)
    with _no_barrier_warning():
        m = PruningManager(net).compute([x], pruned_inputs=[("b.weight", 1)])
    assert not m.spec.barriers
    y_mock = m.get_mock_model()(x)
    m.prune()
    assert torch.allclose(net(x), y_mock, rtol=1e-10, atol=1e-12)


class _no_barrier_warning:
    def __enter__(self):
        import warnings

        self._cm = warnings.catch_warnings(record=True)
        self.records = self._cm.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self._cm.__exit__(*exc)
        bad = [str(r.message) for r in self.records if "barrier" in str(r.message)]
        assert not bad, bad


def _exact(net: nn.Module, x, **kw) -> PruningManager:
    m = PruningManager(net).compute(x, **kw)
    y_mock = m.get_mock_model()(*x)
    m.prune()
    assert torch.allclose(net(*x), y_mock, rtol=1e-10, atol=1e-12)
    return m


def test_frozen_batchnorm_arithmetic_on_buffers_stays_sliceable() -> None:
    """torchvision's FrozenBatchNorm2d: scale and shift are computed from four
    buffers; they must be sliced with the channels, not pin them."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    torch.manual_seed(2)
    fbn = FrozenBatchNorm2d(8)
    for name in ("weight", "bias", "running_mean"):
        getattr(fbn, name).copy_(torch.randn(8))
    fbn.running_var.copy_(torch.rand(8) + 0.5)
    net = nn.Sequential(nn.Conv2d(3, 8, 1), fbn, nn.ReLU(), nn.Conv2d(8, 2, 1)).to(D).eval()
    m = _exact(net, [torch.randn(1, 3, 4, 4, dtype=D)], pruned_inputs=[("3.weight", 1), ("3.weight", 6)])
    assert m.spec.kept()["0.weight"] == (8, 6) and net[1].running_var.shape == (6,)


def test_embedding_of_an_id_buffer_is_sliced_with_the_stream() -> None:
    """BERT-style: token-type ids are a buffer; their embedding is added to the
    word embedding and must shrink with it."""

    class Emb(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok, self.typ, self.fc = nn.Embedding(10, 8), nn.Embedding(2, 8), nn.Linear(8, 2)
            self.register_buffer("ids", torch.zeros(1, 5, dtype=torch.long))

        def forward(self, x):
            return self.fc(self.tok(x) + self.typ(self.ids))

    net = Emb().to(D).eval()
    _exact(net, [torch.randint(0, 10, (2, 5))], pruned_inputs=[("fc.weight", 3)])
    assert net.tok.weight.shape == (10, 7) and net.typ.weight.shape == (2, 7) and net.tok.embedding_dim == 7


class CascadedSplit(nn.Module):
    """EfficientViT-MSRA: every head splits its own projection with the same
    ``[self.key_dim, self.key_dim, self.val_dim]``: one attribute, one value."""

    def __init__(self) -> None:
        super().__init__()
        self.key_dim, self.val_dim = 2, 5
        self.qkvs = nn.ModuleList([nn.Conv2d(4, 9, 1) for _ in range(2)])
        self.proj = nn.Conv2d(10, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = []
        for qkv in self.qkvs:
            q, k, v = qkv(x).split([self.key_dim, self.key_dim, self.val_dim], dim=1)
            outs.append(v * (q * k).sum(1, keepdim=True).sigmoid())
        return self.proj(torch.cat(outs, 1))


@pytest.mark.parametrize("mode", ["unconstrained", "constrained"])
def test_one_size_attribute_used_by_several_heads_keeps_one_value(mode: str) -> None:
    torch.manual_seed(10)
    net = CascadedSplit().to(D).eval()
    x = torch.randn(2, 4, 3, 3, dtype=D)
    # head 0 drops value channel 1, head 1 drops value channels 1 and 3
    request = [("proj.weight", 1), ("proj.weight", 6), ("proj.weight", 8)]
    m = PruningManager(net).compute([x], pruned_inputs=request, constrained=(mode == "constrained"))
    y_mock = m.get_mock_model()(x)
    m.prune()
    assert net.qkvs[0].weight.shape[0] == net.qkvs[1].weight.shape[0] == 4 + net.val_dim
    # channel 1 goes from both heads; channel 3 stays for head 0 unless constrained
    assert net.val_dim == (4 if mode == "unconstrained" else 3)
    assert torch.allclose(net(x), y_mock, rtol=1e-10, atol=1e-12)


class CrossStage(nn.Module):
    """CSPNet: ``split(self.expand_chs // 2)``; GPT-2: ``split(self.split_size)``."""

    def __init__(self, by_total: bool) -> None:
        super().__init__()
        self.by_total = by_total
        if by_total:
            self.expand_chs = 8
        else:
            self.split_size = 4
        self.conv_exp = nn.Conv2d(3, 8, 1)
        self.a, self.b = nn.Conv2d(4, 5, 1), nn.Conv2d(4, 6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = self.expand_chs // 2 if self.by_total else self.split_size
        xs, xb = self.conv_exp(x).split(size, dim=1)
        return torch.cat([self.a(xs), self.b(xb)], 1)


@pytest.mark.parametrize("mode", ["unconstrained", "constrained"])
@pytest.mark.parametrize("by_total", [True, False], ids=["expand_chs_half", "split_size"])
def test_equal_split_by_an_attribute(mode: str, by_total: bool) -> None:
    torch.manual_seed(11)
    net = CrossStage(by_total).to(D).eval()
    x = torch.randn(2, 3, 4, 4, dtype=D)
    m = PruningManager(net)
    m.trace([x])
    request = [("a.weight", 1), ("b.weight", 1), ("b.weight", 2)]
    m.compute([x], pruned_inputs=request, constrained=(mode == "constrained"))
    y_mock = m.get_mock_model()(x)
    m.prune()
    half = 3 if mode == "unconstrained" else 2  # channel 1 goes from both parts (they stay equal)
    assert net.conv_exp.out_channels == 2 * half
    assert (net.expand_chs if by_total else net.split_size) == (2 * half if by_total else half)
    assert torch.allclose(net(x), y_mock, rtol=1e-10, atol=1e-12)


class WindowAttn(nn.Module):
    """Swin: a per-head relative position bias read from a table through an
    integer index buffer (V1), or computed by an MLP from a constant
    coordinate table (V2); heads split with ``self.num_heads``."""

    def __init__(self, v2: bool, dim: int = 12, num_heads: int = 3, n: int = 4) -> None:
        super().__init__()
        self.num_heads, self.v2 = num_heads, v2
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        if v2:
            self.cpb_mlp = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, num_heads, bias=False))
            self.register_buffer("coords", torch.randn(n * n, 2))
        else:
            self.table = nn.Parameter(torch.randn(2 * n - 1, num_heads))
            self.register_buffer("index", torch.randint(0, 2 * n - 1, (n * n,)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        table = torch.sigmoid(self.cpb_mlp(self.coords)) if self.v2 else self.table[self.index]
        bias = table.view(n, n, -1).permute(2, 0, 1).unsqueeze(0)
        attn = (q @ k.transpose(-2, -1) + bias).softmax(-1)
        return x + self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


@pytest.mark.parametrize("v2", [False, True], ids=["table_index", "cpb_mlp"])
def test_relative_position_bias_follows_the_heads(v2: bool) -> None:
    torch.manual_seed(14)
    net = nn.Sequential(nn.Linear(5, 12), WindowAttn(v2), nn.Linear(12, 2)).to(D).eval()
    x = torch.randn(2, 4, 5, dtype=D)
    m = PruningManager(net)
    m.trace([x])
    assert not any(g.pinned for g in m.channel_groups() if any(p.startswith("1.qkv") for p, _ in g.producers))
    request = [(p, c) for p in ("1.qkv.weight", "1.proj.weight", "2.weight") for c in range(4, 8)]
    m.compute([x], pruned_inputs=request)
    y_mock = m.get_mock_model()(x)
    m.prune()
    att = net[1]
    assert att.num_heads == 2
    assert (att.cpb_mlp[2].out_features if v2 else att.table.shape[1]) == 2
    assert torch.allclose(net(x), y_mock, rtol=1e-10, atol=1e-12)


class InceptionDW(nn.Module):
    """InceptionNeXt: ``split(x, self.split_indexes)`` into an identity part
    and three depthwise conv branches."""

    def __init__(self) -> None:
        super().__init__()
        self.split_indexes = (5, 2, 2)
        self.dw1 = nn.Conv2d(2, 2, 3, padding=1, groups=2)
        self.dw2 = nn.Conv2d(2, 2, 3, padding=1, groups=2)
        self.inp, self.out = nn.Conv2d(3, 9, 1), nn.Conv2d(9, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b, c = torch.split(self.inp(x), self.split_indexes, dim=1)
        return self.out(torch.cat((a, self.dw1(b), self.dw2(c)), 1))


@pytest.mark.parametrize("mode", ["unconstrained", "constrained"])
def test_a_depthwise_branch_keeps_a_channel(mode: str) -> None:
    """Every consumer drops both channels of the first depthwise branch: a
    conv with zero groups does not exist, so one channel stays."""
    torch.manual_seed(15)
    net = InceptionDW().to(D).eval()
    x = torch.randn(2, 3, 4, 4, dtype=D)
    m = PruningManager(net).compute([x], pruned_inputs=[("out.weight", 5), ("out.weight", 6), ("out.weight", 0)],
                                    constrained=(mode == "constrained"))
    y_mock = m.get_mock_model()(x)
    m.prune()
    assert net.dw1.weight.shape[0] == 1 and net.split_indexes[1] == 1
    assert torch.allclose(net(x), y_mock, rtol=1e-10, atol=1e-12)
