"""dvc.yaml's code deps are exactly the project modules each stage imports.

A stage's checkpoint identity is read from dvc.yaml (transfer/checkpoints.py), so a module
missing there would let a run resume, and DVC skip a rerun, after that module changed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml
from helpers import ROOT

PACKAGES = ("stages", "transfer")
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def module_file(module: str) -> Path | None:
    for candidate in (Path(*module.split(".")).with_suffix(".py"), Path(*module.split("."), "__init__.py")):
        if (ROOT / candidate).is_file():
            return candidate
    return None


def imported_files(module: str, found: set[str] | None = None) -> set[str]:
    """The project files that `python -m <module>` imports, packages' __init__.py included."""
    found = set() if found is None else found
    path = module_file(module)
    if path is None or path.as_posix() in found:
        return found
    found.add(path.as_posix())
    parts = module.split(".")
    for depth in range(1, len(parts)):
        imported_files(".".join(parts[:depth]), found)
    for node in run_time_nodes(ast.parse((ROOT / path).read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            if name.split(".")[0] in PACKAGES:
                imported_files(name, found)
    return found


def run_time_nodes(node: ast.AST):
    """Every node below `node` but those under `if TYPE_CHECKING:`, which never runs: an import there is for
    type hints only, so no stage depends on what it names."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
            for other in child.orelse:
                yield other
                yield from run_time_nodes(other)
            continue
        yield child
        yield from run_time_nodes(child)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_code_deps_are_the_modules_the_stage_imports(stage):
    spec = STAGES[stage]
    module = spec["cmd"].removeprefix("python -m ")
    code_deps = {dep for dep in spec["deps"] if dep.endswith(".py")}
    assert code_deps == imported_files(module)


def test_the_import_walk_sees_indirect_imports():
    # pretrain imports transfer.training, which imports transfer.checkpoints: a walk that stopped at
    # the first level would pass the test above with that module missing from dvc.yaml.
    assert "transfer/checkpoints.py" in imported_files("stages.pretrain")
    assert "transfer/cifar10.py" not in imported_files("stages.pretrain")


def test_the_import_walk_skips_imports_for_type_hints_only():
    # transfer/models.py imports transfer.runtime under `if TYPE_CHECKING:` (save_model's hint): the figures
    # stage, which uses models.py but never runtime.py, must not depend on it.
    assert "transfer/models.py" in imported_files("stages.figures")
    assert "transfer/runtime.py" not in imported_files("stages.figures")
