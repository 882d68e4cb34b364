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


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_cycles(root: Path, package: str) -> list[list[str]]:
    """Cycles among `package`'s modules through their module-level imports, `if TYPE_CHECKING:` ones
    included (a cycle that only typing needs is still a cycle a reader has to untangle).
    `from pkg import submodule` depends on the submodule, not on pkg's __init__."""
    paths = {_module_name(p, root): p for p in root.glob(f"{package}/**/*.py")}
    graph: dict[str, set[str]] = {name: set() for name in paths}
    for name, path in paths.items():
        for node in ast.parse(path.read_text()).body:
            for statement in node.body if isinstance(node, ast.If) else [node]:
                if isinstance(statement, ast.ImportFrom) and statement.module in paths:
                    subs = {f"{statement.module}.{a.name}" for a in statement.names} & set(paths)
                    graph[name] |= subs if len(subs) == len(statement.names) else {statement.module, *subs}
                elif isinstance(statement, ast.Import):
                    graph[name] |= {a.name for a in statement.names if a.name in paths}
        graph[name].discard(name)
    cycles, done = [], set()

    def walk(name: str, trail: list[str]) -> None:
        for target in sorted(graph[name]):
            if target in trail:
                cycles.append(trail[trail.index(target):])
            elif target not in done:
                walk(target, [*trail, target])
        done.add(name)

    for name in sorted(graph):
        if name not in done:
            walk(name, [name])
    return cycles


def test_no_import_cycle_among_the_library_modules() -> None:
    assert _import_cycles(ROOT, "deltapatch") == []


def test_the_cycle_check_sees_one_through_type_checking(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "a.py").write_text("from pkg.b import B\n")
    (tmp_path / "pkg" / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a import A\nB = 1\n")
    (tmp_path / "pkg" / "c.py").write_text("from pkg import a, b\n")  # submodules, not the package: no cycle
    assert _import_cycles(tmp_path, "pkg") == [["pkg.a", "pkg.b"]]
