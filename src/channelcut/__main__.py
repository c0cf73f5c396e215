"""``python -m channelcut <command> [options]``: the same as the ``channelcut`` command.

The commands and their registry (:data:`channelcut.cli.SUBCOMMANDS`) live in
:mod:`channelcut.cli`; a command is an object or module with
``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import sys

from .cli import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
