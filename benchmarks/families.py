"""Model families outside the classification zoos, for the coverage sweep:
ultralytics YOLO (detect, segment, pose, OBB, classify; v8, v10, 11),
diffusers (UNet2DModel, UNet2DConditionModel with cross-attention,
AutoencoderKL, a DiT transformer), open_clip towers (ResNet with attention
pooling, ViT), segment_anything's image encoder, and Hugging Face
architectures across modalities (small random configs, named by their config
class).

Every builder makes a small random-initialised model (no download); a family
whose package is not installed is left out with a message. ``cases(Case)``
returns the sweep's cases (``benchmarks/coverage.py`` passes its ``Case``).
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any, Dict, List

import torch
from torch import nn

SEED = 0
BATCH = 2


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(SEED)


def _have(module: str) -> bool:
    try:
        __import__(module)
        return True
    except Exception:  # an extra that is missing or broken: its family is left out
        print(f"{module} is not installed: skipping its models", file=sys.stderr)
        return False


# ---------------------------------------------------------------------------
# ultralytics
# ---------------------------------------------------------------------------

YOLO_CONFIGS = [
    "yolov8n.yaml", "yolov8n-seg.yaml", "yolov8n-pose.yaml", "yolov8n-obb.yaml", "yolov8n-cls.yaml",
    "yolov10n.yaml", "yolo11n.yaml", "yolo11n-seg.yaml", "yolo11n-pose.yaml",
]


def yolo(cfg: str) -> nn.Module:
    """The ``nn.Module`` of ``YOLO(cfg)`` (random weights, built from the yaml)."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    from ultralytics import YOLO

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return YOLO(cfg, verbose=False).model


def _yolo_cases(Case) -> List[Any]:
    return [Case("ultralytics", cfg[:-5], (lambda c: lambda size: yolo(c))(cfg)) for cfg in YOLO_CONFIGS]


# ---------------------------------------------------------------------------
# diffusers
# ---------------------------------------------------------------------------


def unet2d(_size=None) -> nn.Module:
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(32, 64), norm_num_groups=8, attention_head_dim=8,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"))


def unet2d_condition(_size=None) -> nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=32,
                                attention_head_dim=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def autoencoder_kl(_size=None) -> nn.Module:
    from diffusers import AutoencoderKL

    class Roundtrip(nn.Module):
        """encode -> the posterior's mode -> decode (no sampling: deterministic)."""

        def __init__(self) -> None:
            super().__init__()
            self.vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                                     block_out_channels=(32, 64), norm_num_groups=8,
                                     down_block_types=("DownEncoderBlock2D",) * 2,
                                     up_block_types=("UpDecoderBlock2D",) * 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.vae.decode(self.vae.encode(x).latent_dist.mode()).sample

    return Roundtrip()


def dit(_size=None) -> nn.Module:
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                                 num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10)


def _diffusers_cases(Case) -> List[Any]:
    def unet_inputs(ch: int, cond: bool):
        def make(_net: nn.Module) -> Dict[str, Any]:
            g = _gen()
            d: Dict[str, Any] = {"sample": torch.randn(BATCH, ch, 16, 16, generator=g, dtype=torch.float64),
                                 "timestep": torch.tensor([3, 17])}
            if cond:
                d["encoder_hidden_states"] = torch.randn(BATCH, 5, 32, generator=g, dtype=torch.float64)
            return d
        return make

    def dit_inputs(_net: nn.Module) -> Dict[str, Any]:
        g = _gen()
        return {"hidden_states": torch.randn(BATCH, 4, 8, 8, generator=g, dtype=torch.float64),
                "timestep": torch.tensor([3, 7]), "class_labels": torch.tensor([1, 4])}

    def image(size: int):
        return lambda _net: [torch.rand(BATCH, 3, size, size, generator=_gen(), dtype=torch.float64)]

    return [
        Case("diffusers", "UNet2DModel", unet2d, unet_inputs(3, False), sizes=(0,)),
        Case("diffusers", "UNet2DConditionModel", unet2d_condition, unet_inputs(4, True), sizes=(0,)),
        Case("diffusers", "AutoencoderKL", autoencoder_kl, image(32), sizes=(0,)),
        Case("diffusers", "DiTTransformer2DModel", dit, dit_inputs, sizes=(0,)),
    ]


# ---------------------------------------------------------------------------
# open_clip and segment_anything
# ---------------------------------------------------------------------------


def open_clip_visual(name: str, size: int = 64) -> nn.Module:
    import open_clip

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = open_clip.create_model(name, pretrained=None, force_image_size=size)
    return model.visual


def open_clip_text(name: str) -> nn.Module:
    import open_clip

    class Text(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.clip = open_clip.create_model(name, pretrained=None)
            self.clip.visual = nn.Identity()

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.clip.encode_text(tokens)

    return Text()


def sam_image_encoder(_size=None) -> nn.Module:
    from functools import partial

    from segment_anything.modeling import ImageEncoderViT

    return ImageEncoderViT(img_size=64, patch_size=8, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0,
                           out_chans=32, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                           use_rel_pos=True, window_size=4, global_attn_indexes=(1,))


def _clip_sam_cases(Case) -> List[Any]:
    cases = []
    if _have("open_clip"):
        cases += [
            Case("open_clip", "RN50.visual", lambda size: open_clip_visual("RN50", size), sizes=(64,)),
            Case("open_clip", "ViT-B-32.visual", lambda size: open_clip_visual("ViT-B-32", size), sizes=(64,)),
            Case("open_clip", "RN50.text", lambda _s: open_clip_text("RN50"),
                 lambda _net: [torch.randint(0, 49408, (BATCH, 77), generator=_gen())], sizes=(0,)),
        ]
    if _have("segment_anything"):
        cases.append(Case("segment_anything", "ImageEncoderViT", sam_image_encoder, sizes=(64,)))
    return cases


def cases(Case) -> List[Any]:
    """The sweep's cases of every installed family (``Case``: coverage's dataclass)."""
    out: List[Any] = []
    if _have("ultralytics"):
        out += _yolo_cases(Case)
    if _have("diffusers"):
        out += _diffusers_cases(Case)
    out += _clip_sam_cases(Case)
    return out
