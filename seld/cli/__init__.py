"""`seld` command line: one subcommand per pipeline stage (docs/DESIGN.md "The command line").

Each module in this package defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and
``run(args) -> int``; they are discovered here, so adding a stage never edits this file.
Errors that users cause (bad files, bad config) are :class:`UserError` subclasses and print one
clear line instead of a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys

from seld.config import ConfigError
from seld.errors import UserError

# Order of subcommands in `seld --help`: the order of the pipeline.
ORDER = ("synth", "convert-foa", "features", "train", "predict", "evaluate", "model-summary")


def _commands() -> dict[str, object]:
    mods = {}
    for info in pkgutil.iter_modules(__path__):
        mod = importlib.import_module(f"{__name__}.{info.name}")
        mods[mod.NAME] = mod
    return dict(sorted(mods.items(), key=lambda kv: ORDER.index(kv[0]) if kv[0] in ORDER else len(ORDER)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="seld",
        description="Stereo SELD (DCASE 2025 Task 3): generate data, extract features, train, predict, evaluate.",
        epilog="Example: seld synth --preset smoke --out data && seld features data --out store",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, mod in _commands().items():
        p = sub.add_parser(
            name,
            help=mod.HELP,
            description=mod.HELP,
            epilog=getattr(mod, "EXAMPLE", None),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


class _CurrentStderr(logging.StreamHandler):
    """A handler that writes to whatever ``sys.stderr`` is when a record is emitted.

    ``logging.basicConfig()`` binds the stream object current at the first call; when that object is
    later closed (an embedding program or a test harness swapped ``sys.stderr`` for a while), every
    record after it fails with "I/O operation on closed file". Looking the stream up per record
    follows the swap instead.
    """

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:  # StreamHandler.__init__/setStream assign it; always sys.stderr
        pass


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _BriefFormatter(logging.Formatter):
    """``HH:MM:SS message`` for the INFO lines a study prints as it goes (one per event); warnings,
    errors and debug records keep their level and logger name."""

    def __init__(self) -> None:
        super().__init__(LOG_FORMAT, "%H:%M:%S")
        self._info = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        return self._info.format(record) if record.levelno == logging.INFO else super().format(record)


def _ours_or_warning(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or record.name.split(".")[0] == "seld"


def configure_logging(verbose: bool, brief: bool = False) -> None:
    """The command lines' logging: INFO (DEBUG with -v) to the current stderr; once per process.

    Args:
        verbose: DEBUG records too, every line with its level and logger.
        brief: INFO lines as ``HH:MM:SS message`` (the study scripts' progress lines), and other
            libraries' INFO records left out (e.g. tensorboardX renaming each metric Tune logs).
    """
    handler = _CurrentStderr()
    if brief and not verbose:
        handler.setFormatter(_BriefFormatter())
        handler.addFilter(_ours_or_warning)
    else:
        handler.setFormatter(logging.Formatter(LOG_FORMAT, "%H:%M:%S"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except (UserError, ConfigError, FileNotFoundError) as e:
        print(f"seld {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"seld {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
