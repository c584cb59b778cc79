"""The package's import graph: no cycle inside pricing_cli, no import of another module's
_private name.

Parsed with ast (nothing is imported): module-level and function-level imports both count, as
a cycle through a function-level import still ties the two modules together. Imports under
``if TYPE_CHECKING:`` are left out: they never run, and annotations may name any module.
A private name is one with a leading underscore that is not a dunder (``__version__``).
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pricing_cli"


def module_name(root: Path, path: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of every node inside an ``if TYPE_CHECKING:`` block."""
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            inside.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    return inside


def _resolve(module: str, node: ast.ImportFrom) -> str:
    """The absolute module of ``from <node.module> import ...`` inside ``module``."""
    if not node.level:
        return node.module or ""
    base = module.split(".")[:-node.level] if module.count(".") >= node.level else []
    return ".".join([*base, *([node.module] if node.module else [])])


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def import_graph(root: Path) -> tuple[dict[str, set[str]], list[str]]:
    """The package's import edges, and each import of another module's private name.

    Returns:
        ({module: modules it imports}, ["importer:line imports module._name", ...]); private
        names are caught in ``from m import _x`` and in ``m._x`` where ``m`` is a name bound
        to a package module by an import.
    """
    top = root.name
    paths = {module_name(root, p): p for p in sorted(root.rglob("*.py"))}
    edges: dict[str, set[str]] = {m: set() for m in paths}
    private: list[str] = []
    for module, path in paths.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        skip = _type_checking_nodes(tree)
        aliases: dict[str, str] = {}  # local name -> package module it is bound to
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == top and alias.name in paths:
                        edges[module].add(alias.name)
                        if alias.asname:
                            aliases[alias.asname] = alias.name
            elif isinstance(node, ast.ImportFrom):
                source = _resolve(module, node)
                if source.split(".")[0] != top:
                    continue
                for alias in node.names:
                    submodule = f"{source}.{alias.name}"
                    if submodule in paths:  # from pricing_cli.stages import batches
                        edges[module].add(submodule)
                        aliases[alias.asname or alias.name] = submodule
                        continue
                    if source in paths:
                        edges[module].add(source)
                    if _private(alias.name) and source != module:
                        private.append(f"{module}:{node.lineno} imports {source}.{alias.name}")
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and _private(node.attr)
                    and aliases[node.value.id] != module and id(node) not in skip):
                private.append(f"{module}:{node.lineno} uses "
                               f"{aliases[node.value.id]}.{node.attr}")
    for module in list(edges):
        edges[module].discard(module)
    return edges, private


def import_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle's modules (strongly connected components of more than one module, or a
    module importing itself), each sorted, found with Tarjan's algorithm."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(cycles)


@functools.cache
def package_graph() -> tuple[dict[str, set[str]], list[str]]:
    """pricing_cli's import graph, parsed once for both tests."""
    return import_graph(PACKAGE)


def test_pricing_cli_has_no_import_cycle() -> None:
    edges, _ = package_graph()
    assert len(edges) > 30  # every module was parsed
    assert "pricing_cli.stages.batches" in edges["pricing_cli.stages.preprocess"]
    assert import_cycles(edges) == []


def test_no_module_imports_another_modules_private_name() -> None:
    _, private = package_graph()
    assert private == []


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "pricing_cli"
    for name, text in {"__init__.py": "", **files}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_the_checks_catch_a_planted_cycle_and_private_imports(tmp_path: Path) -> None:
    root = _package(tmp_path, {
        "a.py": "from pricing_cli.b import f\n",
        "b.py": "def f():\n    from pricing_cli import c\n    return c._hidden\n",
        "c.py": "from pricing_cli.a import f\n_hidden = 1\n",
        "d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                "    from pricing_cli.e import E\nfrom pricing_cli import __version__\n",
        "e.py": "from pricing_cli.d import x\nfrom pricing_cli.stages.s import _q\n",
        "stages/__init__.py": "",
        "stages/s.py": "from ..a import f\nfrom . import t\n_q = 1\n",
        "stages/t.py": "import pricing_cli.stages.s as s\nprint(s._q)\n",
    })
    edges, private = import_graph(root)
    # a -> b -> c -> a through a function-level import; d -> e only under TYPE_CHECKING;
    # s <-> t through relative and `import ... as` imports
    assert import_cycles(edges) == [["pricing_cli.a", "pricing_cli.b", "pricing_cli.c"],
                                    ["pricing_cli.stages.s", "pricing_cli.stages.t"]]
    assert edges["pricing_cli.d"] == {"pricing_cli"}
    assert edges["pricing_cli.stages.s"] == {"pricing_cli.a", "pricing_cli.stages.t"}
    assert private == ["pricing_cli.b:3 uses pricing_cli.c._hidden",
                       "pricing_cli.e:2 imports pricing_cli.stages.s._q",
                       "pricing_cli.stages.t:2 uses pricing_cli.stages.s._q"]



def imports_of_test_modules(source: str, where: str) -> list[str]:
    """Each import of a test module (``tests.test_*``) in ``source``: helpers shared by tests
    and bench/ live in tests/support/ (or tests/agent_fixtures.py, tests/demand_markets.py)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = ([node.module] if node.module.startswith("tests.test_")
                     else [f"{node.module}.{alias.name}" for alias in node.names])
        else:
            continue
        found += [f"{where}:{node.lineno} imports {name}" for name in names
                  if name.startswith("tests.test_")]
    return found


def test_no_test_or_bench_module_imports_a_test_module() -> None:
    root = PACKAGE.parent
    paths = sorted([*(root / "tests").rglob("*.py"), *(root / "bench").rglob("*.py")])
    assert len(paths) > 40
    assert [hit for p in paths for hit in imports_of_test_modules(
        p.read_text(encoding="utf-8"), str(p.relative_to(root)))] == []
    planted = ("from tests.test_checks import checked_market\nimport tests.test_train\n"
               "from tests import test_merge\nfrom tests.support.raw import CATALOG\n")
    assert imports_of_test_modules(planted, "x.py") == [
        "x.py:1 imports tests.test_checks", "x.py:2 imports tests.test_train",
        "x.py:3 imports tests.test_merge"]
