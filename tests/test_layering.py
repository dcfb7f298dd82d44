"""Stages import only earlier stages; heavy optional packages are imported lazily."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "lynx_export"

# Stage order: a module may import modules of its own rank or lower.
RANK = {
    "errors": 0, "routing": 0, "graph_builder": 0, "spec": 1, "op": 2, "model_io": 1, "demo": 1,
    "detect": 3, "forms.match": 2, "forms.batched_mm": 2, "forms.rewritten": 2, "forms.ort_moe": 2, "forms.grouped_mm": 2, "forms.expert_loop": 2, "rewrite": 4, "backends.ort": 5, "backends.lynx_moe_lib": 1, "backends.trt_plugin": 3, "backends.tensorrt": 5, "dense_twin": 5, "verify": 6, "build": 7, "output": 1, "triton": 8, "triton_server": 1, "serving.ort_model": 0, "bench": 8, "cli": 9,
    "corpus": 1, "sweep": 1, "trained": 2, "trace": 2, "train": 3, "evaluate": 7, "accuracy": 8,
}


def _imports(path: pathlib.Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and (PACKAGE / node.module.removeprefix("lynx_export.")).is_dir():
            package = node.module.removeprefix("lynx_export.")
            found.update(f"{package}.{a.name}" for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lynx_export."):
            found.add(node.module.removeprefix("lynx_export."))
        elif isinstance(node, ast.ImportFrom) and node.module == "lynx_export":
            found.update(a.name for a in node.names)
    return found


def test_every_module_is_ranked():
    modules = {str(p.relative_to(PACKAGE).with_suffix("")).replace("/", ".") for p in PACKAGE.rglob("*.py") if p.stem != "__init__"}
    assert modules == set(RANK)


def test_stages_never_import_later_stages():
    for module, rank in RANK.items():
        path = PACKAGE / (module.replace(".", "/") + ".py")
        for imported in _imports(path):
            assert RANK[imported] <= rank, f"{module} imports later stage {imported}"


def test_cli_help_needs_no_heavy_packages():
    code = (
        "import sys; from lynx_export import cli; "
        "bad = [m for m in ('torch', 'onnxruntime', 'onnxscript') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
