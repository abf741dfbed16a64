"""The layers of the codebase (README "Layout"): the pruning library imports nothing above it."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = sorted(p for p in (ROOT / "skrr").glob("*.py"))
ABOVE_LIBRARY = ("eval", "baselines", "skrr.experiments", "hydra", "omegaconf", "wandb")


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at top level or inside functions (absolute names)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: p.name)
def test_library_imports_nothing_from_the_layers_above(path: Path) -> None:
    bad = sorted(m for m in imported_modules(path) if any(m == a or m.startswith(a + ".") for a in ABOVE_LIBRARY))
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}: the library must not depend on the experiment layer"


def test_plan_is_plain_data_without_the_surgery_built_on_it() -> None:
    # plan.py <-> surgery.py was a cycle; a plan is validated against a signature, not an encoder.
    skrr_imports = {m for m in imported_modules(ROOT / "skrr" / "plan.py") if m.startswith("skrr")}
    assert skrr_imports <= {"skrr.io", "skrr.io.atomic_write_text"}, skrr_imports


def test_baselines_and_eval_do_not_reach_into_the_experiment_layer() -> None:
    for path in [*(ROOT / "baselines").glob("*.py"), *(ROOT / "eval").glob("*.py")]:
        bad = [m for m in imported_modules(path) if m.startswith("skrr.experiments")]
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"
