"""Random values for every per-channel constant a pruner must slice in order.

Start at :func:`randomize_norms`. Initialisers leave norms at weight 1 /
bias 0 with running mean 0 / var 1, biases often at 0 and layer scales at one
small constant: identical across channels, so a pruner that slices such a
tensor at the wrong indices, or in the wrong order, still passes. Tests call
:func:`randomize_norms` (seeded, deterministic) before exporting.
"""

from __future__ import annotations

import re
from typing import Iterator, Tuple

import torch
from torch import nn

# ranges: moderate, so that deep nets stay numerically sane in float64
NORM_WEIGHT = (0.5, 1.5)
# biases, running means: small next to the activations of default-initialised
# small nets (conv outputs of std ~0.1), so that a ReLU after a shifted norm
# rarely kills a whole channel (a dead channel hides a mis-slice); -0.5..0.5
# killed 2 of 8 channels in tests/pruning's grouped_conv case
SHIFT = (-0.2, 0.2)
RUNNING_VAR = (0.5, 2.0)
LAYER_SCALE = (0.1, 0.5)
PRELU_SLOPE = (0.0, 0.5)

_NORM_BASES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)
if hasattr(nn, "RMSNorm"):
    _NORM_BASES = _NORM_BASES + (nn.RMSNorm,)
# timm / Hugging Face / torchvision norms by class name: LayerNorm2d, BatchNormAct2d,
# FrozenBatchNorm2d, GroupNorm1, LlamaRMSNorm, RmsNorm2d, T5LayerNorm, ...
_NORM_NAME = re.compile(r"Norm(Act)?\d*d?$|RMSNorm|RmsNorm")
_NORM_TENSORS = ("weight", "bias", "running_mean", "running_var")
# layer-scale parameters: timm ``gamma`` / ``ls1.gamma`` / ``gamma_1``, torchvision
# ConvNeXt ``layer_scale``, MetaFormer ``layer_scale1.scale``, ...
_LAYER_SCALE_NAME = re.compile(r"^(gamma|layer_scale|ls|scale)_?\d*$")


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, _NORM_BASES) or bool(_NORM_NAME.search(type(module).__name__))


def _uniform(t: torch.Tensor, lo_hi: Tuple[float, float], gen: torch.Generator) -> torch.Tensor:
    lo, hi = lo_hi
    u = torch.rand(t.shape, generator=gen, dtype=torch.float64)
    return (lo + (hi - lo) * u).to(dtype=t.dtype, device=t.device)


def _own_tensors(module: nn.Module) -> Iterator[Tuple[str, torch.Tensor]]:
    yield from module.named_parameters(recurse=False)
    yield from module.named_buffers(recurse=False)


@torch.no_grad()
def randomize_norms(net: nn.Module, seed: int) -> nn.Module:
    """Give every normalisation layer random affine weight/bias and running
    statistics (BatchNorm, InstanceNorm with running stats, GroupNorm,
    LayerNorm, RMSNorm and timm / HF norm classes: their own ``weight``,
    ``bias``, ``running_mean``, ``running_var``, parameters or buffers), every
    layer-scale parameter, every per-channel PReLU slope, and every parameter
    named ``bias`` (or ``*_bias``: ``in_proj_bias``, ``q_bias``); in place, deterministic in ``seed`` and
    the model's structure. Returns ``net``.

    Ranges: norm weights and layer scales positive (0.5..1.5, 0.1..0.5),
    biases and running means -0.2..0.2, running variances 0.5..2. A tensor
    shared by several modules is drawn once.

    >>> net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    >>> _ = randomize_norms(net, 0)
    >>> bool((net[1].running_var >= 0.5).all()), len(set(net[1].weight.tolist()))
    (True, 4)
    """
    gen = torch.Generator().manual_seed(seed)
    done = set()
    for _, module in net.named_modules():
        norm = is_norm(module)
        for name, t in _own_tensors(module):
            if id(t) in done or not t.is_floating_point() or t.numel() == 0:
                continue
            if norm and name in _NORM_TENSORS:
                rng = {"weight": NORM_WEIGHT, "running_var": RUNNING_VAR}.get(name, SHIFT)
            elif isinstance(t, nn.Parameter) and (name == "bias" or name.endswith("_bias")):
                rng = SHIFT
            elif isinstance(t, nn.Parameter) and _LAYER_SCALE_NAME.match(name) and t.numel() > 1:
                rng = LAYER_SCALE
            elif isinstance(module, nn.PReLU) and t.numel() > 1:
                rng = PRELU_SLOPE
            else:
                continue
            done.add(id(t))
            t.copy_(_uniform(t, rng, gen))
    return net
