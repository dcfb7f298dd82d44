from __future__ import annotations

import json
import pathlib

import onnx
import onnx_ir as ir
import pytest

from lynx_export.compiler.detect import detect
from lynx_export.compiler.model_io import load_model
from lynx_export.routing import RouterForm
from lynx_export.op.spec import MoESpec
from tests.cli_builds import lynx



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
        assert block.form == "batched_mm"
        assert block.weights.gate_first and block.weights.gate_up_layout == "out_in"
        # The phase input comes from the [B,S,H] tensor the tokens were flattened from.
        assert block.sequence_source is not None


def test_model_without_moe_has_no_candidates(dense_onnx):
    assert detect(load_model(dense_onnx)).candidates == ()


def test_candidate_json_fields(demo_onnx):
    d = detect(load_model(demo_onnx)).candidates[0].to_dict()
    assert set(d) >= {"name", "num_experts", "top_k", "hidden_size", "expert_size", "activation", "router", "normalize", "supported", "reason"}
    assert d["router"] == "softmax_topk"


# -- transformers Mixtral (dynamo export, batched_mm experts) -----------------------------------

MIXTRAL_BLOCKS = ["model.model.layers.0.mlp", "model.model.layers.1.mlp"]


@pytest.fixture(scope="module")
def mixtral_onnx() -> pathlib.Path:
    """The tiny Mixtral export, from the tests' artefact cache (as tests/test_families.py's)."""
    pytest.importorskip("transformers")
    from tests.transformers_models import cached_export

    return cached_export("mixtral")


def _build_cli(model: pathlib.Path, out: pathlib.Path, policy: str) -> tuple[dict, dict]:
    r = lynx("build", model, "-o", out, "--policy", policy)
    assert r.returncode == 0, r.stderr
    return json.loads((out / "manifest.json").read_text()), json.loads((out / "report.json").read_text())


def test_mixtral_blocks_are_found_with_their_spec(mixtral_onnx):
    model = load_model(mixtral_onnx)
    result = detect(model)
    # Named after the MoE block, not after its router module (`...mlp.gate`, where the TopK runs).
    assert [c.name for c in result.candidates] == MIXTRAL_BLOCKS
    assert all(c.supported and c.reason == "" for c in result.candidates)
    producers = {v.name: node for node in model.graph for v in node.outputs}
    for block in result.blocks:
        assert block.spec == MoESpec(
            num_experts=8, top_k=2, hidden_size=32, expert_size=48, activation="swiglu", router=RouterForm.SOFTMAX_TOPK, normalize=True
        )
        assert block.form == "batched_mm"
        # gate_up_proj [E,2I,H] holds [gate; up] concatenated (transformers' is_concatenated=True).
        assert block.weights.gate_first and block.weights.gate_up_layout == "out_in" and block.weights.down_layout == "out_in"
        assert model.graph.initializers[block.weights.gate_up].shape == (8, 96, 32)
        assert model.graph.initializers[block.weights.down].shape == (8, 32, 48)
        # `hidden` is what the router reads ([T,H]); the [B,S,H] it was flattened from gives the phase.
        router = producers[block.router_logits]
        assert router.op_type == "Gemm" and router.inputs[0].name == block.hidden
        assert list(producers[block.hidden].outputs[0].shape)[-1:] == [32]
        assert producers[block.output].op_type == "ReduceSum"
        assert block.sequence_source is not None and len(producers[block.sequence_source].outputs[0].shape) == 3


def test_mixtral_builds_exactly_with_policy_off(mixtral_onnx, tmp_path):
    manifest, report = _build_cli(mixtral_onnx, tmp_path / "engine", "off")
    assert [b["name"] for b in manifest["blocks"]] == MIXTRAL_BLOCKS
    assert manifest["rewrite"] == {"blocks": 2, "counts": {"batched_mm": 2}}
    assert report["passed"] and report["phase_gated"] and report["tolerance"] == 1e-4
    assert [(c["batch"], c["seq_len"]) for c in report["cases"]] == [(1, 1), (8, 1), (32, 1), (1, 16), (8, 16), (32, 16)]
    for case in report["cases"]:
        assert case["must_match"] and case["max_abs_diff"] <= 1e-4
        assert case["routing_agreement"] == 1.0
    # Each block's expert subgraph became one LynxMoE node: its two expert GatherNDs are gone,
    # the model's other GatherNDs stay.
    source = [n.op_type for n in onnx.load(mixtral_onnx).graph.node]
    lynx = [n.op_type for n in onnx.load(tmp_path / "engine" / "model.lynx.onnx").graph.node]
    assert lynx.count("LynxMoE") == 2
    assert source.count("GatherND") - lynx.count("GatherND") == 4
    # The routers' linear layers stay and feed the nodes; their top-k now runs inside LynxMoE.
    assert source.count("TopK") == 2 and lynx.count("TopK") == 0


def test_mixtral_builds_with_policy_lynx(mixtral_onnx, tmp_path):
    manifest, report = _build_cli(mixtral_onnx, tmp_path / "engine", "lynx")
    assert manifest["policy"]["name"] == "lynx" and len(manifest["blocks"]) == 2
    assert report["passed"] and report["phase_gated"]
    for case in report["cases"]:
        # Prefill keeps the model's routing; decode steps may route differently.
        assert case["must_match"] == (case["phase"] == "prefill")
        if case["must_match"]:
            assert case["max_abs_diff"] <= 1e-4 and case["routing_agreement"] == 1.0


def test_mixtral_router_reading_other_tokens_is_refused(mixtral_onnx):
    """The router and the experts may read sibling views of one tensor, never different tensors."""
    model = load_model(mixtral_onnx)
    first = detect(model).blocks[0]
    router = next(n for n in model.graph if n.outputs[0].name == first.router_logits)
    hidden = router.inputs[0]
    negated = ir.node("Neg", [hidden])
    negated.outputs[0].shape, negated.outputs[0].dtype = hidden.shape, hidden.dtype
    model.graph.insert_before(router, negated)
    router.replace_input_with(0, negated.outputs[0])
    candidates = detect(model).candidates
    assert [c.supported for c in candidates] == [False, True]
    assert candidates[0].reason == "no expert projection reads the router's hidden state"


# -- rank inference before detection (compiler/ranks.py) ----------------------------------------

@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_rank_inference_fills_in_what_torchscript_left_out(family):
    """A TorchScript export records no intermediate shapes: the pass gives every value one, each
    dimension it knows agreeing with ONNX shape inference (the grouped router's [T,G,S] scores
    included); run again it changes nothing."""
    pytest.importorskip("torch")
    from lynx_export.compiler.ranks import RankInferencePass
    from tests.loop_models import LoopConfig, cached_loop_model

    path = cached_loop_model(LoopConfig(family=family, num_layers=1), opset=18)
    model = ir.load(path)
    assert any(v.shape is None for node in model.graph for v in node.outputs)
    result = RankInferencePass()(model)
    assert result.modified and result.model is model
    inferred = onnx.shape_inference.infer_shapes(onnx.load(path), data_prop=True).graph.value_info
    reference = {vi.name: [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim] for vi in inferred}
    for node in model.graph:
        for value in node.outputs:
            assert value.shape is not None, (node.op_type, value.name)
            dims, expected = [d if isinstance(d, int) else None for d in value.shape], reference.get(value.name)
            if expected is not None:
                assert len(dims) == len(expected) and all(a is None or b is None or a == b for a, b in zip(dims, expected)), (
                    node.op_type, value.name, dims, expected)
    assert not RankInferencePass()(model).modified


def test_detect_takes_back_the_shapes_it_inferred():
    pytest.importorskip("torch")
    from tests.loop_models import LoopConfig, cached_loop_model

    model = ir.load(cached_loop_model(LoopConfig(num_layers=1), opset=18))
    shapes = {v: v.shape for node in model.graph for v in node.outputs}
    assert len(detect(model).blocks) == 1
    assert {v: v.shape for node in model.graph for v in node.outputs} == shapes
