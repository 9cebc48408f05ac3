"""The architecture's boundaries, checked: what each module may import (README.md, "Map of the files")."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HEAVY = {"torch", "transformers", "llama_cpp"}


def imports_of(path: Path) -> set[str]:
    """Top-level names of every module `path` imports, anywhere in the file."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def modules(package: str) -> list[Path]:
    return sorted(p for p in (REPO / package).rglob("*.py") if "rpc" not in p.parts)


def roots(names: set[str]) -> set[str]:
    return {n.split(".")[0] for n in names}


def test_policy_is_pure_standard_library():
    allowed = set(sys.stdlib_module_names) | {"__future__"}
    assert roots(imports_of(REPO / "shared" / "policy.py")) <= allowed


@pytest.mark.parametrize("path", modules("shared"), ids=lambda p: p.name)
def test_shared_imports_neither_side_nor_a_runtime(path):
    assert not roots(imports_of(path)) & ({"edge", "cloud"} | HEAVY)


@pytest.mark.parametrize("path", modules("edge"), ids=lambda p: p.name)
def test_edge_never_imports_the_cloud(path):
    assert "cloud" not in roots(imports_of(path))


@pytest.mark.parametrize("path", modules("cloud"), ids=lambda p: p.name)
def test_cloud_never_imports_the_edge(path):
    assert "edge" not in roots(imports_of(path))


def test_one_module_owns_each_heavy_dependency():
    """torch and transformers live in the `cloud.engine` package only, llama.cpp in one module."""
    owners: dict[str, set[str]] = {name: set() for name in HEAVY}
    for package in ("shared", "edge", "cloud"):
        for path in modules(package):
            for name in roots(imports_of(path)) & HEAVY:
                owners[name].add(str(path.relative_to(REPO)))
    engine_package = {str(p.relative_to(REPO)) for p in modules("cloud/engine")}
    assert owners["torch"] and owners["torch"] <= engine_package
    assert owners["transformers"] and owners["transformers"] <= engine_package
    assert owners["llama_cpp"] == {"edge/drafter.py"}


@pytest.mark.parametrize(
    "module", ["cloud.servicer", "cloud.server", "edge.cli", "cloud.cli", "edge.session"]
)
def test_importing_does_not_load_a_heavy_runtime(module):
    """--help stays instant and the servicer runs without torch: nothing heavy at import."""
    code = f"import sys, {module}; print(sorted(set(sys.modules) & set({sorted(HEAVY)!r})))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True
    ).stdout.strip()
    assert out == "[]"
