"""The package's shape (issues #17, #32): sam_ft's packages depend on each other in one
direction, ``evaluation/``'s three rooms keep their layer rules, the decode-and-select step lives
in one module, family-independent code names the backend interface, and no module or function
outgrows one idea. Read from the source with ``ast`` (function-level imports count)."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "sam_ft"
MAX_LINES = 500


def _package_graph() -> dict[str, set[str]]:
    """{top-level part of sam_ft: the other top-level parts it imports}, e.g. "data" -> "model"."""
    graph: dict[str, set[str]] = defaultdict(set)
    for path in PACKAGE.rglob("*.py"):
        part = path.relative_to(PACKAGE).with_suffix("").parts[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                bits = name.split(".")
                if bits[0] == "sam_ft" and len(bits) > 1 and bits[1] != part:
                    graph[part].add(bits[1])
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path (first node repeated at the end), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}}) is None


def test_packages_depend_on_each_other_in_one_direction():
    graph = _package_graph()
    assert graph["data"] and graph["evaluation"]  # the walk sees imports at all
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_no_module_over_the_line_limit():
    long = {
        str(p.relative_to(PACKAGE)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, long


MAX_FUNCTION_LINES = 80


def _code_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines from the first statement after the docstring to the last one."""
    body = node.body
    if isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        body = body[1:] or body
    return body[-1].end_lineno - body[0].lineno + 1


def test_no_function_over_the_line_limit():
    long = {
        f"{p.relative_to(PACKAGE)}:{node.lineno} {node.name}": n
        for p in PACKAGE.rglob("*.py")
        for node in ast.walk(ast.parse(p.read_text(), str(p)))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and (n := _code_lines(node)) > MAX_FUNCTION_LINES
    }
    assert not long, long


def _imports_from(path: Path) -> dict[str, set[str]]:
    """{module imported from: names} of one file (function-level imports included)."""
    found: dict[str, set[str]] = defaultdict(set)
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module:
            found[node.module] |= {a.name for a in node.names}
    return found


def test_the_decode_and_select_step_lives_in_one_module():
    """Evaluation, training's validation and predict decode and keep masks with the one step in
    ``evaluation/protocol/decode_select.py``; outside ``model/`` nothing else thresholds a
    decoder's upsampled logits (``binarize``) or holds the upsample budget."""
    step = "sam_ft.evaluation.protocol.decode_select"
    users = {
        "training/module.py": "decode_scored",
        "inference/label_maps.py": "decode_masks",
        "evaluation/protocol/run_case.py": "decode_scored",
        "evaluation/protocol/propagation.py": "decode_scored",
        "evaluation/protocol/everything.py": "prompts_per_upsample",
    }
    for module, name in users.items():
        assert name in _imports_from(PACKAGE / module)[step], module
    binarizing, budgets = set(), set()
    for path in PACKAGE.rglob("*.py"):
        rel = str(path.relative_to(PACKAGE))
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == "binarize":
                binarizing.add(rel)
            if isinstance(node, ast.Assign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(getattr(t, "id", "").endswith("UPSAMPLE_BUDGET_BYTES") for t in targets):
                    budgets.add(rel)
    assert {p for p in binarizing if not p.startswith("model/")} == {
        "evaluation/protocol/decode_select.py"
    }
    assert budgets == {"evaluation/protocol/decode_select.py"}


def test_family_independent_code_names_the_backend_not_sam():
    """The engine, the decode-and-select step, the propagators, training and inference work with
    any model family: they take a ``model.backend.SegmentBackend``; ``TrainableSam`` (the SAM
    family's backend) is named only by code that is SAM's own."""
    naming_sam = {
        str(path.relative_to(PACKAGE))
        for part in ("evaluation", "training", "inference", "data", "prompts")
        for path in (PACKAGE / part).rglob("*.py")
        if any(
            isinstance(node, ast.Name | ast.alias)
            and (node.id if isinstance(node, ast.Name) else node.name) == "TrainableSam"
            for node in ast.walk(ast.parse(path.read_text(), str(path)))
        )
    }
    assert not naming_sam, naming_sam
    hints = _imports_from(PACKAGE / "evaluation/protocol/engine.py")["sam_ft.model.backend"]
    assert "SegmentBackend" in hints


ROOMS = {"protocol", "metrics", "reports"}
REPORTS_READ_FROM_PROTOCOL = {"options", "order", "tables", "tablesort"}
"""What the reports take from the protocol: its options, its row order, its tables' columns and
their streamed reading; never the engine or anything that runs a model."""


def _sam_ft_imports(path: Path) -> set[str]:
    """The sam_ft modules (or packages) one file imports, dotted, function-level included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {name for name in found if name.split(".")[0] == "sam_ft"}


def test_evaluation_is_three_rooms_with_their_layer_rules():
    """``evaluation/`` is protocol (running the study), metrics (one object's numbers) and
    reports (summaries, statistics, studies): metrics import nothing of sam_ft but metrics;
    reports read the protocol's options, row order and table columns only, and run no model."""
    evaluation = PACKAGE / "evaluation"
    assert {p.name for p in evaluation.iterdir() if p.suffix == ".py"} == {"__init__.py"}
    assert {p.name for p in evaluation.iterdir() if p.is_dir() and p.name != "__pycache__"} == (
        ROOMS
    )
    broken = []
    for path in sorted((evaluation / "metrics").rglob("*.py")):
        broken += [
            f"metrics/{path.name} -> {name}"
            for name in _sam_ft_imports(path)
            if not name.startswith("sam_ft.evaluation.metrics")
        ]
    for path in sorted((evaluation / "reports").rglob("*.py")):
        for name in _sam_ft_imports(path):
            bits = name.split(".") + [""] * 3
            runs_models = bits[1] in {"model", "data", "prompts", "training", "inference"}
            protocol = bits[1:3] == ["evaluation", "protocol"]
            if runs_models or (protocol and bits[3] not in REPORTS_READ_FROM_PROTOCOL):
                broken.append(f"reports/{path.name} -> {name}")
    assert not broken, broken
