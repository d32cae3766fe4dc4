"""The module graph of src/fedftg: no import cycle, and lower layers never import higher ones.

An edge ``a -> b`` is every import statement of ``a`` that names module ``b`` of the package
(``from fedftg.x import y`` names ``fedftg.x.y`` when that is a module, else ``fedftg.x``),
wherever it stands, inside functions too; only the body of an ``if TYPE_CHECKING:`` block is
left out (annotations, never run). The modules are found on disk, so new ones are checked.

The layers, lowest first (a module may import its own layer and those below):

0. ``errors``, ``seeding``, ``settings``, ``precision``, ``threads``, ``tables`` (the
   name tables of datasets, models and partition schemes), ``report.files`` (atomic
   writes, strict JSON lines: what every layer that writes a file uses), the package itself;
1. ``data``, ``models``: arrays and networks;
2. ``fl``: what every federated method shares (local loop, aggregation, plug-in protocols,
   specs);
3. ``methods``, ``plugins``: the client methods and server plug-ins, each a torch-free spec
   and an implementation that never imports its spec at run time;
4. ``registry``: collects the specs;
5. ``config``, ``presets``, ``legacy``: the run's settings and the formats of older versions;
6. ``engine``, ``report``: runs, run directories, tables and figures;
7. ``flower``, ``bench``, ``api``, ``server_step``: the Flower apps, the benchmarks and the
   Python API, all on the engine (the package's lazy re-exports of the API, by
   ``importlib``, are no import statement and so no edge);
8. ``cli``, ``sweep_point``: the command line and the sweep's child process.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

LAYERS: tuple[tuple[str, ...], ...] = (
    (
        "fedftg",
        "fedftg.errors",
        "fedftg.seeding",
        "fedftg.settings",
        "fedftg.precision",
        "fedftg.threads",
        "fedftg.tables",
        "fedftg.report.files",
    ),
    ("fedftg.data", "fedftg.models"),
    ("fedftg.fl",),
    ("fedftg.methods", "fedftg.plugins"),
    ("fedftg.registry",),
    ("fedftg.config", "fedftg.presets", "fedftg.legacy"),
    ("fedftg.engine", "fedftg.report"),
    ("fedftg.flower", "fedftg.bench", "fedftg.api", "fedftg.server_step"),
    ("fedftg.cli", "fedftg.sweep_point"),
)


def package_modules(src: Path) -> dict[str, tuple[Path, bool]]:
    """Every module of the fedftg package under ``src``: name -> (file, is a package)."""
    found = {}
    for path in sorted((src / "fedftg").rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        found[".".join(parts)] = (path, is_package)
    return found


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imported(tree: ast.AST, name: str, is_package: bool, modules: set[str]) -> set[str]:
    """The package modules that module ``name`` (parsed as ``tree``) imports."""
    package = name if is_package else name.rpartition(".")[0]
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in modules else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {m for m in out if m in modules and m != name}


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    """Module name -> the package modules it imports."""
    modules = package_modules(src)
    names = set(modules)
    return {
        name: imported(ast.parse(path.read_text(), str(path)), name, is_package, names)
        for name, (path, is_package) in modules.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as [a, b, ..., a], or None when it is acyclic."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := walk(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := walk(node)):
            return cycle
    return None


def layer_of(module: str) -> int | None:
    """The layer of ``module``: that of the longest entry of `LAYERS` it is or lies under."""
    best: tuple[int, int] | None = None  # (prefix length, layer)
    for level, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            inside = module == prefix or (prefix != "fedftg" and module.startswith(prefix + "."))
            if inside and (best is None or len(prefix) > best[0]):
                best = (len(prefix), level)
    return None if best is None else best[1]


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Each import of a higher layer's module, as 'a (layer i) -> b (layer j)' (modules
    without a layer are `test_every_module_has_a_layer`'s)."""
    out = []
    for a in sorted(graph):
        for b in sorted(graph[a]):
            low, high = layer_of(a), layer_of(b)
            if low is not None and high is not None and high > low:
                out.append(f"{a} (layer {low}) -> {b} (layer {high})")
    return out


GRAPH = import_graph()


def test_the_graph_sees_the_package_and_imports_inside_functions():
    assert len(GRAPH) > 50
    assert "fedftg.config" in GRAPH["fedftg.cli"]
    # fedftg.models.build_model imports the architectures inside the function
    assert "fedftg.models.cnn" in GRAPH["fedftg.models"]


def test_the_module_graph_has_no_cycle():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_every_module_has_a_layer():
    assert [m for m in GRAPH if layer_of(m) is None] == []


def test_lower_layers_never_import_higher_ones():
    assert upward_imports(GRAPH) == []


def test_a_cycle_and_an_upward_import_are_named(tmp_path):
    pkg = tmp_path / "fedftg"
    (pkg / "fl").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "fl" / "__init__.py").write_text("")
    (pkg / "errors.py").write_text("def f():\n    from fedftg.fl import client\n")
    (pkg / "fl" / "client.py").write_text(
        "from typing import TYPE_CHECKING\nfrom fedftg import errors\n"
        "if TYPE_CHECKING:\n    from fedftg.cli import x\n"
    )
    graph = import_graph(tmp_path)
    assert graph["fedftg.fl.client"] == {"fedftg.errors"}  # TYPE_CHECKING left out
    assert find_cycle(graph) == ["fedftg.errors", "fedftg.fl.client", "fedftg.errors"]
    assert upward_imports(graph) == ["fedftg.errors (layer 0) -> fedftg.fl.client (layer 2)"]


@pytest.mark.parametrize(
    ("module", "layer"),
    [("fedftg.report.files", 0), ("fedftg.report.report", 6), ("fedftg", 0), ("fedftg.x", None)],
)
def test_a_module_takes_the_layer_of_its_longest_prefix(module, layer):
    assert layer_of(module) == layer
