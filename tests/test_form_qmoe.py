"""Sources already quantized: `com.microsoft.QMoE` nodes (what onnxruntime-genai's model builder
writes for CPU) are detected and rewritten with their quantized weights kept as they are."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from lynx_export.compiler.detect import detect
from lynx_export.compiler.model_io import load_model
from lynx_export.op.quantization import quantize_blockwise
from tests.cli_builds import run_build

E, K, H, I = 8, 2, 64, 32


def qmoe_model(path: pathlib.Path, *, bits: int = 4, block: int = 32, fusion: int = 1, per_channel: bool = False,
               zero_points: bool = False, seed: int = 0) -> dict[str, np.ndarray]:
    """A two-layer [B,S,H] model whose MoE layers are QMoE nodes, laid out as onnxruntime-genai's
    CPU builder writes them (raw [E,N,K*bits/8] weights, float16 block scales, 14 inputs, empty
    slots as ""). Returns the quantized fc1 arrays by layer, to check they are kept."""
    rng = np.random.default_rng(seed)
    inits, nodes, kept = [], [], {}
    x = "x"
    for layer in range(2):
        # Weights scaled like a trained layer's (unit-scale activations through the residual stream).
        fc1 = (rng.standard_normal((E, 2 * I, H)) * 0.1).astype(np.float32)  # gate/up rows interleaved (fusion 1) or [g | u]
        fc2 = (rng.standard_normal((E, H, I)) * 0.1).astype(np.float32)
        q1, q2 = quantize_blockwise(fc1, bits, block), quantize_blockwise(fc2, bits, block)
        p = f"l{layer}."
        inits += [numpy_helper.from_array((rng.standard_normal((H, E)) * 2).astype(np.float32), p + "router"),
                  numpy_helper.from_array(q1.q, p + "fc1"), numpy_helper.from_array(q2.q, p + "fc2")]
        scales = [q1.scales, q2.scales]
        if per_channel:
            scales = [s[..., 0] for s in scales]
        inits += [numpy_helper.from_array(s.astype(np.float16), p + n) for s, n in zip(scales, ("fc1_scales", "fc2_scales"))]
        zp = ["", ""]
        if zero_points:
            blocks1, blocks2 = H // block, I // block
            z1 = np.full((E, 2 * I, -(-blocks1 * bits // 8)), 0x88 if bits == 4 else 128, np.uint8)
            z2 = np.full((E, H, -(-blocks2 * bits // 8)), 0x88 if bits == 4 else 128, np.uint8)
            inits += [numpy_helper.from_array(z1, p + "fc1_zp"), numpy_helper.from_array(z2, p + "fc2_zp")]
            zp = [p + "fc1_zp", p + "fc2_zp"]
        kept[layer] = q1.q
        attrs = dict(k=K, activation_type="swiglu", swiglu_fusion=fusion, expert_weight_bits=bits, normalize_routing_weights=1,
                     activation_alpha=1.0, activation_beta=0.0)
        if not per_channel:
            attrs["block_size"] = block
        nodes += [
            helper.make_node("Reshape", [x, "flat"], [p + "tokens"]),
            helper.make_node("MatMul", [p + "tokens", p + "router"], [p + "logits"]),
            helper.make_node("QMoE", [x, p + "logits", p + "fc1", p + "fc1_scales", "", p + "fc2", p + "fc2_scales", "", "", "", "", *zp, ""],
                             [p + "moe"], domain="com.microsoft", name=f"layers.{layer}.moe", **attrs),
            helper.make_node("Add", [x, p + "moe"], [p + "out"]),
        ]
        x = p + "out"
    inits.append(numpy_helper.from_array(np.array([-1, H], np.int64), "flat"))
    # The builder types every value it makes (make_value); ONNX shape inference knows no QMoE.
    typed = [helper.make_tensor_value_info(f"l{layer}.{v}", TensorProto.FLOAT, ["batch", "seq", H]) for layer in range(2) for v in ("moe", "out")]
    graph = helper.make_graph(nodes, "qmoe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", H])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["batch", "seq", H])], inits, value_info=typed[:-1])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]), path)
    return kept


@pytest.mark.parametrize("bits", [4, 8])
def test_qmoe_blocks_are_detected_with_their_quantization(tmp_path, bits):
    qmoe_model(tmp_path / "m.onnx", bits=bits)
    blocks = detect(load_model(tmp_path / "m.onnx")).blocks
    assert [b.form for b in blocks] == ["ort_moe", "ort_moe"]
    spec, weights = blocks[0].spec, blocks[0].weights
    assert (spec.num_experts, spec.top_k, spec.hidden_size, spec.expert_size) == (E, K, H, I)
    assert weights.quantization.bits == bits and weights.quantization.block_size == 32
    assert weights.gate_up_scales == "l0.fc1_scales" and weights.down_scales == "l0.fc2_scales"


@pytest.mark.parametrize("policy", ["off", "lynx"])
def test_qmoe_build_keeps_the_quantized_weights_and_verifies(tmp_path, policy):
    kept = qmoe_model(tmp_path / "m.onnx")
    r, manifest, report = run_build(tmp_path / "m.onnx", tmp_path / "out", "--policy", policy, "--batch-sizes", "1,8", "--seq-lens", "1,5")
    assert r.returncode == 0, r.stderr
    assert report["passed"] and report["verified_at_accuracy_level"] == 0 and manifest["ort_experts"] == "per-expert"
    assert "quantization_error" not in report and len(report["kernel_error"]["cases"]) == len(report["cases"])
    for case in report["cases"]:
        assert case["must_match"] == (policy == "off" or case["phase"] == "prefill")
        if case["must_match"]:
            assert case["max_abs_diff"] <= 1e-4
    canonical = onnx.load(tmp_path / "out" / "model.lynx.onnx")
    inits = {t.name: numpy_helper.to_array(t) for t in canonical.graph.initializer}
    lynx = [n for n in canonical.graph.node if n.op_type == "LynxMoE"]
    assert len(lynx) == 2
    for layer, node in enumerate(lynx):
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["weight_bits"] == 4 and attrs["block_size"] == 32
        np.testing.assert_array_equal(inits[node.input[2]], kept[layer])  # no round trip through float
        assert inits[node.input[8]].dtype == np.float32  # float16 scales widened to the activations' type
    ops = [n.op_type for n in onnx.load(tmp_path / "out" / "model.ort.onnx").graph.node]
    assert "QMoE" not in ops and ops.count("MatMulNBits") == 2 * E * 2
    if policy == "lynx":
        decode = [c for c in report["cases"] if c["phase"] == "decode" and c["batch"] == 8]
        assert decode[0]["mean_active_experts_policy"] < decode[0]["mean_active_experts_model"]


def test_qmoe_concatenated_gate_up_is_interleaved_exactly(tmp_path):
    kept = qmoe_model(tmp_path / "m.onnx", fusion=2, zero_points=True)
    r, _, report = run_build(tmp_path / "m.onnx", tmp_path / "out", "--policy", "off", "--batch-sizes", "1,4", "--seq-lens", "1")
    assert r.returncode == 0, r.stderr
    assert report["passed"]
    canonical = onnx.load(tmp_path / "out" / "model.lynx.onnx")
    inits = {t.name: numpy_helper.to_array(t) for t in canonical.graph.initializer}
    node = next(n for n in canonical.graph.node if n.op_type == "LynxMoE")
    rows = kept[0]
    interleaved = np.stack([rows[:, :I], rows[:, I:]], axis=2).reshape(rows.shape)
    np.testing.assert_array_equal(inits[node.input[2]], interleaved)
    assert node.input[10] and inits[node.input[10]].shape == (E, 2 * I, 1)  # zero points kept, rows interleaved too


def test_per_channel_qmoe_is_left_as_it_is_with_a_reason(tmp_path):
    qmoe_model(tmp_path / "m.onnx", per_channel=True)
    r, manifest, _ = run_build(tmp_path / "m.onnx", tmp_path / "out", "--batch-sizes", "1", "--seq-lens", "1")
    assert r.returncode == 0, r.stderr
    reasons = {u["reason"] for u in manifest["unsupported"]}
    assert reasons == {"QMoE with per-channel scales (no block_size): LynxMoE's quantized experts are block-wise"}
    assert json.loads((tmp_path / "out" / "report.json").read_text())["cases"] == []
