"""End-to-end demo: prune a real torchvision model three ways and report what it buys.

Run it with ``python -m channelcut demo`` (``--small`` for a quick resnet18
run). Start reading at :func:`run`: it

1. builds a randomly initialised resnet50 (resnet18 with ``--small``),
2. picks, for every consumer (conv / linear weight) but the stem that reads
   the image, the ``--ratio`` fraction (rounded to the nearest channel) of its
   input channels with the smallest L1 weight magnitude
   (:class:`channelcut.importance.L1` through :class:`channelcut.MaskingManager`),
3. exports that choice three times, each on a fresh copy of the model:
   *unconstrained* (exactly the requested channels, reordered to avoid
   copies), *constrained* (grown until consumers agree: zero copies) and
   *baseline* (unconstrained, no reordering: one gather per disagreeing
   consumer),
4. checks that each pruned model computes what its mock model computes, and
5. prints parameters, MACs, copies per inference, export time and latency
   (all variants timed round-robin in one process, so drift cancels).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .cli.progress import Progress
from .errors import ChannelcutError
from .importance import L1
from .masking import MaskingManager
from .pruning import PruningManager
from .stats import LatencyStats, compare_latency, count_macs, count_parameters

VARIANTS: Tuple[Tuple[str, Dict[str, bool]], ...] = (
    ("unconstrained", {"constrained": False, "reorder": True, "baseline": False}),
    ("constrained", {"constrained": True, "reorder": True, "baseline": False}),
    ("baseline", {"constrained": False, "reorder": False, "baseline": True}),
)

# pruned vs mock, relative to the output's largest magnitude: float32 rounding
# differences (a few 1e-7) pass, a wrongly pruned channel does not
VERIFY_RTOL = 1e-4


# ----------------------------------------------------------------------------
# the demo
# ----------------------------------------------------------------------------
@dataclass
class VariantResult:
    """What one export produced (``error`` is set when it failed)."""

    name: str
    model: Optional[nn.Module] = None
    params: int = 0
    macs: int = 0
    copied_channels: int = 0
    copy_ops: int = 0
    view_ops: int = 0
    removed_groups: int = 0
    total_groups: int = 0
    compute_s: float = 0.0
    prune_s: float = 0.0
    max_abs_diff: float = float("nan")
    max_rel_diff: float = float("nan")
    error: Optional[str] = None
    latency: Optional[LatencyStats] = field(default=None)


def export_variant(
    dense: nn.Module, x: torch.Tensor, pruned_inputs: List[Tuple[str, int]], name: str, options: Dict[str, bool]
) -> VariantResult:
    """Export ``pruned_inputs`` on a fresh copy of ``dense`` and check it against its mock."""
    res = VariantResult(name)
    net = copy.deepcopy(dense)
    try:
        manager = PruningManager(net)
        t0 = time.perf_counter()
        manager.compute([x], pruned_inputs=pruned_inputs, **options)
        res.compute_s = time.perf_counter() - t0
        spec = manager.spec
        if spec is None:  # compute() always sets it; keeps type checkers honest
            raise RuntimeError("PruningManager.compute() did not produce a spec")
        with torch.no_grad():
            y_mock = manager.get_mock_model()(x)
        t0 = time.perf_counter()
        manager.prune(verify=False)  # checked below against the mock, as prune(verify=True) would
        res.prune_s = time.perf_counter() - t0
    except ChannelcutError as exc:
        res.error = f"{type(exc).__name__}: {exc}"
        return res
    try:
        with torch.no_grad():
            y = net(x)
    except Exception as exc:  # a wrongly pruned model may not even run
        manager.undo()
        res.error = f"the pruned model raised {type(exc).__name__}: {exc}"
        return res
    diff = (y - y_mock).abs().max().item()
    scale = max(y_mock.abs().max().item(), 1e-30)
    res.max_abs_diff = diff
    res.max_rel_diff = diff / scale
    if not res.max_rel_diff <= VERIFY_RTOL:
        manager.undo()
        res.error = f"pruned model differs from the mock: max |diff| {diff:.3g} = {res.max_rel_diff:.3g} of max |y| (> {VERIFY_RTOL:g})"
        return res
    res.model = net
    res.params = count_parameters(net)
    res.macs = count_macs(net, [x])
    res.copied_channels = spec.copied_channels
    res.copy_ops = spec.copy_ops
    res.view_ops = spec.view_ops
    res.removed_groups = spec.removed_groups
    res.total_groups = spec.total_groups
    return res


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's command-line options (shared by ``main`` and ``python -m channelcut demo``)."""
    parser.add_argument("--small", action="store_true", help="resnet18 at 128x128 instead of resnet50 at 224x224")
    parser.add_argument("--ratio", type=float, default=0.3, help="fraction of each consumer's input channels to prune (default 0.3)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per model (default 15, 30 with --small)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds before timing (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads while timing (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for weights and input (default 0)")
    parser.add_argument("--no-progress", action="store_true", help="no progress output on stderr")


def run(args: argparse.Namespace) -> int:
    """Run the demo with parsed ``args``; prints the report, returns the exit code
    (0 when every export succeeded and matched its mock, 1 otherwise)."""
    try:
        import torchvision
    except ImportError:
        print("channelcut demo needs torchvision: pip install torchvision", file=sys.stderr)
        return 2
    if args.threads < 1:
        print(f"--threads must be >= 1, got {args.threads}", file=sys.stderr)
        return 2
    if not 0.0 <= args.ratio < 1.0:
        print(f"--ratio must be in [0, 1), got {args.ratio}", file=sys.stderr)
        return 2
    arch, size = ("resnet18", 128) if args.small else ("resnet50", 224)
    repeats = args.repeats if args.repeats is not None else (30 if args.small else 15)

    start = time.perf_counter()
    progress = Progress(total=3 + len(VARIANTS), enabled=not args.no_progress)
    with progress.step(f"building {arch}"):
        torch.manual_seed(args.seed)
        dense = getattr(torchvision.models, arch)(weights=None).eval()
        x = torch.rand(1, 3, size, size)
        dense_params, dense_macs = count_parameters(dense), count_macs(dense, [x])

    with progress.step("tracing, choosing channels by L1 magnitude"):
        masking = MaskingManager(dense, [x]).importance(L1())
        pruned_inputs = masking.select(args.ratio, ignore=[])  # ignore=[]: the classifier's inputs too
        layers = len(masking.selection.layers) if masking.selection is not None else 0

    results: List[VariantResult] = []
    for name, options in VARIANTS:
        with progress.step(f"{name} export"):
            results.append(export_variant(dense, x, pruned_inputs, name, options))

    with progress.step(f"timing {1 + sum(r.error is None for r in results)} models x {repeats} rounds"):
        models = {"dense": dense}
        models.update({r.name: r.model for r in results if r.model is not None})
        latency = compare_latency(models, [x], repeats=repeats, warmup=args.warmup, threads=args.threads)
        for r in results:
            r.latency = latency.get(r.name)
    progress.close()

    header = (
        f"channelcut demo: {arch} (random init), input 1x3x{size}x{size}, float32, torch {torch.__version__}\n"
        f"request: {len(pruned_inputs)} input channels = {args.ratio:.0%} (rounded) of each of {layers} "
        f"consumers (all but the stem), lowest L1 weight magnitude\n"
        f"latency: batch 1, {args.threads} thread(s), {repeats} rounds interleaved round-robin "
        f"(after {args.warmup} warm-up)"
    )
    print(header)
    print()
    print(format_report(dense_params, dense_macs, latency["dense"], results))
    print()
    ok = all(r.error is None for r in results)
    for r in results:
        if r.error is not None:
            print(f"{r.name} export FAILED: {r.error}")
    print(
        ("all exports verified: pruned == mock (max |diff| above). " if ok else "")
        + f"demo took {time.perf_counter() - start:.0f} s"
    )
    return 0 if ok else 1


def format_report(
    dense_params: int, dense_macs: int, dense_latency: LatencyStats, results: Sequence[VariantResult]
) -> str:
    """A table with one column per model (dense first) and one row per measure."""
    cols = ["dense"] + [r.name for r in results]
    rows: List[Tuple[str, List[str]]] = []

    def row(label: str, dense_cell: str, cell: Callable[[VariantResult], str]) -> None:
        rows.append((label, [dense_cell] + [cell(r) if r.error is None else "failed" for r in results]))

    def pct(a: float, b: float) -> str:
        return f"({a / b:.0%})" if b else ""

    row("params (M)", f"{dense_params / 1e6:.2f}", lambda r: f"{r.params / 1e6:.2f} {pct(r.params, dense_params)}")
    row("MACs (G)", f"{dense_macs / 1e9:.3f}", lambda r: f"{r.macs / 1e9:.3f} {pct(r.macs, dense_macs)}")
    row("channel groups removed", "-", lambda r: f"{r.removed_groups} / {r.total_groups}")
    row("copied channels / inference", "-", lambda r: str(r.copied_channels))
    row("copy ops / views", "-", lambda r: f"{r.copy_ops} / {r.view_ops}")
    row("export: compute (s)", "-", lambda r: f"{r.compute_s:.2f}")
    row("export: prune (s)", "-", lambda r: f"{r.prune_s:.2f}")

    def lat(s: Optional[LatencyStats]) -> str:
        return "-" if s is None else f"{s['median_ms']:.1f}"

    def spread(s: Optional[LatencyStats]) -> str:
        return "-" if s is None else f"{s['p10_ms']:.1f}-{s['p90_ms']:.1f}"

    row("latency median (ms)", lat(dense_latency), lambda r: lat(r.latency))
    row("latency p10-p90 (ms)", spread(dense_latency), lambda r: spread(r.latency))
    row(
        "speed-up vs dense",
        "1.00x",
        lambda r: "-" if r.latency is None else f"{dense_latency['median_ms'] / r.latency['median_ms']:.2f}x",
    )
    row("max |mock - pruned|", "-", lambda r: f"{r.max_abs_diff:.1e}")
    row("  relative to max |y|", "-", lambda r: f"{r.max_rel_diff:.1e}")

    label_w = max(len(label) for label, _ in rows)
    widths = [max(len(c), *(len(cells[i]) for _, cells in rows)) for i, c in enumerate(cols)]
    lines = [" " * label_w + "  " + "  ".join(c.rjust(w) for c, w in zip(cols, widths))]
    for label, cells in rows:
        lines.append(label.ljust(label_w) + "  " + "  ".join(c.rjust(w) for c, w in zip(cells, widths)))
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m channelcut.demo [--small] ...``: parse ``argv`` and run the demo."""
    parser = argparse.ArgumentParser(prog="channelcut demo", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
