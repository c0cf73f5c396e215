"""``channelcut prune-pretrained SRC --out DST``: prune a Hugging Face
checkpoint on disk, tensor by tensor (:func:`channelcut.hf.prune_pretrained`).

The request is given as JSON, inline or in a file: a list of
``[parameter name, channel]`` pairs or ``{parameter name: [channels]}``; or
chosen from calibration data to a parameter budget (``--keep 0.75`` or
``--target-params 6e9`` with ``--calibration FILE``): the checkpoint is
scored one decoder layer at a time
(:func:`channelcut.calibrate.calibrate_pretrained`) and MLP channels,
key/value groups and hidden channels chosen
(:func:`channelcut.calibrate.select_to_budget`). The plan is made on the
meta device; no weight is loaded whole.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, List, Optional

from .common import EXIT_OK, EXIT_USAGE, CLIError, emit


class PrunePretrainedCommand:
    """``channelcut prune-pretrained``: stream a pruned copy of a checkpoint."""

    help = "prune a Hugging Face checkpoint directory tensor by tensor into a new one (LLMs of any size)"

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("src", metavar="SRC", help="a local Hugging Face checkpoint directory (config.json + safetensors)")
        p.add_argument("--out", required=True, help="directory to write (must not exist unless --overwrite)")
        p.add_argument("--pruned-inputs", default=None,
                       help="JSON (or @file.json): [[consumer weight, input channel], ...] or {weight: [channels]}")
        p.add_argument("--pruned-outputs", default=None,
                       help="JSON (or @file.json): producer output channels to remove everywhere they flow, "
                            "e.g. '{\"model.embed_tokens.weight\": [0, 5]}' narrows the hidden size")
        p.add_argument("--constrained", action="store_true", help="constrained export (no subset reads)")
        g = p.add_argument_group("choose the request from calibration data, to a parameter budget")
        g.add_argument("--keep", type=float, default=None, help="fraction of the parameters to keep, e.g. 0.75")
        g.add_argument("--target-params", type=float, default=None, help="parameter count to reach, e.g. 6e9")
        g.add_argument("--calibration", default=None,
                       help="calibration data: a text file (tokenised with SRC's tokenizer) or a .json list of "
                            "token-id lists")
        g.add_argument("--calibration-batches", type=int, default=8, help="batches of text (default 8)")
        g.add_argument("--calibration-tokens", type=int, default=512, help="tokens per batch (default 512)")
        g.add_argument("--method", choices=("activation", "wanda"), default="activation",
                       help="importance: activation RMS (Minitron) or weight x activation (Wanda)")
        g.add_argument("--kinds", default="mlp,kv_groups,hidden",
                       help="what to remove, comma-separated from mlp,kv_groups,hidden (default: all three)")
        g.add_argument("--scope", choices=("global", "local"), default="global")
        g.add_argument("--round-to", type=int, default=None, help="keep MLP widths and the hidden size multiples of this")
        g.add_argument("--device", default=None, help="where calibration layers run (e.g. cuda); default CPU")
        p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
        p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
        p.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from ..hf import prune_pretrained

        inputs, outputs = _request(args.pruned_inputs, "--pruned-inputs"), _request(args.pruned_outputs, "--pruned-outputs")
        budget = None
        if args.keep is not None or args.target_params is not None:
            if inputs is not None or outputs is not None:
                raise CLIError("--keep/--target-params choose the request: drop --pruned-inputs/--pruned-outputs",
                               EXIT_USAGE)
            budget = _budget(args)
            inputs, outputs = budget.pruned_inputs, budget.pruned_outputs
        elif inputs is None and outputs is None:
            raise CLIError("nothing to prune", EXIT_USAGE,
                           "pass --pruned-inputs and/or --pruned-outputs, or --keep/--target-params with --calibration")
        report = prune_pretrained(args.src, args.out, pruned_inputs=inputs, pruned_outputs=outputs,
                                  constrained=args.constrained, overwrite=args.overwrite,
                                  progress=None if args.quiet else _Bytes())
        if not args.quiet:
            print(file=sys.stderr)
        spec = report.spec
        emit(args, {
            "command": "prune-pretrained", "src": args.src, "out": str(report.dst), "config": report.config,
            "loads_with": report.loads_with, "why": report.why, "files": report.files,
            "bytes_written": report.bytes_written, "source_bytes": report.source_bytes,
            "plan_s": report.plan_s, "write_s": report.write_s, "largest_tensor_in_memory": report.largest_sliced,
            "removed_channel_groups": spec.removed_groups, "copied_channels_per_inference": spec.copied_channels,
            **({"budget": {"params_before": budget.params_before, "params_after": budget.params_after,
                           "target": budget.target, "removed": budget.removed, "hidden": budget.hidden,
                           "mlp": budget.mlp, "kv_groups": budget.kv_groups}} if budget is not None else {}),
        }, report.summary() if budget is None else budget.summary() + "\n" + report.summary())
        return EXIT_OK


def _budget(args: argparse.Namespace) -> Any:
    """Calibrate SRC on ``--calibration`` and select to the budget."""
    from ..calibrate import calibrate_pretrained, select_to_budget

    if args.calibration is None:
        raise CLIError("--keep/--target-params need --calibration", EXIT_USAGE,
                       "a text file (tokenised with SRC's tokenizer) or a .json list of token-id lists")
    if (args.keep is None) == (args.target_params is None):
        raise CLIError("pass one of --keep and --target-params", EXIT_USAGE)
    if args.calibration_batches < 1 or args.calibration_tokens < 1:
        raise CLIError("--calibration-batches and --calibration-tokens must be positive", EXIT_USAGE)
    batches = _calibration(args.src, args.calibration, args.calibration_batches, args.calibration_tokens)
    quiet = args.quiet

    def progress(done: int, total: int) -> None:
        if not quiet:
            print(f"\rcalibrating: layer {done} of {total}", end="" if done < total else "\n", file=sys.stderr,
                  flush=True)

    cal = calibrate_pretrained(args.src, batches, method=args.method, device=args.device, progress=progress)
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    try:
        return select_to_budget(cal.scores, args.src, keep=args.keep,
                                target_params=None if args.target_params is None else int(args.target_params),
                                kinds=kinds, scope=args.scope, round_to=args.round_to)
    except ValueError as exc:
        raise CLIError(str(exc), EXIT_USAGE) from None


def _calibration(src: str, path: str, batches: int, tokens: int) -> List[Any]:
    """Token-id batches of shape (1, tokens) from a .json list of id lists, or a text file and SRC's tokenizer."""
    import torch

    file = Path(path)
    if not file.is_file():
        raise CLIError(f"--calibration: {path} is not a file", EXIT_USAGE)
    if file.suffix == ".json":
        try:
            rows = json.loads(file.read_text())
            out = [torch.tensor([row], dtype=torch.long) for row in rows[:batches]]
        except (ValueError, TypeError) as exc:
            raise CLIError(f"--calibration: {path} is not a JSON list of token-id lists ({exc})", EXIT_USAGE) from None
        if not out or any(t.dim() != 2 or t.shape[1] == 0 for t in out):
            raise CLIError(f"--calibration: {path} holds no token-id list", EXIT_USAGE)
        return out
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(src)
    except Exception as exc:  # noqa: BLE001 - any failure to load a tokenizer is the same usage error
        raise CLIError(f"--calibration: {src} has no tokenizer that loads ({type(exc).__name__}: {exc})", EXIT_USAGE,
                       "pass a .json list of token-id lists instead") from None
    ids = tokenizer(file.read_text(encoding="utf-8", errors="replace"), return_tensors="pt")["input_ids"][0]
    n = min(batches, len(ids) // tokens)
    if n < 1:
        raise CLIError(f"--calibration: {path} has {len(ids)} tokens, fewer than one batch of {tokens}", EXIT_USAGE)
    return list(ids[: n * tokens].view(n, 1, tokens))


def _request(text: Optional[str], option: str) -> Any:
    """The JSON an option holds (``@path`` reads a file), or None."""
    if text is None:
        return None
    try:
        raw = Path(text[1:]).read_text() if text.startswith("@") else text
        value = json.loads(raw)
    except (OSError, ValueError) as exc:
        raise CLIError(f"{option}: not JSON or not readable ({exc})", EXIT_USAGE,
                       'e.g. --pruned-outputs \'{"model.embed_tokens.weight": [0, 5]}\'') from None
    if isinstance(value, list):
        value = [tuple(v) if isinstance(v, list) else v for v in value]
    return value


class _Bytes:
    """``progress(done, total)`` as one updating line of written bytes."""

    def __init__(self) -> None:
        self.last = -1.0

    def __call__(self, done: int, total: int) -> None:
        if total <= 0:
            return
        pct = 100.0 * done / total
        if done == 0 or pct - self.last >= 1 or done >= total:
            self.last = pct
            print(f"\rwriting: {done / (1 << 30):.2f} of {total / (1 << 30):.2f} GiB ({pct:.0f}%)",
                  end="", file=sys.stderr, flush=True)

