"""Checkpoint safety, checked on the source: every ``torch.load`` passes ``weights_only=True``
and no weight loading uses ``strict=False``. Issue #8, item 4 (behaviour: pickled objects and
hash mismatches refused in tests/test_checkpoint.py, truncated files in test_cache_faults.py)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted(
    [*(ROOT / "sam_ft").rglob("*.py"), *ROOT.glob("*.py"), *(ROOT / "bench").rglob("*.py")]
)


def _calls(name: str):
    """(file, call) of every call whose function name contains ``name``."""
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and name in ast.unparse(node.func):
                yield path.relative_to(ROOT), node


def _is_true(node: ast.Call, keyword: str) -> bool:
    value = next((k.value for k in node.keywords if k.arg == keyword), None)
    return isinstance(value, ast.Constant) and value.value is True


def test_every_torch_load_is_weights_only():
    loads = list(_calls("torch.load"))
    assert loads, "expected torch.load calls in sam_ft"
    assert [
        f"{path}:{node.lineno}" for path, node in loads if not _is_true(node, "weights_only")
    ] == []


def test_no_non_strict_weight_loading():
    """Any ``*load*(..., strict=...)`` call (load_state_dict, load_from_checkpoint, ...) is
    strict; ``zip(strict=False)`` and friends are not weight loading."""
    loose = [
        f"{path}:{node.lineno}"
        for path, node in _calls("load")
        if any(k.arg == "strict" for k in node.keywords) and not _is_true(node, "strict")
    ]
    assert loose == []
