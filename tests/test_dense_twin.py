"""The dense twin: same parameters as the MoE (router aside), same signature, runs on ORT."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from lynx_export.bench.dense_twin import dense_twin
from lynx_export.errors import DetectError


@pytest.fixture(scope="module")
def twin(demo_onnx, tmp_path_factory):
    return dense_twin(demo_onnx, tmp_path_factory.mktemp("twin") / "dense.onnx")


def test_parameter_counts_match(twin):
    # Demo: 2 layers, E=8, H=64, I=128 -> 2 x 8 x 3 x 64 x 128 expert weights; routers 2 x (8 x 64 + 8).
    assert twin.blocks == 2
    assert twin.router_parameters == 2 * (8 * 64 + 8)
    assert twin.relative_difference < 0.01
    model = onnx.load(twin.path)
    dense = {i.name: list(i.dims) for i in model.graph.initializer if i.name.endswith((".dense_in", ".dense_out"))}
    assert dense == {
        "layers.0.mlp.dense_in": [64, 2 * 8 * 128], "layers.0.mlp.dense_out": [8 * 128, 64],
        "layers.1.mlp.dense_in": [64, 2 * 8 * 128], "layers.1.mlp.dense_out": [8 * 128, 64],
    }
    op_types = {n.op_type for n in model.graph.node}
    assert not op_types & {"TopK", "MoE", "LynxMoE", "GatherND"}


def test_twin_computes_all_experts_summed(twin, demo_onnx):
    """Each dense FFN equals the sum of every expert's output with weight 1."""
    model = onnx.load(twin.path)
    init = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    w_in, w_out = init["layers.0.mlp.dense_in"], init["layers.0.mlp.dense_out"]
    source = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(demo_onnx).graph.initializer}
    gate_up = next(v for v in source.values() if v.shape == (8, 256, 64))
    down = next(v for v in source.values() if v.shape == (8, 64, 128))
    x = np.random.default_rng(0).standard_normal(64).astype(np.float32)
    proj = x @ w_in
    g, u = proj[:1024], proj[1024:]
    got = (g / (1 + np.exp(-g)) * u) @ w_out
    expected = np.zeros(64)
    for e in range(8):
        p = gate_up[e] @ x
        expected += down[e] @ (p[:128] / (1 + np.exp(-p[:128])) * p[128:])
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_twin_runs_with_the_source_signature(twin, demo_onnx):
    src = ort.InferenceSession(str(demo_onnx), providers=["CPUExecutionProvider"])
    dense = ort.InferenceSession(str(twin.path), providers=["CPUExecutionProvider"])
    assert [(i.name, i.shape) for i in dense.get_inputs()] == [(i.name, i.shape) for i in src.get_inputs()]
    assert [o.name for o in dense.get_outputs()] == [o.name for o in src.get_outputs()]
    feeds = {"input_ids": np.zeros((3, 1), np.int64), **{i.name: np.zeros((3, 4, 2, 16), np.float32) for i in src.get_inputs()[1:]}}
    out = dense.run(None, feeds)
    assert out[0].shape == (3, 1, 256) and np.isfinite(out[0]).all()


def test_no_moe_is_an_error(dense_onnx, tmp_path):
    with pytest.raises(DetectError, match="no supported MoE block"):
        dense_twin(dense_onnx, tmp_path / "twin.onnx")
    assert list(tmp_path.iterdir()) == []


def test_cli_prints_both_counts(demo_onnx, tmp_path):
    exe = [sys.executable, "-m", "lynx_export.cli"]
    r = subprocess.run([*exe, "dense-twin", str(demo_onnx), str(tmp_path / "d.onnx")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "MoE parameters:" in r.stdout and "dense parameters:" in r.stdout
    assert (tmp_path / "d.onnx").exists()


@pytest.mark.parametrize("precision", ["int4", "int8"])
def test_quantized_twin_runs_matmulnbits_on_its_dequantized_weights(demo_onnx, twin, tmp_path, precision):
    """--quantize: the twin's FFN weights block-quantized like the experts (MatMulNBits), same
    parameter count as the float twin, and the same outputs as the float twin whose FFN weights
    are replaced by their dequantized values (within MatMulNBits' int8 activation rounding)."""
    from lynx_export.compiler.quantize import PRECISIONS, QuantizeOptions
    from lynx_export.op.quantization import QuantizedWeight

    quantized = dense_twin(demo_onnx, tmp_path / "dense.onnx", QuantizeOptions(precision))
    assert quantized.dense_parameters == twin.dense_parameters and quantized.block_names == ("layers.0.mlp", "layers.1.mlp")
    model = onnx.load(quantized.path)
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 4 and all(n.name.startswith(("layers.0.mlp.n", "layers.1.mlp.n")) for n in nbits)
    assert {a.name: a.i for a in nbits[0].attribute if a.name in ("K", "N", "bits", "block_size")} == {
        "K": 64, "N": 2 * 8 * 128, "bits": PRECISIONS[precision], "block_size": 32}
    init = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    # The float twin with the quantized twin's weights, dequantized, in place of its own.
    float_model = onnx.load(twin.path)
    for tensor in float_model.graph.initializer:
        if tensor.name.endswith((".dense_in", ".dense_out")):
            packed, scales = init[tensor.name], init[f"{tensor.name}.scales"]
            n, k = tensor.dims[1], tensor.dims[0]  # the float twin stores [K,N], MatMul's layout
            weight = QuantizedWeight(packed.reshape(n, -1), scales.reshape(n, -1), PRECISIONS[precision], 32)
            tensor.CopyFrom(onnx.numpy_helper.from_array(np.ascontiguousarray(weight.dequantize(k).T), tensor.name))
    dequantized = tmp_path / "dequantized.onnx"
    onnx.save(float_model, dequantized)
    feeds = {"input_ids": np.arange(6, dtype=np.int64).reshape(3, 2), **{f"past_{kv}.{i}": np.zeros((3, 4, 5, 16), np.float32)
                                                                        for kv in ("key", "value") for i in range(2)}}
    got, want = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, feeds)[0] for p in (quantized.path, dequantized))
    np.testing.assert_allclose(got, want, atol=1e-4 + 2e-2 * np.abs(want).max())
    assert 0 < np.abs(got - want).max()  # it did run the quantized kernel


def test_twin_over_the_single_file_limit_writes_its_data_beside(demo_onnx, tmp_path, monkeypatch):
    """A large twin (the benchmark presets' are GBs) keeps its weights in `<name>.data` beside it,
    moved into place with the model; no staging folder is left."""
    from lynx_export.compiler import model_io

    monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD", 1 << 10)
    result = dense_twin(demo_onnx, tmp_path / "dense.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense.onnx", "dense.onnx.data"]
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": np.zeros((2, 1), np.int64), **{i.name: np.zeros((2, 4, 3, 16), np.float32) for i in session.get_inputs()[1:]}}
    assert np.isfinite(session.run(None, feeds)[0]).all()
    monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD", 1 << 40)
    dense_twin(demo_onnx, tmp_path / "dense.onnx")  # smaller again: the stale data file goes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense.onnx"]
