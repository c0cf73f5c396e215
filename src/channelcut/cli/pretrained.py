"""``channelcut prune-pretrained SRC --out DST``: prune a Hugging Face
checkpoint on disk, tensor by tensor (:func:`channelcut.hf.prune_pretrained`).

The request is given as JSON, inline or in a file: a list of
``[parameter name, channel]`` pairs or ``{parameter name: [channels]}``.
The plan is made on the meta device; no weight is loaded whole.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional

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
        p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
        p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
        p.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from ..hf import prune_pretrained

        inputs, outputs = _request(args.pruned_inputs, "--pruned-inputs"), _request(args.pruned_outputs, "--pruned-outputs")
        if inputs is None and outputs is None:
            raise CLIError("nothing to prune", EXIT_USAGE, "pass --pruned-inputs and/or --pruned-outputs")
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
        }, report.summary())
        return EXIT_OK


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

