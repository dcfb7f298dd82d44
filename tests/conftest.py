"""Shared fixtures. The expensive ones (the demo export, demo builds) come from the tests' artefact
cache (tests/artifacts.py): made once per content key, shared by every module, run and
pytest-xdist worker; a test that changes one works on its own copy."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass

import hypothesis
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from tests.artifacts import cached, sources, versions
from tests.cli_builds import Run, cli_state_kept, lynx

# Hypothesis draws the same examples on every run and machine, and replays nothing from earlier
# runs: a test's outcome depends on the code, not on what ran before (`--hypothesis-profile default`
# explores).
hypothesis.settings.register_profile("deterministic", derandomize=True, database=None)
hypothesis.settings.load_profile("deterministic")

# What a build's output depends on besides its source model and options.
_BUILD_PACKAGES = ("onnx", "onnx-ir", "onnxruntime", "numpy", "polygraphy", "tensorrt-rtx-cu13", "torch")


def package_key() -> dict[str, object]:
    """The package's own code and the versions of what it runs on: part of every build's key."""
    return {"lynx_export": sources("lynx_export/**/*.py", "lynx_export/**/*.json", "lynx_export/**/*.npz"), "versions": versions(*_BUILD_PACKAGES)}


@pytest.fixture
def model_runs(monkeypatch):
    """A Counter of ONNX Runtime runs by the runner's label (what errors call the model), for
    tests that count how often each model runs."""
    import collections

    from lynx_export.backends import ort as ort_backend

    runs: collections.Counter[str] = collections.Counter()
    infer = ort_backend.OrtRunner.infer_impl

    def counted(self, feed_dict):
        runs[self.label] += 1
        return infer(self, feed_dict)

    monkeypatch.setattr(ort_backend.OrtRunner, "infer_impl", counted)
    return runs


@pytest.fixture(autouse=True)
def _cli_state_kept():
    """Commands run in this process (click's runner) set the package logger and the SIGTERM
    handler for themselves; each test starts and ends with them as they were."""
    with cli_state_kept():
        yield


@pytest.fixture(scope="session")
def demo_onnx() -> pathlib.Path:
    """The demo model (a real dynamo export, random weights)."""
    pytest.importorskip("torch")
    from lynx_export.evaluation.demo import export_demo_model

    def make(folder: pathlib.Path) -> None:
        folder.mkdir()
        export_demo_model(folder / "model.onnx")

    return cached("demo", {"demo": "export_demo_model", **package_key()}, make, folder=True) / "model.onnx"


@dataclass(frozen=True)
class Built:
    """A shared command's result: the folder it wrote into and what it printed."""

    out: pathlib.Path
    run: Run


@pytest.fixture(scope="session")
def lynx_once() -> Callable[..., Built]:
    """`lynx_once(*ARGS)`: `lynx-export ARGS` run once per ARGS (in this process), where `{out}` in an
    argument stands for the folder it writes into. Keyed by the arguments, the content of every
    file they name and the package (`package_key`). A failed command fails the test with its
    stderr. Shared: a test that changes what it wrote works on `copy_build(built.out, ...)`."""

    def get(*args: object) -> Built:
        argv = [str(a) for a in args]

        def make(folder: pathlib.Path) -> None:
            folder.mkdir()
            r = lynx(*(a.replace("{out}", str(folder / "out")) for a in argv))
            assert r.returncode == 0, r.stderr
            (folder / "run.json").write_text(json.dumps(dataclasses.asdict(r)))

        inputs = {a: sources(pathlib.Path(a).name, root=pathlib.Path(a).parent) if pathlib.Path(a).is_file() else sources("**/*", root=pathlib.Path(a))
                  for a in argv if pathlib.Path(a).exists()}  # a file's content, a folder's files
        folder = cached("lynx-run", {"args": argv, "inputs": inputs, **package_key()}, make, folder=True)
        return Built(folder / "out", Run(**json.loads((folder / "run.json").read_text())))

    return get


@pytest.fixture(scope="session")
def demo_builds(demo_onnx, lynx_once) -> Callable[..., Built]:
    """`demo_builds(*ARGS)`: `lynx-export build DEMO -o OUT ARGS`, through `lynx_once`."""
    return lambda *args: lynx_once("build", demo_onnx, "-o", "{out}", *args)


def copy_build(folder: pathlib.Path, to: pathlib.Path) -> pathlib.Path:
    """A private copy of a shared build folder, for a test that changes it."""
    shutil.copytree(folder, to)
    return to


@pytest.fixture(scope="session")
def dense_onnx(tmp_path_factory) -> pathlib.Path:
    """A model with no MoE block: y = relu(x @ W)."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 4], np.eye(4, dtype=np.float32).ravel().tolist())
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
        "dense",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [w],
    )
    path = tmp_path_factory.mktemp("dense") / "dense.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path
