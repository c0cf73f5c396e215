"""Minimal repros of what stops channelcut on zoo models (from benchmarks/coverage.py).

Each case is a few-line ``nn.Module`` with the pattern that real models use
(the comment names them). For each, the script prints the fraction of
consumer input channels that stay prunable (model inputs left out), the
reason channels are pinned, and whether a 30% random request exports with
pruned == mock in float64, unconstrained and constrained::

    python benchmarks/zoo_repros.py                 # all cases
    python benchmarks/zoo_repros.py stdconv lstm    # some

A case that prunes 0% is a lost opportunity (a rule the engine lacks); an
``EXCEPTION`` or an error above 1e-10 is a bug.
"""

from __future__ import annotations

import random
import sys
import warnings
from typing import Any, Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from channelcut import PruningManager

R: Dict[str, Callable[[], Tuple[Callable[[], nn.Module], List[Any]]]] = {}


def case(f):
    R[f.__name__] = f
    return f


x4 = [torch.rand(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))]


@case
def frozen_bn():  # torchvision FrozenBatchNorm2d (detection backbones): scale = w * (rv + eps).rsqrt() from two buffers
    from torchvision.ops.misc import FrozenBatchNorm2d

    return lambda: nn.Sequential(nn.Conv2d(4, 8, 1), FrozenBatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 2, 1)), x4


@case
def stdconv():  # timm StdConv2d / ScaledStdConv2d (nf_resnet, BiT ResNetV2, NFNets)
    class StdConv(nn.Conv2d):
        def forward(self, x):
            w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0., eps=1e-5).reshape_as(self.weight)
            return F.conv2d(x, w, self.bias, self.stride, self.padding)
    return lambda: nn.Sequential(StdConv(4, 8, 3, padding=1), nn.ReLU(), StdConv(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 2, 1)), x4

@case
def computed_bias():  # BEiT / EVA / Swin-V2 qkv: bias = cat(q_bias, zeros, v_bias)
    class QKV(nn.Module):
        def __init__(s):
            super().__init__(); s.qkv = nn.Linear(8, 24, bias=False); s.q_bias = nn.Parameter(torch.rand(8)); s.v_bias = nn.Parameter(torch.rand(8))
            s.register_buffer("k_bias", torch.zeros(8), persistent=False)
        def forward(s, x): return F.linear(x, s.qkv.weight, torch.cat((s.q_bias, s.k_bias, s.v_bias)))
    class Net(nn.Module):
        def __init__(s): super().__init__(); s.a = nn.Linear(4, 8); s.qkv = QKV(); s.b = nn.Linear(24, 8); s.c = nn.Linear(8, 2)
        def forward(s, x): h = s.a(x); h = h + s.b(s.qkv(h)); return s.c(h)
    return Net, [torch.rand(2, 5, 4)]

@case
def chunk_gate():  # gMLP SpatialGatingUnit, EVA02 SwiGLU (packed), GLU-style gates
    class Net(nn.Module):
        def __init__(s): super().__init__(); s.fc1 = nn.Linear(4, 16); s.fc2 = nn.Linear(8, 4)
        def forward(s, x): u, v = s.fc1(x).chunk(2, dim=-1); return s.fc2(u * torch.sigmoid(v))
    return Net, [torch.rand(2, 5, 4)]

@case
def split_literal():  # MixNet MixedConv2d, Res2Net, CSP, InceptionNeXt, FocalNet: split with sizes from attributes
    class Net(nn.Module):
        def __init__(s): super().__init__(); s.a = nn.Conv2d(4, 8, 1); s.splits = [3, 5]; s.b1 = nn.Conv2d(3, 3, 3, padding=1, groups=3); s.b2 = nn.Conv2d(5, 5, 5, padding=2, groups=5); s.c = nn.Conv2d(8, 2, 1)
        def forward(s, x): p, q = torch.split(s.a(x), s.splits, dim=1); return s.c(torch.cat([s.b1(p), s.b2(q)], 1))
    return Net, x4

@case
def split_half():  # CSPNet / cs3darknet: x.split(C // 2) computed from the shape
    class Net(nn.Module):
        def __init__(s): super().__init__(); s.a = nn.Conv2d(4, 8, 1); s.b = nn.Conv2d(4, 4, 3, padding=1); s.c = nn.Conv2d(8, 2, 1)
        def forward(s, x): h = s.a(x); p, q = h.split(h.shape[1] // 2, dim=1); return s.c(torch.cat([p, s.b(q)], 1))
    return Net, x4

@case
def split_attr_width():  # timm Res2Net Bottle2neck: torch.split(out, self.width, 1) into equal parts
    class Net(nn.Module):
        def __init__(s): super().__init__(); s.width = 4; s.a = nn.Conv2d(4, 12, 1); s.b = nn.Conv2d(4, 4, 3, padding=1); s.c = nn.Conv2d(12, 2, 1)
        def forward(s, x):
            p, q, r = torch.split(s.a(x), s.width, 1)
            return s.c(torch.cat([p, s.b(q), r], 1))
    return Net, x4


@case
def split_attr_half():  # timm CSPNet CrossStage: x.split(self.expand_chs // 2, dim=1)
    class Net(nn.Module):
        def __init__(s): super().__init__(); s.expand_chs = 8; s.a = nn.Conv2d(4, 8, 1); s.b = nn.Conv2d(4, 4, 3, padding=1); s.c = nn.Conv2d(8, 2, 1)
        def forward(s, x):
            xs, xb = s.a(x).split(s.expand_chs // 2, dim=1)
            return s.c(torch.cat([xs, s.b(xb)], 1))
    return Net, x4


@case
def aliased_depthwise():  # timm CoaT: the ConvPosEnc module is registered under two names (cpe1 and serial_blocks1.0.cpe)
    class Net(nn.Module):
        def __init__(s):
            super().__init__(); s.a = nn.Conv2d(4, 8, 1); s.cpe = nn.Conv2d(8, 8, 3, padding=1, groups=8)
            s.block = nn.Sequential(s.cpe); s.c = nn.Conv2d(8, 2, 1)  # the same depthwise conv, a second name
        def forward(s, x): h = s.a(x); return s.c(h + s.block(h))
    return Net, x4


@case
def stack_newdim():  # SKNet SelectiveKernel: stack branches on a new dim 1, weighted sum over it
    class Net(nn.Module):
        def __init__(s): super().__init__(); s.a = nn.Conv2d(4, 8, 1); s.p1 = nn.Conv2d(8, 8, 3, padding=1); s.p2 = nn.Conv2d(8, 8, 3, padding=2, dilation=2); s.c = nn.Conv2d(8, 2, 1)
        def forward(s, x): h = s.a(x); y = torch.stack([s.p1(h), s.p2(h)], dim=1); return s.c(y.sum(1))
    return Net, x4

@case
def getitem_literal():  # DPN dual path (x[:, :num_1x1_c]), ReXNet partial residual (x[:, 0:C] + shortcut)
    class Net(nn.Module):
        def __init__(s): super().__init__(); s.a = nn.Conv2d(4, 8, 1); s.n = 5; s.b = nn.Conv2d(5, 2, 1); s.c = nn.Conv2d(3, 2, 1)
        def forward(s, x): h = s.a(x); return s.b(h[:, :s.n]) + s.c(h[:, s.n:])
    return Net, x4

@case
def const_embedding():  # HF BERT embeddings: token_type / position ids are buffers -> embedding of a constant
    class Net(nn.Module):
        def __init__(s):
            super().__init__(); s.tok = nn.Embedding(10, 8); s.typ = nn.Embedding(2, 8); s.register_buffer("ids", torch.zeros(1, 5, dtype=torch.long)); s.fc = nn.Linear(8, 2)
        def forward(s, x): return s.fc(s.tok(x) + s.typ(s.ids))
    return Net, [torch.randint(0, 10, (2, 5))]

@case
def const_conv():  # XCiT PositionalEncodingFourier: a conv applied to a constant grid, added to the stream
    class Net(nn.Module):
        def __init__(s): super().__init__(); s.a = nn.Conv2d(4, 8, 1); s.pos = nn.Conv2d(2, 8, 1); s.c = nn.Conv2d(8, 2, 1)
        def forward(s, x):
            grid = torch.stack(torch.meshgrid(torch.arange(8.), torch.arange(8.), indexing="ij")).unsqueeze(0).to(x.dtype)
            return s.c(s.a(x) + s.pos(grid))
    return Net, x4

@case
def addmm_conv1d():  # HF GPT-2 Conv1D: torch.addmm(bias, x2d, weight) with weight (in, out)
    class Conv1D(nn.Module):
        def __init__(s, nin, nout): super().__init__(); s.nf = nout; s.weight = nn.Parameter(torch.randn(nin, nout) * 0.1); s.bias = nn.Parameter(torch.zeros(nout))
        def forward(s, x): return torch.addmm(s.bias, x.view(-1, x.size(-1)), s.weight).view(x.size()[:-1] + (s.nf,))
    return lambda: nn.Sequential(nn.Linear(4, 8), Conv1D(8, 16), nn.GELU(), Conv1D(16, 8), nn.Linear(8, 2)), [torch.rand(2, 5, 4)]

@case
def lstm():  # Sequencer2d: nn.LSTM on channels
    class Net(nn.Module):
        def __init__(s): super().__init__(); s.a = nn.Linear(4, 8); s.rnn = nn.LSTM(8, 6, batch_first=True, bidirectional=True); s.c = nn.Linear(12, 2)
        def forward(s, x): return s.c(s.rnn(s.a(x))[0])
    return Net, [torch.rand(2, 5, 4)]

@case
def functional_groups_attr():  # timm BlurPool2d (TResNet): F.conv2d(x, buffer, groups=self.channels)
    class Blur(nn.Module):
        def __init__(s, c): super().__init__(); s.channels = c; s.register_buffer("filt", torch.ones(c, 1, 3, 3) / 9)
        def forward(s, x): return F.conv2d(x, s.filt, padding=1, groups=s.channels)
    return lambda: nn.Sequential(nn.Conv2d(4, 8, 1), Blur(8), nn.Conv2d(8, 2, 1)), x4

@case
def mha():  # torchvision ViT / nn.MultiheadAttention: traced op by op (mha_forward), heads and embedding channels prune
    class Net(nn.Module):
        def __init__(s): super().__init__(); s.a = nn.Linear(4, 8); s.att = nn.MultiheadAttention(8, 2, batch_first=True); s.c = nn.Linear(8, 2)
        def forward(s, x): h = s.a(x); return s.c(h + s.att(h, h, h, need_weights=False)[0])
    return Net, [torch.rand(2, 5, 4)]

@case
def shuffle_unit():  # torchvision ShuffleNetV2 InvertedResidual(stride 1): chunk, cat, channel_shuffle, twice
    def shuffle(x, g):
        b, c, h, w = x.size(); return x.view(b, g, c // g, h, w).transpose(1, 2).contiguous().view(b, c, h, w)
    class Unit(nn.Module):
        def __init__(s): super().__init__(); s.b = nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.Conv2d(4, 4, 1))
        def forward(s, x): x1, x2 = x.chunk(2, dim=1); return shuffle(torch.cat((x1, s.b(x2)), 1), 2)
    return lambda: nn.Sequential(nn.Conv2d(4, 8, 1), Unit(), Unit(), nn.Conv2d(8, 2, 1)), x4



@case
def attention_heads():  # timm CaiT / Swin Attention: qkv.reshape(B, N, 3, self.num_heads, C // self.num_heads): whole heads
    class Attn(nn.Module):
        def __init__(s, dim=8, heads=2): super().__init__(); s.num_heads = heads; s.qkv = nn.Linear(dim, 3 * dim); s.proj = nn.Linear(dim, dim)
        def forward(s, x):
            B, N, C = x.shape
            q, k, v = s.qkv(x).reshape(B, N, 3, s.num_heads, C // s.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
            return s.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C))
    class Net(nn.Module):
        def __init__(s): super().__init__(); s.a = nn.Linear(4, 8); s.att = Attn(); s.c = nn.Linear(8, 2)
        def forward(s, x): h = s.a(x); return s.c(h + s.att(h))
    return Net, [torch.rand(2, 5, 4)]


def _double(x: List[Any]) -> List[Any]:
    return [t.double() if t.is_floating_point() else t for t in x]


def prunable(make: Callable[[], nn.Module], x: List[Any]) -> Tuple[float, List[str]]:
    m = PruningManager(make().double().eval())
    m.trace(_double(x))
    groups = [g for g in m.channel_groups() if g.consumers and g.pinned != "is a model input"]
    total = sum(len(g.consumers) for g in groups)
    free = sum(len(g.consumers) for g in groups if g.pinned is None)
    return (free / total if total else 1.0), sorted({g.pinned for g in groups if g.pinned})


def export(make: Callable[[], nn.Module], x: List[Any], constrained: bool) -> str:
    torch.manual_seed(0)
    net = make().double().eval()
    x = _double(x)
    m = PruningManager(net)
    m.trace(x)
    pruned = []
    for name, n in sorted(m.consumers().items()):
        rng = random.Random(name)
        pruned += [(name, c) for c in sorted(rng.sample(range(n), int(round(0.3 * n))))]
    try:
        m.compute(x, pruned_inputs=pruned, constrained=constrained)
        with torch.no_grad():
            ref = m.get_mock_model()(*x)
        m.prune(verify=False)
        with torch.no_grad():
            out = net(*x)
    except Exception as exc:
        return f"EXCEPTION {type(exc).__name__}: {str(exc)[:160]}"
    if out.shape != ref.shape:
        return f"MISMATCH shape {tuple(out.shape)} vs {tuple(ref.shape)}"
    err = float((out - ref).abs().max() / ref.abs().max())
    return f"ok ({err:.1e})" if err <= 1e-10 else f"MISMATCH {err:.2e}"


def main(names: List[str]) -> None:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    for name in names or list(R):
        make, x = R[name]()
        frac, reasons = prunable(make, x)
        print(f"{name:24s} prunable {100 * frac:5.1f}%  unconstrained: {export(make, x, False)}  "
              f"constrained: {export(make, x, True)}")
        for r in reasons[:3]:
            print(f"{'':24s}   pinned: {r}")


if __name__ == "__main__":
    main(sys.argv[1:])
