"""What every command shares: :class:`CLIError`, the exit codes, the common
options and :func:`emit` (text or ``--json``)."""

from __future__ import annotations

import argparse
import json
from typing import Any, Dict, Optional

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class CLIError(Exception):
    """An error the command line reports in one line (plus a hint) and exits with ``code``.

    Internal to the command line: the library raises
    :class:`channelcut.ChannelcutError` and its subclasses instead.
    """

    def __init__(self, message: str, code: int = EXIT_FAILURE, hint: Optional[str] = None) -> None:
        super().__init__(message)
        self.code = code
        self.hint = hint


def model_arguments(p: argparse.ArgumentParser) -> None:
    """MODEL and the options that build it and its example inputs."""
    p.add_argument("model", metavar="MODEL", help="torchvision name (resnet50), timm:NAME, or package.module:factory")
    p.add_argument("--model-kwargs", default=None, help='JSON keyword arguments for the model builder, e.g. \'{"num_classes": 10}\'')
    p.add_argument("--weights", default=None, help="state_dict file to load before pruning (default: random weights)")
    p.add_argument("--input-shape", action="append", default=None, help="example input shape, e.g. 1,3,224,224 (repeat for several inputs)")
    p.add_argument("--seed", type=int, default=0, help="seed for random weights and example inputs (default 0)")


def output_arguments(p: argparse.ArgumentParser) -> None:
    """``--json``, ``--quiet``, ``--max-rows``."""
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    p.add_argument("--max-rows", type=int, default=30, help="rows shown in tables (default 30)")


def emit(args: argparse.Namespace, report: Dict[str, Any], text: str) -> None:
    """Print ``report`` as JSON with ``--json``, else ``text``."""
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print(text)
