"""Model families outside the classification zoos, for the coverage sweep:
ultralytics YOLO (detect, segment, pose, OBB, classify; v8, v10, 11),
diffusers (UNet2DModel, UNet2DConditionModel with cross-attention,
AutoencoderKL, a DiT transformer), open_clip towers (ResNet with attention
pooling, ViT), segment_anything's image encoder, and Hugging Face
architectures across modalities (``hf_architectures.py``: small random
configs, named by their config class).

Every builder makes a small random-initialised model (no download); a family
whose package is not installed is left out with a message. ``cases(Case)``
returns the sweep's cases (``benchmarks/coverage.py`` passes its ``Case``).

Each family with an export path of its own gets an *exporter*, run by the
sweep on what channelcut hands back (the coverage table's "own exporter"
column): ultralytics ``YOLO.save`` -> ``YOLO(path)`` -> ONNX in onnxruntime
(:func:`yolo_onnx`), Hugging Face ``save_pretrained`` -> ``from_pretrained``
(:func:`hf_save_pretrained`), diffusers ``save_pretrained`` ->
``from_pretrained`` (:func:`diffusers_save_pretrained`).
"""

from __future__ import annotations

import copy
import os
import sys
import tempfile
import warnings
from typing import Any, Callable, Dict, List, Optional

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


def _first_tensor(y: Any) -> torch.Tensor:
    while isinstance(y, (list, tuple)):
        y = y[0]
    return y


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30)) if want.numel() else 0.0


def yolo_onnx(cfg: str) -> Callable[[nn.Module, Any], str]:
    """The exporter of a pruned YOLO model: ``YOLO.save`` -> ``YOLO(path)`` ->
    ``export(format="onnx")``, the ONNX model run in onnxruntime and compared
    with the reloaded PyTorch model (float32, batch 1)."""

    def export(net: nn.Module, inputs: Any) -> str:
        import onnxruntime as ort
        from ultralytics import YOLO

        x = inputs[0][:1].float()
        wrapper = YOLO(cfg, verbose=False)
        wrapper.model = copy.deepcopy(net).float().eval()
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            path = os.path.join(tmp, "pruned.pt")
            wrapper.save(path)
            back = YOLO(path)
            onnx_path = back.export(format="onnx", imgsz=int(x.shape[-1]), simplify=False, verbose=False)
            sess = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
            got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
            with torch.no_grad():
                want = _first_tensor(YOLO(path).model.float().eval()(x))
        err = _rel(got, want)
        return f"ok: ONNX (rel err {err:.0e})" if got.shape == want.shape and err <= 1e-3 else (
            f"FAILED: ONNX output {tuple(got.shape)} differs from PyTorch {tuple(want.shape)} by {err:.2g}")

    return export


def _yolo_cases(Case) -> List[Any]:
    return [Case("ultralytics", cfg[:-5], (lambda c: lambda size: yolo(c))(cfg), exporter=yolo_onnx(cfg))
            for cfg in YOLO_CONFIGS]


# ---------------------------------------------------------------------------
# Hugging Face save_pretrained / from_pretrained
# ---------------------------------------------------------------------------

#: config fields that hold the MLP width, in the architectures that have one
MLP_FIELDS = ("intermediate_size", "n_inner", "ffn_dim", "d_ff", "encoder_ffn_dim", "decoder_ffn_dim",
              "ffn_hidden_size", "hidden_dim")


def _mlp_widths(config: Any) -> set:
    widths = {v for f in MLP_FIELDS if isinstance(v := getattr(config, f, None), int) and v > 0}
    if getattr(config, "n_inner", 0) is None and isinstance(getattr(config, "n_embd", None), int):
        widths.add(4 * config.n_embd)  # GPT-2 style: n_inner None means 4 x the stream
    return widths


def _tensors(out: Any) -> List[torch.Tensor]:
    from channelcut.pruning.model_run import flatten_tensors

    return [t for t in flatten_tensors(out) if t.is_floating_point()]


def hf_save_pretrained(build: Callable[[Optional[int]], nn.Module], make_inputs: Callable[[nn.Module], Any],
                       amount: float = 0.25) -> Callable[[nn.Module, Any], str]:
    """The exporter of a Hugging Face model: a fresh model of the same
    architecture pruned by the same count of MLP channels in every layer
    (what one config can describe; the sweep's random per-layer request is
    saved with ``channelcut.save``), ``channelcut.hf.save_pretrained`` ->
    ``type(model).from_pretrained``, outputs compared in float64."""

    def export(_net: nn.Module, _inputs: Any) -> str:
        from channelcut import MaskingManager, NotExpressibleError, PruningManager, hf

        net = build(None).double().eval()
        x = make_inputs(net)
        widths = _mlp_widths(getattr(net, "config", None))
        pm = PruningManager(net)
        pm.trace(x)
        layers = [n for n, w in pm.consumers().items() if w in widths]
        if not layers:
            return "-"
        MaskingManager(net, x).mask(amount, scope="local", layers=layers, ignore=[])
        pm = PruningManager(net).compute(x).prune()
        with torch.no_grad():
            want = _tensors(net(**x) if isinstance(x, dict) else net(*x))
        try:
            with tempfile.TemporaryDirectory() as tmp:
                hf.save_pretrained(net, tmp)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    back = type(net).from_pretrained(tmp, dtype=torch.float64).eval()
        except NotExpressibleError as exc:
            return f"no: {str(exc)[:160]}"
        with torch.no_grad():
            got = _tensors(back(**x) if isinstance(x, dict) else back(*x))
        err = max((_rel(a, b) for a, b in zip(got, want)), default=0.0)
        if len(got) != len(want) or err > 1e-10:
            return f"FAILED: from_pretrained differs by {err:.2g}"
        before, after = sorted(widths)[-1], sorted(_mlp_widths(back.config))
        n_net, n_back = (sum(p.numel() for p in m.parameters()) for m in (net, back))
        if n_back != n_net:
            return f"FAILED: from_pretrained built {n_back} parameters, the pruned model has {n_net}"
        return f"ok: save_pretrained, MLP {before} -> {'/'.join(map(str, after))} in {len(layers)} layers (rel err {err:.0e})"

    return export


def diffusers_save_pretrained(part: Callable[[nn.Module], nn.Module] = lambda net: net) -> Callable[[nn.Module, Any], str]:
    """The exporter of a diffusers model: ``save_pretrained`` ->
    ``from_pretrained`` of the sweep's pruned model (``part``: the
    ``ModelMixin`` inside a wrapper). Its config holds one width per block,
    so an unconstrained export of random channels does not load back: the
    result says so (*no*) instead of failing."""

    def export(net: nn.Module, _inputs: Any) -> str:
        model = part(net)
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.save_pretrained(tmp)
            try:
                back = type(model).from_pretrained(tmp, torch_dtype=torch.float64)
            except Exception as exc:  # the config describes the unpruned widths
                line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                return f"no: from_pretrained builds the config's widths ({line[:100]}); channelcut.save holds it"
        n_back = sum(p.numel() for p in back.parameters())
        n_net = sum(p.numel() for p in model.parameters())
        return "ok: save_pretrained" if n_back == n_net else "no: from_pretrained rebuilt the unpruned widths"

    return export


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

    own = diffusers_save_pretrained()
    return [
        Case("diffusers", "UNet2DModel", unet2d, unet_inputs(3, False), sizes=(0,), exporter=own),
        Case("diffusers", "UNet2DConditionModel", unet2d_condition, unet_inputs(4, True), sizes=(0,), exporter=own),
        Case("diffusers", "AutoencoderKL", autoencoder_kl, image(32), sizes=(0,),
             exporter=diffusers_save_pretrained(lambda net: net.vae)),
        Case("diffusers", "DiTTransformer2DModel", dit, dit_inputs, sizes=(0,), exporter=own),
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
    import hf_architectures

    for case in hf_architectures.cases(Case):
        case.exporter = hf_save_pretrained(case.build, case.inputs)
        out.append(case)
    return out
