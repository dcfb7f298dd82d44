"""The TensorRT path: the core library loads with no GPU, the Python plugin builds TensorRT-RTX
engines with no GPU, and the engine holds the plugin with the node's attributes. The builds
themselves (nvcc, CMake, the C++ plugin) are tests/test_plugin_build.py's."""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from lynx_export.backends import lynx_moe_lib
from lynx_export.backends import tensorrt as trt_backend
from lynx_export.backends.ort import OrtRunner
from lynx_export.compiler.lowering.ort import lower
from lynx_export.backends.trt_plugin import FIELD_DEFAULTS, FIELD_NAMES
from lynx_export.errors import BackendUnavailable, EngineError
from lynx_export.op import contract
from lynx_export.op.contract import OP_TYPE, PLUGIN_SLOTS, Slot
from lynx_export.op.spec import MoESpec, WeightQuantization
from lynx_export.routing import OffPolicy, RouterForm
from tests.engine_plan import plugin_fields
from tests.test_plugin_build import core_build
from tests.cli_builds import lynx

ROOT = pathlib.Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "plugins" / "lynx_moe"
needs_rtx = pytest.mark.skipif(trt_backend.importlib.util.find_spec("tensorrt_rtx") is None, reason="tensorrt-rtx not installed")


def lynx_nodes(path: pathlib.Path) -> list[onnx.NodeProto]:
    return [n for n in onnx.load(str(path)).graph.node if n.op_type == OP_TYPE]


def node_fields(node: onnx.NodeProto) -> dict[str, object]:
    """The plugin fields a node's attributes make (absent optional ones take their defaults)."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    return {**FIELD_DEFAULTS, **{k: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items() if k in FIELD_NAMES}}


# --- the core library -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def core_library() -> pathlib.Path:
    return core_build() / "liblynx_moe.so"


def _params(**overrides) -> lynx_moe_lib.Params:
    attrs = {"num_experts": 8, "top_k": 2, "hidden_size": 64, "expert_size": 96, "activation": "swiglu", "router": "softmax_topk",
             "normalize": 1, "policy": "lynx", "alpha": 3.0, "beta": 1, "budget": 0, "tie_break": "logit"}
    return lynx_moe_lib.params_from_attributes({**attrs, **overrides})


@pytest.mark.slow
def test_library_loads_without_a_gpu_and_agrees_on_workspace_and_checks(core_library):
    lib = lynx_moe_lib.CoreLibrary(core_library)
    for p in (_params(), _params(num_experts=128, top_k=8, hidden_size=2048, expert_size=768), _params(policy="budget", budget=5)):
        for tokens in (0, 1, 7, 256, 8192):
            assert lib.workspace_size(p, tokens) == lynx_moe_lib.workspace_bytes(p, tokens)
        assert lib.check_params(p)
    for field, value in (("top_k", 9), ("top_k", 0), ("num_experts", 2000)):
        bad = _params()
        setattr(bad, field, value)
        assert not lib.check_params(bad)
        assert lib.workspace_size(bad, 4) == 0
    # A call with a workspace too small is refused before any launch, so no GPU is needed to see it.
    with pytest.raises(lynx_moe_lib.RunError, match="workspace too small"):
        lib.route(_params(), 4, lynx_moe_lib.Tensors(router_logits=1), 0, 0, 0)
    # With no GPU (and no driver) the launches themselves fail: the error names CUDA's reason, every
    # time (each call's own launches, not an error left over from the call before).
    if not _gpu_available():
        for _ in range(2):
            with pytest.raises(lynx_moe_lib.RunError, match=r"lynx_moe_route failed: CUDA error \(cudaError\w+: .+\)"):
                lib.route(_params(), 4, lynx_moe_lib.Tensors(router_logits=1 << 20), 1 << 30, lib.workspace_size(_params(), 4), 0)


def test_params_from_attributes_names_the_bad_attribute():
    with pytest.raises(ValueError, match="attribute 'router' is 'bogus'"):
        _params(router="bogus")
    with pytest.raises(ValueError, match="the plugin implements swiglu"):
        _params(activation="gelu")
    with pytest.raises(ValueError, match="budget=9 is outside"):
        _params(policy="budget", budget=9)
    with pytest.raises(ValueError, match="attribute 'top_k' is missing"):
        lynx_moe_lib.params_from_attributes({"num_experts": 8, "activation": "swiglu"})


def test_missing_library_is_a_one_line_error(tmp_path):
    with pytest.raises(BackendUnavailable, match="make -C plugins/lynx_moe"):
        lynx_moe_lib.CoreLibrary(tmp_path / "liblynx_moe.so")


# --- preparing the graph ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_build(demo_builds) -> pathlib.Path:
    return demo_builds("--policy", "off").out


def test_prepare_gives_every_node_all_inputs_and_keeps_the_outputs(demo_build, tmp_path):
    canonical = ir.load(demo_build / "model.lynx.onnx")
    assert any(len(n.inputs) < len(PLUGIN_SLOTS) or any(v is None for v in n.inputs) for n in canonical.graph if n.op_type == OP_TYPE)
    prepared = trt_backend.prepare(ir.load(demo_build / "model.lynx.onnx"))
    nodes = [n for n in prepared.graph if n.op_type == OP_TYPE]
    assert nodes and all(len(n.inputs) == len(PLUGIN_SLOTS) and all(v is not None for v in n.inputs) for n in nodes)
    for n in nodes:
        assert not n.inputs[Slot.FC1_BIAS].const_value.numpy().any()
        assert n.inputs[Slot.NUM_VALID].const_value.numpy() == np.iinfo(np.int64).max
    # Zero biases and "every row votes" change nothing: the ORT lowering of both graphs agrees.
    paths = []
    for name, model in (("canonical", canonical), ("prepared", prepared)):
        ir.save(lower(model).model, tmp_path / f"{name}.onnx")
        paths.append(tmp_path / f"{name}.onnx")
    rng = np.random.default_rng(0)
    for seq in (5, 1):  # prefill and decode
        feeds = {"input_ids": rng.integers(0, 256, (3, seq)).astype(np.int64)}
        for i in range(2):
            feeds[f"past_key.{i}"] = feeds[f"past_value.{i}"] = np.zeros((3, 4, 0, 16), np.float32)
        results = []
        for path in paths:
            with OrtRunner(str(path)) as runner:
                results.append(runner.infer(feeds))
        for name, value in results[0].items():
            np.testing.assert_array_equal(value, results[1][name])


def _quantized_model(path: pathlib.Path, weight_bits: bool = True, scales: bool = True) -> pathlib.Path:
    """One LynxMoE node with int4 experts (E 4, H 32, I 32, blocks of 16): `weight_bits` and/or
    the scale inputs, every other input present, so that only the quantization is wrong for TensorRT."""
    e, h, i, block = 4, 32, 32, 16
    spec = MoESpec(num_experts=e, top_k=2, hidden_size=h, expert_size=i, activation="swiglu", router=RouterForm.SOFTMAX_TOPK, normalize=True)
    arrays = {"fc1": np.zeros((e, 2 * i, h // 2), np.uint8), "fc1_bias": np.zeros((e, 2 * i), np.float32),
              "fc2": np.zeros((e, h, i // 2), np.uint8), "fc2_bias": np.zeros((e, h), np.float32),
              "seq_len": np.array(1, np.int64), "num_valid": np.array(2, np.int64)}
    if scales:
        arrays |= {"fc1_scales": np.ones((e, 2 * i, h // block), np.float32), "fc2_scales": np.ones((e, h, i // block), np.float32)}
    names = ["x", "logits", *(s.name.lower() if s.name.lower() in arrays else "" for s in list(Slot)[2:])]
    while not names[-1]:
        names.pop()
    attributes = contract.to_attributes(spec, OffPolicy(), WeightQuantization(4, block) if weight_bits else None)
    node = onnx.helper.make_node(OP_TYPE, names, ["y"], name="layers.0.mlp", domain=contract.DOMAIN, **attributes)
    graph = onnx.helper.make_graph(
        [node], "quantized",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", h]),
         onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["batch", e])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", h])],
        [onnx.numpy_helper.from_array(a, n) for n, a in arrays.items()],
    )
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18), onnx.helper.make_opsetid(contract.DOMAIN, 1)]), path)
    return path


@pytest.mark.parametrize("weight_bits,scales,what", [(True, True, "weight_bits=4"), (False, True, "inputs fc1_scales, fc2_scales")])
def test_prepare_refuses_quantized_experts_in_one_line(tmp_path, weight_bits, scales, what):
    model = ir.load(_quantized_model(tmp_path / "q.onnx", weight_bits, scales))
    with pytest.raises(EngineError) as info:
        trt_backend.prepare(model)
    assert str(info.value) == (f"LynxMoE node 'layers.0.mlp' has quantized experts ({what}): "
                               "the TensorRT plugin does not implement quantized experts yet")
    assert len(next(iter(model.graph)).inputs) > len(PLUGIN_SLOTS)  # refused before anything changed


@needs_rtx
def test_the_plugin_refuses_quantized_experts_when_prepare_is_skipped(tmp_path):
    """A quantized node parsed as it is (trtexec users skip prepare): the plugin's weight_bits guard."""
    with pytest.raises(EngineError) as info:
        trt_backend.build_engine(_quantized_model(tmp_path / "q.onnx"), tmp_path / "model.plan", "tensorrt-rtx", trt_backend.EngineOptions())
    message = str(info.value)
    assert "\n" not in message and "LynxMoE node 'layers.0.mlp'" in message and "does not implement quantized experts yet" in message
    assert not (tmp_path / "model.plan").exists()


def test_profiles_follow_the_dimension_names(demo_build):
    profiles = trt_backend.engine_profiles(ir.load(demo_build / "model.lynx.onnx"), trt_backend.EngineOptions(max_batch=64, max_sequence=512))
    assert profiles["decode"]["input_ids"] == ((1, 1), (8, 1), (64, 1))
    assert profiles["prefill"]["input_ids"] == ((1, 1), (1, 256), (8, 512))
    assert profiles["decode"]["past_key.0"] == ((1, 4, 0, 16), (8, 4, 255, 16), (64, 4, 511, 16))
    assert profiles["prefill"]["past_key.0"][2] == (8, 4, 0, 16)


def test_unnamed_dynamic_dimension_is_an_error(demo_build):
    model = ir.load(demo_build / "model.lynx.onnx")
    model.graph.inputs[0].shape = ir.Shape([ir.SymbolicDim("batch"), ir.SymbolicDim("foo")])
    with pytest.raises(EngineError, match=r"input 'input_ids' dimension 1 \('foo'\) is dynamic"):
        trt_backend.engine_profiles(model, trt_backend.EngineOptions())


# --- TensorRT-RTX engines -------------------------------------------------------------------------------


def _check_engine(out: pathlib.Path, policy: str, max_batch: int = 256) -> dict:
    manifest = json.loads((out / "manifest.json").read_text())
    engine = manifest["engine"]
    assert engine["backend"] == "tensorrt-rtx" and engine["file"] == "model.plan"
    assert engine["builder"]["package"] == "tensorrt_rtx" and engine["builder"]["version"].startswith("1.")
    assert engine["plugin"] | {"implementation": None} == {"name": "LynxMoE", "namespace": "lynx", "version": "1", "implementation": None,
                                                          "layers": len(manifest["blocks"])}
    assert engine["profiles"]["decode"]["input_ids"]["max"][0] == max_batch
    assert {a["file"] for a in manifest["artifacts"]} >= {"model.plan", "model.trt.onnx", "model.lynx.onnx", "model.ort.onnx"}
    prepared = lynx_nodes(out / "model.trt.onnx")  # what trtexec builds from: every input present
    assert prepared and all(len(n.input) == len(PLUGIN_SLOTS) and all(n.input) for n in prepared)
    # Every block's plugin carries the node's attributes (once per optimisation profile).
    expected = [node_fields(n) for n in lynx_nodes(out / "model.lynx.onnx")]
    assert expected and all(e["policy"] == policy for e in expected)
    found = plugin_fields((out / "model.plan").read_bytes(), FIELD_NAMES)
    assert len(found) == len(expected) * len(engine["profiles"])
    for fields in found:
        assert any(fields == pytest.approx(e) for e in expected), fields
    return manifest


@needs_rtx
@pytest.mark.slow
def test_rtx_engine_from_the_demo_model(demo_builds):
    built = demo_builds("--backend", "tensorrt-rtx")  # the C++ plugin's test compares its engine with this one
    assert "building the TensorRT-RTX engine" in built.run.stderr
    assert "engine: model.plan by tensorrt_rtx 1." in built.run.stdout and "2 LynxMoE plugin layer(s)" in built.run.stdout
    manifest = _check_engine(built.out, "lynx")
    assert manifest["engine"]["targets"] == ["8.0"]


@needs_rtx
@pytest.mark.slow
def test_rtx_engine_from_the_trained_model_with_the_budget_policy(lynx_once, tmp_path):
    pytest.importorskip("torch")
    source = lynx_once("demo-model", "{out}/model.onnx", "--trained").out / "model.onnx"  # test_accuracy's export
    r = lynx("build", source, "-o", tmp_path / "out", "--backend", "tensorrt-rtx", "--policy", "budget", "--budget", "4",
            "--target", "8.6", "--target", "8.9", "--max-batch", "64")
    assert r.returncode == 0, r.stderr
    manifest = _check_engine(tmp_path / "out", "budget", max_batch=64)
    assert manifest["engine"]["targets"] == ["8.6", "8.9"]


@needs_rtx
@pytest.mark.slow
def test_rtx_engine_from_a_transformers_mixtral_export(tmp_path):
    pytest.importorskip("transformers")
    from tests.transformers_models import export_tiny_mixtral

    source = export_tiny_mixtral(tmp_path / "src" / "model.onnx")
    # The tiny config's rotary table covers 64 positions.
    r = lynx("build", source, "-o", tmp_path / "out", "--backend", "tensorrt-rtx", "--max-sequence", "64")
    assert r.returncode == 0, r.stderr
    manifest = _check_engine(tmp_path / "out", "lynx")
    assert [b["form"] for b in manifest["blocks"]] == ["batched_mm", "batched_mm"]
    assert manifest["engine"]["profiles"]["prefill"]["input_ids"]["max"] == [8, 64]


@needs_rtx
def test_engine_builder_errors_are_one_line(demo_build, tmp_path):
    # A node whose attributes break the contract fails the parse with the plugin's reason.
    model = trt_backend.prepare(ir.load(demo_build / "model.lynx.onnx"))
    node = next(n for n in model.graph if n.op_type == OP_TYPE)
    node.attributes["router"] = ir.AttrString("router", "bogus")
    ir.save(model, tmp_path / "bad.onnx")
    with pytest.raises(EngineError) as info:
        trt_backend.build_engine(tmp_path / "bad.onnx", tmp_path / "model.plan", "tensorrt-rtx", trt_backend.EngineOptions())
    message = str(info.value)
    assert "\n" not in message and "TensorRT-RTX engine build failed" in message and "LynxMoE" in message
    assert not (tmp_path / "model.plan").exists()


def test_missing_engine_package_names_the_extra(demo_onnx, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from lynx_export import cli

    real = trt_backend.importlib.util.find_spec
    monkeypatch.setattr(trt_backend.importlib.util, "find_spec", lambda name, *a: None if name.startswith("tensorrt") else real(name, *a))
    for backend, extra in (("tensorrt", "tensorrt"), ("tensorrt-rtx", "tensorrt-rtx")):
        result = CliRunner().invoke(cli.main, ["build", str(demo_onnx), "-o", str(tmp_path / backend), "--backend", backend])
        assert result.exit_code == 3
        assert result.output.strip().splitlines() == [f"lynx-export: error: --backend {backend} needs {trt_backend.FLAVOURS[backend].title}: pip install 'lynx-export[{extra}]'"]
        assert not (tmp_path / backend).exists()


@needs_rtx
def test_rtx_options_are_checked_before_any_work(demo_onnx, tmp_path):
    r = lynx("build", demo_onnx, "-o", tmp_path / "out", "--backend", "tensorrt-rtx", "--precision", "fp16")
    assert r.returncode == 2 and "--precision applies to --backend tensorrt only" in r.stderr
    r = lynx("build", demo_onnx, "-o", tmp_path / "out", "--backend", "tensorrt-rtx", "--target", "9.0")
    assert r.returncode == 2 and "cannot target compute capability 9.0" in r.stderr
    assert not (tmp_path / "out").exists()


# --- on a GPU ----------------------------------------------------------------------------------------


def _gpu_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu_available() or shutil.which("nvcc") is None, reason="needs an NVIDIA GPU, PyTorch with CUDA and nvcc")
def test_kernels_match_the_numpy_reference_on_a_gpu(core_library, tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--quick", "--library", str(core_library), "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


@pytest.mark.slow
def test_gpu_check_says_why_it_cannot_run():
    if _gpu_available():
        pytest.skip("a GPU is present: the check runs instead")
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--quick"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip() in ("gpu_check: no NVIDIA GPU visible: nothing to check",
                                                      "gpu_check: PyTorch is not installed; it allocates the GPU memory")
