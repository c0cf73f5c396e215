"""Command line: ``python -m channelcut <command> [options]``.

Each subcommand lives in its own module that provides two functions:
``add_arguments(parser)`` (its options) and ``run(args) -> int`` (exit code).
To add one, write the module and append a line to :data:`SUBCOMMANDS`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence, Tuple

# (command, module implementing add_arguments/run, one-line help)
SUBCOMMANDS: Tuple[Tuple[str, str, str], ...] = (
    ("demo", "channelcut.demo", "prune a torchvision resnet three ways and report size, MACs, copies and latency"),
)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one sub-parser per entry of :data:`SUBCOMMANDS`."""
    parser = argparse.ArgumentParser(prog="python -m channelcut", description="channelcut: export channel-pruned PyTorch models.")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    sub.required = True
    for name, module_name, help_text in SUBCOMMANDS:
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run the chosen command."""
    args = build_parser().parse_args(argv)
    return int(args._run(args))


if __name__ == "__main__":
    sys.exit(main())
