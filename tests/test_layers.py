"""The arrows point one way: ivon_core ← sensitivity ← worker → app.store ← app; research and benchmarks sit
above the product and nothing in it imports them; the API never imports torch."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
# package → top-level packages of this project it must never import (at any depth, function-level imports too)
FORBIDDEN = {
    "ivon_core": {"sensitivity", "worker", "app", "research", "bench", "migrations"},
    "sensitivity": {"worker", "app", "research", "bench", "migrations"},
    "worker": {"research", "bench"},
    "app": {"worker", "sensitivity", "ivon_core", "research", "bench", "torch"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_package_imports_a_layer_above_it(package):
    bad = {str(p.relative_to(ROOT)): sorted(_imports(p) & FORBIDDEN[package])
           for p in (ROOT / package).rglob("*.py")}
    assert {k: v for k, v in bad.items() if v} == {}


def test_the_research_harness_is_outside_the_product():
    assert not (ROOT / "worker" / "validation").exists()
    assert not (ROOT / "worker" / "cli.py").exists()
    assert "research" in _imports(ROOT / "ivon_diag" / "cli.py")  # the one entry that may import every layer


FIGURE = re.compile(r"\d+(\.\d+)?\s?×(?!\s?\d)|\b(Spearman|Pearson|AUROC)\s+[-−]?\d")


def test_figures_live_in_the_documents_that_measure_them():
    """The README, docstrings, comments, API descriptions and pages link docs/validation.md and docs/benchmarks.md
    (the validation and benchmarks own their figures); a ratio or a correlation quoted elsewhere drifts."""
    files = [ROOT / "README.md", *(p for pkg in ("ivon_core", "sensitivity", "worker", "app", "ivon_diag")
                                   for p in (ROOT / pkg).rglob("*") if p.suffix in (".py", ".html"))]
    quoted = {str(p.relative_to(ROOT)): m.group(0) for p in files for m in [FIGURE.search(p.read_text())] if m}
    assert quoted == {}
