"""No code path unpickles data outside the one explicit legacy opt-in; YAML is only read safely."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pricing_cli"
LEGACY_OPT_IN = ("stages/legacy.py", "_load_legacy_unsafe")


def calls(tree: ast.AST):
    """(call node, name of the enclosing function) for every call in a module."""
    def walk(node: ast.AST, function: str):
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef,
                                                      ast.AsyncFunctionDef)) else function
            if isinstance(child, ast.Call):
                yield child, function
            yield from walk(child, inner)
    yield from walk(tree, "<module>")


def dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else "?"


def keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else "dynamic"
    return None


def offending_calls(package: Path = PACKAGE) -> list[str]:
    found = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package).as_posix()
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for call, function in calls(tree):
            name = dotted(call.func)
            where = f"{rel}:{call.lineno} in {function}"
            if name.endswith("np.load") or name == "load" and keyword(call, "allow_pickle"):
                if keyword(call, "allow_pickle") not in (None, False) and (
                        (rel, function) != LEGACY_OPT_IN):
                    found.append(f"{where}: np.load(allow_pickle=...)")
            elif name in ("pickle.load", "pickle.loads", "cloudpickle.load", "dill.load"):
                found.append(f"{where}: {name}")
            elif name == "yaml.load" or name == "yaml.unsafe_load":
                found.append(f"{where}: {name}")
            elif name == "torch.load" and keyword(call, "weights_only") is not True:
                found.append(f"{where}: torch.load without weights_only=True")
    return found


def test_no_unpickling_outside_the_legacy_opt_in() -> None:
    assert offending_calls() == []


def test_the_scan_would_catch_an_unsafe_call(tmp_path) -> None:
    bad = tmp_path / "pkg"
    bad.mkdir()
    (bad / "m.py").write_text("import numpy as np, yaml, torch\n"
                              "def f(p):\n"
                              "    np.load(p, allow_pickle=True)\n"
                              "    yaml.load(open(p))\n"
                              "    torch.load(p)\n")
    assert [line.split(": ", 1)[1] for line in offending_calls(bad)] == [
        "np.load(allow_pickle=...)", "yaml.load", "torch.load without weights_only=True"]


def test_the_legacy_opt_in_is_the_only_allow_pickle_site() -> None:
    text = (PACKAGE / "stages" / "legacy.py").read_text(encoding="utf-8")
    code = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    assert sum(line.count("allow_pickle=True") for line in code) == 1
