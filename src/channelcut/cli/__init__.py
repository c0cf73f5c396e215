"""The ``channelcut`` command line. Start at :func:`main`.

Commands (``channelcut <command> --help`` for options)::

    channelcut prune MODEL --amount 0.3 --heuristic l1 [--constrained] --out DIR
    channelcut inspect MODEL
    channelcut bench MODEL_OR_SAVED
    channelcut export SAVED --format onnx --out model.onnx  (or --check)
    channelcut prune-pretrained SRC --out DST --pruned-outputs JSON  (a Hugging Face checkpoint, streamed)
    channelcut demo

``MODEL`` is a torchvision model name (``resnet50``), a timm model name
(``timm:resnet50`` or a plain name torchvision does not know), or
``package.module:factory`` (a function building the model, called with the
``--model-kwargs`` JSON object as keyword arguments). Models are built with
random weights unless ``--weights FILE`` (a state_dict) is given.
``MODEL_OR_SAVED`` may also be a directory written by ``channelcut prune``.

Every command prints a readable table, or one JSON object with ``--json``;
progress goes to stderr. Exit codes: 0 success, 1 failure (the export or a
check failed), 2 usage error (bad arguments, unknown model, bad shape).

The command line only parses, calls the library and renders: the reports
come from :mod:`channelcut.report`, the channel choice from
:class:`channelcut.MaskingManager`. Modules:

- ``pretrained``: ``prune-pretrained`` (a checkpoint on disk, tensor by tensor);
- ``commands``: ``prune``, ``inspect``, ``bench``, ``export``; each an object
  with ``add_arguments(parser)`` and ``run(args) -> int`` listed in
  :data:`SUBCOMMANDS` (``demo`` lives in :mod:`channelcut.demo`);
- ``models``: building ``MODEL`` and its example inputs;
- ``render``: tables and text; ``progress``: steps on stderr;
- ``common``: :class:`CLIError`, exit codes, shared options.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any, NoReturn, Optional, Sequence, Tuple

import torch

from ..errors import ChannelcutError, ExportError, PlanError, TracingError
from .commands import HEURISTICS, choose_channels
from .common import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, CLIError
from .models import build_model, parse_shape
from .progress import Progress
from .render import format_table

__all__ = [
    "main",
    "build_parser",
    "build_model",
    "parse_shape",
    "choose_channels",
    "format_table",
    "Progress",
    "CLIError",
    "SUBCOMMANDS",
    "HEURISTICS",
    "EXIT_OK",
    "EXIT_FAILURE",
    "EXIT_USAGE",
]

# (command, "module" or "module:attribute" providing add_arguments/run, help or None to use its .help)
SUBCOMMANDS: Tuple[Tuple[str, str, Optional[str]], ...] = (
    ("prune", "channelcut.cli.commands:PruneCommand", None),
    ("inspect", "channelcut.cli.commands:InspectCommand", None),
    ("bench", "channelcut.cli.commands:BenchCommand", None),
    ("export", "channelcut.cli.commands:ExportCommand", None),
    ("prune-pretrained", "channelcut.cli.pretrained:PrunePretrainedCommand", None),
    ("demo", "channelcut.demo", "prune a torchvision resnet three ways and report size, MACs, copies and latency"),
)


def _resolve(target: str) -> Any:
    module_name, _, attr = target.partition(":")
    obj: Any = importlib.import_module(module_name)
    return getattr(obj, attr) if attr else obj


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\nhint: run '{self.prog} --help' for the options\n")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one sub-parser per entry of :data:`SUBCOMMANDS`."""
    from .. import __version__

    parser = _Parser(prog="channelcut", description="channelcut: export channel-pruned PyTorch models that are genuinely smaller.")
    parser.add_argument("--version", action="version", version=f"channelcut {__version__} (torch {torch.__version__})")
    sub = parser.add_subparsers(dest="command", metavar="<command>", parser_class=_Parser)
    sub.required = True
    for name, target, help_text in SUBCOMMANDS:
        command = _resolve(target)
        text = help_text or getattr(command, "help", None)
        p = sub.add_parser(name, help=text, description=text)
        command.add_arguments(p)
        p.set_defaults(_run=command.run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line on ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    try:
        return int(args._run(args))
    except CLIError as exc:
        _report_error(str(exc), exc.hint)
        return exc.code
    except ChannelcutError as exc:
        _report_error(f"{type(exc).__name__}: {exc}", _hint_for(exc))
        return EXIT_FAILURE
    except ImportError as exc:
        _report_error(str(exc), "install the missing package (pip install 'channelcut[export]' for ONNX)")
        return EXIT_FAILURE
    except KeyboardInterrupt:
        _report_error("interrupted", None)
        return 130
    except (OSError, RuntimeError, ValueError, TypeError) as exc:
        _report_error(f"{type(exc).__name__}: {exc}", "this looks like a bug or an unsupported model: please report it with the command you ran")
        return EXIT_FAILURE


def _hint_for(exc: ChannelcutError) -> Optional[str]:
    if isinstance(exc, TracingError):
        return "check --input-shape: the model must run on a random tensor of that shape"
    if isinstance(exc, ExportError):
        return "try --constrained, a smaller --amount, or report the model"
    if isinstance(exc, PlanError):
        return "pass the directory written by 'channelcut prune' and the same model arguments"
    return None


def _report_error(message: str, hint: Optional[str]) -> None:
    print(f"channelcut: error: {message}", file=sys.stderr)
    if hint:
        print(f"hint: {hint}", file=sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
