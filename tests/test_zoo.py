"""Zoo smoke tests: a representative fast subset of ``benchmarks/coverage.py``.

Each model is random-initialised in float64 at a small input, with random
norms (affine parameters, running statistics), layer scales and biases
(``support.randomize``); 30% of every consumer's input channels are pruned
(seeded), and the pruned model must reproduce, to 1e-10 relative,
unconstrained and constrained, both the mock model and the independent
reference: the original model with the request plus the reported additions
zeroed by hand (``support.reference``; unconstrained adds nothing,
constrained only channels of the request's channel groups, and no layer
is left reading nothing), and every width attribute of the pruned model must
agree with its tensors (``support.widths``: attention heads, norms, Subselect
layers).
The full sweep (every torchvision model, ~80 timm architectures) is the
benchmark script; these cover one model per family of ops: residual streams,
concatenation, grouped / depthwise convs, channel shuffle, squeeze-excite,
channels-last layer norms, attention, dict outputs, feature-pyramid outputs,
and two small random Hugging Face configs (BERT, GPT-2; transformers is in the
test extra). About 35 s on one core.
"""

from __future__ import annotations

import random
from typing import Any, Callable, Dict, List, Tuple

import pytest
import torch
import torchvision
from torch import nn

from channelcut import PruningManager
from support.randomize import randomize_norms
from support.reference import check_removal, zeroed_reference
from support.widths import check_widths

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
    ("tv-densenet121", _tv("densenet121"), 64),  # dense concatenation
    ("tv-googlenet", _tv("googlenet"), 64),  # inception branches
    ("tv-convnext_small_config", _small_convnext, 64),  # channels-last LayerNorm, layer scale
    ("tv-vit_small_config", _small_vit, 32),  # class token, MHA
    ("tv-lraspp_mobilenet_v3_large", _tv("lraspp_mobilenet_v3_large", weights_backbone=None), 64),  # dict out
    ("tv-deeplabv3_mobilenet_v3_large", _tv("deeplabv3_mobilenet_v3_large", weights_backbone=None, aux_loss=False), 64),
    ("tv-resnet18_fpn_backbone", _fpn, 64),  # OrderedDict of pyramid levels
    ("timm-resnet26t", _timm("resnet26t"), 64),
    ("timm-efficientnet_b0", _timm("efficientnet_b0"), 64),
    ("timm-convnext_atto", _timm("convnext_atto"), 64),
    ("timm-vit_tiny_patch16_224", _timm("vit_tiny_patch16_224", img_size=32), 32),
    ("timm-poolformer_s12", _timm("poolformer_s12"), 64),
    ("timm-mixnet_s", _timm("mixnet_s"), 64),  # split with literal sizes (pinned, must stay exact)
    ("timm-dpn68", _timm("dpn68"), 64),  # dual path: slicing with literal bounds
    ("timm-skresnet18", _timm("skresnet18"), 64),  # stack on a new dim, selective kernel
    ("timm-swin_tiny", _timm("swin_tiny_patch4_window7_224", img_size=64), 64),  # windows, relative bias
    ("timm-levit_128s", _timm("levit_128s", img_size=64), 64),  # attention with split q/k/v
    ("timm-coat_lite_tiny", _timm("coat_lite_tiny", img_size=64), 64),  # shared (aliased) modules
    ("timm-eva02_tiny", _timm("eva02_tiny_patch14_224", img_size=64), 64),  # rope, computed qkv bias, SwiGLU
    ("timm-maxvit_pico", _timm("maxvit_pico_rw_256", img_size=64), 64),  # block + grid attention
    ("timm-mobilevitv2_050", _timm("mobilevitv2_050"), 64),  # unfold-based transformer
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


@pytest.mark.parametrize("constrained", [False, True], ids=["unconstrained", "constrained"])
@pytest.mark.parametrize("build,size", [pytest.param(b, s, id=i) for i, b, s in MODELS])
def test_zoo_model_exports_exactly(build, size, constrained):
    torch.manual_seed(SEED)
    net = randomize_norms(build().double().eval(), SEED)
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(SEED), dtype=torch.float64)
    manager = PruningManager(net)
    manager.trace([x])
    pruned = _request(manager.consumers())
    manager.compute([x], pruned_inputs=pruned, constrained=constrained)
    params_before = sum(p.numel() for p in net.parameters())
    with torch.no_grad():
        ref = manager.get_mock_model()(x)
    y_indep = _independent_reference(manager, net, [x], pruned)
    manager.prune(verify=False)
    widths = check_widths(net, [x])
    assert not widths, "widths after prune:\n" + "\n".join(widths)
    with torch.no_grad():
        out = net(x)
    err = _max_rel_error(out, ref)
    assert err <= 1e-10, f"pruned model differs from the mock by {err:.3g} (relative)\n{manager.spec.summary()}"
    err = _max_rel_error(out, y_indep)
    assert err <= 1e-10, f"pruned model differs from the independent reference by {err:.3g} (relative)\n{manager.spec.summary()}"
    assert sum(p.numel() for p in net.parameters()) < params_before, "nothing was pruned"
    if constrained:
        assert manager.spec.copied_channels == 0


def _independent_reference(manager: PruningManager, net: nn.Module, inputs: Any, pruned: List[Tuple[str, int]]) -> Any:
    """The outputs of the original ``net`` with the request plus the spec's
    reported additions zeroed by hand, after checking those additions against
    the channel groups (``support.reference.check_removal``)."""
    removed, problems = check_removal(manager.spec, manager.channel_groups(), pruned, widths=manager.consumers())
    assert not problems, "\n".join(problems)
    ref = zeroed_reference(net, removed, manager.graph)
    with torch.no_grad():
        return ref(**inputs) if isinstance(inputs, dict) else ref(*inputs)


def _hf(kind: str) -> nn.Module:
    import transformers  # in the test extra: CI always runs these
    if kind == "bert":
        return transformers.BertModel(transformers.BertConfig(
            vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=64))
    return transformers.GPT2Model(transformers.GPT2Config(vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                                          use_cache=False))


@pytest.mark.parametrize("constrained", [False, True], ids=["unconstrained", "constrained"])
@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_zoo_transformers_export_exactly(kind, constrained):
    torch.manual_seed(SEED)
    net = randomize_norms(_hf(kind).double().eval(), SEED)
    inputs = {"input_ids": torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(SEED))}
    manager = PruningManager(net)
    manager.trace(inputs)
    pruned = _request(manager.consumers())
    manager.compute(inputs, pruned_inputs=pruned, constrained=constrained)
    with torch.no_grad():
        ref = manager.get_mock_model()(**inputs).last_hidden_state
    y_indep = _independent_reference(manager, net, inputs, pruned).last_hidden_state
    manager.prune(verify=False)
    widths = check_widths(net, inputs)
    assert not widths, "widths after prune:\n" + "\n".join(widths)
    with torch.no_grad():
        out = net(**inputs).last_hidden_state
    err = _max_rel_error(out, ref)
    assert err <= 1e-10, f"pruned model differs from the mock by {err:.3g} (relative)"
    err = _max_rel_error(out, y_indep)
    assert err <= 1e-10, f"pruned model differs from the independent reference by {err:.3g} (relative)"


# zoo models whose shape-only pass hands over to a real pass, and why
REAL_PASS = {
    "timm-levit_128s": "its attention fills a cache keyed by the device in forward",
}


@pytest.mark.parametrize("build,size,model_id", [pytest.param(b, s, i, id=i) for i, b, s in MODELS])
def test_zoo_shape_only_trace_is_the_real_trace(build, size, model_id):
    """The shape-only pass (ops on meta tensors) gives the very graph a pass
    with real values gives, and leaves the model as it was; it is kept on
    every zoo model but those in ``REAL_PASS``. (All 178 coverage models:
    the *trace* column of ``benchmarks/coverage.py``.)"""
    import export_props

    torch.manual_seed(SEED)
    net = build().double().eval()
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(SEED), dtype=torch.float64)
    kept, problems = export_props.check_shape_only_trace(net, [x])
    assert not problems, "\n".join(problems)
    assert kept == (model_id not in REAL_PASS), f"shape-only pass kept: {kept}"


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_zoo_transformers_shape_only_trace_is_the_real_trace(kind):
    import export_props

    torch.manual_seed(SEED)
    net = _hf(kind).double().eval()
    inputs = {"input_ids": torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(SEED))}
    kept, problems = export_props.check_shape_only_trace(net, inputs)
    assert not problems, "\n".join(problems)
    assert kept, "the shape-only pass handed over to a real pass"
