"""Zoo smoke tests: a representative fast subset of ``benchmarks/coverage.py``.

Each model is random-initialised in float64 at a small input; 30% of every
consumer's input channels are pruned (seeded), and the pruned model must
reproduce the mock model to 1e-10 relative, unconstrained and constrained.
The full sweep (every torchvision model, ~80 timm architectures) is the
benchmark script; these cover one model per family of ops: residual streams,
concatenation, grouped / depthwise convs, channel shuffle, squeeze-excite,
channels-last layer norms, attention, dict outputs, feature-pyramid outputs.
"""

from __future__ import annotations

import random
from typing import Any, Callable, Dict, List, Tuple

import pytest
import torch
import torchvision
from torch import nn

from channelcut import PruningManager

SEED = 0


def _tv(name: str, **kw: Any) -> Callable[[], nn.Module]:
    return lambda: torchvision.models.get_model(name, weights=None, **kw)


def _timm(name: str, **kw: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, **kw)

    return build


def _fpn() -> nn.Module:
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    return resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5)


def _small_vit() -> nn.Module:  # torchvision's ViT code (class token, nn.MultiheadAttention), 2 layers
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128)


def _small_convnext() -> nn.Module:  # torchvision's ConvNeXt code (permute, LayerNorm, layer scale), 2 stages
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    return ConvNeXt([CNBlockConfig(32, 64, 2), CNBlockConfig(64, None, 2)], stochastic_depth_prob=0.1)


# (id, builder, input size)
MODELS: List[Tuple[str, Callable[[], nn.Module], int]] = [
    ("tv-resnet18", _tv("resnet18"), 64),  # residual stream
    ("tv-mobilenet_v3_small", _tv("mobilenet_v3_small"), 64),  # depthwise, SE, hardswish
    ("tv-shufflenet_v2_x0_5", _tv("shufflenet_v2_x0_5"), 64),  # chunk + channel shuffle
    ("tv-regnet_x_400mf", _tv("regnet_x_400mf"), 64),  # grouped convs
    ("tv-squeezenet1_1", _tv("squeezenet1_1"), 64),  # concat
    ("tv-convnext_small_config", _small_convnext, 64),  # channels-last LayerNorm, layer scale
    ("tv-vit_small_config", _small_vit, 32),  # class token, MHA
    ("tv-lraspp_mobilenet_v3_large", _tv("lraspp_mobilenet_v3_large", weights_backbone=None), 64),  # dict out
    ("tv-resnet18_fpn_backbone", _fpn, 64),  # OrderedDict of pyramid levels
    ("timm-resnet26t", _timm("resnet26t"), 64),
    ("timm-efficientnet_b0", _timm("efficientnet_b0"), 64),
    ("timm-convnext_atto", _timm("convnext_atto"), 64),
    ("timm-vit_tiny_patch16_224", _timm("vit_tiny_patch16_224", img_size=32), 32),
    ("timm-poolformer_s12", _timm("poolformer_s12"), 64),
]


def _tensors(out: Any) -> List[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for k in out for t in _tensors(out[k])]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors(o)]
    return []


def _max_rel_error(out: Any, ref: Any) -> float:
    a, b = _tensors(out), _tensors(ref)
    assert len(a) == len(b) and a, f"{len(a)} output tensors, expected {len(b)}"
    worst = 0.0
    for x, y in zip(a, b):
        assert x.shape == y.shape, f"pruned output {tuple(x.shape)} != mock output {tuple(y.shape)}"
        worst = max(worst, float((x - y).abs().max()) / max(float(y.abs().max()), 1e-300))
    return worst


def _request(consumers: Dict[str, int]) -> List[Tuple[str, int]]:
    pruned = []
    for name in sorted(consumers):
        n = consumers[name]
        rng = random.Random(f"{SEED}:{name}")
        pruned += [(name, c) for c in sorted(rng.sample(range(n), int(round(0.3 * n))))]
    return pruned


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("constrained", [False, True], ids=["unconstrained", "constrained"])
@pytest.mark.parametrize("build,size", [pytest.param(b, s, id=i) for i, b, s in MODELS])
def test_zoo_model_exports_exactly(build, size, constrained):
    torch.manual_seed(SEED)
    net = build().double().eval()
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(SEED), dtype=torch.float64)
    manager = PruningManager(net)
    manager.trace([x])
    pruned = _request(manager.consumers())
    manager.compute([x], pruned_inputs=pruned, constrained=constrained)
    params_before = sum(p.numel() for p in net.parameters())
    with torch.no_grad():
        ref = manager.get_mock_model()(x)
    manager.prune(verify=False)
    with torch.no_grad():
        out = net(x)
    err = _max_rel_error(out, ref)
    assert err <= 1e-10, f"pruned model differs from the mock by {err:.3g} (relative)\n{manager.spec.summary()}"
    assert sum(p.numel() for p in net.parameters()) < params_before, "nothing was pruned"
    if constrained:
        assert manager.spec.copied_channels == 0
