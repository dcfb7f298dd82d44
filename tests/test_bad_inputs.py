"""Every malformed input gets a one-line error, a non-zero exit, no traceback, and nothing written."""

from __future__ import annotations


import pytest
from click.testing import CliRunner

from lynx_export.cli import main
from tests.bad_inputs import make_corpus


@pytest.fixture(scope="module")
def corpus(demo_onnx, tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"), demo_onnx)


def _invoke(*args) -> tuple[int, list[str], str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    errors = [line for line in result.stderr.splitlines() if not line.startswith("[lynx-export]")]
    return result.exit_code, errors, result.stdout


def test_corpus_has_twenty_cases(corpus):
    assert len(corpus) >= 20


@pytest.mark.parametrize("command", ["inspect", "build"])
def test_every_case_fails_cleanly(corpus, tmp_path, command):
    for name, (path, message) in corpus.items():
        out = tmp_path / name
        args = [command, path] + (["-o", out, "--batch-sizes", "1", "--seq-lens", "1"] if command == "build" else [])
        code, errors, stdout = _invoke(*args)
        assert code == 1, (name, code, errors)
        assert len(errors) == 1 and errors[0].startswith("lynx-export: error: "), (name, errors)
        assert message in errors[0], (name, errors[0])
        assert stdout == "", name
        assert not out.exists(), name
    assert list(tmp_path.iterdir()) == []


def test_output_folder_holding_the_input_is_refused(demo_onnx, tmp_path):
    model = tmp_path / "model.onnx"
    model.write_bytes(demo_onnx.read_bytes())
    code, errors, _ = _invoke("build", model, "-o", tmp_path, "--force")
    assert code == 1 and "would overwrite the input file" in errors[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_output_inside_the_inputs_external_data_is_refused(tmp_path):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    # A valid model whose weight is stored in external data, then -o pointing into that file.
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(model, tmp_path / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=0)
    from lynx_export.compiler.model_io import input_files

    assert [p.name for p in input_files(tmp_path / "m.onnx")] == ["m.onnx", "m.data"]
    code, errors, _ = _invoke("build", tmp_path / "m.onnx", "-o", tmp_path / "m.data" / "engine")
    assert code == 1 and len(errors) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.data", "m.onnx"]


def test_existing_output_without_force(demo_onnx, tmp_path):
    out = tmp_path / "engine"
    out.mkdir()
    (out / "keep").write_text("x")
    code, errors, _ = _invoke("build", demo_onnx, "-o", out)
    assert code == 1 and "not empty (use --force" in errors[0]
    assert [p.name for p in out.iterdir()] == ["keep"]


def _build_process(model, out, *extra):
    import signal
    import subprocess
    import sys

    command = [sys.executable, "-m", "lynx_export.cli", "build", str(model), "-o", str(out), "--force", "--batch-sizes", "1,8", *extra]
    # As from a terminal: a runner started in the background inherits SIGINT ignored, and Python
    # then installs no Ctrl-C handler at all, so restore the default for the child.
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


@pytest.mark.slow
@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_interrupted_build_keeps_previous_output(demo_onnx, tmp_path, signame):
    import signal
    import time

    out = tmp_path / "engine"
    out.mkdir()
    (out / "previous.txt").write_text("previous build")
    process = _build_process(demo_onnx, out)
    # Signalled once it stages its output: however slow the machine, the signal lands in the build.
    deadline = time.monotonic() + 600
    while not list(tmp_path.glob(".engine.tmp-*")) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.02)
    assert process.poll() is None, "the build finished before it could be interrupted"
    assert list(tmp_path.glob(".engine.tmp-*")), "the build staged no output in 600 s"
    process.send_signal(getattr(signal, signame))
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == "lynx-export: interrupted"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine"]  # no staging folder left
    assert [p.name for p in out.iterdir()] == ["previous.txt"]


@pytest.mark.slow
def test_two_builds_into_one_folder(demo_onnx, tmp_path):
    import json

    from lynx_export.compiler.model_io import sha256_file

    out = tmp_path / "engine"
    first, second = _build_process(demo_onnx, out), _build_process(demo_onnx, out, "--policy", "off")
    for process in (first, second):
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["policy"]["name"] in ("lynx", "off")
    for artifact in manifest["artifacts"]:
        assert sha256_file(out / artifact["file"]) == artifact["sha256"]  # one whole build, not a mix
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine"]
