"""``sam_ft/model``: the architecture table is data on its own, no module imports another back
(also through imports inside functions), and the package's ``__init__`` holds no code."""

from __future__ import annotations

import ast
from pathlib import Path

MODEL = Path(__file__).resolve().parents[1] / "sam_ft" / "model"


def _imports(path: Path) -> set[str]:
    """``sam_ft.model.*`` modules that ``path`` imports anywhere (top level or in a function)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found |= {n for n in names if n.startswith("sam_ft.model.") and n.count(".") == 2}
    return found


def _graph() -> dict[str, set[str]]:
    modules = {f"sam_ft.model.{p.stem}": p for p in MODEL.glob("*.py") if p.stem != "__init__"}
    return {name: _imports(path) & set(modules) for name, path in modules.items()}


def test_no_import_cycle_inside_the_model_package():
    graph = _graph()
    assert graph["sam_ft.model.builders"] >= {"sam_ft.model.checkpoint", "sam_ft.model.specs"}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        nexts = graph[start] - seen
        return any(nxt == goal or reaches(nxt, goal, seen | {nxt}) for nxt in nexts)

    cycles = sorted(m for m in graph if reaches(m, m, set()))
    assert cycles == [], f"modules on an import cycle: {cycles}"


def test_the_spec_table_is_plain_data():
    from sam_ft.model import builders, checkpoint, specs

    assert _imports(MODEL / "specs.py") == set()
    tree = ast.parse((MODEL / "specs.py").read_text())
    assert not [n.name for n in tree.body if isinstance(n, ast.FunctionDef)]
    # One table: the builders and the checkpoint reader see the same object.
    assert builders.SPECS is specs.SPECS is checkpoint.SPECS
    assert {"vit_b", "vit_l", "vit_h", "medsam", "tiny"} <= set(specs.SPECS)


def test_package_init_holds_no_code():
    tree = ast.parse((MODEL / "__init__.py").read_text())
    assert len(tree.body) == 1 and isinstance(tree.body[0], ast.Expr), "only a docstring"
