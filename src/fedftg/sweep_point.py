"""A sweep point's process: `fedftg` run as a child of `fedftg sweep` that ends with it.

`fedftg.engine.sweep.run_sweep` starts ``python -m fedftg.sweep_point <sweep pid> run ...``.
It lives beside the CLI, not in the engine, because it calls the CLI (the engine sits below).
"""

from __future__ import annotations

import sys

from fedftg.cli import main as cli_main
from fedftg.engine.sweep import follow_parent


def main(argv: list[str]) -> int:
    """``argv`` is the sweep's pid, then `fedftg`'s arguments."""
    follow_parent(int(argv[0]))
    return cli_main(argv[1:])


if __name__ == "__main__":  # pragma: no cover - the child process of `run_sweep`
    raise SystemExit(main(sys.argv[1:]))
