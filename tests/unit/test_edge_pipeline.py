"""The edge's outer layer is one typed, one-way pipeline: cli -> flags -> options -> run ->
(small model, client, renderer) -> session. Checked on the source: the edge's modules import
each other without a cycle (lazy imports inside functions included, type-only ones not),
configuration knows nothing of the gRPC client, and `--help` loads neither grpc nor
llama.cpp."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

EDGE = Path(__file__).resolve().parents[2] / "edge"


def _edge_imports(path: Path) -> set[str]:
    """edge.* modules `path` imports at run time (anywhere but under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    type_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            type_only |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "edge":
                found |= {f"edge.{alias.name}" for alias in node.names}
            elif node.module.startswith("edge."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("edge.")}
    return found


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in EDGE.rglob("*.py"):
        rel = path.relative_to(EDGE.parent).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        name = ".".join(parts)
        graph[name] = {m for m in _edge_imports(path) if m != name}
    return graph


def test_the_edge_modules_import_each_other_in_one_direction() -> None:
    graph = _graph()
    visiting: list[str] = []
    done: set[str] = set()

    def visit(module: str) -> None:
        if module in done:
            return
        assert module not in visiting, "import cycle: " + " -> ".join([*visiting, module])
        visiting.append(module)
        for target in sorted(graph.get(module, ())):
            visit(target)
        visiting.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)


def test_configuration_does_not_depend_on_the_grpc_client() -> None:
    assert "edge.cloud_client" not in _edge_imports(EDGE / "config.py")
    assert "edge.cloud_client" not in _edge_imports(EDGE / "options.py")


def test_help_loads_neither_grpc_nor_llama_cpp() -> None:
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from edge.cli import app\n"
        "result = CliRunner().invoke(app, ['ask', '--help'])\n"
        "assert result.exit_code == 0, result.output\n"
        "print(sorted(m for m in ('grpc', 'llama_cpp', 'torch') if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]", done.stdout + done.stderr
