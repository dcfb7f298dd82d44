"""The rewrite pass: node types, the checker, weight layouts, and blocks it must leave alone."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from lynx_export.compiler.detect import detect
from lynx_export.compiler.model_io import load_model
from lynx_export.compiler.rewrite import canonical_expert_weights, rewrite
from lynx_export.op import reference
from lynx_export.op.spec import MoESpec
from lynx_export.routing import OffPolicy, RouterForm
from lynx_export.compiler.blocks import ExpertWeights


def _silu(x):
    return x / (1 + np.exp(-x))


@pytest.mark.parametrize("gate_first", [True, False])
@pytest.mark.parametrize("gate_up_layout", ["out_in", "in_out"])
@pytest.mark.parametrize("down_layout", ["out_in", "in_out"])
@pytest.mark.parametrize("arrangement", ["halves", "interleaved", "apart"])
def test_canonical_weights_compute_the_same_expert(gate_first, gate_up_layout, down_layout, arrangement):
    rng = np.random.default_rng(0)
    e, h, i = 3, 5, 7
    gate, up = rng.standard_normal((2, e, i, h)).astype(np.float32)
    gate_b, up_b = rng.standard_normal((2, e, i)).astype(np.float32)
    down = rng.standard_normal((e, h, i)).astype(np.float32)
    down_b = rng.standard_normal((e, h)).astype(np.float32)
    first, second = (gate, up) if gate_first else (up, gate)
    first_b, second_b = (gate_b, up_b) if gate_first else (up_b, gate_b)
    if arrangement == "halves":
        gate_up, gate_up_b, up_src, up_b_src = np.concatenate([first, second], 1), np.concatenate([first_b, second_b], 1), None, None
    elif arrangement == "interleaved":
        gate_up = np.stack([first, second], 2).reshape(e, 2 * i, h)
        gate_up_b, up_src, up_b_src = np.stack([first_b, second_b], 2).reshape(e, 2 * i), None, None
    else:
        gate_up, gate_up_b, up_src, up_b_src = gate, gate_b, up, up_b
    to_layout = (lambda w: w) if gate_up_layout == "out_in" else (lambda w: None if w is None else w.transpose(0, 2, 1))
    src_down = down if down_layout == "out_in" else down.transpose(0, 2, 1)
    layout = ExpertWeights("gu", gate_up_layout, gate_first, "d", down_layout, up="u" if up_src is not None else None,
                           interleaved=arrangement == "interleaved")
    w = canonical_expert_weights(to_layout(gate_up), src_down, layout, to_layout(up_src), gate_up_b, up_b_src, down_b)
    assert w.fc1.shape == (e, 2 * i, h) and w.fc2.shape == (e, h, i) and w.fc1_bias.shape == (e, 2 * i)
    x = rng.standard_normal(h).astype(np.float32)
    # The canonical weights through the op's reference: row ex is x through expert ex alone (weight 1).
    spec = MoESpec(num_experts=e, top_k=1, hidden_size=h, expert_size=i, activation="swiglu", router=RouterForm.SOFTMAX_TOPK,
                   normalize=False)
    canonical = reference.combine(np.tile(x, (e, 1)), np.arange(e)[:, None], np.ones((e, 1)), w.fc1, w.fc2, spec,
                                  fc1_bias=w.fc1_bias, fc2_bias=w.fc2_bias)
    for ex in range(e):
        expected = down[ex] @ (_silu(gate[ex] @ x + gate_b[ex]) * (up[ex] @ x + up_b[ex])) + down_b[ex]
        np.testing.assert_allclose(canonical[ex], expected, rtol=1e-5, atol=1e-5)


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
    # A second detection finds only the LynxMoE nodes themselves (a rebuild replaces, never nests them).
    again = detect(model)
    assert [b.form for b in again.blocks] == ["lynx_moe"] * len(blocks) and len(again.candidates) == len(blocks)
    assert [b.name for b in again.blocks] == [b.name for b in blocks]


def test_unsupported_activation_is_reported_and_left_alone(demo_onnx):
    model = load_model(demo_onnx)
    sigmoids = [n for n in model.graph if n.op_type == "Sigmoid"]
    sigmoids[0].op_type = "Tanh"  # the first block's SiLU becomes x * tanh(x): not SwiGLU
    candidates = detect(model).candidates
    assert [c.supported for c in candidates] == [False, True]
    assert candidates[0].reason == "expert activation is not SwiGLU (silu(gate) * up, or gate * sigmoid(alpha * gate) * (up + beta))"
    assert candidates[0].to_dict()["num_experts"] is None
