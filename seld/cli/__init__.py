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
import os
import pkgutil
import socket
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Literal

from seld.config import ConfigError
from seld.errors import UserError
from seld.storage import is_uri

# Order of subcommands in `seld --help`: the order of the pipeline.
ORDER = ("synth", "convert-foa", "features", "store", "train", "predict", "evaluate", "model-summary")


# --- Paths typed by the user -------------------------------------------------------------------
# Every path a user types is made absolute here, once, where it enters (argument parsing): Ray's
# workers run in folders of their own, so a path relative to the user's shell must never travel to
# them (issue 25). What the stages write keeps paths relative to its own folder or the store.

# Config fields (dotted keys) that hold a path, so that `--set KEY=VALUE` makes them absolute too.
PATH_KEYS = frozenset({"train.init_checkpoint"})


def absolute(value: str | os.PathLike) -> Path:
    """``value`` (``~`` expanded) made absolute against the current folder, ``..`` folded; symlinks
    are kept (a resolved link could name a path that other nodes do not mount)."""
    return Path(os.path.abspath(os.path.expanduser(os.fspath(value))))


def user_path(value: str) -> Path:
    """argparse ``type``: a path that may not exist yet (an output folder), made absolute."""
    return absolute(value)


def path_or_uri(value: str) -> str:
    """argparse ``type``: an ``s3://`` / ``gs://`` URI as typed, else an absolute path (as a string)."""
    return value if is_uri(value) else str(absolute(value))


def missing_path_text(typed: str | os.PathLike, what: str, kind: Literal["folder", "file"] = "folder") -> str | None:
    """The one line for a ``what`` the user typed as ``typed`` that is not an existing ``kind``
    (naming the path as typed and where it was looked up), or None when it is one."""
    path = absolute(typed)
    if path.is_dir() if kind == "folder" else path.is_file():
        return None
    where = (f"looked up from {os.getcwd()}" if not Path(os.path.expanduser(os.fspath(typed))).is_absolute()
             else f"on this machine, {socket.gethostname()}")
    found = "is a file" if path.is_file() else "is a folder" if path.is_dir() else "does not exist"
    return f"{what} {os.fspath(typed)}: {found}, expected an existing {kind} ({where})"


def existing_path(what: str, kind: Literal["folder", "file"] = "folder") -> Callable[[str], Path]:
    """argparse ``type``: an existing folder (or file), made absolute; else a UserError naming
    the path as typed and the folder it was looked up from (raised out of ``parse_args``, so the
    command prints one line before anything starts)."""

    def convert(value: str) -> Path:
        text = missing_path_text(value, what, kind)
        if text:
            raise UserError(text)
        return absolute(value)

    convert.__name__ = what  # argparse names the type in its own messages
    return convert


def existing_path_or_uri(what: str, kind: Literal["folder", "file"] = "folder") -> Callable[[str], str]:
    """argparse ``type``: an ``s3://`` / ``gs://`` URI as typed (checked where it is read), else
    :func:`existing_path` (as a string)."""
    check = existing_path(what, kind)

    def convert(value: str) -> str:
        return value if is_uri(value) else str(check(value))

    convert.__name__ = what
    return convert


def absolute_overrides(overrides: Mapping[str, str]) -> dict[str, str]:
    """``--set`` overrides with the values of PATH_KEYS made absolute (URIs and empty values kept)."""
    return {k: (path_or_uri(v) if k in PATH_KEYS and v.lower() not in ("", "none", "null") else v)
            for k, v in overrides.items()}


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

    Ray's own console output (its INFO lines, the workers' echoed output such as Ray Train's
    "Checkpoint successfully created" and "Reporting training result", the C++ core's log lines,
    in colour) stays in Ray's logs unless -v: RAY_LOG_TO_DRIVER=0 (read by
    :func:`seld.study.session.init_ray`; a value already in the environment is kept). The commands print
    their own line per event instead (the studies' progress, `seld train`'s epochs).

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
    if verbose:
        os.environ["RAY_LOG_TO_DRIVER"] = "1"
    else:
        os.environ.setdefault("RAY_LOG_TO_DRIVER", "0")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parser.parse_args(argv)
    except UserError as e:  # a path that does not exist, found while parsing: before anything runs
        command = next((a for a in argv if a in _commands()), None)
        print(f"{'seld ' + command if command else 'seld'}: error: {e}", file=sys.stderr)
        return 2
    configure_logging(args.verbose)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except (UserError, ConfigError, FileNotFoundError) as e:
        print(f"seld {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"seld {args.command}: interrupted{'; ' + str(e) if str(e) else ''}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
