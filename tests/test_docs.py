"""The docs' commands against the code: every `fedftg` command in a bash block of README.md
and docs/usage.md parses (default suite) and runs, shrunk to the embedded digits and two
rounds (slow suite); the README's Quick start is the line CI runs (`.ci/quickstart.py`)."""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest

from clirun import run_cli as _run

REPO = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "docs/usage.md")

# commands the docs show that these tests do not run, by their first words, and why
SKIPPED = {
    "pip install": "installs packages from the network (CI runs the Quick start's test line)",
    "python -m pytest": "the test suite itself",
    "python benchmarks/": "benchmark scripts (tests/test_bench.py and benchmark_scripts.py)",
    "ruff": "the linter: CI runs it",
    "mypy": "the type checker: CI runs it",
    "flwr": "a Flower federation: tests/test_flower*.py run it on a local SuperLink",
    "fedftg bench": "needs a GPU (--device cuda); tests/test_bench.py runs it on the CPU",
}
if importlib.util.find_spec("flwr_datasets") is None:  # tests/test_flwr_partition.py skips too
    SKIPPED.update(
        {
            f"fedftg {c} --partition flwr:": "needs the flwr-datasets extra"
            for c in ("run", "partition")
        }
    )
# a block that starts Flower processes is a script, not a list of commands
FLOWER_BLOCK = "flower-superlink"


def bash_blocks() -> list[tuple[str, str]]:
    """(where, text) of every ```bash block of the docs."""
    out = []
    for name in DOCS:
        text = (REPO / name).read_text()
        for m in re.finditer(r"```bash\n(.*?)```", text, re.S):
            out.append((f"{name}:{text[: m.start()].count(chr(10)) + 1}", m.group(1)))
    return out


def commands(block: str) -> list[list[str]]:
    """A block's commands as argv lists: continuation lines joined, comments dropped,
    `a && b` split."""
    argvs = []
    for line in block.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        while words:
            cut = words.index("&&") if "&&" in words else len(words)
            argvs.append(words[:cut])
            words = words[cut + 1 :]
    return [a for a in argvs if a]


def skip_reason(argv: list[str]) -> str | None:
    text = " ".join(argv)
    return next((why for start, why in SKIPPED.items() if text.startswith(start)), None)


def _fedftg_commands() -> list[tuple[str, list[str]]]:
    found, unknown = [], []
    for where, block in bash_blocks():
        if FLOWER_BLOCK in block:
            continue
        for argv in commands(block):
            if skip_reason(argv) is not None:
                continue
            if argv[0] != "fedftg":
                unknown.append((where, argv))
            found.append((where, argv))
    assert not unknown, f"no rule for these documented commands: add one to SKIPPED {unknown}"
    return found


def _blocks_with_fedftg() -> list[tuple[str, list[list[str]]]]:
    out = []
    for where, block in bash_blocks():
        if FLOWER_BLOCK in block:
            continue
        argvs = [a for a in commands(block) if a[0] == "fedftg" and skip_reason(a) is None]
        if argvs:
            out.append((where, argvs))
    return out


def shrink(argv: list[str]) -> list[str]:
    """``fedftg ...`` at test size: the embedded digits, 4 clients of 40 samples, 2 local
    steps, 2 rounds (3 for a --resume that extends a run), a preset's model as the CNN;
    --data-dir dropped; examples/ read from the repository."""
    args, out = argv[1:], []
    it = iter(args)
    for a in it:
        if a in ("--data-dir", "--dataset", "--rounds", "--clients"):
            next(it)
            continue
        out.append(str(REPO / a) if a.startswith("examples/") else a)
    if out[0] in ("run", "sweep", "partition"):
        out += ["--dataset", "digits", "--clients", "4"]
    if out[0] in ("run", "sweep"):
        out += ["--rounds", "3" if "--resume" in out else "2", "--local-steps", "2"]
        out += ["--samples-per-client", "40"]
        if "--preset" in out:
            out += ["--model", "cnn"]
    return out


def test_every_documented_fedftg_command_parses(tmp_path, capsys, monkeypatch):
    """run and sweep with --print-config (as documented, nothing written); presets and
    partition run; report needs the runs of its block (the slow test runs it)."""
    monkeypatch.chdir(REPO)
    seen = set()
    for where, argv in _fedftg_commands():
        sub = argv[1] if len(argv) > 1 else "help"
        seen.add(sub)
        if sub == "report":
            continue
        if sub == "partition":
            monkeypatch.chdir(tmp_path)
            args = shrink(argv)
        else:
            args = argv[1:] + (["--print-config"] if sub in ("run", "sweep") else [])
        code, out, err = _run(capsys, args)
        monkeypatch.chdir(REPO)
        assert code == 0, (where, argv, err)
        assert out, (where, argv)
    assert {"run", "sweep", "report", "partition", "presets"} <= seen
    assert not (REPO / "runs" / "fmnist").exists()


@pytest.mark.processes
@pytest.mark.slow
@pytest.mark.parametrize(
    ("where", "argvs"), _blocks_with_fedftg(), ids=[w for w, _ in _blocks_with_fedftg()]
)
def test_every_documented_fedftg_command_runs_shrunk(where, argvs, tmp_path, capsys, monkeypatch):
    """Each block's fedftg commands in order (a report reads its block's sweep), shrunk."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(REPO))  # --model examples.mynets:SmallNet
    for argv in argvs:
        code, _, err = _run(capsys, shrink(argv))
        assert code == 0, (where, argv, shrink(argv), err[-2000:])


def test_shrink_rewrites_data_rounds_and_clients():
    argv = shlex.split(
        "fedftg run --dataset fmnist --data-dir ../shared/data --clients 20 --rounds 30 "
        "--config examples/fmnist.toml --out runs/x"
    )
    assert shrink(argv) == [
        "run",
        "--config",
        str(REPO / "examples/fmnist.toml"),
        "--out",
        "runs/x",
        "--dataset",
        "digits",
        "--clients",
        "4",
        "--rounds",
        "2",
        "--local-steps",
        "2",
        "--samples-per-client",
        "40",
    ]
    assert commands("a b \\\n  c && d  # note\ne") == [["a", "b", "c"], ["d"], ["e"]]


# ------------------------------------------------------------------- Quick start and CI


def _quickstart():
    spec = importlib.util.spec_from_file_location("quickstart", REPO / ".ci" / "quickstart.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_start_is_two_complete_commands_and_ci_runs_the_test_one():
    found = _quickstart().quickstart_commands((REPO / "README.md").read_text())
    assert found == {
        "run": "pip install torch==2.13.0 && pip install . && fedftg run",
        "test": 'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest',
    }
    ci = (REPO / ".ci" / "run").read_text()
    assert "test_line=$(python3 .ci/quickstart.py test)" in ci
    assert 'bash -c "set -eo pipefail; $test_line"' in ci
    assert "python3 -m venv .venv-ci" in ci and '"$status" -eq 5' in ci  # collected nothing


@pytest.mark.parametrize(
    "section",
    [
        "## Quick start\n\n```bash\npip install . && fedftg run\n```\n",  # one block
        "## Quick start\n\n```bash\na && fedftg run\nb\n```\n```bash\nc && python -m pytest\n```\n",
        "## Quick start\n\n```bash\na && fedftg run\n```\n```bash\nc && pytest -q\n```\n",
    ],
)
def test_a_quick_start_of_another_shape_is_refused(section):
    with pytest.raises(ValueError):
        _quickstart().quickstart_commands("# x\n\n" + section + "\n## Usage\n")
