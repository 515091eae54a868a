"""The core's folders import one way, down the flow, and no module imports itself back in a circle.

docs/architecture.md draws the same layers; every import counts, type-only and function-level ones included.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parent.parent / "gateway"
#: The name the core imports as (the folder is mapped to it in pyproject.toml).
PACKAGE = "declic_gateway"

#: Top to bottom: a module may import its own layer and the layers below it, never one above.
LAYERS: list[set[str]] = [
    {"cli", "testing"},
    {"http"},
    {"jobs"},
    {"send"},
    {"pipeline"},
    {"insight"},
    {"__init__", "plugins", "hookspecs"},  # the public face: what plugin authors import, the plugin manager
    {"config"},
    {"kit"},
    {"store"},
    {"errors"},
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    parts = (PACKAGE, *path.relative_to(CORE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(dotted: str) -> bool:
    path = CORE.joinpath(*dotted.split(".")[1:])
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports_of(path: Path, name: str | None = None) -> set[str]:
    """Every gateway module this file imports, wherever the import statement stands."""
    name = name or module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == PACKAGE}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            if target.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:  # `from . import contacts` imports the module, not the package
                found.add(f"{target}.{alias.name}" if is_module(f"{target}.{alias.name}") else target)
    return found - {name}


def import_graph() -> dict[str, set[str]]:
    return {module_name(path): imports_of(path) for path in CORE.rglob("*.py") if "migrations" not in path.parts}


def layer(module: str) -> str:
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def backward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Imports from a lower layer up to a higher one."""
    return sorted(
        f"{module} imports {target} ({layer(module)} is below {layer(target)})"
        for module, targets in graph.items()
        for target in targets
        if RANK[layer(target)] < RANK[layer(module)]
    )


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_every_core_folder_has_a_layer():
    folders = {layer(module) for module in import_graph()}
    assert folders <= set(RANK), f"place these in LAYERS and docs/architecture.md: {sorted(folders - set(RANK))}"


def test_imports_point_down_the_layers():
    assert backward_imports(import_graph()) == []


def test_no_import_circle():
    assert circles(import_graph()) == []


def test_a_planted_backward_import_is_caught():
    graph = import_graph()
    graph["declic_gateway.store.db"] = graph["declic_gateway.store.db"] | {"declic_gateway.http.app"}
    assert backward_imports(graph) == ["declic_gateway.store.db imports declic_gateway.http.app (store is below http)"]


def test_a_planted_circle_is_caught():
    graph = import_graph()
    graph["declic_gateway.pipeline.router"] = graph["declic_gateway.pipeline.router"] | {
        "declic_gateway.pipeline.inbound"
    }
    assert ["declic_gateway.pipeline.inbound", "declic_gateway.pipeline.router"] in circles(graph)


def test_type_only_and_function_level_imports_count(tmp_path):
    """A circle hidden behind TYPE_CHECKING or inside a function is still a circle."""
    planted = tmp_path / "events.py"
    planted.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from ..http import app\n"
        "def late():\n    from declic_gateway.pipeline import router\n"
    )
    found = imports_of(planted, "declic_gateway.kit.events")
    assert found == {"declic_gateway.http.app", "declic_gateway.pipeline.router"}
    assert len(backward_imports({"declic_gateway.kit.events": found})) == 2


@pytest.mark.parametrize("folder", sorted({names for layer_ in LAYERS for names in layer_} - {"__init__"}))
def test_docs_describe_each_layer(folder):
    text = (CORE.parent / "docs" / "architecture.md").read_text()
    assert f"`{folder}/`" in text or f"`{folder}.py`" in text
