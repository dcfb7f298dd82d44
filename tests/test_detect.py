from __future__ import annotations

from lynx_export.detect import detect
from lynx_export.model_io import load_model
from lynx_export.routing import RouterForm


def test_demo_blocks_are_found_with_their_spec(demo_onnx):
    result = detect(load_model(demo_onnx))
    assert [c.name for c in result.candidates] == ["layers.0.mlp", "layers.1.mlp"]
    assert all(c.supported and c.reason == "" for c in result.candidates)
    for block in result.blocks:
        spec = block.spec
        assert (spec.num_experts, spec.top_k, spec.hidden_size, spec.expert_size) == (8, 2, 64, 128)
        assert spec.activation == "swiglu"
        assert spec.router is RouterForm.SOFTMAX_TOPK
        assert spec.normalize is True
        assert spec.shared_expert is False
        assert block.form == "batched_mm"
        assert block.weights.gate_first and block.weights.gate_up_layout == "out_in"
        # The phase input comes from the [B,S,H] tensor the tokens were flattened from.
        assert block.sequence_source is not None


def test_model_without_moe_has_no_candidates(dense_onnx):
    assert detect(load_model(dense_onnx)).candidates == ()


def test_candidate_json_fields(demo_onnx):
    d = detect(load_model(demo_onnx)).candidates[0].to_dict()
    assert set(d) >= {"name", "num_experts", "top_k", "hidden_size", "expert_size", "activation", "router", "normalize", "shared_expert", "supported", "reason"}
    assert d["router"] == "softmax_topk"
