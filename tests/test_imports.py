"""No import cycles among the repo's own modules (factories live apart from the
contracts they build, so a contract never imports its implementations).

The graph has one edge per import statement of `protocol/`, `hub/`, `persistence/`,
`admin_http/` and `bench/`, also those inside functions: an import deferred into a function
still makes the two modules depend on each other, it only hides the cycle from the
interpreter. Imports under `if TYPE_CHECKING:` are left out (they never run). Importing
`pkg.mod` also runs `pkg/__init__.py`; that implicit edge is left out too, or every package
re-exporting its submodules would be a cycle.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Folder -> the package name it installs as (pyproject.toml, clients/python/pyproject.toml).
PACKAGES = {"protocol": "openred.protocol", "hub": "openred.hub",
            "persistence": "openred.persistence", "admin_http": "openred.admin_http",
            "clients/python/openred/client": "openred.client", "bench": "bench"}


def _module_files(root: Path, packages: dict[str, str]) -> dict[str, Path]:
    modules: dict[str, Path] = {}
    for folder, package in packages.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = [package, *path.relative_to(root / folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return ((isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
            or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                yield from _imports(ast.Module(body=[child], type_ignores=[]))
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        yield from _imports(node)


def import_graph(root: Path = ROOT,
                 packages: dict[str, str] = PACKAGES) -> dict[str, set[str]]:
    """Module name -> the repo modules it imports."""
    modules = _module_files(root, packages)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: list[str] = []
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets += [alias.name for alias in node.names]
                continue
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            # `from pkg import mod` imports the module pkg.mod; `from mod import name`, mod.
            targets += [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                        for alias in node.names]
        edges = set()
        for target in targets:
            while target and target not in modules:  # a name inside a module: that module
                target = target.rpartition(".")[0]
            if target and target != name:
                edges.add(target)
        graph[name] = edges
    return graph


def _components(graph: dict[str, set[str]]) -> dict[str, int]:
    """Module -> the number of its strongly connected component (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    component: dict[str, int] = {}

    def visit(v: str) -> None:  # recursion as deep as the longest import chain
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w not in component:  # on the stack
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            while True:
                w = stack.pop()
                component[w] = index[v]
                if w == v:
                    break

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return component


def find_cycles(graph: dict[str, set[str]], limit: int = 50) -> list[list[str]]:
    """The elementary cycles of `graph` (each a path back to its first module, which is
    its smallest name), at most `limit` of them, sorted."""
    component = _components(graph)
    cycles: list[list[str]] = []
    for start in sorted(graph):
        # Depth first, inside start's component and through modules named after it
        # only: each cycle is found once, from its smallest module.
        stack = [(start, [start])]
        while stack and len(cycles) < limit:
            v, path = stack.pop()
            for w in sorted(graph.get(v, ()), reverse=True):
                if w == start:
                    cycles.append([*path, start])
                elif w > start and w not in path and component[w] == component[start]:
                    stack.append((w, [*path, w]))
    return sorted(cycles)


def test_no_import_cycles() -> None:
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_check_sees_deferred_imports_and_skips_type_checking(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from pkg.contract import Thing\n")
    (pkg / "contract.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from pkg.impl import Impl\n"
        "class Thing: ...\n"
        "def make():\n    from .impl import Impl\n    return Impl()\n")
    (pkg / "impl.py").write_text("from pkg import contract\nclass Impl(contract.Thing): ...\n")
    (pkg / "typed.py").write_text(
        "import typing\nif typing.TYPE_CHECKING:\n    import pkg.other\n")
    (pkg / "other.py").write_text("import pkg.typed\n")
    graph = import_graph(tmp_path, {"pkg": "pkg"})
    assert graph["pkg.typed"] == set()
    assert find_cycles(graph) == [["pkg.contract", "pkg.impl", "pkg.contract"]]
