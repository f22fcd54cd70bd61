"""The ``unetquant`` command line (also ``python -m napari_unetquant``).

A thin shell: parse arguments into the recipe's configs, call the jobs, print. User mistakes
end with one line on stderr and a non-zero exit code (2), never a traceback; where the core
names a setting, the line names its option. The commands and options of the trainer issue are
a contract other tools rely on: extend, never rename or drop.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from ..errors import settings_hint
from . import _models, _segment, _train
from ._models import model_summary
from ._options import OPTIONS, quant_config_from_args

EXIT_USAGE = 2
EXIT_INTERRUPTED = _train.EXIT_INTERRUPTED

__all__ = ["OPTIONS", "build_parser", "main", "model_summary", "quant_config_from_args"]


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump), like every other user error here."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="unetquant",
        description="Quantization-aware training of low-bit fixed-point U-Nets for medical image "
        "segmentation.",
    )
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )
    _train.add_parser(commands)
    _segment.add_parsers(commands)
    _models.add_parsers(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code."""
    args = build_parser().parse_args(argv)
    command = f"unetquant {args.command}{_rank_tag()}"
    logger = logging.getLogger("napari_unetquant")
    handler = _Notes(command)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        return int(args.handler(args))
    except (ValueError, OSError) as error:  # user mistakes, bad files: one line, no traceback
        message = settings_hint(error, OPTIONS, " (option {})")
        print(f"{command}: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        logger.removeHandler(handler)


class _Notes(logging.Handler):
    """The core's notes (which engine runs, a slow integer path) as one line each on stderr."""

    def __init__(self, command: str) -> None:
        super().__init__(logging.INFO)
        self.command = command

    def emit(self, record: logging.LogRecord) -> None:
        print(f"{self.command}: {record.getMessage()}", file=sys.stderr)


def _rank_tag() -> str:
    """`` (rank R of N)`` in a process torchrun started, so messages say which one failed."""
    world_size, rank = os.environ.get("WORLD_SIZE", "1"), os.environ.get("RANK", "?")
    return f" (rank {rank} of {world_size})" if world_size not in ("", "0", "1") else ""
