"""The commands ``prune``, ``inspect``, ``bench`` and ``export``: each parses
its options, calls the library, and renders the report it gets back.

A command is an object with ``help``, ``add_arguments(parser)`` and
``run(args) -> int`` (the exit code), registered in
:data:`channelcut.cli.SUBCOMMANDS`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import torch
from torch import nn

from .. import export as ex
from ..importance import FPGM, L1, L2, LAMP, ActivationNorm, BNScale, HRank, Importance, Wanda
from ..io import load, save
from ..masking import MaskingManager
from ..pruning import PruningManager
from ..report import bench_report, export_report, inspect_report, model_size
from .common import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, CLIError, emit, model_arguments, output_arguments
from .models import defaults_from_plan, model_from_args
from .progress import Progress
from .render import render_backends, render_bench, render_export, render_inspect

#: ``--heuristic`` name -> the :mod:`channelcut.importance` class it uses
HEURISTICS: Dict[str, type] = {"l1": L1, "l2": L2, "lamp": LAMP, "fpgm": FPGM, "bnscale": BNScale, "hrank": HRank,
                               "activation": ActivationNorm, "wanda": Wanda}


def choose_channels(
    model: nn.Module, inputs: Sequence[torch.Tensor], amount: float, heuristic: str, constrained: bool
) -> Tuple[List[Tuple[str, int]], str]:
    """``(weight name, input channel)`` pairs to prune, and how they were chosen:
    :class:`channelcut.MaskingManager` with the :mod:`channelcut.importance`
    heuristic named ``heuristic`` (see :data:`HEURISTICS`), ``amount`` of each
    layer's input channels (or channel groups, when ``constrained``)."""
    cls = HEURISTICS.get(heuristic)
    if cls is None:
        raise CLIError(f"unknown heuristic {heuristic!r}", EXIT_USAGE, f"choose one of {', '.join(HEURISTICS)}")
    imp: Importance = cls()
    pairs = MaskingManager(model, list(inputs)).importance(imp).select(amount, mode="constrained" if constrained else "unconstrained")
    return list(pairs), f"{cls.__name__} via channelcut.importance"


def _check_amount(amount: float) -> None:
    if not 0.0 <= amount < 1.0:
        raise CLIError(f"--amount must be in [0, 1), got {amount}", EXIT_USAGE)


# ----------------------------------------------------------------------------
# prune
# ----------------------------------------------------------------------------
class PruneCommand:
    """``channelcut prune``: choose channels, export, verify, save."""

    help = "prune a model and save it (weights + plan) to a directory"

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        model_arguments(p)
        p.add_argument("--amount", type=float, default=0.3, help="fraction of each layer's input channels to remove, in [0, 1) (default 0.3)")
        p.add_argument("--heuristic", default="l1", type=str.lower, choices=tuple(HEURISTICS), help="channel importance (default l1)")
        p.add_argument("--constrained", action="store_true", help="constrained export: whole channel groups, no copies at inference")
        p.add_argument("--out", required=True, help="directory to write (plan.json, weights, report.json)")
        p.add_argument("--no-verify", action="store_true", help="skip comparing the pruned model with the mock model")
        output_arguments(p)

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        _check_amount(args.amount)
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise CLIError(f"--out {out} exists and is not a directory", EXIT_USAGE, "choose a new directory name")
        progress = Progress(6, enabled=not args.quiet)
        with progress.step(f"building {args.model}"):
            model, info, inputs = model_from_args(args)
            before = model_size(model, inputs)
        with progress.step(f"choosing {args.amount:.0%} of channels ({args.heuristic})"):
            pairs, how = choose_channels(model, inputs, args.amount, args.heuristic, args.constrained)
        manager = PruningManager(model)
        with progress.step("tracing and resolving the export"):
            manager.compute(inputs, pruned_inputs=pairs, constrained=args.constrained)
        with progress.step("pruning" + ("" if args.no_verify else " and verifying against the mock")):
            manager.prune(verify=not args.no_verify)
        with progress.step("measuring"):
            rep = export_report(manager, inputs, before, name=args.model, heuristic=how, verified=not args.no_verify)
        metadata = {
            "model": args.model,
            "model_kwargs": info["model_kwargs"],
            "input_shape": info["input_shape"],
            "amount": args.amount,
            "heuristic": args.heuristic,
            "constrained": bool(args.constrained),
            "weights": args.weights,
            "seed": args.seed,
        }
        with progress.step(f"saving to {out}"):
            save(model, out, manager=manager, metadata=metadata)
        progress.close()
        report = {
            "command": "prune",
            "model": args.model,
            "out": str(out),
            **rep.to_dict(),
            "seconds": {k: round(v, 3) for k, v in progress.times.items()},
        }
        (out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        emit(args, report, render_export(rep, str(out), args.max_rows))
        return EXIT_OK


# ----------------------------------------------------------------------------
# inspect
# ----------------------------------------------------------------------------
class InspectCommand:
    """``channelcut inspect``: what can be pruned, and what stops the rest."""

    help = "show producers, consumers, channel groups, barrier ops and how much is prunable"

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        model_arguments(p)
        output_arguments(p)

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        progress = Progress(2, enabled=not args.quiet)
        with progress.step(f"building {args.model}"):
            model, _, inputs = model_from_args(args)
        rep = inspect_report(model, inputs, name=args.model, step=progress.step)
        progress.close()
        emit(args, {"command": "inspect", **rep.to_dict()}, render_inspect(rep, args.max_rows))
        return EXIT_OK


# ----------------------------------------------------------------------------
# bench
# ----------------------------------------------------------------------------
class BenchCommand:
    """``channelcut bench``: dense vs pruned size, MACs, latency and copies."""

    help = "compare a dense model with its pruned version: params, MACs, latency, copies"

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("model", metavar="MODEL_OR_SAVED", help="model name (pruned here first) or a directory written by 'channelcut prune'")
        p.add_argument("--model-kwargs", default=None, help="JSON keyword arguments for the model builder")
        p.add_argument("--weights", default=None, help="state_dict file to load into the dense model")
        p.add_argument("--input-shape", action="append", default=None, help="input shape, e.g. 1,3,224,224 (repeat for several inputs)")
        p.add_argument("--seed", type=int, default=0, help="seed for random weights and inputs (default 0)")
        p.add_argument("--amount", type=float, default=0.3, help="when MODEL is a name: fraction to prune (default 0.3)")
        p.add_argument("--heuristic", default="l1", type=str.lower, choices=tuple(HEURISTICS), help="when MODEL is a name: heuristic (default l1)")
        p.add_argument("--constrained", action="store_true", help="when MODEL is a name: constrained export")
        p.add_argument("--repeats", type=int, default=20, help="timed calls per model (default 20)")
        p.add_argument("--warmup", type=int, default=3, help="untimed calls first (default 3)")
        p.add_argument("--threads", type=int, default=1, help="torch threads while timing (default 1)")
        output_arguments(p)

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        if args.repeats < 1 or args.warmup < 0 or args.threads < 1:
            raise CLIError("--repeats and --threads must be >= 1, --warmup >= 0", EXIT_USAGE)
        saved = Path(args.model)
        progress = Progress(3 if saved.is_dir() else 4, enabled=not args.quiet)
        if saved.is_dir():
            dense, pruned, inputs = BenchCommand._load_saved(args, saved, progress)
            source = str(saved)
        else:
            dense, pruned, inputs = BenchCommand._prune_here(args, progress)
            source = f"{args.model} pruned here ({args.amount:.0%}, {args.heuristic}{', constrained' if args.constrained else ''})"
        rep = bench_report(
            dense, pruned, inputs, repeats=args.repeats, warmup=args.warmup, threads=args.threads,
            name=args.model, source=source, step=progress.step,
        )
        progress.close()
        emit(args, {"command": "bench", **rep.to_dict()}, render_bench(rep))
        return EXIT_OK

    @staticmethod
    def _load_saved(args: argparse.Namespace, saved: Path, progress: Progress) -> Tuple[nn.Module, nn.Module, List[torch.Tensor]]:
        meta = defaults_from_plan(args, saved)
        if "model" not in meta:
            raise CLIError(f"{saved} does not say which model it was pruned from", EXIT_USAGE, "it was not written by 'channelcut prune'")
        args.model = meta["model"]
        if args.weights is None:
            args.weights = meta.get("weights")
        with progress.step(f"building {args.model} and loading {saved}"):
            dense, _, inputs = model_from_args(args)
            pruned, _, _ = model_from_args(args)
            pruned = load(saved, pruned).eval()
        return dense, pruned, inputs

    @staticmethod
    def _prune_here(args: argparse.Namespace, progress: Progress) -> Tuple[nn.Module, nn.Module, List[torch.Tensor]]:
        _check_amount(args.amount)
        with progress.step(f"building {args.model}"):
            dense, _, inputs = model_from_args(args)
            pruned, _, _ = model_from_args(args)
        with progress.step(f"pruning {args.amount:.0%} ({args.heuristic})"):
            pairs, _ = choose_channels(pruned, inputs, args.amount, args.heuristic, args.constrained)
            PruningManager(pruned).compute(inputs, pruned_inputs=pairs, constrained=args.constrained).prune()
        return dense, pruned, inputs


# ----------------------------------------------------------------------------
# export
# ----------------------------------------------------------------------------
class ExportCommand:
    """``channelcut export``: a saved pruned model to ONNX / TorchScript / .pt2, checked."""

    help = "export a saved pruned model to ONNX, TorchScript or torch.export (.pt2), or check every exporter"

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("saved", metavar="SAVED", help="a directory written by 'channelcut prune' (or channelcut.save with metadata 'model')")
        p.add_argument("--format", choices=("onnx", "torchscript", "pt2"), default=None, help="what to write to --out")
        p.add_argument("--out", default=None, help="file to write")
        p.add_argument("--check", action="store_true", help="run every exporter (and torch.compile) and compare with the eager model")
        p.add_argument("--no-verify", action="store_true", help="write --out without comparing it with the eager model")
        p.add_argument("--model", default=None, help="MODEL to build (default: the one recorded in the plan)")
        p.add_argument("--model-kwargs", default=None, help="JSON keyword arguments for the model builder")
        p.add_argument("--input-shape", action="append", default=None, help="example input shape (default: the one recorded in the plan)")
        p.add_argument("--seed", type=int, default=0, help="seed for the example inputs (default 0)")
        output_arguments(p)

    #: ``--format`` -> the :mod:`channelcut.export` function that writes it
    WRITERS = {"onnx": "to_onnx", "torchscript": "to_torchscript", "pt2": "to_exported_program"}

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        if args.format is None and not args.check:
            raise CLIError("nothing to do", EXIT_USAGE, "pass --format onnx|torchscript|pt2 with --out FILE, and/or --check")
        if args.format is not None and not args.out:
            raise CLIError(f"--format {args.format} needs --out FILE", EXIT_USAGE)
        saved = Path(args.saved)
        meta = defaults_from_plan(args, saved)
        args.model = args.model or meta.get("model")
        if not args.model:
            raise CLIError(f"{saved} does not say which model it was pruned from", EXIT_USAGE, "pass --model MODEL")
        args.weights = None
        progress = Progress(1 + bool(args.format) + bool(args.check), enabled=not args.quiet)
        with progress.step(f"building {args.model} and loading {saved}"):
            model, info, inputs = model_from_args(args)
            model = load(saved, model).eval()
        report: Dict[str, Any] = {"command": "export", "saved": str(saved), "input_shape": info["input_shape"]}
        lines: List[str] = []
        failed = False
        if args.format:
            verify = not args.no_verify
            with progress.step(f"writing {args.format} to {args.out}"):
                getattr(ex, ExportCommand.WRITERS[args.format])(model, inputs, args.out, verify=verify)
            report["written"] = {"format": args.format, "path": args.out, "verified": verify}
            lines.append(f"wrote {args.out} ({args.format})" + (", verified against the eager model" if verify else ""))
        if args.check:
            with progress.step("checking every exporter"):
                results = ex.check_backends(model, inputs, backends=list(ex.BACKENDS))
            report["backends"] = [vars(r) for r in results]
            failed = not all(r.ok for r in results)
            lines += ["", render_backends(results)]
        progress.close()
        emit(args, report, "\n".join(lines).strip())
        return EXIT_FAILURE if failed else EXIT_OK
