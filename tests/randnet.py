"""Seeded random networks for end-to-end export tests. Start at :func:`make_net`.

``make_net(seed)`` returns a :class:`RandNet` (float64, eval mode) and example
inputs. The same seed always gives the same network, weights and inputs.

A network is a tiny register machine: the model's inputs are registers
``r0..r{k-1}``; ``program`` is a list of ``(block name, input registers)``
and each step appends one register; ``outputs`` names the registers returned
(as a tensor, tuple, list or dict). Every block is a small ``nn.Module``
defined here, so ``print(net)`` plus ``net.program`` is a readable repro.

Tensors come in three kinds, with channels at a fixed dim:

- ``img``: ``(B, C, *spatial)`` with 1, 2 or 3 spatial dims; channels at dim 1
- ``tok``: ``(B, N, C)``; channels last
- ``vec``: ``(B, C)``; channels last

The generator composes: convs of every kind (groups=1, depthwise with and
without multiplier, grouped, transposed; 1d/2d/3d), linears on (B, C) and
(B, N, C), BatchNorm/LayerNorm/GroupNorm/InstanceNorm, residual adds with 2-4
branches, concats, channel slicing/chunking/swapping, channel shuffles (view +
transpose, ``F.channel_shuffle``), SE gates, flatten->linear, permutes
(channels-last linear, channels-last LayerNorm, tokens<->conv1d), layer-scale
parameters, pooling and interpolation, attention (matmul+softmax, SDPA,
nn.MultiheadAttention, heads split with a num_heads attribute), and
multiple inputs and outputs. Norms (affine parameters and running
statistics), layer scales and biases get random values
(``support.randomize.randomize_norms``). Shapes are tracked by running a probe tensor
through each block as it is created, so every generated model runs.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from support.randomize import randomize_norms

DTYPE = torch.float64
BATCH = 2

# ---------------------------------------------------------------------------
# blocks
# ---------------------------------------------------------------------------


def chan_dim(x: torch.Tensor, kind: str) -> int:
    return 1 if kind == "img" else x.dim() - 1


class Act(nn.Module):
    FUNCS = {
        "relu": F.relu, "gelu": F.gelu, "silu": F.silu, "sigmoid": torch.sigmoid, "tanh": torch.tanh,
        "hardswish": F.hardswish, "leaky_relu": F.leaky_relu, "elu": F.elu, "softplus": F.softplus,
    }

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def forward(self, x):
        return self.FUNCS[self.name](x)

    def extra_repr(self) -> str:
        return self.name


class AddN(nn.Module):
    """Residual sum of 2-4 branches (plus optional scalar weights)."""

    def forward(self, *xs):
        y = xs[0]
        for x in xs[1:]:
            y = y + x
        return y


class MulN(nn.Module):
    def forward(self, a, b):
        return a * b


class Cat(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, *xs):
        return torch.cat(xs, dim=self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class ChannelSlice(nn.Module):
    """Literal channel slicing ``x[:, start:stop]`` (img) or ``x[..., start:stop]``."""

    def __init__(self, start: int, stop: int, last: bool) -> None:
        super().__init__()
        self.start, self.stop, self.last = start, stop, last

    def forward(self, x):
        if self.last:
            return x[..., self.start:self.stop]
        return x[:, self.start:self.stop]

    def extra_repr(self) -> str:
        return f"{self.start}:{self.stop}, last={self.last}"


class Chunk(nn.Module):
    """``torch.chunk`` along channels; returns chunk ``take``, or all chunks
    re-concatenated in reverse order when ``take`` is -1 (a channel permutation)."""

    def __init__(self, n: int, take: int, dim: int) -> None:
        super().__init__()
        self.n, self.take, self.dim = n, take, dim

    def forward(self, x):
        parts = torch.chunk(x, self.n, dim=self.dim)
        if self.take < 0:
            return torch.cat(list(reversed(parts)), dim=self.dim)
        return parts[self.take]

    def extra_repr(self) -> str:
        return f"n={self.n}, take={self.take}, dim={self.dim}"


class Shuffle(nn.Module):
    """Channel shuffle: ``view`` + ``transpose`` + ``reshape``, or ``F.channel_shuffle``."""

    def __init__(self, groups: int, how: str, last: bool) -> None:
        super().__init__()
        self.groups, self.how, self.last = groups, how, last

    def forward(self, x):
        if self.last:
            *lead, c = x.shape
            return x.reshape(*lead, self.groups, c // self.groups).transpose(-1, -2).reshape(*lead, c)
        if self.how == "fn":
            return F.channel_shuffle(x, self.groups)
        b, c = x.shape[:2]
        rest = x.shape[2:]
        return x.view(b, self.groups, c // self.groups, *rest).transpose(1, 2).reshape(b, c, *rest)

    def extra_repr(self) -> str:
        return f"groups={self.groups}, how={self.how}, last={self.last}"


class SEGate(nn.Module):
    """Squeeze-excitation: ``x * sigmoid(fc2(relu(fc1(mean(x)))))``."""

    def __init__(self, c: int, hidden: int, nd: int, use_linear: bool) -> None:
        super().__init__()
        self.nd, self.use_linear = nd, use_linear
        if use_linear:
            self.fc1, self.fc2 = nn.Linear(c, hidden), nn.Linear(hidden, c)
        else:
            conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[nd]
            self.fc1, self.fc2 = conv(c, hidden, 1), conv(hidden, c, 1)

    def forward(self, x):
        dims = tuple(range(2, 2 + self.nd))
        if self.use_linear:
            s = x.mean(dims)
            s = torch.sigmoid(self.fc2(F.relu(self.fc1(s))))
            return x * s.reshape(s.shape + (1,) * self.nd)
        s = x.mean(dims, keepdim=True)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(s))))


class LayerScale(nn.Module):
    def __init__(self, c: int, nd: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)
        self.nd = nd  # spatial dims after the channel dim (0 for tok/vec)

    def forward(self, x):
        if self.nd:
            return x * self.gamma.view(-1, *([1] * self.nd))
        return x * self.gamma


class ChannelsLast(nn.Module):
    """Run ``inner`` (a Linear or LayerNorm) with channels moved last: permutes."""

    def __init__(self, inner: nn.Module, nd: int) -> None:
        super().__init__()
        self.inner, self.nd = inner, nd

    def forward(self, x):
        perm = (0,) + tuple(range(2, 2 + self.nd)) + (1,)
        y = self.inner(x.permute(*perm))
        back = (0, 1 + self.nd) + tuple(range(1, 1 + self.nd))
        return y.permute(*back)


class ToTokens(nn.Module):
    """img ``(B, C, *S)`` -> tok ``(B, prod(S), C)``."""

    def forward(self, x):
        return x.flatten(2).transpose(1, 2)


class TokensToSeq(nn.Module):
    """tok ``(B, N, C)`` -> img1d ``(B, C, N)`` (so a Conv1d can read tokens)."""

    def forward(self, x):
        return x.transpose(1, 2)


class ToVec(nn.Module):
    def __init__(self, how: str, nd: int) -> None:
        super().__init__()
        self.how, self.nd = how, nd

    def forward(self, x):
        if self.how == "flatten":
            return x.flatten(1)
        if self.how == "gap":
            pool = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}[self.nd]
            return pool(x, 1).flatten(1)
        if self.how == "mean":
            return x.mean(tuple(range(2, 2 + self.nd)))
        if self.how == "amax":
            return x.amax(tuple(range(2, 2 + self.nd)))
        if self.how == "tokmean":
            return x.mean(1)
        if self.how == "cls":
            return x[:, 0]
        raise ValueError(self.how)

    def extra_repr(self) -> str:
        return self.how


class VecToImg(nn.Module):
    def __init__(self, nd: int) -> None:
        super().__init__()
        self.nd = nd

    def forward(self, x):
        return x.reshape(x.shape + (1,) * self.nd)


class Pool(nn.Module):
    def __init__(self, how: str, nd: int) -> None:
        super().__init__()
        self.how, self.nd = how, nd

    def forward(self, x):
        if self.how == "max":
            return {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[self.nd](x, 2)
        if self.how == "avg":
            return {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[self.nd](x, 2)
        if self.how == "up":
            mode = {1: "linear", 2: "bilinear", 3: "nearest"}[self.nd]
            kw = {} if mode == "nearest" else {"align_corners": False}
            return F.interpolate(x, scale_factor=2, mode=mode, **kw)
        raise ValueError(self.how)

    def extra_repr(self) -> str:
        return f"{self.how}, nd={self.nd}"


class Attention(nn.Module):
    """Single-head attention over tokens: explicit matmul+softmax, or SDPA."""

    def __init__(self, c: int, d: int, sdpa: bool) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(c, d), nn.Linear(c, d), nn.Linear(c, d)
        self.o = nn.Linear(d, c)
        self.sdpa = sdpa

    def forward(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            a = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
            y = a @ v
        return self.o(y)


class MHABlock(nn.Module):
    """``nn.MultiheadAttention`` self-attention over tokens (traced op by op)."""

    def __init__(self, c: int, heads: int, need_weights: bool) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(c, heads, batch_first=True)
        self.need_weights = need_weights

    def forward(self, x):
        return self.mha(x, x, x, need_weights=self.need_weights)[0]

    def extra_repr(self) -> str:
        return f"need_weights={self.need_weights}"


class HeadAttention(nn.Module):
    """timm-style multi-head attention: heads split with the attribute
    ``self.num_heads`` and merged with ``self.attn_dim``."""

    def __init__(self, c: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.attn_dim = heads, head_dim, heads * head_dim
        self.qkv = nn.Linear(c, 3 * self.attn_dim)
        self.proj = nn.Linear(self.attn_dim, c)

    def forward(self, x):
        b, n = x.shape[0], x.shape[1]
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, n, self.attn_dim))


class LNOverChannels(nn.Module):
    """GroupNorm(1, C)-like: F.layer_norm over (C, *spatial) with no params."""

    def forward(self, x):
        return F.layer_norm(x, x.shape[1:])


# ---------------------------------------------------------------------------
# the network
# ---------------------------------------------------------------------------


class RandNet(nn.Module):
    """A generated network: ``blocks[i]`` computes register ``n_inputs + i``."""

    def __init__(self, n_inputs: int, program: List[Tuple[str, Tuple[int, ...]]], blocks: Dict[str, nn.Module],
                 outputs: List[int], out_format: str) -> None:
        super().__init__()
        self.n_inputs = n_inputs
        self.program = list(program)
        self.blocks = nn.ModuleDict(blocks)
        self.outputs = list(outputs)
        self.out_format = out_format

    def forward(self, *xs):
        regs = list(xs)
        for name, ins in self.program:
            regs.append(self.blocks[name](*[regs[i] for i in ins]))
        outs = [regs[i] for i in self.outputs]
        if self.out_format == "single":
            return outs[0]
        if self.out_format == "tuple":
            return tuple(outs)
        if self.out_format == "list":
            return outs
        return {f"out{i}": y for i, y in enumerate(outs)}

    def describe(self) -> str:
        lines = [f"RandNet: {self.n_inputs} inputs, outputs {self.outputs} as {self.out_format}"]
        for i, (name, ins) in enumerate(self.program):
            lines.append(f"  r{self.n_inputs + i} = {name}({', '.join(f'r{j}' for j in ins)}): {self.blocks[name]!r}".replace("\n", "\n    "))
        return "\n".join(lines)


@dataclass
class Val:
    reg: int
    kind: str  # img | tok | vec
    probe: torch.Tensor

    @property
    def c(self) -> int:
        return self.probe.shape[chan_dim(self.probe, self.kind)]

    @property
    def nd(self) -> int:  # spatial dims (img only)
        return self.probe.dim() - 2 if self.kind == "img" else 0

    @property
    def spatial(self) -> Tuple[int, ...]:
        return tuple(self.probe.shape[2:]) if self.kind == "img" else ()


class Builder:
    """Grows a :class:`RandNet` block by block (see module docstring)."""

    MAX_C = 12

    def __init__(self, rng: random.Random, n_inputs: int) -> None:
        self.rng = rng
        self.n_inputs = n_inputs
        self.program: List[Tuple[str, Tuple[int, ...]]] = []
        self.blocks: Dict[str, nn.Module] = {}
        self.n_regs = n_inputs
        self.budget = 0  # blocks emitted

    # -- emitting --------------------------------------------------------
    def emit(self, tag: str, module: nn.Module, ins: Sequence[Val], kind: str) -> Val:
        module = module.to(DTYPE).eval()
        self.rng.randrange(2**31)  # (a draw kept: every seed builds the network it always built)
        name = f"b{len(self.program)}_{tag}"
        self.blocks[name] = module
        self.program.append((name, tuple(v.reg for v in ins)))
        with torch.no_grad():
            probe = module(*[v.probe for v in ins])
        reg = self.n_regs
        self.n_regs += 1
        self.budget += 1
        return Val(reg, kind, probe)

    def ch(self, lo: int = 1) -> int:
        r = self.rng.random()
        if r < 0.08:
            return max(lo, 1)
        return self.rng.randint(max(lo, 2), self.MAX_C)

    # -- single ops --------------------------------------------------------
    def conv(self, v: Val, cout: Optional[int] = None, keep_spatial: bool = False, variant: Optional[str] = None) -> Val:
        rng, c, nd = self.rng, v.c, v.nd
        Conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[nd]
        ConvT = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[nd]
        small = min(v.spatial)
        big = max(v.spatial)
        options = ["plain", "plain", "pointwise", "depthwise", "grouped", "transposed"]
        if cout is not None and cout != c:
            options = [o for o in options if o not in ("depthwise",)] + (["depthwise_mult"] if cout % c == 0 else [])
        if variant is None:
            variant = rng.choice(options)
        bias = rng.random() < 0.6
        if variant == "depthwise_mult" or (variant == "depthwise" and cout is None and rng.random() < 0.3 and c * 2 <= self.MAX_C):
            mult = (cout // c) if cout is not None else 2
            k = rng.choice([1, 3])
            return self.emit("dwconv", Conv(c, c * mult, k, padding=k // 2, groups=c, bias=bias), [v], "img")
        if variant == "depthwise":
            k = rng.choice([1, 3])
            return self.emit("dwconv", Conv(c, c, k, padding=k // 2, groups=c, bias=bias), [v], "img")
        if cout is None:
            cout = self.ch()
        if variant == "grouped":
            gs = [g for g in (2, 3, 4) if c % g == 0 and cout % g == 0]
            if gs:
                g = rng.choice(gs)
                k = rng.choice([1, 3])
                return self.emit("gconv", Conv(c, cout, k, padding=k // 2, groups=g, bias=bias), [v], "img")
            variant = "plain"
        if variant == "transposed":
            if keep_spatial:
                k = rng.choice([1, 3])
                return self.emit("convT", ConvT(c, cout, k, padding=k // 2, bias=bias), [v], "img")
            if big <= 5 and rng.random() < 0.5:
                return self.emit("convT", ConvT(c, cout, 2, stride=2, bias=bias), [v], "img")
            k = rng.choice([1, 2, 3]) if big < 10 else 1
            return self.emit("convT", ConvT(c, cout, k, bias=bias), [v], "img")
        if variant == "pointwise":
            return self.emit("conv1x1", Conv(c, cout, 1, bias=bias), [v], "img")
        k = rng.choice([1, 3])
        stride = 2 if (not keep_spatial and small >= 4 and rng.random() < 0.3) else 1
        return self.emit("conv", Conv(c, cout, k, padding=k // 2, stride=stride, bias=bias), [v], "img")

    def linear(self, v: Val, cout: Optional[int] = None) -> Val:
        cout = self.ch() if cout is None else cout
        return self.emit("linear", nn.Linear(v.c, cout, bias=self.rng.random() < 0.7), [v], v.kind)

    def proj(self, v: Val, cout: Optional[int] = None, keep_spatial: bool = True) -> Val:
        """A channel-changing op that keeps the kind (and spatial size)."""
        if v.kind == "img":
            if self.rng.random() < 0.15:
                return self.emit("cl_linear", ChannelsLast(nn.Linear(v.c, cout or self.ch()), v.nd), [v], "img")
            return self.conv(v, cout, keep_spatial=keep_spatial)
        return self.linear(v, cout)

    def norm(self, v: Val) -> Val:
        rng, c = self.rng, v.c
        if v.kind == "img":
            nd = v.nd
            opts = ["bn", "bn", "gn", "in", "ln_cl", "ln_all"]
            if math.prod(v.spatial) < 2:
                opts = [o for o in opts if o not in ("in", "ln_all")]
            o = rng.choice(opts)
            if o == "bn":
                BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[nd]
                return self.emit("bn", BN(c, affine=rng.random() < 0.9), [v], "img")
            if o == "gn":
                gs = [g for g in range(1, c + 1) if c % g == 0]
                return self.emit("gn", nn.GroupNorm(rng.choice(gs), c, affine=rng.random() < 0.9), [v], "img")
            if o == "in":
                IN = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[nd]
                return self.emit("in", IN(c, affine=True, track_running_stats=rng.random() < 0.3), [v], "img")
            if o == "ln_cl":
                return self.emit("ln_cl", ChannelsLast(nn.LayerNorm(c), nd), [v], "img")
            return self.emit("ln_all", LNOverChannels(), [v], "img")
        if v.kind == "vec" and rng.random() < 0.4:
            return self.emit("bn1d", nn.BatchNorm1d(c), [v], "vec")
        return self.emit("ln", nn.LayerNorm(c, elementwise_affine=rng.random() < 0.9), [v], v.kind)

    def act(self, v: Val) -> Val:
        return self.emit("act", Act(self.rng.choice(sorted(Act.FUNCS))), [v], v.kind)

    # -- composites --------------------------------------------------------
    def branch(self, v: Val, cout: int, depth: int) -> Val:
        """A chain of 1-3 ops from ``v`` to ``cout`` channels, same spatial size."""
        rng = self.rng
        x = v
        steps = rng.randint(1, depth)
        for i in range(steps):
            last = i == steps - 1
            r = rng.random()
            if last:
                x = self.proj(x, cout, keep_spatial=True) if (x.c != cout or r < 0.7) else self.norm(x)
            elif r < 0.45:
                x = self.proj(x, None, keep_spatial=True)
            elif r < 0.6 and x.kind == "img":
                x = self.conv(x, keep_spatial=True, variant="depthwise")
            elif r < 0.8:
                x = self.norm(x)
            else:
                x = self.act(x)
        if x.c != cout:
            x = self.proj(x, cout, keep_spatial=True)
        return x

    def residual(self, v: Val) -> Val:
        rng = self.rng
        n = rng.randint(2, 4)
        ident = rng.random() < 0.6
        branches = [v] if ident else []
        while len(branches) < n:
            branches.append(self.branch(v, v.c, 2))
        if rng.random() < 0.2 and v.c > 1:
            branches.append(self.emit("layerscale", LayerScale(v.c, v.nd), [branches.pop()], v.kind))
        return self.emit(f"add{len(branches)}", AddN(), branches, v.kind)

    def concat(self, v: Val) -> Val:
        rng = self.rng
        n = rng.randint(2, 3)
        parts = [v] if rng.random() < 0.4 else []
        while len(parts) < n:
            parts.append(self.branch(v, self.ch(), 2))
        rng.shuffle(parts)
        return self.emit("cat", Cat(chan_dim(v.probe, v.kind)), parts, v.kind)

    def se(self, v: Val) -> Val:
        return self.emit("se", SEGate(v.c, self.rng.randint(1, 4), v.nd, self.rng.random() < 0.4), [v], "img")

    def slice_(self, v: Val) -> Val:
        rng, c = self.rng, v.c
        last = v.kind != "img"
        if rng.random() < 0.5 and c >= 2:
            ns = [n for n in (2, 3) if n <= c]
            n = rng.choice(ns)
            take = rng.choice([-1] + list(range(len(torch.chunk(v.probe, n, dim=chan_dim(v.probe, v.kind))))))
            return self.emit("chunk", Chunk(n, take, chan_dim(v.probe, v.kind)), [v], v.kind)
        start = rng.randint(0, c - 1)
        stop = rng.randint(start + 1, c)
        return self.emit("slice", ChannelSlice(start, stop, last), [v], v.kind)

    def shuffle(self, v: Val) -> Val:
        gs = [g for g in (2, 3, 4) if v.c % g == 0 and v.c > g]
        if not gs:
            v = self.proj(v, 2 * self.rng.randint(1, 4))
            gs = [2]
        how = self.rng.choice(["view", "fn"])
        return self.emit("shuffle", Shuffle(self.rng.choice(gs), how, v.kind != "img"), [v], v.kind)

    def spatial_op(self, v: Val) -> Val:
        rng = self.rng
        if min(v.spatial) >= 2 and rng.random() < 0.6:
            return self.emit("pool", Pool(rng.choice(["max", "avg"]), v.nd), [v], "img")
        if max(v.spatial) <= 5 and v.nd < 3:
            return self.emit("up", Pool("up", v.nd), [v], "img")
        return self.act(v)

    def to_tokens(self, v: Val) -> Val:
        return self.emit("to_tokens", ToTokens(), [v], "tok")

    def to_vec(self, v: Val) -> Val:
        rng = self.rng
        if v.kind == "img":
            hows = ["gap", "mean", "amax"]
            if v.c * math.prod(v.spatial) <= 400:
                hows += ["flatten", "flatten"]
            how = rng.choice(hows)
            y = self.emit(f"tovec_{how}", ToVec(how, v.nd), [v], "vec")
            if how == "flatten":  # flatten -> linear
                y = self.linear(y)
            return y
        how = rng.choice(["tokmean", "cls", "flatten"] if v.c * v.probe.shape[1] <= 300 else ["tokmean", "cls"])
        y = self.emit(f"tovec_{how}", ToVec(how, 0), [v], "vec")
        if how == "flatten":
            y = self.linear(y)
        return y

    def attention(self, v: Val) -> Val:
        rng = self.rng
        kind = rng.choice(["single", "single", "mha", "heads"])
        if kind == "mha":
            heads = rng.choice([h for h in (1, 2, 3, 4) if v.c % h == 0])
            a = self.emit("mha", MHABlock(v.c, heads, rng.random() < 0.3), [v], "tok")
        elif kind == "heads":
            a = self.emit("heads", HeadAttention(v.c, rng.randint(1, 3), rng.randint(1, 3)), [v], "tok")
        else:
            a = self.emit("attn", Attention(v.c, rng.randint(2, 6), rng.random() < 0.4), [v], "tok")
        return self.emit("add2", AddN(), [v, a], "tok")

    # -- one random stage ----------------------------------------------------
    def stage(self, v: Val) -> Val:
        rng = self.rng
        if v.kind == "img":
            table = [
                (self.conv, 5), (self.residual, 4), (self.concat, 2), (self.norm, 2), (self.act, 2),
                (self.se, 1.5), (self.slice_, 1.5), (self.shuffle, 1.5), (self.spatial_op, 1),
                (lambda x: self.emit("layerscale", LayerScale(x.c, x.nd), [x], "img"), 0.7),
                (lambda x: self.emit("cl_linear", ChannelsLast(nn.Linear(x.c, self.ch()), x.nd), [x], "img"), 0.7),
            ]
        elif v.kind == "tok":
            table = [
                (self.linear, 4), (self.residual, 3), (self.concat, 1.5), (self.norm, 2), (self.act, 1.5),
                (self.slice_, 1), (self.shuffle, 1), (self.attention, 1.5),
                (lambda x: self.emit("layerscale", LayerScale(x.c, 0), [x], "tok"), 0.7),
                (self.tok_conv, 1),
            ]
        else:
            table = [
                (self.linear, 4), (self.residual, 3), (self.concat, 1.5), (self.norm, 1.5), (self.act, 1.5),
                (self.slice_, 1), (self.shuffle, 0.7),
                (lambda x: self.emit("layerscale", LayerScale(x.c, 0), [x], "vec"), 0.5),
                (lambda x: self.conv(self.emit("vec2img", VecToImg(2), [x], "img"), variant="pointwise"), 0.5),
            ]
        fns, weights = zip(*table)
        return rng.choices(fns, weights)[0](v)

    def tok_conv(self, v: Val) -> Val:
        """tokens -> (B, C, N) -> Conv1d -> back to tokens."""
        s = self.emit("tok2seq", TokensToSeq(), [v], "img")
        s = self.conv(s, keep_spatial=True, variant=self.rng.choice(["plain", "depthwise", "pointwise"]))
        return self.emit("seq2tok", TokensToSeq(), [s], "tok")


def _compatible(a: Val, b: Val) -> bool:
    if a.kind != b.kind:
        return False
    if a.kind == "img":
        return a.spatial == b.spatial
    if a.kind == "tok":
        return a.probe.shape[1] == b.probe.shape[1]
    return True


def _input(rng: random.Random, kind: str, nd: int, gen: torch.Generator) -> Tuple[str, torch.Tensor]:
    c = rng.randint(1, 5)
    if kind == "img":
        size = {1: (rng.randint(4, 10),), 2: (rng.randint(3, 8),) * 2, 3: (rng.randint(2, 4),) * 3}[nd]
        shape = (BATCH, c) + size
    elif kind == "tok":
        shape = (BATCH, rng.randint(2, 6), c)
    else:
        shape = (BATCH, c)
    return kind, torch.randn(shape, generator=gen, dtype=DTYPE)


def make_net(seed: int, max_stages: int = 8) -> Tuple[RandNet, List[torch.Tensor]]:
    """A random network (float64, eval mode) and its example inputs."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net, inputs = _make(rng, gen, max_stages)
    # every norm's affine parameters and running statistics, layer scales and
    # biases random (seeded): a channel sliced at the wrong index or in the
    # wrong order changes the output
    return randomize_norms(net, seed), inputs


def _make(rng: random.Random, gen: torch.Generator, max_stages: int):
    n_inputs = rng.choices([1, 2, 3], [0.6, 0.28, 0.12])[0]
    kind = rng.choices(["img", "tok", "vec"], [0.65, 0.2, 0.15])[0]
    nd = rng.choices([1, 2, 3], [0.25, 0.55, 0.2])[0]
    inputs = [_input(rng, kind, nd, gen)[1]]
    kinds = [kind]
    for _ in range(n_inputs - 1):
        if rng.random() < 0.6:  # same shape as input 0: merged into the main stream
            inputs.append(torch.randn(inputs[0].shape, generator=gen, dtype=DTYPE))
            kinds.append(kind)
        else:
            k2 = rng.choice(["img", "tok", "vec"])
            inputs.append(_input(rng, k2, rng.choice([1, 2]), gen)[1])
            kinds.append(k2)
    b = Builder(rng, n_inputs)
    vals = [Val(i, k, x) for i, (k, x) in enumerate(zip(kinds, inputs))]
    main = vals[0]
    # a stem: inputs are pinned, so start with a producer
    main = b.proj(main, b.ch(2))
    outputs: List[Val] = []
    side: List[Val] = []
    for v in vals[1:]:
        s = b.proj(v, b.ch(2))
        if rng.random() < 0.5:
            s = b.stage(s)
        side.append(s)
    n_stages = rng.randint(2, max_stages)
    merge_at = {rng.randrange(n_stages) for _ in side}
    for i in range(n_stages):
        main = b.stage(main)
        if i in merge_at:
            for s in [s for s in side if _compatible(s, main)]:
                side.remove(s)
                r = rng.random()
                if r < 0.45:
                    s = b.proj(s, main.c)
                    main = b.emit("merge_add", AddN(), [main, s], main.kind)
                elif r < 0.8:
                    main = b.emit("merge_cat", Cat(chan_dim(main.probe, main.kind)), [main, s], main.kind)
                else:
                    s = b.proj(s, main.c)
                    g = b.emit("gate", Act("sigmoid"), [s], s.kind)
                    main = b.emit("merge_mul", MulN(), [main, g], main.kind)
        if main.kind == "img" and rng.random() < 0.08:
            main = b.to_tokens(main) if main.nd >= 1 and rng.random() < 0.5 else b.to_vec(main)
        elif main.kind == "tok" and rng.random() < 0.08:
            main = b.to_vec(main)
        if rng.random() < 0.1:
            outputs.append(main)  # an intermediate output (a tap)
    # heads
    if main.kind != "vec" and rng.random() < 0.7:
        main = b.to_vec(main)
    if rng.random() < 0.7:
        main = b.linear(main) if main.kind != "img" else b.conv(main, variant="pointwise")
    outputs.append(main)
    for s in side:
        if rng.random() < 0.5:
            s = b.to_vec(s) if s.kind != "vec" else b.linear(s)
        outputs.append(s)
    rng.shuffle(outputs)
    fmt = "single" if len(outputs) == 1 and rng.random() < 0.7 else rng.choice(["tuple", "list", "dict"])
    net = RandNet(n_inputs, b.program, b.blocks, [o.reg for o in outputs], fmt).to(DTYPE).eval()
    return net, inputs
