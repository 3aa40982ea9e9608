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


def test_sensitivity_modules_import_each_other_at_the_top_and_without_a_cycle():
    """Shared helpers sit in a lower module (sensitivity.jacobians); no function-level imports hide a cycle."""
    graph = {}
    for p in (ROOT / "sensitivity").glob("*.py"):
        tree = ast.parse(p.read_text())
        nested = [n for f in ast.walk(tree) if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)
                  for n in ast.walk(f) if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("sensitivity")]
        assert nested == [], f"{p.name} imports sensitivity modules inside a function"
        graph[p.stem] = {n.module.split(".")[1] for n in tree.body if isinstance(n, ast.ImportFrom)
                         and (n.module or "").startswith("sensitivity.")}
    seen, done = set(), set()

    def visit(m, path):
        assert m not in seen or m in done, f"import cycle: {' -> '.join([*path, m])}"
        if m in done:
            return
        seen.add(m)
        for n in graph.get(m, ()):
            visit(n, [*path, m])
        done.add(m)

    for m in graph:
        visit(m, [])


def test_a_new_covariance_chooses_its_own_form_without_a_list_of_classes():
    import torch

    from sensitivity import compute_sensitivities
    from sensitivity.deviations import resolve_amplification, resolve_form

    class Scaled:  # a provider from outside the package: Σ = 0.01 I, with its own defaults
        default_form, default_max_amplification = "second_order", 3.0

        def apply(self, tangents):
            return {k: 0.01 * v for k, v in tangents.items()}

    class Plain:
        def apply(self, tangents):
            return tangents

    assert resolve_form("auto", Scaled()) == "second_order" and resolve_amplification("auto", Scaled()) == 3.0
    assert resolve_form("auto", Plain()) == "first_order" and resolve_amplification("auto", Plain()) == 2.0
    model = torch.nn.Linear(3, 2)
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    assert compute_sensitivities(model, (x, y), Scaled()).loo > 0
