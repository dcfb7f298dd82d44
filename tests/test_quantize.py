"""Quantized experts (`build --quantize`): the block format, the per-expert MatMulNBits lowering,
verification against the dequantized model and the quantization error reported apart."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.cli_builds import BIN, run_build
from lynx_export.compiler.build import BuildOptions, PolicyChoice, build
from lynx_export.compiler.quantize import QuantizeOptions
from lynx_export.compiler.verify import VerifyOptions
from lynx_export.op.quantization import QuantizedWeight, pack, quantize_blockwise, unpack

QUICK = VerifyOptions(batch_sizes=(1, 8), seq_lens=(1, 5))


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([4, 8]), block=st.sampled_from([16, 32, 64]), blocks=st.integers(1, 3), rows=st.integers(1, 5),
       seed=st.integers(0, 2**31 - 1), scale=st.floats(1e-3, 1e3))
def test_blockwise_round_trip_error_is_half_a_step(bits, block, blocks, rows, seed, scale):
    w = (np.random.default_rng(seed).standard_normal((2, rows, block * blocks)) * scale).astype(np.float32)
    q = quantize_blockwise(w, bits, block)
    assert q.q.dtype == np.uint8 and q.q.shape == (2, rows, block * blocks * bits // 8)
    assert q.scales.shape == (2, rows, blocks)
    back = q.dequantize(block * blocks)
    step = np.repeat(q.scales, block, axis=-1)  # one quantization step per element
    assert np.all(np.abs(back - w) <= 0.5 * step * (1 + 1e-5) + 1e-30)


def test_pack_is_low_nibble_first_and_unpack_inverts_it():
    values = np.array([[1, 2, 15, 0]], dtype=np.uint8)
    assert pack(values, 4).tolist() == [[0x21, 0x0F]]
    assert unpack(pack(values, 4), 4).tolist() == values.tolist()
    assert unpack(pack(values, 8), 8).tolist() == values.tolist()


def test_zero_points_shift_the_dequantized_values():
    q = QuantizedWeight(pack(np.full((1, 32), 9, np.uint8), 4), np.full((1, 1), 0.5, np.float32), 4, 32,
                        zero_points=pack(np.array([[7, 0]], np.uint8), 4))
    assert np.all(q.dequantize(32) == 1.0)  # (9 - 7) * 0.5


@pytest.fixture(scope="module", params=["int4", "int8"])
def quantized_off(request, demo_onnx, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param) / "engine"
    return request.param, build(demo_onnx, out, BuildOptions(PolicyChoice("off"), quantize=QuantizeOptions(request.param), verify=QUICK))


def test_quantized_build_matches_its_dequantized_model(quantized_off):
    precision, result = quantized_off
    report = result.report
    assert report.passed and report.verified_at_accuracy_level == 0
    for case in report.comparison.cases:
        assert case.must_match and case.max_abs_diff <= 1e-4
    kernel = report.kernel_error
    assert kernel.accuracy_level == 4 and len(kernel.cases) == len(report.comparison.cases)
    for case in kernel.cases:
        # MatMulNBits at level 4 rounds activations to int8: close, not exact.
        assert 1e-4 < case.max_abs_diff < 0.1
    assert result.manifest.quantize.to_json() == {"precision": precision, "block_size": 32}
    assert result.manifest.ort_experts == "per-expert"


def test_quantization_error_is_reported_against_the_unquantized_original(quantized_off):
    precision, result = quantized_off
    error = result.report.quantization_error
    assert [(c.batch, c.seq_len) for c in error] == [(c.batch, c.seq_len) for c in result.report.comparison.cases]
    for c in error:
        assert 0 < c.mean_abs_diff <= c.max_abs_diff < 1.0
    weight_error = result.report.quantization_weight_error
    assert sorted(weight_error) == ["layers.0.mlp", "layers.1.mlp"]
    # Relative RMS of the dequantized weights: int8 steps are 127 / 7 times finer than int4's.
    assert all((0 < e < 0.01) if precision == "int8" else (0.03 < e < 0.2) for e in weight_error.values())
    if precision == "int4":  # int4 weights lose more than the activation rounding alone
        assert max(c.max_abs_diff for c in error) > max(c.max_abs_diff for c in result.report.kernel_error.cases)


def test_quantized_graphs_hold_packed_weights_and_matmulnbits(quantized_off):
    precision, result = quantized_off
    bits = {"int4": 4, "int8": 8}[precision]
    canonical = onnx.load(result.out_dir / "model.lynx.onnx")
    inits = {t.name: t for t in canonical.graph.initializer}
    for node in (n for n in canonical.graph.node if n.op_type == "LynxMoE"):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["weight_bits"] == bits and attrs["block_size"] == 32
        fc1, fc2 = inits[node.input[2]], inits[node.input[4]]
        assert fc1.data_type == fc2.data_type == onnx.TensorProto.UINT8
        h, i = attrs["hidden_size"], attrs["expert_size"]
        assert list(fc1.dims) == [attrs["num_experts"], 2 * i, h * bits // 8]
        assert list(inits[node.input[8]].dims) == [attrs["num_experts"], 2 * i, h // 32]
    ops = [n.op_type for n in onnx.load(result.out_dir / "model.ort.onnx").graph.node]
    assert "MoE" not in ops and ops.count("MatMulNBits") == 2 * 2 * 8  # 2 layers x 8 experts x (fc1, fc2)


def test_quantized_lynx_build_keeps_prefill_within_the_bound(demo_onnx, tmp_path):
    result = build(demo_onnx, tmp_path / "engine", BuildOptions(PolicyChoice("lynx"), quantize=QuantizeOptions("int4", 64), verify=QUICK))
    cases = result.report.comparison.cases
    assert [c.must_match for c in cases] == [c.phase == "prefill" for c in cases]
    assert result.manifest.quantize.block_size == 64


@pytest.mark.parametrize("args, code, message", [
    # Wrong for this model (H = 64): exit 1; wrong whatever the model: exit 2.
    (("--quantize", "int4", "--block-size", "256"), 1, "--block-size 256 does not divide the hidden size H = 64"),
    (("--quantize", "int8", "--ort-experts", "fused"), 2, "--quantize runs on --ort-experts per-expert only, not fused"),
    # Before any work (it was refused after the rewrite, quantization, lowering and verification, exit 1).
    (("--quantize", "int4", "--backend", "tensorrt-rtx"), 2, "--quantize runs on --backend ort only: the TensorRT plugin does not implement"),
    (("--quantize", "int8", "--backend", "tensorrt"), 2, "--quantize runs on --backend ort only"),
])
def test_quantize_option_errors_are_one_line_and_write_nothing(demo_onnx, tmp_path, args, code, message):
    out = tmp_path / "engine"
    r, _, _ = run_build(demo_onnx, out, "--policy", "off", *args)
    assert r.returncode == code, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("lynx-export")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_prints_the_quantization_error(demo_onnx, tmp_path):
    r, manifest, report = run_build(demo_onnx, tmp_path / "engine", "--policy", "off", "--quantize", "int8", "--batch-sizes", "1",
                                    "--seq-lens", "1")
    assert r.returncode == 0, r.stderr
    assert "verification: passed (tolerance 0.0001, quantized experts with float activations: MatMulNBits accuracy level 0)" in r.stdout
    assert "kernel error at accuracy level 4 (int8 activations) vs the dequantized experts: batch 1, seq 1 (decode): max " in r.stdout
    assert "quantization error vs the unquantized model: batch 1, seq 1 (decode): max " in r.stdout
    assert "quantized weights of block layers.0.mlp: relative RMS error " in r.stdout
    assert json.loads((tmp_path / "engine" / "report.json").read_text()) == report
    assert BIN.exists()


def test_a_quantized_build_runs_each_model_once_per_case_set(demo_onnx, tmp_path, model_runs):
    """Run, then compare: the dequantized reference, the built model at accuracy level 0 and as
    built, and the unquantized original each run once per case, for the three comparisons."""
    result = build(demo_onnx, tmp_path / "engine", BuildOptions(PolicyChoice("off"), quantize=QuantizeOptions("int8"),
                                                                verify=VerifyOptions(batch_sizes=(1, 4), seq_lens=(1, 3))))
    cases = len(result.report.comparison.cases)
    assert cases == 4 and len(result.report.kernel_error.cases) == len(result.report.quantization_error) == cases
    assert len(model_runs) == 4 and set(model_runs.values()) == {cases}, model_runs
