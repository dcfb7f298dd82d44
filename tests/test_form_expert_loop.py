"""The `expert_loop` form: per-expert Python loops (transformers 4.x Mixtral style) unrolled by
torch's exporters, detected, rewritten and verified end to end.

Exports are kept in pytest's cache (tests/loop_models.py): TorchScript takes a few seconds,
dynamo a few tens.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
import pytest

from lynx_export.detect import detect
from lynx_export.model_io import load_model
from lynx_export.routing import RouterForm
from lynx_export.spec import MoESpec

pytest.importorskip("torch")

from tests.loop_models import LoopConfig, cached_loop_model  # noqa: E402

BIN = pathlib.Path(sys.executable).parent / "lynx-export"
CONFIG = LoopConfig()
E, K, H, I = CONFIG.num_experts, CONFIG.top_k, CONFIG.hidden_size, CONFIG.intermediate_size
SPEC = MoESpec(num_experts=E, top_k=K, hidden_size=H, expert_size=I, activation="swiglu", router=RouterForm.SOFTMAX_TOPK, normalize=True)

@pytest.fixture(scope="module")
def torchscript_onnx(request) -> pathlib.Path:
    """The classic export: TorchScript, opset 17."""
    return cached_loop_model(request)


@pytest.fixture(scope="module")
def models(request) -> dict[str, pathlib.Path]:
    """Exports by name ("<exporter>-<opset>[-inferred]"), made (or read from the cache) on first use."""

    class Exports(dict):
        def __missing__(self, name: str) -> pathlib.Path:
            exporter, opset, *shapes = name.split("-")
            self[name] = cached_loop_model(request, dynamo=exporter == "dynamo", opset=int(opset), infer_shapes=shapes == ["inferred"])
            return self[name]

    return Exports()


def _producers(model: ir.Model) -> dict[str, ir.Node]:
    return {v.name: node for node in model.graph for v in node.outputs}


def _build(model: pathlib.Path, out: pathlib.Path, policy: str) -> tuple[subprocess.CompletedProcess, dict, dict]:
    args = [str(BIN), "build", str(model), "-o", str(out), "--policy", policy, "--batch-sizes", "1,3,8", "--seq-lens", "1,5"]
    r = subprocess.run(args, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        return r, {}, {}
    return r, json.loads((out / "manifest.json").read_text()), json.loads((out / "report.json").read_text())


# -- detection -----------------------------------------------------------------------------------

def test_torchscript_graph_is_a_per_expert_loop(torchscript_onnx):
    """What the matcher relies on: the loop is unrolled, one NonZero / 3 MatMuls / scatter per expert."""
    graph = onnx.load(torchscript_onnx).graph
    assert not graph.value_info  # no intermediate shapes or types: the matcher deduces ranks
    ops = [n.op_type for n in graph.node]
    layers = CONFIG.num_layers
    assert ops.count("TopK") == ops.count("OneHot") == layers
    assert ops.count("NonZero") == layers * E
    assert ops.count("ScatterElements") == layers * E  # index_add_: scatter into zeros, then Add
    assert ops.count("MatMul") == layers * (1 + 3 * E) + 1  # router, w1/w3/w2 per expert, lm_head


def test_torchscript_blocks_are_found_with_their_spec(torchscript_onnx):
    model = load_model(torchscript_onnx)
    result = detect(model)
    assert len(result.candidates) == CONFIG.num_layers
    assert all(c.supported and c.reason == "" for c in result.candidates), [c.reason for c in result.candidates]
    producers = _producers(model)
    seen: set[str] = set()
    for block in result.blocks:
        assert block.form == "expert_loop"
        assert block.spec == SPEC
        w = block.weights
        # One initializer per expert and projection, in expert order; TorchScript stores Linear
        # weights transposed for MatMul ([in,out]).
        assert isinstance(w.gate_up, tuple) and isinstance(w.up, tuple) and isinstance(w.down, tuple)
        assert len(w.gate_up) == len(w.up) == len(w.down) == E
        assert w.gate_up_layout == w.down_layout == "in_out" and not w.interleaved
        assert w.gate_up_bias is w.up_bias is w.down_bias is None
        for name in w.gate_up + w.up:
            assert model.graph.initializers[name].shape == (H, I)
        for name in w.down:
            assert model.graph.initializers[name].shape == (I, H)
        names = set(w.gate_up + w.up + w.down)
        assert len(names) == 3 * E and not names & seen
        seen |= names
        # The router's MatMul reads `hidden`; the output is the last partial sum of index_add_.
        router = producers[block.router_logits]
        assert router.op_type == "MatMul" and router.inputs[0].name == block.hidden
        assert producers[block.output].op_type == "Add"
        assert block.sequence_source is not None


def test_expert_weights_follow_the_loop_order(torchscript_onnx):
    """Expert e's weights are torch's experts[e] (w1, w3, w2), transposed."""
    from tests.loop_models import build_loop_model

    torch_model = build_loop_model(CONFIG)
    model = load_model(torchscript_onnx)
    for layer, block in enumerate(detect(model).blocks):
        experts = torch_model.layers[layer].mlp.experts
        for e in range(E):
            for names, linear in ((block.weights.gate_up, experts[e].w1), (block.weights.up, experts[e].w3), (block.weights.down, experts[e].w2)):
                stored = model.graph.initializers[names[e]].const_value.numpy()
                assert (stored == linear.weight.detach().numpy().T).all()


def test_dynamo_blocks_are_found_with_their_spec(models):
    """torch's dynamo exporter unrolls the loop too: Equal-with-arange one-hot, GatherND, Gemm, ScatterND add."""
    path = models["dynamo-18"]
    ops = [n.op_type for n in onnx.load(path).graph.node]
    assert "OneHot" not in ops and ops.count("ScatterND") == CONFIG.num_layers * E
    model = load_model(path)
    result = detect(model)
    assert len(result.candidates) == CONFIG.num_layers
    assert all(c.supported for c in result.candidates), [c.reason for c in result.candidates]
    for block in result.blocks:
        assert block.form == "expert_loop" and block.spec == SPEC
        assert block.weights.gate_up_layout == block.weights.down_layout == "out_in"
        assert model.graph.initializers[block.weights.gate_up[0]].shape == (I, H)
        assert model.graph.initializers[block.weights.down[0]].shape == (H, I)
        assert _producers(model)[block.output].op_type == "ScatterND"
        assert block.sequence_source is not None


# -- build: rewrite, lower, verify ---------------------------------------------------------------

@pytest.mark.parametrize(
    "name",
    [
        "torchscript-17",
        "torchscript-18",
        "torchscript-18-inferred",
        "dynamo-18",
    ],
)
def test_builds_exactly_with_policy_off(models, tmp_path, name):
    r, manifest, report = _build(models[name], tmp_path / "engine", "off")
    assert r.returncode == 0, r.stderr
    assert manifest["rewrite"] == {"blocks": CONFIG.num_layers, "counts": {"expert_loop": CONFIG.num_layers}}
    assert report["passed"] and report["phase_gated"]
    assert [(c["batch"], c["seq_len"]) for c in report["cases"]] == [(1, 1), (3, 1), (8, 1), (1, 5), (3, 5), (8, 5)]
    for case in report["cases"]:
        assert case["must_match"] and case["max_abs_diff"] <= 1e-4
        assert case["routing_agreement"] == 1.0
    # The unrolled loops are gone: one LynxMoE node per block, no NonZero or scatter left.
    lynx = [n.op_type for n in onnx.load(tmp_path / "engine" / "model.lynx.onnx").graph.node]
    assert lynx.count("LynxMoE") == CONFIG.num_layers
    assert not {"NonZero", "ScatterND", "ScatterElements", "OneHot", "TopK"} & set(lynx)


@pytest.mark.parametrize("name", ["torchscript-18", "torchscript-18-inferred", "dynamo-18"])
def test_builds_with_policy_lynx(models, tmp_path, name):
    r, manifest, report = _build(models[name], tmp_path / "engine", "lynx")
    assert r.returncode == 0, r.stderr
    assert manifest["policy"]["name"] == "lynx" and len(manifest["blocks"]) == CONFIG.num_layers
    assert report["passed"] and report["phase_gated"]
    for case in report["cases"]:
        assert case["must_match"] == (case["phase"] == "prefill")
        if case["must_match"]:
            assert case["max_abs_diff"] <= 1e-4


# -- refusals ------------------------------------------------------------------------------------

def _remove_expert(model: ir.Model, layer: int, expert: int) -> None:
    """Cut one expert out of a TorchScript loop: its partial sum is skipped, its nodes die."""
    scatters = [n for n in model.graph if n.op_type == "ScatterElements"]
    scatter = scatters[layer * E + expert]
    (add,) = [n for n, _ in scatter.outputs[0].uses() if n.op_type == "Add"]
    before = add.inputs[1] if add.inputs[0] is scatter.outputs[0] else add.inputs[0]
    add.outputs[0].replace_all_uses_with(before)
    common_passes.RemoveUnusedNodesPass()(model)


def test_graph_with_an_expert_cut_out_is_refused(torchscript_onnx):
    model = load_model(torchscript_onnx)
    _remove_expert(model, layer=0, expert=2)
    candidates = detect(model).candidates
    assert [c.supported for c in candidates] == [False, True]
    assert candidates[0].reason == f"experts [2] of {E} are missing from the loop"


def test_loop_skipping_an_expert_is_refused(request):
    path = cached_loop_model(request, LoopConfig(skip_experts=(5,)))
    candidates = detect(load_model(path)).candidates
    assert len(candidates) == CONFIG.num_layers
    assert {c.reason for c in candidates} == {f"experts [5] of {E} are missing from the loop"}


def test_other_activation_is_refused(request):
    path = cached_loop_model(request, LoopConfig(activation="gelu"))
    candidates = detect(load_model(path)).candidates
    assert len(candidates) == CONFIG.num_layers and not any(c.supported for c in candidates)
    assert candidates[0].reason == "expert 0: activation is not SwiGLU (silu(gate) * up)"


def test_expert_reading_other_tokens_is_refused(torchscript_onnx):
    """An expert must read the router's hidden state, not another tensor."""
    model = load_model(torchscript_onnx)
    block = detect(model).blocks[0]
    hidden = next(v for v in (o for n in model.graph for o in n.outputs) if v.name == block.hidden)
    gathers = [n for n, i in hidden.uses() if n.op_type == "Unsqueeze"]
    assert len(gathers) == 1  # hidden[None, top_x] of every expert reads one Unsqueeze
    negated = ir.node("Neg", [hidden])
    model.graph.insert_before(gathers[0], negated)
    gathers[0].replace_input_with(0, negated.outputs[0])
    candidates = detect(model).candidates
    assert [c.supported for c in candidates] == [False, True]
    assert candidates[0].reason == "expert 0 does not read the hidden state's rows of its tokens"


def test_unsupported_block_is_left_in_place_by_build(torchscript_onnx, tmp_path):
    """inspect reports the reason; nothing claims the candidate for another form."""
    model = load_model(torchscript_onnx)
    _remove_expert(model, layer=1, expert=0)
    path = tmp_path / "mangled.onnx"
    ir.save(model, path)
    r = subprocess.run([str(BIN), "inspect", str(path), "--json"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    found = json.loads(r.stdout)
    assert [b["supported"] for b in found] == [True, False]
    assert found[1]["reason"] == f"experts [0] of {E} are missing from the loop"
    assert found[0]["num_experts"] == E and found[0]["top_k"] == K
