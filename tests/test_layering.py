"""The layering of the package, read from the import statements of every source file.

    stdit.common  <-  stdit.kernels  <-  stdit.models  <-  stdit.train
                              \\______________\\_______________\\____  stdit.bench
    the command line (stdit.cli, stdit.info) on top of all of them

A layer imports only the layers below it, and no two modules import each other, directly or
through others. The test plants a bad import in a copy of the tree to show that it fails.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# folder -> the package it is installed as (pyproject's package-dir)
PACKAGES = {"common": "stdit.common", "kernels": "stdit.kernels", "models": "stdit.models", "train": "stdit.train",
            "bench": "stdit.bench", "stdit": "stdit"}  # fmt: skip
# package -> the stdit packages it may import
ALLOWED = {
    "stdit.common": set(),
    "stdit.kernels": {"stdit.common"},
    "stdit.models": {"stdit.common", "stdit.kernels"},
    "stdit.train": {"stdit.common", "stdit.kernels", "stdit.models"},
    "stdit.bench": {"stdit.common", "stdit.kernels", "stdit.models", "stdit.train"},
    "stdit": {"stdit.common", "stdit.kernels", "stdit.models", "stdit.train", "stdit.bench"},
}


def _modules(root: Path) -> dict[str, Path]:
    """Every source module of the package: dotted name -> file."""
    out = {}
    for folder, package in PACKAGES.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = path.relative_to(root / folder).with_suffix("").parts
            name = ".".join((package, *parts))
            out[name.removesuffix(".__init__")] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The stdit modules that module ``name`` imports (relative imports resolved; a name imported
    from a package counts as its submodule when it is one)."""
    is_package = path.name == "__init__.py"
    base = name.split(".") if is_package else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                stem = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            targets = [stem] + [f"{stem}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _package(module: str) -> str:
    for package in sorted(ALLOWED, key=len, reverse=True):
        if module == package or module.startswith(package + "."):
            return package
    raise AssertionError(module)


def layering_errors(root: Path) -> list[str]:
    modules = _modules(root)
    graph = {name: _imports(name, path, set(modules)) for name, path in modules.items()}
    errors = []
    for name, deps in sorted(graph.items()):
        layer = _package(name)
        for dep in sorted(deps):
            other = _package(dep)
            if other != layer and other not in ALLOWED[layer]:
                errors.append(f"{name} imports {dep}: {layer} may not import {other}")
    # import cycles between modules (a package's __init__ importing its own submodules is no cycle,
    # but a submodule importing that __init__ back is)
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if dep.startswith(node + "."):  # an __init__ importing its submodules
                continue
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep] if dep in stack else [node, dep]
                errors.append("import cycle: " + " -> ".join(cycle))
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    return errors


def test_layers_import_only_the_layers_below():
    assert layering_errors(ROOT) == []


@pytest.mark.parametrize(
    "where, line, expected",
    [
        ("kernels/api.py", "from stdit.models import STDiT", "stdit.kernels may not import stdit.models"),
        ("models/stdit.py", "import stdit.train.trainer", "stdit.models may not import stdit.train"),
        ("train/trainer.py", "from stdit.bench import results", "stdit.train may not import stdit.bench"),
        ("kernels/validate.py", "from stdit import cli", "stdit.kernels may not import stdit"),
        ("models/sizes.py", "from .stdit import STDiT", "import cycle"),
    ],
)
def test_a_planted_bad_import_fails(tmp_path, where, line, expected):
    for folder in PACKAGES:
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    path = tmp_path / where
    path.write_text(path.read_text() + f"\n{line}\n")
    assert any(expected in e for e in layering_errors(tmp_path)), layering_errors(tmp_path)
