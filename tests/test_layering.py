"""Packages import only earlier packages; heavy optional packages are imported lazily."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "lynx_export"

# Package order: a module may import its own package or packages of lower rank. The compiler
# uses the backends' runners and engine builders; the tooling (serving, evaluation, bench) uses
# the compiler, never the reverse.
RANK = {
    "errors": 0,
    "progress": 0,
    "records": 0,
    "routing": 1,
    "op": 2,
    "backends": 3,
    "compiler": 4,
    "serving": 5,
    "evaluation": 5,
    "bench": 6,
    "cli": 7,
}
# Top-level modules beside the packages (the issue that set the layout caps them at 6).
TOP_LEVEL_MODULES = {"__init__", "errors", "progress", "records"}
MAX_LINES = 600


def _package(module: str) -> str:
    return module.removeprefix("lynx_export.").split(".")[0]


def _imports(path: pathlib.Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "lynx_export":
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lynx_export."):
            found.add(_package(node.module))
        elif isinstance(node, ast.Import):
            found.update(_package(a.name) for a in node.names if a.name.startswith("lynx_export."))
    return found


def _modules() -> list[pathlib.Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_package_is_ranked():
    tops = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in _modules()}
    assert tops - {"__init__"} == set(RANK)
    assert {p.stem for p in PACKAGE.glob("*.py")} == TOP_LEVEL_MODULES


def test_packages_never_import_later_packages():
    for path in _modules():
        own = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        if own == "__init__":
            continue
        for imported in _imports(path):
            assert RANK[imported] <= RANK[own], f"{path.relative_to(PACKAGE)} ({own}) imports later package {imported}"


def test_no_module_over_600_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in _modules() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long


def test_cli_help_needs_no_heavy_packages():
    code = (
        "import sys; from lynx_export import cli; "
        "bad = [m for m in ('torch', 'onnxruntime', 'onnxscript') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
