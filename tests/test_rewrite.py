"""The rewrite pass: node types, the checker, weight layouts, and blocks it must leave alone."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from lynx_export.detect import detect
from lynx_export.model_io import load_model
from lynx_export.rewrite import canonical_expert_weights, rewrite
from lynx_export.routing import OffPolicy
from lynx_export.spec import ExpertWeights


def _silu(x):
    return x / (1 + np.exp(-x))


@pytest.mark.parametrize("gate_first", [True, False])
@pytest.mark.parametrize("gate_up_layout", ["out_in", "in_out"])
@pytest.mark.parametrize("down_layout", ["out_in", "in_out"])
def test_canonical_weights_compute_the_same_expert(gate_first, gate_up_layout, down_layout):
    rng = np.random.default_rng(0)
    e, h, i = 3, 5, 7
    gate = rng.standard_normal((e, i, h)).astype(np.float32)
    up = rng.standard_normal((e, i, h)).astype(np.float32)
    down = rng.standard_normal((e, h, i)).astype(np.float32)
    gate_up = np.concatenate([gate, up] if gate_first else [up, gate], axis=1)
    src_gate_up = gate_up if gate_up_layout == "out_in" else gate_up.transpose(0, 2, 1)
    src_down = down if down_layout == "out_in" else down.transpose(0, 2, 1)
    layout = ExpertWeights("gu", gate_up_layout, gate_first, "d", down_layout)
    fc1, fc2 = canonical_expert_weights(src_gate_up, src_down, layout)
    assert fc1.shape == (e, 2 * i, h) and fc2.shape == (e, h, i)
    x = rng.standard_normal(h).astype(np.float32)
    for ex in range(e):
        expected = down[ex] @ (_silu(gate[ex] @ x) * (up[ex] @ x))
        proj = fc1[ex] @ x
        np.testing.assert_allclose(fc2[ex] @ (_silu(proj[0::2]) * proj[1::2]), expected, rtol=1e-5, atol=1e-5)


def test_rewrite_leaves_one_node_per_block_and_passes_checker(demo_onnx):
    model = load_model(demo_onnx)
    blocks = detect(model).blocks
    before = [n.op_type for n in model.graph]
    result = rewrite(model, blocks, OffPolicy())
    assert result.rewritten == ("layers.0.mlp", "layers.1.mlp")
    assert result.counts == {"batched_mm": 2}
    op_types = [n.op_type for n in model.graph]
    assert op_types.count("LynxMoE") == 2
    # The expert subgraph (gathers, batched matmuls, split, activation) is gone; routers stay.
    assert "GatherND" in before and "GatherND" not in op_types
    for removed in ("Split", "Sigmoid"):
        assert before.count(removed) - op_types.count(removed) == 2
    assert op_types.count("Softmax") >= 2  # attention softmax + the routers' softmax stay
    proto = ir.to_proto(model)
    onnx.checker.check_model(proto)
    assert {o.domain: o.version for o in proto.opset_import}["trt.plugins"] == 1
    # A second detection finds nothing left to rewrite.
    assert detect(model).candidates == ()


def test_unsupported_activation_is_reported_and_left_alone(demo_onnx):
    model = load_model(demo_onnx)
    sigmoids = [n for n in model.graph if n.op_type == "Sigmoid"]
    sigmoids[0].op_type = "Tanh"  # the first block's SiLU becomes x * tanh(x): not SwiGLU
    candidates = detect(model).candidates
    assert [c.supported for c in candidates] == [False, True]
    assert candidates[0].reason == "expert activation is not SwiGLU (silu(gate) * up)"
    assert candidates[0].to_dict()["num_experts"] is None
