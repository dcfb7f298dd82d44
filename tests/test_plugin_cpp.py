"""The C++ TensorRT plugin (plugins/lynx_moe/trt/), built from TensorRT's headers with no libnvinfer:

1. its host test (plugins/lynx_moe/test/plugin_host_test.cpp) over the fake-runtime core: plugin
   fields never read past their length, input shapes checked against the contract, onShapeChange
   and enqueue calling the core, CUDA errors from the core reported;
2. its copy of the contract's input shapes equals the table's;
3. TensorRT-RTX loads it (IPluginRegistry::loadLibrary), its ONNX parser maps the demo model's
   LynxMoE nodes to its creator, and the engine it builds (CPU only) holds the same serialized
   plugin fields as the Python plugin's engine of the same model.
"""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys
import tempfile

import onnx_ir as ir
import pytest

from lynx_export.backends import tensorrt as trt_backend
from lynx_export.backends.trt_plugin import FIELD_NAMES
from lynx_export.op.contract import INPUTS, PLUGIN_SLOTS
from tests.engine_plan import plugin_fields
from tests.test_plugin_build import PLUGIN, cmake_plugin, core_build, require_nvcc, tensorrt_headers

CPP = (PLUGIN / "trt" / "LynxMoEPlugin.cpp").read_text()
needs_rtx = pytest.mark.skipif(trt_backend.importlib.util.find_spec("tensorrt_rtx") is None, reason="tensorrt-rtx not installed")


def test_the_cpp_plugin_checks_the_contracts_shapes():
    names = re.search(r"kInputNames\[kNB_INPUTS\]\s*=\s*\{(.*?)\};", CPP, re.S)
    shapes = re.search(r"kInputShapes\[kNB_INPUTS\]\s*=\s*\{(.*?)\};", CPP, re.S)
    assert names and shapes
    assert re.findall(r'"([^"]*)"', names.group(1)) == [INPUTS[s].name for s in PLUGIN_SLOTS]
    assert re.findall(r'"([^"]*)"', shapes.group(1)) == [INPUTS[s].shape for s in PLUGIN_SLOTS]


@pytest.mark.slow
def test_the_cpp_plugin_on_the_host(tmp_path):
    build = core_build()
    exe = tmp_path / "plugin_host_test"
    # nvcc only drives the host compiler here (it knows where the CUDA headers are); no CUDA runtime is linked.
    compile_ = subprocess.run([require_nvcc(), "-std=c++17", "-O1", "-Xcompiler", "-Wall,-Wextra", "-cudart", "none", "-isystem", str(tensorrt_headers()),
                               "-I", str(PLUGIN / "include"), "-I", str(PLUGIN / "trt"), str(PLUGIN / "test" / "plugin_host_test.cpp"),
                               str(PLUGIN / "trt" / "LynxMoEPlugin.cpp"), str(build / "liblynx_moe_fake_cuda.so"), f"-Xlinker=-rpath,{build}",
                               "-o", str(exe)], capture_output=True, text=True, timeout=600)
    assert compile_.returncode == 0, compile_.stderr[-3000:]
    assert "warning" not in compile_.stderr
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith("plugin_host_test: ok"), r.stdout + r.stderr
    # What the checks logged: the refused field and shapes, in one line each.
    assert "[LynxMoE] plugin field 'policy': unknown value 'l'" in r.stderr
    assert "[LynxMoE] input fc2 has shape [8,32,64]; the contract says [E,H,I] = [8,64,32] (E 8, H 64, I 32)" in r.stderr
    assert "[LynxMoE] enqueue failed: CUDA error: cudaErrorIllegalAddress" in r.stderr


# --- TensorRT-RTX builds an engine through the C++ creator ------------------------------------------------

_CHILD = r'''
import json, pathlib, sys
import tensorrt_rtx as trt
job = json.loads(pathlib.Path(sys.argv[1]).read_text())
logger = trt.Logger(trt.Logger.ERROR)
registry = trt.get_plugin_registry()
registry.load_library(job["library"])
creator = registry.get_creator("LynxMoE", "1", "lynx")
assert creator is not None and type(creator).__name__ != "LynxMoECreator", creator  # the C++ one, not Python's
builder = trt.Builder(logger)
network = builder.create_network(0)
parser = trt.OnnxParser(network, logger)
assert parser.parse_from_file(job["onnx"]), [str(parser.get_error(i)) for i in range(parser.num_errors)]
config = builder.create_builder_config()
config.num_compute_capabilities = 1
config.set_compute_capability(trt.ComputeCapability.SM80, 0)
for shapes in job["profiles"].values():
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
plan = builder.build_serialized_network(network, config)
assert plan is not None
pathlib.Path(job["plan"]).write_bytes(bytes(plan))
layers = sum(1 for i in range(network.num_layers) if network.get_layer(i).type == trt.LayerType.PLUGIN_V3)
print(json.dumps({"plugin_layers": layers}))
'''


@needs_rtx
@pytest.mark.slow
def test_rtx_builds_the_demo_engine_through_the_cpp_creator(demo_builds, tmp_path):
    plugin, _ = cmake_plugin()
    # The Python plugin's engine (test_tensorrt's build), and the prepared graph it was built from.
    python_build = demo_builds("--backend", "tensorrt-rtx").out
    prepared = python_build / trt_backend.PREPARED_NAME
    profiles = trt_backend.engine_profiles(ir.load(prepared), trt_backend.EngineOptions())
    job = {"library": str(plugin), "onnx": str(prepared), "plan": str(tmp_path / "cpp.plan"), "profiles": profiles}
    (tmp_path / "job.json").write_text(json.dumps(job))
    with tempfile.TemporaryDirectory() as scratch:
        libdir = trt_backend._library_dir(trt_backend.FLAVOURS["tensorrt-rtx"], pathlib.Path(scratch))
        env = {"PATH": "/usr/bin:/bin", "LD_LIBRARY_PATH": ":".join(str(p) for p in (libdir, core_build()) if p)}
        child = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path / "job.json")], capture_output=True, text=True, timeout=900, env=env)
    assert child.returncode == 0, child.stdout[-2000:] + child.stderr[-3000:]
    assert json.loads(child.stdout.strip().splitlines()[-1])["plugin_layers"] == 2
    cpp = plugin_fields((tmp_path / "cpp.plan").read_bytes(), FIELD_NAMES)
    python = plugin_fields((python_build / trt_backend.PLAN_NAME).read_bytes(), FIELD_NAMES)
    assert len(cpp) == len(python) == 4  # 2 layers x 2 profiles
    key = lambda fields: json.dumps(fields, sort_keys=True)  # noqa: E731
    assert sorted(cpp, key=key) == sorted(python, key=key)
    assert len(FIELD_NAMES) == 15
