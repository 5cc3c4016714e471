"""The `seld` command line: every pipeline stage is a subcommand with --help and an example."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from seld.cli import ORDER, build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def test_help_lists_every_stage_in_pipeline_order(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    positions = [out.find(f"    {name}") for name in ORDER]
    assert all(p >= 0 for p in positions), out
    assert positions == sorted(positions)


@pytest.mark.parametrize("name", ORDER)
def test_each_subcommand_has_help_with_an_example(name):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[name]
    text = sub.format_help()
    assert "example" in text.lower() and f"seld {name}" in text, text


def test_console_script_runs_and_bad_usage_exits_nonzero():
    done = subprocess.run([sys.executable, "-m", "seld", "evaluate"], capture_output=True, text=True)
    assert done.returncode != 0
    assert "usage" in done.stderr


def test_logging_follows_stderr_after_a_swapped_stream_is_closed(capsys):
    """The CLIs' log handler writes to the stderr of the moment: a stream that was sys.stderr when
    logging was configured, and was closed since, costs no "I/O operation on closed file" error."""
    import io
    import logging
    import sys

    from seld.cli import configure_logging

    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    root.handlers = []
    try:
        current, swapped = sys.stderr, io.StringIO()
        sys.stderr = swapped
        configure_logging(verbose=False)
        logging.getLogger("seld.test").warning("first record")
        sys.stderr = current
        assert "first record" in swapped.getvalue()
        swapped.close()
        logging.getLogger("seld.test").warning("second record")
        err = capsys.readouterr().err
        assert "second record" in err and "Logging error" not in err and "closed file" not in err
    finally:
        root.handlers, root.level = saved, level


def test_ray_console_output_follows_verbose(monkeypatch):
    """Without -v the command lines keep Ray's own lines and the workers' echoes out of the
    console (RAY_LOG_TO_DRIVER=0, read by init_ray); -v brings them back; a value the user set stays."""
    import logging

    from seld.cli import configure_logging

    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    try:
        for preset, verbose, expected in ((None, False, "0"), (None, True, "1"), ("1", False, "1"), ("0", True, "1")):
            if preset is None:
                monkeypatch.delenv("RAY_LOG_TO_DRIVER", raising=False)
            else:
                monkeypatch.setenv("RAY_LOG_TO_DRIVER", preset)
            root.handlers = []
            configure_logging(verbose=verbose)
            assert os.environ["RAY_LOG_TO_DRIVER"] == expected, (preset, verbose)
    finally:
        root.handlers, root.level = saved, level
