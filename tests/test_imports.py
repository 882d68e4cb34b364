"""Imports at the top where the issue moved them (issue 13, item 1), and a CLI that stays light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOP_LEVEL_ONLY = ["deltapatch/pipeline.py", "deltapatch/gate.py", "deltapatch/registry/registry.py"]


def _function_body_imports(path: Path) -> list[int]:
    lines: list[int] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if in_function and isinstance(child, ast.Import | ast.ImportFrom):
                lines.append(child.lineno)
            visit(child, in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda))

    visit(ast.parse(path.read_text()), False)
    return lines


@pytest.mark.parametrize("module", TOP_LEVEL_ONLY)
def test_no_function_body_imports(module: str) -> None:
    assert _function_body_imports(ROOT / module) == [], f"{module}: import inside a function"


def test_cli_import_loads_neither_mlflow_nor_torch() -> None:
    code = "import sys, deltapatch.cli; print(sorted(m for m in ('mlflow', 'torch', 'prefect') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_library_modules_import_without_a_cycle() -> None:
    code = "import deltapatch.pipeline, deltapatch.registry.registry, deltapatch.gate, flows.patch_task, deltapatch.cli"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, text=True)
