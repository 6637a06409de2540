"""
The package's modules import one another without a circle: a module that
another imports never imports it back, directly or through others.

Every import a module states counts, wherever it is: at its top level,
under ``if TYPE_CHECKING:`` (a circle for the type checker is one for the
reader) and inside functions (an import moved into a function to get
around a circle leaves the circle where it was).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import dit4c

ROOT = Path(dit4c.__file__).parent


def moduleName(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(tree: ast.Module) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement of a module, wherever it stands."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node


def importGraph() -> dict[str, set[str]]:
    """Each module of ``dit4c`` and the modules of ``dit4c`` it imports."""
    paths = {moduleName(path): path for path in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
                continue
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                # "from package import module" imports the module; "from module import name", the module.
                targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in paths else base)
        graph[name] = {t for t in targets if t in paths and t != name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    onStack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        onStack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in onStack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                onStack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_graph_sees_the_portal_importing_its_parts() -> None:
    """The walk finds real imports (a check that finds none would pass on anything)."""
    graph = importGraph()
    assert {"dit4c.portal.api", "dit4c.portal.admin", "dit4c.portal.oauth"} <= graph["dit4c.portal.app"]
    assert "dit4c.portal.store.errors" in graph["dit4c.portal.api"]


def test_a_circle_is_found() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert circles(graph) == [["a", "b", "c"]]


def test_imports_for_the_type_checker_and_in_functions_count() -> None:
    """The hidden ones are where circles hide: an import under ``if TYPE_CHECKING:`` or in a function."""
    tree = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from dit4c.tunnel.session import Session\n"
        "def later():\n"
        "    import dit4c.portal.app\n"
    )
    found = {node.module if isinstance(node, ast.ImportFrom) else node.names[0].name for node in imports(tree)}
    assert found == {"typing", "dit4c.tunnel.session", "dit4c.portal.app"}


def test_no_import_circle_in_the_package() -> None:
    """None anywhere in ``dit4c``."""
    assert circles(importGraph()) == []


def test_no_part_of_the_portal_imports_the_app() -> None:
    """The app builds the rooms and gives them their doors; none of them reaches back into it."""
    importers = {name for name, targets in importGraph().items() if "dit4c.portal.app" in targets}
    assert {n for n in importers if n.startswith("dit4c.portal.")} <= {"dit4c.portal.service", "dit4c.portal.tap"}


def test_no_module_is_longer_than_600_lines() -> None:
    """A module a newcomer opens fits in one sitting: past 600 lines, it holds more than one thing."""
    long = {str(p.relative_to(ROOT)): n for p in ROOT.rglob("*.py") if (n := len(p.read_text().splitlines())) > 600}
    assert long == {}, long
