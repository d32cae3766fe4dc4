"""Print one command of README.md's Quick start, so that CI runs the README's own line.

`python3 .ci/quickstart.py test` prints the command that installs the test extra and runs
the tests, `... run` the one that installs and runs the main job. The Quick start holds
exactly these two one-line bash blocks; anything else is an error (exit 1), so that the
README and CI cannot drift apart. Standard library only: it runs before any install.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def quickstart_commands(readme: str) -> dict[str, str]:
    """The Quick start's two commands by role: ``run`` (ends in `fedftg run`) and ``test``
    (ends in `python -m pytest`); ValueError if the section is not made of exactly them."""
    head, found, rest = readme.partition("\n## Quick start\n")
    if not found:
        raise ValueError("README.md has no '## Quick start' section")
    section = rest.split("\n## ", 1)[0]
    blocks = [b.strip() for b in re.findall(r"```bash\n(.*?)```", section, re.S)]
    if len(blocks) != 2 or any("\n" in b for b in blocks):
        raise ValueError(f"the Quick start must hold two one-line bash blocks, got {blocks!r}")
    roles = {"run": [b for b in blocks if b.endswith("fedftg run")]}
    roles["test"] = [b for b in blocks if b.endswith("python -m pytest")]
    if any(len(found) != 1 for found in roles.values()):
        raise ValueError(
            f"expected one command ending in 'fedftg run', one in 'python -m "
            f"pytest', got {blocks!r}"
        )
    return {role: found[0] for role, found in roles.items()}


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in ("run", "test"):
        sys.stderr.write("usage: quickstart.py run|test\n")
        return 2
    try:
        print(quickstart_commands(README.read_text())[argv[0]])
    except ValueError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
