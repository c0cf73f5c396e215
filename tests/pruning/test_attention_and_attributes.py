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
