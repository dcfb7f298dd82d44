"""Verification anyone can replay: every build leaves its cases in Polygraphy's JSON formats, and
`polygraphy run` on the build's artifacts against them passes (and fails when they differ)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import pathlib
import shlex
import subprocess
import sys

import numpy as np
import pytest
from tests.cli_builds import run_build
from polygraphy.comparator import RunResults
from polygraphy.json import load_json

from lynx_export.backends.tensorrt import Engine, EngineBuilder, EnginePlugin
from lynx_export.compiler import replay

POLYGRAPHY = pathlib.Path(sys.executable).parent / "polygraphy"
SMALL = ("--batch-sizes", "1,4", "--seq-lens", "1,3")


def polygraphy_run(build_dir: pathlib.Path, command: str) -> subprocess.CompletedProcess:
    """Run a report's command as a user would, in the build folder, with this environment's polygraphy."""
    words = shlex.split(command)
    assert words[:2] == ["polygraphy", "run"]
    return subprocess.run([str(POLYGRAPHY), *words[1:]], cwd=build_dir, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def builds(demo_builds) -> dict[str, tuple[pathlib.Path, dict, dict, str]]:
    """name -> (folder, manifest, report, stdout) of a shared demo build (copy a folder to change it)."""
    out = {}
    for name, args in {"off": ("--policy", "off"), "lynx": (), "int8": ("--policy", "off", "--quantize", "int8")}.items():
        built = demo_builds(*SMALL, *args)
        manifest, report = (json.loads((built.out / f).read_text()) for f in ("manifest.json", "report.json"))
        out[name] = (built.out, manifest, report, built.run.stdout)
    return out


def test_a_policy_off_build_replays_with_polygraphy(builds):
    folder, manifest, report, stdout = builds["off"]
    command = ("polygraphy run model.ort.onnx --onnxrt --load-inputs verification/inputs.json "
               "--load-outputs verification/expected.json --atol 0.0001 --rtol 0")
    assert [c["command"] for c in report["replay"]["commands"]] == [command]
    assert command in stdout  # the build's printout gives it too
    r = polygraphy_run(folder, command)
    assert r.returncode == 0, r.stdout[-3000:]
    assert "PASSED" in r.stdout and "Passed: 4/4 iterations" in r.stdout


def test_replay_files_are_the_verified_cases_and_in_the_manifest(builds):
    folder, manifest, report, _ = builds["off"]
    feeds = load_json(folder / replay.INPUTS)
    expected = RunResults.load(str(folder / replay.EXPECTED))
    assert report["replay"]["cases"] == len(feeds) == len(report["cases"]) == 4
    assert [(f["input_ids"].shape) for f in feeds] == [(c["batch"], c["seq_len"]) for c in report["cases"]]
    assert list(expected.keys()) == [replay.RUNNER] and len(expected[replay.RUNNER]) == 4
    hashes = {a["file"]: a["sha256"] for a in manifest["artifacts"]}
    for name in (replay.INPUTS, replay.EXPECTED):
        assert hashes[name] == hashlib.sha256((folder / name).read_bytes()).hexdigest()


def test_lynx_decode_steps_are_expected_from_the_compiled_model(builds):
    folder, _, report, _ = builds["lynx"]
    assert report["replay"]["expected_from"] == "the original where the outputs must match, the built model elsewhere"
    r = polygraphy_run(folder, report["replay"]["commands"][0]["command"])
    assert r.returncode == 0, r.stdout[-3000:]


def test_replay_fails_when_the_model_differs_from_the_expected_outputs(builds, tmp_path):
    folder, _, report, _ = builds["off"]
    expected = RunResults.load(str(folder / replay.EXPECTED))
    first = expected[replay.RUNNER][0]
    first["logits"] = np.asarray(first["logits"]) + np.float32(1e-3)  # 10x the tolerance
    tampered = tmp_path / "build"
    subprocess.run(["cp", "-r", str(folder), str(tampered)], check=True)
    expected.save(str(tampered / replay.EXPECTED))
    r = polygraphy_run(tampered, report["replay"]["commands"][0]["command"])
    assert r.returncode != 0 and "FAILED" in r.stdout
    assert "Passed: 3/4 iterations" in r.stdout


def test_a_quantized_build_replays_against_its_own_outputs(builds):
    folder, _, report, _ = builds["int8"]
    assert report["replay"]["expected_from"] == "the built model (accuracy level 4) in every case"
    r = polygraphy_run(folder, report["replay"]["commands"][0]["command"])
    assert r.returncode == 0, r.stdout[-3000:]


def test_the_report_keeps_polygraphys_comparison(builds):
    _, _, report, _ = builds["off"]
    assert report["comparator"].startswith("Polygraphy ") and "SimpleCompareFunc(atol=0.0001 per output, rtol=0)" in report["comparator"]
    logits = report["cases"][1]["outputs"]["logits"]
    assert set(logits) == {"max_abs_diff", "mean_abs_diff", "max_rel_diff", "median_abs_diff", "passed", "worst_index"}
    assert logits["passed"] and len(logits["worst_index"]) == 3


def _engine(backend: str, version: str, targets: tuple[str, ...]) -> Engine:
    return Engine(file="model.plan", backend=backend, builder=EngineBuilder(package=backend.replace("-", "_"), version=version),
                  precision="fp16", targets=targets, profiles={},
                  plugin=EnginePlugin(name="LynxMoE", namespace="lynx", version="1", implementation="", layers=2))


def test_engine_commands_say_what_they_need():
    rtx = replay.replay_commands(1e-4, _engine("tensorrt-rtx", "1.2", ("8.0", "8.9")))
    assert rtx[1].command == ("POLYGRAPHY_USE_TENSORRT_RTX=1 polygraphy run model.plan --trt --plugins /path/to/liblynx_moe_trt_plugin.so "
                              "--load-inputs verification/inputs.json --load-outputs verification/expected.json --atol 0.0001 --rtol 0")
    assert "8.0, 8.9" in rtx[1].needs and "C++ LynxMoE plugin library" in rtx[1].needs
    trt = replay.replay_commands(1e-4, _engine("tensorrt", "10.9", ()))
    assert trt[1].command.startswith("polygraphy run model.plan --trt --plugins /path/to/liblynx_moe_trt_plugin.so ")
    assert "TensorRT 10.9" in trt[1].needs


@pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx") is None, reason="tensorrt-rtx not installed")
def test_an_rtx_build_names_the_engine_command(demo_onnx, tmp_path):
    r, manifest, report = run_build(demo_onnx, tmp_path / "rtx", *SMALL, "--policy", "off", "--backend", "tensorrt-rtx")
    assert r.returncode == 0, r.stderr
    artifacts = [c["artifact"] for c in report["replay"]["commands"]]
    assert artifacts == ["model.ort.onnx", "model.plan"]
    assert report["replay"]["commands"][1]["command"].startswith("POLYGRAPHY_USE_TENSORRT_RTX=1 polygraphy run model.plan --trt --plugins ")
    assert json.loads((tmp_path / "rtx" / "report.json").read_text()) == report


def test_polygraphy_logs_only_under_verbose(demo_onnx, tmp_path):
    from click.testing import CliRunner

    from lynx_export.cli import main

    quiet = CliRunner().invoke(main, ["build", str(demo_onnx), "-o", str(tmp_path / "q"), "--batch-sizes", "1", "--seq-lens", "1"])
    loud = CliRunner().invoke(main, ["-v", "build", str(demo_onnx), "-o", str(tmp_path / "v"), "--batch-sizes", "1", "--seq-lens", "1"])
    assert quiet.exit_code == loud.exit_code == 0
    assert "[I]" not in quiet.output and "[I]" not in loud.stdout
    assert "DEBUG lynx_export.polygraphy:" in loud.stderr and "DEBUG" not in quiet.stderr


def test_progress_draws_a_bar_on_a_terminal_and_lines_elsewhere(monkeypatch, capsys):
    from lynx_export.cli._common import ConsoleProgress

    monkeypatch.setenv("COLUMNS", "200")  # the bar is cut to the terminal's width
    bar = ConsoleProgress()
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    bar.step("original", 3, 8, "batch 8, seq 16")
    bar.note("verifying against the original model")
    drawn = capsys.readouterr().err
    assert drawn.startswith("\r\x1b[K[lynx-export] original [#########...............] 3/8 ")
    assert drawn.endswith("s: batch 8, seq 16\n[lynx-export] verifying against the original model\n")
    # A path with slashes in a note is a note: no bar (the old reporter guessed steps from `i/n` in the text).
    bar.note("wrote runs/1/2/m.onnx")
    assert capsys.readouterr().err == "[lynx-export] wrote runs/1/2/m.onnx\n"
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    bar.LINE_EVERY_S = 3600.0  # no stall of the machine between the calls below may count as the pause that prints a line
    bar.step("original", 4, 8, "batch 8, seq 16")
    bar.step("original", 5, 8, "batch 8, seq 16")  # within LINE_EVERY_S of the stage's last line: no line
    bar.step("original", 8, 8, "batch 8, seq 32")  # the stage's end
    bar.step("compiled", 1, 8)  # a new stage
    assert capsys.readouterr().err == ("[lynx-export] original 4/8: batch 8, seq 16\n[lynx-export] original 8/8: batch 8, seq 32\n"
                                       "[lynx-export] compiled 1/8\n")


def test_a_build_does_not_import_torch(demo_onnx, tmp_path):
    """Polygraphy would import torch (5 s) to ask whether arrays are torch tensors."""
    code = ("import sys; from lynx_export.compiler.build import BuildOptions, build; "
            "from lynx_export.compiler.verify import VerifyOptions; "
            f"build({str(demo_onnx)!r}, {str(tmp_path / 'out')!r}, BuildOptions(verify=VerifyOptions(batch_sizes=(1,), seq_lens=(1,)))); "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
    assert (tmp_path / "out" / replay.INPUTS).is_file()


def test_polygraphy_is_configured_by_the_runner_not_on_import():
    """Importing the backend changes nothing in Polygraphy; `configure_polygraphy` (which every
    runner and comparison calls) sets what it says, twice the same as once. Each thing it sets is
    checked to be where Polygraphy keeps it, so an upgrade that moves one fails here."""
    code = """
import importlib
import lynx_export.backends.ort as backend
from polygraphy.logger import G_LOGGER
def lazy(x):  # Polygraphy's lazy module (a class local to polygraphy.mod.importer.lazy_import)
    return type(x).__module__ == "polygraphy.mod.importer" and type(x).__qualname__ == "lazy_import.<locals>.LazyModule"
modules = [importlib.import_module(name) for name in backend.POLYGRAPHY_TORCH_USERS]
assert all(lazy(vars(m).get('torch')) for m in modules), [type(vars(m).get('torch')) for m in modules]
assert G_LOGGER.use_python_logging_system is False and G_LOGGER.colors is True and not hasattr(G_LOGGER, 'python_logger')
for _ in range(2):
    backend.configure_polygraphy()
    assert all(isinstance(vars(m)['torch'], backend._TorchOnceImported) and lazy(vars(m)['torch']._lazy) for m in modules)
    assert G_LOGGER.use_python_logging_system is True and G_LOGGER.colors is False
    assert G_LOGGER.python_logger is backend._POLYGRAPHY_SINK
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
