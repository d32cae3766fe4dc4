"""`fedftg` CLI calls for tests: exit status, stdout and stderr of one command line."""

from __future__ import annotations

import pytest

from fedftg.cli import main


def run_cli(capsys: pytest.CaptureFixture[str], args: list[str]) -> tuple[int, str, str]:
    """Run ``fedftg ARGS`` in-process; argparse's SystemExit counts as its exit status."""
    try:
        code = main(args)
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err
