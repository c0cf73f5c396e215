"""The model variants the performance benchmarks compare, built from one set of masks.

Shared by ``compare.py`` (CPU: export time, latency, copies, memory) and
``gpu_latency.py`` (CUDA latency). Needs only torch, torchvision and
channelcut; the peers (``apple-upscale``, ``torch-pruning``) are imported
lazily and their variants are skipped when they are not installed
(:func:`have_upscale`, :func:`have_torch_pruning`).

Start at :func:`build_variants`. Given a model, an example input and one list
of ``(consumer weight name, input channel)`` pairs it returns:

=================  ==========================================================
``dense``          the unpruned model
``unconstrained``  channelcut, unconstrained export (channel reordering on)
``baseline``       channelcut, unconstrained, no reordering: one gather per
                   consumer that reads a subset
``upscale``        apple-upscale 0.1.1, unconstrained export of the same
                   pairs (its default ``prune()``)
``constrained``    channelcut, constrained export of the same pairs (grows the
                   pruned set until consumers agree: zero copies)
``torch_pruning``  torch-pruning's ``MagnitudePruner`` (L1) with the ratio
                   that matches the MACs of the unconstrained export; a
                   different (constrained-only) pruning pattern, for reference
``ideal``          the physical limit of this pruning pattern, see
                   :func:`make_ideal`
=================  ==========================================================

The masks are per-consumer L1-magnitude input-channel masks from
:class:`channelcut.MaskingManager` (``select``; weights are not touched), so
every tool exports exactly the same pruning pattern.
"""

from __future__ import annotations

import copy
import gc
import logging
import math
import os
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torchvision
from torch import nn

from channelcut import MaskingManager, PruningManager
from channelcut.importance import L1
from channelcut.pruning.subselect import SubselectMixin, is_subselect
from channelcut.stats import count_macs

Pair = Tuple[str, int]

VARIANTS = ["dense", "unconstrained", "device_costs", "gather", "baseline", "upscale", "constrained", "torch_pruning", "ideal"]
LABELS = {
    "dense": "dense",
    "unconstrained": "channelcut unconstrained",
    "device_costs": "channelcut unconstrained, the device's costs (calibrate_costs, exported at this batch)",
    "gather": "channelcut unconstrained, no cost model (always gather)",
    "baseline": "channelcut baseline (no reorder)",
    "upscale": "apple-upscale (same masks)",
    "constrained": "channelcut constrained",
    "torch_pruning": "torch-pruning (same MACs)",
    "ideal": "ideal (no copies)",
}


# ----------------------------------------------------------------------------
# models and masks
# ----------------------------------------------------------------------------
def build_model(name: str, seed: int = 0) -> nn.Module:
    """A randomly initialised torchvision classification model, in eval mode."""
    torch.manual_seed(seed)
    return getattr(torchvision.models, name)(weights=None).eval()


def image_size(name: str, wanted: int) -> int:
    """ViTs are built for 224x224 and accept nothing else."""
    return 224 if name.startswith("vit_") else wanted


def select_masks(model: nn.Module, x: torch.Tensor, amounts: List[float]) -> Tuple[Dict[float, List[Pair]], str]:
    """Per-consumer L1 input-channel masks at each amount (the classifier head
    keeps its inputs), and the module name of that head."""
    mm = MaskingManager(model, [x]).importance(L1())
    head = mm.head
    if head is None:
        head_name = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    else:
        head_name = head.rpartition(".")[0]
    return {a: mm.select(a) for a in amounts}, head_name


def engine_version() -> str:
    """The channelcut commit this run used (with ``+dirty`` when src/ has uncommitted changes)."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:
        return "unknown"
    return (head or "unknown") + ("+dirty" if dirty else "")


# ----------------------------------------------------------------------------
# exports
# ----------------------------------------------------------------------------
class Export:
    """One exported variant: the model, how long the export took, what it copies."""

    def __init__(self, model: nn.Module, compute_s: float, prune_s: float, **info: Any) -> None:
        self.model = model
        self.compute_s = compute_s
        self.prune_s = prune_s
        self.info = info

    @property
    def total_s(self) -> float:
        return self.compute_s + self.prune_s


def fresh_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` to export, with the garbage the copy leaves
    collected: every tool's timer starts after it, so none pays for a
    collection the benchmark's own copy set off."""
    net = copy.deepcopy(model)
    gc.collect()
    return net


def export_channelcut(
    model: nn.Module, x: torch.Tensor, pairs: List[Pair], mode: str, copy_cost: Optional[float] = None,
    op_cost: Optional[float] = None,
) -> Export:
    """channelcut's export of ``pairs`` on a copy of ``model``; ``mode`` is
    ``unconstrained``, ``baseline`` or ``constrained``; ``copy_cost`` and
    ``op_cost`` as in ``compute`` (None: its default cost model, copy_cost 0:
    always gather)."""
    net = fresh_copy(model)
    t0 = time.perf_counter()
    m = PruningManager(net).compute(
        [x], pruned_inputs=pairs, constrained=mode == "constrained", baseline=mode == "baseline",
        copy_cost=copy_cost, op_cost=op_cost,
    )
    t1 = time.perf_counter()
    m.prune(verify=False)
    t2 = time.perf_counter()
    spec = m.spec
    return Export(
        net, t1 - t0, t2 - t1,
        copied_channels=spec.copied_channels, copy_ops=spec.copy_ops, view_ops=spec.view_ops,
        zero_columns=sum(len(z.channels) for z in spec.zeros), superset_reads=spec.superset_reads,
    )


def time_channelcut_default(model: nn.Module, x: torch.Tensor, pairs: List[Pair]) -> float:
    """Seconds for channelcut's default path on a copy of ``model``:
    ``compute`` then ``prune()`` with its verification (the reference run and
    the pruned model's run)."""
    net = fresh_copy(model)
    t0 = time.perf_counter()
    PruningManager(net).compute([x], pruned_inputs=pairs).prune()
    return time.perf_counter() - t0


def have_upscale() -> bool:
    try:
        import upscale.pruning  # noqa: F401
    except Exception:
        return False
    return True


def have_torch_pruning() -> bool:
    try:
        import torch_pruning  # noqa: F401
    except Exception:
        return False
    return True


def export_upscale(model: nn.Module, x: torch.Tensor, pairs: List[Pair]) -> Export:
    """apple-upscale's unconstrained export of the same ``pairs`` (its defaults:
    producer and consumer reordering on, ``prune()`` with ``is_not_ane=False``)."""
    from upscale.pruning import PruningManager as UpscaleManager

    quiet_upscale()
    net = fresh_copy(model)
    t0 = time.perf_counter()
    m = UpscaleManager(net).compute([x], pruned_inputs=pairs)
    t1 = time.perf_counter()
    m.prune()
    t2 = time.perf_counter()
    return Export(net, t1 - t0, t2 - t1, **upscale_copies(net))


def quiet_upscale() -> None:
    """apple-upscale logs a warning per op it does not follow; keep the errors only."""
    logging.getLogger("pruning").setLevel(logging.ERROR)


def upscale_copies(model: nn.Module) -> Dict[str, int]:
    """Copies in an apple-upscale export, read from its ``Subselect`` layers.

    A ``Subselect`` whose indices are a ``range`` narrows (a view); any other
    index list is read as ``torch.cat`` of its contiguous runs: one copy op of
    ``len(indices)`` channels (``cat`` always allocates, even for one run).
    """
    from upscale.pruning.pruner import Subselect

    out = {"copied_channels": 0, "copy_ops": 0, "view_ops": 0, "zero_columns": 0}
    for m in model.modules():
        if isinstance(m, Subselect):
            if isinstance(m.indices, range) and not m.baseline:
                out["view_ops"] += 1
            else:
                out["copy_ops"] += 1
                out["copied_channels"] += len(m.indices)
    return out


def export_torch_pruning(model: nn.Module, x: torch.Tensor, ratio: float, head: str) -> Export:
    """torch-pruning's ``MagnitudePruner`` (L1 magnitude) at ``ratio`` on a copy
    of ``model``; ``head`` (a module name) is left alone. The time is graph
    build + pruner init + ``step()``. ViTs get torch-pruning's recipe (attention
    heads declared, ``hidden_dim`` fixed afterwards)."""
    import torch_pruning as tp

    net = fresh_copy(model)
    kwargs: Dict[str, Any] = {}
    vit = isinstance(net, torchvision.models.VisionTransformer)
    if vit:
        kwargs["num_heads"] = {m: m.num_heads for m in net.modules() if isinstance(m, nn.MultiheadAttention)}
        kwargs["prune_head_dims"] = True
        kwargs["prune_num_heads"] = False
    t0 = time.perf_counter()
    pruner = tp.pruner.MagnitudePruner(
        net, x, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=ratio,
        ignored_layers=[net.get_submodule(head)], **kwargs,
    )
    pruner.step()
    t1 = time.perf_counter()
    if vit:
        net.hidden_dim = net.conv_proj.out_channels
        for m in net.modules():
            if isinstance(m, nn.MultiheadAttention):
                m.head_dim = m.embed_dim // m.num_heads
    return Export(net, t1 - t0, 0.0, copied_channels=0, copy_ops=0, view_ops=0, zero_columns=0, ratio=ratio)


def export_torch_pruning_matched(
    model: nn.Module, x: torch.Tensor, target_macs: int, head: str, dense_macs: int
) -> Tuple[Export, List[float]]:
    """torch-pruning at the ratio whose MACs come closest to ``target_macs``.

    Constrained pruning at ratio p shrinks both sides of most layers, so MACs
    fall roughly like (1-p)^k with k near 2. One run at the k=2 guess measures
    k for this model; a second run uses it; the closer of the two is kept.
    Returns the export and the times of all runs.
    """
    frac = max(min(target_macs / dense_macs, 0.999), 0.01)
    p = 1 - math.sqrt(frac)
    best: Optional[Tuple[float, Export]] = None
    times: List[float] = []
    for _ in range(2):
        p = min(max(p, 0.01), 0.9)
        e = export_torch_pruning(model, x, p, head)
        times.append(e.compute_s)
        macs = count_macs(e.model, [x])
        e.info["macs"] = macs
        err = abs(math.log(macs / target_macs))
        if best is None or err < best[0]:
            best = (err, e)
        got = macs / dense_macs
        if got >= 0.999 or err < 0.01:
            break
        k = math.log(got) / math.log(1 - p)
        p = 1 - frac ** (1 / k)
    assert best is not None
    return best[1], times


# ----------------------------------------------------------------------------
# the ideal model
# ----------------------------------------------------------------------------
class FreeRead:
    """Forward pre-hook of an ideal model's consumer: hands it a ``length``-channel
    input at no cost.

    ``x.narrow(dim, 0, length)`` is a view; where it is also contiguous in
    memory (NCHW at batch 1) it is exactly what a dense layer of that width
    would read. Where it is not (larger batches, the last dim of a linear
    layer's input) a consumer could pay for the strided read, so the hook
    returns a contiguous tensor of that shape made once on the first call and
    reused (its values are stale from then on, which does not change the
    time a dense layer takes).
    """

    def __init__(self, dim: int, length: int) -> None:
        self.dim = dim
        self.length = length
        self.cache: Dict[Any, torch.Tensor] = {}

    def __call__(self, module: nn.Module, args: Tuple[Any, ...]) -> Tuple[Any, ...]:
        x = args[0]
        y = x.narrow(self.dim, 0, self.length)
        if not y.is_contiguous():
            key = (tuple(y.shape), y.dtype, y.device)
            buf = self.cache.get(key)
            if buf is None:
                buf = self.cache[key] = y.contiguous()
            y = buf
        # attention reads its input as query, key and value: the same tensor
        # three times (self-attention) gets the same free read each time
        rest = tuple(y if a is x else a for a in args[1:])
        return (y,) + rest


def _plain_class(cls: type) -> type:
    base = getattr(cls, "subselect_base", None)
    if base is not None:
        return base
    return next(b for b in cls.__bases__ if b is not SubselectMixin)


def make_ideal(pruned: nn.Module) -> nn.Module:
    """The ideal model of a channelcut unconstrained export.

    A copy of the pruned model in which every consumer that reads a subset
    of its input (a Subselect layer: view or gather) becomes its plain class
    again and reads a ``length``-channel input for free (:class:`FreeRead`).
    Every layer keeps exactly the pruned widths (producers still emit every
    channel some consumer needs); nothing is gathered or concatenated. That
    is the cost of a dense model with the pruned model's layer widths and no
    copies, i.e. the physical limit of this pruning pattern. Its outputs are
    not those of the pruned model (consumers read the wrong channels): it is
    for timing only.
    """
    ideal = copy.deepcopy(pruned)
    for m in ideal.modules():
        if is_subselect(m):
            dim, length = int(m.subselect_dim), int(m.subselect_length)
            m.__class__ = _plain_class(type(m))
            m.register_forward_pre_hook(FreeRead(dim, length))
    return ideal


# ----------------------------------------------------------------------------
# everything at once
# ----------------------------------------------------------------------------
def build_variants(
    name: str,
    model: nn.Module,
    x: torch.Tensor,
    pairs: List[Pair],
    head: str,
    peers: bool = True,
    log: Callable[[str], None] = lambda s: None,
) -> Tuple[Dict[str, nn.Module], Dict[str, Dict[str, Any]]]:
    """Export every variant of ``model`` for one list of pruned ``pairs``.

    Returns ``(models, info)``: name -> model (variants whose export failed
    are missing) and name -> facts (export times, copies, MACs, parameters,
    or ``error``).
    """
    models: Dict[str, nn.Module] = {"dense": model}
    info: Dict[str, Dict[str, Any]] = {}
    dense_macs = count_macs(model, [x])
    info["dense"] = {"macs": dense_macs, "params": sum(p.numel() for p in model.parameters())}

    ref: List[torch.Tensor] = []  # the unconstrained export's output

    def record(key: str, fn: Callable[[], Export]) -> Optional[Export]:
        try:
            e = fn()
            with torch.no_grad():
                y = e.model(x)
            if key == "unconstrained":
                ref.append(y)
            elif key in ("gather", "baseline", "upscale") and ref:
                # the same masks must give the same function (up to float32 rounding)
                diff = float((y - ref[0]).abs().max())
                if not diff <= 1e-3 * max(1.0, float(ref[0].abs().max())):
                    raise RuntimeError(f"exported model differs from channelcut's export of the same masks by {diff:.3g}")
                e.info["max_abs_diff_vs_unconstrained"] = diff
        except Exception as exc:  # a peer that cannot export this model, or exports it wrong
            text = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
            msg = f"{type(exc).__name__}: {text}"
            info[key] = {"error": msg}
            log(f"{name}: {key} failed: {msg}")
            return None
        models[key] = e.model
        d = {"compute_s": e.compute_s, "prune_s": e.prune_s, **e.info}
        if key in ("unconstrained", "constrained"):  # baseline and apple-upscale: the same widths as unconstrained
            d.setdefault("macs", count_macs(e.model, [x]))
        d["params"] = sum(p.numel() for p in e.model.parameters())
        info[key] = d
        return e

    unc = record("unconstrained", lambda: export_channelcut(model, x, pairs, "unconstrained"))
    gather = None
    if unc is not None and unc.info.get("superset_reads"):
        # the cost model read some inputs as wider views: the same export
        # with every such read a gather, to show what it bought (and the
        # ideal is built from it: the pruned widths, not the wider ones)
        gather = record("gather", lambda: export_channelcut(model, x, pairs, "unconstrained", copy_cost=0))
    record("baseline", lambda: export_channelcut(model, x, pairs, "baseline"))
    if peers and have_upscale():
        record("upscale", lambda: export_upscale(model, x, pairs))
    record("constrained", lambda: export_channelcut(model, x, pairs, "constrained"))
    if peers and have_torch_pruning() and unc is not None:
        tp_times: List[float] = []

        def tp_export() -> Export:
            e, times = export_torch_pruning_matched(model, x, info["unconstrained"]["macs"], head, dense_macs)
            tp_times.extend(times)
            return e

        if record("torch_pruning", tp_export) is not None:
            info["torch_pruning"]["runs_s"] = tp_times
    if unc is not None:
        models["ideal"] = make_ideal((gather or unc).model)
        info["ideal"] = {}
    return {k: models[k] for k in VARIANTS if k in models}, info

