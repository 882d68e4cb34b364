"""Imports at the top where the issue moved them (issue 13, item 1), and a CLI that stays light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = sorted(p for p in [*ROOT.glob("deltapatch/**/*.py"), *ROOT.glob("flows/**/*.py")]
                 if "cli" not in p.relative_to(ROOT).parts)  # the CLI's lazy imports keep `--help` fast
REASON = "# lazy:"


def _function_body_imports(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every import inside a function whose statement carries no `# lazy: <reason>`."""
    lines = path.read_text().splitlines()
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if in_function and isinstance(child, ast.Import | ast.ImportFrom):
                statement = lines[child.lineno - 1:(child.end_lineno or child.lineno)]
                if not any(REASON in line for line in statement):
                    found.append((child.lineno, lines[child.lineno - 1].strip()))
            visit(child, in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda))

    visit(ast.parse(path.read_text()), False)
    return found


@pytest.mark.parametrize("module", LIBRARY, ids=lambda p: str(p.relative_to(ROOT)))
def test_function_body_imports_say_why(module: Path) -> None:
    assert _function_body_imports(module) == [], f"{module}: import inside a function without '{REASON} <reason>'"


def test_the_check_sees_an_unexplained_import(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("import os\n\ndef f():\n    import json\n    import csv  # lazy: a reason\n    return json, csv\n")
    assert _function_body_imports(sample) == [(4, "import json")]


def test_cli_import_loads_neither_mlflow_nor_torch() -> None:
    code = "import sys, deltapatch.cli; print(sorted(m for m in ('mlflow', 'torch', 'prefect') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_library_modules_import_without_a_cycle() -> None:
    code = "import deltapatch.pipeline, deltapatch.registry.registry, deltapatch.gate, flows.patch_task, deltapatch.cli"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, text=True)
