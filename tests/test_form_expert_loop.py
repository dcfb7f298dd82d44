"""The `expert_loop` form: per-expert Python loops (transformers 4.x Mixtral style) unrolled by
torch's exporters, detected, rewritten and verified end to end.

The loop model's `family` option writes each MoE family's math in the same loop style (router,
renormalisation, shared expert, expert activation; tests/loop_models.py); every family is tested
with both exporters (TorchScript opset 18, dynamo). PhiMoE's sparse mixer router cannot be
rewritten (ONNX Runtime's MoE kernel cannot route so): its blocks are reported with the reason and
built unchanged. Exports are kept in pytest's cache (tests/loop_models.py): TorchScript takes a
few seconds, dynamo a few tens.
"""

from __future__ import annotations

import json
import math
import pathlib
import subprocess
from dataclasses import replace

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
import pytest

from lynx_export.compiler.detect import detect
from lynx_export.compiler.forms.router import SPARSE_MIXER
from lynx_export.compiler.model_io import load_model
from lynx_export.routing import RouterForm
from lynx_export.op.spec import MoESpec

pytest.importorskip("torch")

from tests import loop_models  # noqa: E402
from tests.cli_builds import SHAPES, check_left_as_it_is, check_report, lynx, run_build  # noqa: E402
from tests.loop_models import FAMILIES, LoopConfig, cached_loop_model  # noqa: E402

CONFIG = LoopConfig()
E, K, H, I = CONFIG.num_experts, CONFIG.top_k, CONFIG.hidden_size, CONFIG.intermediate_size
SPEC = MoESpec(num_experts=E, top_k=K, hidden_size=H, expert_size=I, activation="swiglu", router=RouterForm.SOFTMAX_TOPK, normalize=True)

@pytest.fixture(scope="module")
def torchscript_onnx() -> pathlib.Path:
    """The classic export: TorchScript, opset 17."""
    return cached_loop_model()


@pytest.fixture(scope="module")
def models() -> dict[str, pathlib.Path]:
    """Exports by name ("<exporter>-<opset>[-inferred]"), made (or read from the cache) on first use."""

    class Exports(dict):
        def __missing__(self, name: str) -> pathlib.Path:
            exporter, opset, *shapes = name.split("-")
            self[name] = cached_loop_model(dynamo=exporter == "dynamo", opset=int(opset), infer_shapes=shapes == ["inferred"])
            return self[name]

    return Exports()


@pytest.fixture(scope="module")
def family_models() -> dict[tuple[str, str], pathlib.Path]:
    """Exports of each family's loop model, by (family, "torchscript" | "dynamo"), opset 18."""

    class Exports(dict):
        def __missing__(self, key: tuple[str, str]) -> pathlib.Path:
            family, exporter = key
            self[key] = cached_loop_model(LoopConfig(family=family), dynamo=exporter == "dynamo", opset=18)
            return self[key]

    return Exports()


def _producers(model: ir.Model) -> dict[str, ir.Node]:
    return {v.name: node for node in model.graph for v in node.outputs}


def _build(model: pathlib.Path, out: pathlib.Path, policy: str) -> tuple[subprocess.CompletedProcess, dict, dict]:
    return run_build(model, out, "--policy", policy, *SHAPES)


def _check_loops_replaced(lynx: pathlib.Path, layers: int = CONFIG.num_layers) -> list[str]:
    """The unrolled loops are gone: one LynxMoE node per block, no NonZero or scatter left."""
    ops = [n.op_type for n in onnx.load(lynx).graph.node]
    assert ops.count("LynxMoE") == layers
    assert not {"NonZero", "ScatterND", "ScatterElements", "OneHot", "TopK"} & set(ops)
    return ops


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


# -- families ------------------------------------------------------------------------------------
# Each family's spec in this form. Qwen3-MoE (norm_topk_prob=True) computes Mixtral's math; its
# row is the default model's. The shared experts (Qwen2-MoE, DeepSeek-V3) stay outside the block.

FAMILY_SPECS = {
    "mixtral": SPEC,
    "olmoe": replace(SPEC, normalize=False),
    "qwen2_moe": replace(SPEC, normalize=False),
    "granitemoe": replace(SPEC, router=RouterForm.TOPK_SOFTMAX),
    "gpt_oss": replace(SPEC, router=RouterForm.TOPK_SOFTMAX, activation_alpha=1.702, activation_beta=1.0, swiglu_limit=7.0),
    # score_bias: the model's random correction bias, checked against the torch model below.
    "deepseek_v3": replace(SPEC, router=RouterForm.SIGMOID_GROUPED, num_groups=4, topk_groups=2, routed_scaling=2.5),
}
# Families whose blocks this form refuses, with the reason: tested under "PhiMoE" below.
REFUSED = {"phimoe": SPARSE_MIXER}
SUPPORTED = [f for f in FAMILIES if f not in REFUSED]
EXPORTERS = ["torchscript", "dynamo"]


def test_every_family_has_a_spec_or_a_refusal():
    assert set(FAMILY_SPECS) | set(REFUSED) == set(FAMILIES) and not set(FAMILY_SPECS) & set(REFUSED)
    assert SPARSE_MIXER == "PhiMoE sparse mixer router (argmax rounds over masked logits): ONNX Runtime's MoE kernel cannot reproduce it"


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("family", SUPPORTED)
def test_family_blocks_are_found_with_their_spec(family_models, family, exporter):
    from tests.loop_models import build_loop_model

    path = family_models[family, exporter]
    model = load_model(path)
    shapes = {v.name: v.shape for node in model.graph for v in node.outputs}
    result = detect(model)
    assert len(result.candidates) == CONFIG.num_layers
    assert all(c.supported and c.reason == "" for c in result.candidates), [c.reason for c in result.candidates]
    # Detection lends a TorchScript grouped router the shapes it lacks only for the call.
    assert {v.name: v.shape for node in model.graph for v in node.outputs} == shapes

    torch_model = build_loop_model(LoopConfig(family=family))
    producers = _producers(model)
    biased = family == "gpt_oss"
    for layer, block in enumerate(result.blocks):
        mlp = torch_model.layers[layer].mlp
        expected = FAMILY_SPECS[family]
        if family == "deepseek_v3":
            bias = mlp.e_score_correction_bias.numpy()
            assert block.spec.score_bias is not None and np.array_equal(np.float32(block.spec.score_bias), bias)
            expected = replace(expected, score_bias=block.spec.score_bias)
        assert block.form == "expert_loop" and block.spec == expected
        # Per-expert weights in loop order: gate w1, up w3, down w2 (biases for gpt-oss), as stored
        # by the exporter ([in,out] for MatMul, [out,in] for Gemm with transB).
        w = block.weights
        assert w.gate_first and not w.interleaved
        roles = [(w.gate_up, w.gate_up_layout, "w1"), (w.up, w.gate_up_layout, "w3"), (w.down, w.down_layout, "w2")]
        for names, layout, attr in roles:
            assert isinstance(names, tuple) and len(names) == E
            for e, name in enumerate(names):
                linear = getattr(mlp.experts[e], attr)
                weight = linear.weight.detach().numpy()
                stored = model.graph.initializers[name].const_value.numpy()
                assert np.array_equal(stored, weight if layout == "out_in" else weight.T)
        for names, attr in ((w.gate_up_bias, "w1"), (w.up_bias, "w3"), (w.down_bias, "w2")):
            assert (names is not None) == biased
            for e, name in enumerate(names or ()):
                stored = model.graph.initializers[name].const_value.numpy()
                assert np.array_equal(stored, getattr(mlp.experts[e], attr).bias.detach().numpy())
        # The router reads `hidden`: a linear layer, with gpt-oss's bias (Gemm, or MatMul + Add).
        router = producers[block.router_logits]
        if router.op_type == "Add":
            router = next(v.producer() for v in router.inputs if v.producer() is not None)
        assert router.op_type in ("MatMul", "Gemm") and router.inputs[0].name == block.hidden
        assert (len(router.inputs) == 3 or producers[block.router_logits].op_type == "Add") == biased
        # The block ends at the running sum: a shared expert is added after it.
        assert producers[block.output].op_type == ("Add" if exporter == "torchscript" else "ScatterND")
        assert block.sequence_source is not None


def test_gpt_oss_pre_activations_pass_the_limit(monkeypatch):
    """The gpt-oss model's gate and up pre-activations often pass the clamp (its weights are scaled
    up), so that its outputs depend on the limit: a rewrite that dropped it would change the
    logits far beyond the verification's 1e-4."""
    import torch

    from tests.loop_models import build_loop_model

    config = LoopConfig(family="gpt_oss")
    model = build_loop_model(config)
    seen: dict[str, list] = {"w1": [], "w3": []}
    for layer in model.layers:
        for expert in layer.mlp.experts:
            for attr in seen:
                getattr(expert, attr).register_forward_hook(lambda _m, _i, out, attr=attr: seen[attr].append(out.detach().reshape(-1)))
    ids = torch.arange(config.vocab_size).reshape(8, -1)  # every token
    with torch.no_grad():
        clamped = model(ids)
    gate, up = torch.cat(seen["w1"]), torch.cat(seen["w3"])
    limit = loop_models.GPT_OSS_LIMIT
    assert (gate > limit).float().mean() > 0.05
    assert (up > limit).float().mean() > 0.05 and (up < -limit).float().mean() > 0.05
    monkeypatch.setattr(loop_models, "GPT_OSS_LIMIT", math.inf)
    with torch.no_grad():
        unclamped = build_loop_model(config)(ids)
    assert (clamped - unclamped).abs().max() > 1.0


@pytest.mark.parametrize("family", ["gpt_oss", "deepseek_v3"])
def test_inspect_reports_family_parameters(family_models, family):
    """inspect on the TorchScript export (no shapes recorded, no shape inference run)."""
    path = family_models[family, "torchscript"]
    r = lynx("inspect", path, "--json")
    assert r.returncode == 0, r.stderr
    found = json.loads(r.stdout)
    spec = FAMILY_SPECS[family]
    assert len(found) == CONFIG.num_layers
    for block in found:
        assert block["supported"] and block["reason"] == ""
        assert block["router"] == spec.router.value and block["normalize"] == spec.normalize
        assert (block["activation_alpha"], block["activation_beta"], block["swiglu_limit"]) == (
            spec.activation_alpha, spec.activation_beta, spec.swiglu_limit)


def test_router_bias_added_after_a_matmul(family_models):
    """A router Linear with a bias spelled MatMul(hidden, W[in,out]) + b instead of Gemm."""
    model = load_model(family_models["gpt_oss", "torchscript"])
    block = detect(model).blocks[0]
    gemm = _producers(model)[block.router_logits]
    assert gemm.op_type == "Gemm" and gemm.attributes["transB"].as_int() == 1
    hidden, weight, bias = gemm.inputs
    array = weight.const_value.numpy().T.copy()
    transposed = ir.Value(
        name="router_weight_in_out", shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.FLOAT), const_value=ir.tensor(array)
    )
    model.graph.register_initializer(transposed)
    matmul = ir.node("MatMul", [hidden, transposed])
    add = ir.node("Add", [matmul.outputs[0], bias])
    model.graph.insert_before(gemm, [matmul, add])
    gemm.outputs[0].replace_all_uses_with(add.outputs[0])
    model.graph.remove(gemm)
    blocks = detect(model).blocks
    assert len(blocks) == CONFIG.num_layers
    assert blocks[0].spec == FAMILY_SPECS["gpt_oss"] and blocks[0].hidden == block.hidden
    assert blocks[0].router_logits == add.outputs[0].name


def _expert_clips(model: ir.Model, expert: int) -> list[ir.Node]:
    """The Clip nodes of layer 0's expert `expert` (gate first, then up) in a gpt-oss TorchScript export."""
    block = detect(model).blocks[0]
    clips = []
    for name in (block.weights.gate_up[expert], block.weights.up[expert]):
        (gemm,) = [n for n in model.graph if n.inputs and len(n.inputs) > 1 and n.inputs[1] is not None and n.inputs[1].name == name]
        (clip,) = [n for n, _ in gemm.outputs[0].uses() if n.op_type == "Clip"]
        clips.append(clip)
    return clips


def test_gate_clamped_from_below_is_refused(family_models):
    """A clamp ONNX Runtime's SwiGLU limit cannot express is refused with its reason."""
    model = load_model(family_models["gpt_oss", "torchscript"])
    gate_clip, _ = _expert_clips(model, 3)
    low = ir.node("Constant", [], attributes={"value": ir.tensor(np.array(-7.0, dtype=np.float32))})
    model.graph.insert_before(gate_clip, low)
    gate_clip.replace_input_with(1, low.outputs[0])
    candidates = detect(model).candidates
    assert [c.supported for c in candidates] == [False, True]
    assert candidates[0].reason == (
        "expert 3: clamped SwiGLU with gate clamped to [-7, 7], up to [-7, 7]: the gate is clamped from below "
        "(supported: gate <= L and -L <= up <= L, as gpt-oss)"
    )


def test_experts_with_different_limits_are_refused(family_models):
    """Every expert's SwiGLU must have the same parameters: the block's spec holds one set."""
    model = load_model(family_models["gpt_oss", "torchscript"])
    for clip in _expert_clips(model, 5):
        bounds = []
        for slot in (1, 2):
            value = clip.inputs[slot] if len(clip.inputs) > slot else None
            if value is None or ir.convenience.get_const_tensor(value) is None:
                bounds.append(value)
                continue
            c = ir.node("Constant", [], attributes={"value": ir.tensor(np.float32(ir.convenience.get_const_tensor(value).numpy() * 2))})
            model.graph.insert_before(clip, c)
            clip.replace_input_with(slot, c.outputs[0])
    candidates = detect(model).candidates
    assert [c.supported for c in candidates] == [False, True]
    assert candidates[0].reason == "experts' SwiGLU parameters (alpha, beta, limit) differ"


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
    check_report(report, "off")
    _check_loops_replaced(tmp_path / "engine" / "model.lynx.onnx")


@pytest.mark.parametrize("name", ["torchscript-18", "torchscript-18-inferred", "dynamo-18"])
def test_builds_with_policy_lynx(models, tmp_path, name):
    r, manifest, report = _build(models[name], tmp_path / "engine", "lynx")
    assert r.returncode == 0, r.stderr
    assert manifest["policy"]["name"] == "lynx" and len(manifest["blocks"]) == CONFIG.num_layers
    check_report(report, "lynx")


# Mixtral's builds are the default model's above.
@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("family", [f for f in SUPPORTED if f != "mixtral"])
def test_family_builds_exactly_with_policy_off(family_models, tmp_path, family, exporter):
    from tests.loop_models import build_loop_model

    r, manifest, report = _build(family_models[family, exporter], tmp_path / "engine", "off")
    assert r.returncode == 0, r.stderr
    assert manifest["rewrite"] == {"blocks": CONFIG.num_layers, "counts": {"expert_loop": CONFIG.num_layers}}
    check_report(report, "off")
    lynx = tmp_path / "engine" / "model.lynx.onnx"
    _check_loops_replaced(lynx)
    # A shared expert stays in the graph, outside the block: its weights (either orientation) and
    # Qwen2-MoE's gate are still there.
    torch_model = build_loop_model(LoopConfig(family=family))
    shared = []
    for layer in torch_model.layers:
        if hasattr(layer.mlp, "shared_expert"):
            shared += [layer.mlp.shared_expert.w1, layer.mlp.shared_expert.w2, layer.mlp.shared_expert.w3]
        if hasattr(layer.mlp, "shared_expert_gate"):
            shared.append(layer.mlp.shared_expert_gate)
    assert len(shared) == {"qwen2_moe": 4, "deepseek_v3": 3}.get(family, 0) * CONFIG.num_layers
    stored = [onnx.numpy_helper.to_array(t) for t in onnx.load(lynx).graph.initializer]
    for linear in shared:
        weight = linear.weight.detach().numpy()
        assert any(np.array_equal(a, w) for a in stored for w in (weight, weight.T) if a.shape == w.shape)


@pytest.mark.parametrize(("family", "exporter"), [("qwen2_moe", "torchscript"), ("gpt_oss", "torchscript"), ("deepseek_v3", "dynamo")])
def test_family_builds_with_policy_lynx(family_models, tmp_path, family, exporter):
    r, manifest, report = _build(family_models[family, exporter], tmp_path / "engine", "lynx")
    assert r.returncode == 0, r.stderr
    assert manifest["policy"]["name"] == "lynx" and len(manifest["blocks"]) == CONFIG.num_layers
    check_report(report, "lynx")


# -- PhiMoE: the sparse mixer router, reported and left as it is ---------------------------------

def test_phimoe_router_is_transformers_sparse_mixer():
    """The loop model's router computes transformers' `sparsemixer` (eval mode) exactly: the same
    two experts per token, in the same order, with the same weights."""
    import torch

    phimoe = pytest.importorskip("transformers.models.phimoe.modeling_phimoe")
    from tests.loop_models import PHIMOE_JITTER_EPS, build_loop_model

    model = build_loop_model(LoopConfig(family="phimoe"))
    logits = torch.randn(512, E, generator=torch.Generator().manual_seed(0)) * 3
    logits[:8, 3] = logits[:8, 5] = logits[:8].max(dim=-1).values + 1  # ties: the first wins
    weights, ids = model.layers[0].mlp.route(logits)
    expected_weights, expected_ids = phimoe.sparsemixer(logits, jitter_eps=PHIMOE_JITTER_EPS, training=False)
    assert ids.shape == (512, 2) and torch.equal(ids, expected_ids) and torch.equal(weights, expected_weights)
    assert (ids[:, 0] != ids[:, 1]).all() and ids[:8].tolist() == [[3, 5]] * 8
    # Not a top-k followed by a softmax: the weights come from masked softmaxes, one per round.
    top = torch.softmax(torch.topk(logits, 2, dim=-1).values, dim=-1)
    assert not torch.allclose(weights, top, atol=1e-3)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_phimoe_export_computes_the_sparse_mixer(family_models, exporter):
    """Both exporters write the sparse mixer (ArgMax rounds, no TopK) and the loop, and the
    export computes the torch model's logits."""
    import onnxruntime as ort
    import torch

    from tests.loop_models import build_loop_model

    path = family_models["phimoe", exporter]
    ops = [n.op_type for n in onnx.load(path).graph.node]
    assert "TopK" not in ops and ops.count("ArgMax") == 2 * CONFIG.num_layers
    assert ops.count("NonZero") == CONFIG.num_layers * E
    ids = np.arange(CONFIG.vocab_size, dtype=np.int64).reshape(4, -1)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"input_ids": ids})
    with torch.no_grad():
        expected = build_loop_model(LoopConfig(family="phimoe"))(torch.from_numpy(ids)).numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-4)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_phimoe_blocks_are_reported_with_the_sparse_mixer(family_models, exporter):
    """expert_loop claims the node computing the expert ids (a Concat of the argmax rounds, one-hot
    encoded for the loop) and refuses it with the reason; inspect lists each layer's block."""
    path = family_models["phimoe", exporter]
    model = load_model(path)
    candidates = detect(model).candidates
    assert len(candidates) == CONFIG.num_layers
    assert all(not c.supported and c.block is None and c.reason == SPARSE_MIXER for c in candidates)
    r = lynx("inspect", path, "--json")
    assert r.returncode == 0, r.stderr
    found = json.loads(r.stdout)
    # Named after the module scope where the exporter records one (dynamo), else by position.
    names = [f"layers.{i}.mlp" if exporter == "dynamo" else f"moe_{i}" for i in range(CONFIG.num_layers)]
    assert [(b["name"], b["supported"], b["reason"], b["num_experts"]) for b in found] == [(n, False, SPARSE_MIXER, None) for n in names]


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_phimoe_is_left_as_it_is_by_build(family_models, tmp_path, exporter):
    path = family_models["phimoe", exporter]
    names = [f"layers.{i}.mlp" if exporter == "dynamo" else f"moe_{i}" for i in range(CONFIG.num_layers)]
    out = tmp_path / "engine"
    r, _, _ = run_build(path, out)
    check_left_as_it_is(r, out, path, names, SPARSE_MIXER)
    assert "LynxMoE" not in [n.op_type for n in onnx.load(out / "model.lynx.onnx").graph.node]


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


def test_loop_skipping_an_expert_is_refused():
    path = cached_loop_model(LoopConfig(skip_experts=(5,)))
    candidates = detect(load_model(path)).candidates
    assert len(candidates) == CONFIG.num_layers
    assert {c.reason for c in candidates} == {f"experts [5] of {E} are missing from the loop"}


def test_other_activation_is_refused():
    path = cached_loop_model(LoopConfig(activation="gelu"))
    candidates = detect(load_model(path)).candidates
    assert len(candidates) == CONFIG.num_layers and not any(c.supported for c in candidates)
    assert candidates[0].reason == "expert 0: activation is not SwiGLU (silu(gate) * up, or gate * sigmoid(alpha * gate) * (up + beta))"


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
    r = lynx("inspect", path, "--json")
    assert r.returncode == 0, r.stderr
    found = json.loads(r.stdout)
    assert [b["supported"] for b in found] == [True, False]
    assert found[1]["reason"] == f"experts [0] of {E} are missing from the loop"
    assert found[0]["num_experts"] == E and found[0]["top_k"] == K


# -- the same loop arranged differently ----------------------------------------------------------
# tests/loop_models.py ARRANGEMENTS: how a user's loop may spell the rows, the (slot, token)
# coordinates, the sum and the experts' weights. Each arrangement below changes one of them from
# the default model's (or several, as transformers 5's `MixtralExperts.forward` does); every one
# is detected with the default model's spec and builds to a rewrite that reproduces it.

ARRANGED = {
    "rows-index": dict(rows="index"),  # hidden_states[top_x]
    "nonzero": dict(positions="nonzero"),  # idx, top_x = nonzero[:, 0], nonzero[:, 1]
    "scatter-add": dict(combine="scatter_add"),
    "index-put": dict(combine="index_put"),  # index_put_((top_x,), y, accumulate=True)
    "stacked": dict(experts="stacked"),  # F.linear(x, gate_up_proj[e]).chunk(2, -1)
    # transformers 4's loop (one_hot(...).permute(2, 1, 0), torch.where, hidden_states[None, top_x],
    # index_add_) over stacked [E,in,out] parameters, as its gpt-oss keeps them: (x @ gate_up_proj[e]).
    "stacked-in-out": dict(experts="stacked_in_out"),
    # transformers 5's loop: stacked parameters, hidden_states[token_idx], index_add_.
    "transformers5": dict(experts="stacked", rows="index"),
    "all-changed": dict(experts="stacked", rows="index", positions="nonzero", combine="index_put"),
    # Stacked parameters small enough for the dynamo exporter to fold each expert's slice into an
    # initializer of its own (the others keep Gather(gate_up_proj, e) in the graph).
    "stacked-folded": dict(experts="stacked", num_experts=4, hidden_size=16, intermediate_size=24),
}


@pytest.fixture(scope="module")
def arranged_models() -> dict[tuple[str, str], pathlib.Path]:
    """Exports of each arrangement (one layer), by (name, "torchscript" | "dynamo"), opset 18."""

    class Exports(dict):
        def __missing__(self, key: tuple[str, str]) -> pathlib.Path:
            name, exporter = key
            self[key] = cached_loop_model(_arranged(name), dynamo=exporter == "dynamo", opset=18)
            return self[key]

    return Exports()


def _arranged(name: str) -> LoopConfig:
    return LoopConfig(num_layers=1, **ARRANGED[name])


def _check_weights(model: ir.Model, block, mlp, config: LoopConfig) -> None:
    """The block binds the torch model's expert weights (each role in its layout), per expert or stacked."""
    w = block.weights
    if config.experts != "linears":  # one fused gate/up projection, gate rows first
        assert w.up is None and w.up_bias is None and w.gate_first and not w.interleaved
        order = (0, 2, 1) if config.experts == "stacked_in_out" else (0, 1, 2)  # to [E,out,in]
        roles = [(w.gate_up, w.gate_up_layout, mlp.gate_up_proj.detach().numpy().transpose(order)),
                 (w.down, w.down_layout, mlp.down_proj.detach().numpy().transpose(order))]
    else:
        experts = mlp.experts
        linears = ((w.gate_up, w.gate_up_layout, "w1"), (w.up, w.gate_up_layout, "w3"), (w.down, w.down_layout, "w2"))
        roles = [(names, layout, np.stack([getattr(x, attr).weight.detach().numpy() for x in experts])) for names, layout, attr in linears]
    for names, layout, params in roles:  # params: [E,out,in], torch Linear order
        expected = params if layout == "out_in" else params.transpose(0, 2, 1)
        if isinstance(names, str):  # the stacked parameter itself, sliced per expert in the graph
            assert np.array_equal(model.graph.initializers[names].const_value.numpy(), expected)
        else:
            assert len(names) == config.num_experts
            for e, name in enumerate(names):
                assert np.array_equal(model.graph.initializers[name].const_value.numpy(), expected[e])


def test_every_arrangement_is_tested():
    from tests.loop_models import ARRANGEMENTS

    for field, options in ARRANGEMENTS.items():
        assert {a.get(field, options[0]) for a in ARRANGED.values()} == set(options), field


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", list(ARRANGED))
def test_arranged_loop_is_found_with_its_spec(arranged_models, name, exporter):
    from tests.loop_models import build_loop_model

    config = _arranged(name)
    model = load_model(arranged_models[name, exporter])
    candidates = detect(model).candidates
    assert [(c.supported, c.reason) for c in candidates] == [(True, "")]
    block = candidates[0].block
    expected = replace(SPEC, num_experts=config.num_experts, hidden_size=config.hidden_size, expert_size=config.intermediate_size)
    assert block.form == "expert_loop" and block.spec == expected and block.sequence_source is not None
    _check_weights(model, block, build_loop_model(config).layers[0].mlp, config)
    if name == "transformers5" and exporter == "dynamo":  # the export: each expert slices the stacked parameter
        assert block.weights.gate_up == "layers.0.mlp.gate_up_proj" and block.weights.down == "layers.0.mlp.down_proj"


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", list(ARRANGED))
def test_arranged_loop_builds_exactly_with_policy_off(arranged_models, tmp_path, name, exporter):
    r, manifest, report = _build(arranged_models[name, exporter], tmp_path / "engine", "off")
    assert r.returncode == 0, r.stderr
    assert manifest["rewrite"] == {"blocks": 1, "counts": {"expert_loop": 1}}
    check_report(report, "off")
    _check_loops_replaced(tmp_path / "engine" / "model.lynx.onnx", layers=1)
