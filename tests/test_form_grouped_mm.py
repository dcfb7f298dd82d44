"""The `grouped_mm` form: MoE models exported by transformers' own ONNX exporter (default settings),
whose `grouped_mm` experts unroll into per-expert Range/Gather/MatMul groups.

Also here: PhiMoE through that exporter (its sparse mixer router, reported and left as it is), and
the exporter's `ort_fusions="cuda"` export of Mixtral (com.microsoft.MoE nodes, the ort_moe form),
which it writes on a CPU machine too.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
import pytest

from lynx_export.compiler.detect import detect
from lynx_export.compiler.model_io import load_model
from lynx_export.routing import RouterForm
from lynx_export.op.spec import MoESpec

pytest.importorskip("transformers.exporters")

from tests.cli_builds import SHAPES, check_left_as_it_is, check_report, lynx, run_build  # noqa: E402
from tests.transformers_exporter import FAMILIES, ExportFailed, cached_export  # noqa: E402


# What each family's tiny config routes with (E=8, K=2, H=32, I=48 everywhere).
ROUTERS = {
    # Sigmoid scores plus a (random) correction bias, 2 of 4 groups of 2 kept, renormalised, scaled
    # by 2.5 (DEEPSEEK_GROUPING; the bias per layer, checked in test_deepseek_v3_blocks_and_spec);
    # its shared expert stays in the graph, beside the block.
    "deepseek_v3": (RouterForm.SIGMOID_GROUPED, True),
    "mixtral": (RouterForm.SOFTMAX_TOPK, True),
    "qwen3_moe": (RouterForm.SOFTMAX_TOPK, True),
    "olmoe": (RouterForm.SOFTMAX_TOPK, False),
    "qwen2_moe": (RouterForm.SOFTMAX_TOPK, False),  # its shared expert stays in the graph, beside the block
    "granitemoe": (RouterForm.TOPK_SOFTMAX, True),
}
BLOCK = {"granitemoe": "model.layers.{}.block_sparse_moe"}
DEEPSEEK_GROUPING = dict(num_groups=4, topk_groups=2, routed_scaling=2.5)
SPARSE_MIXER = "PhiMoE sparse mixer router (argmax rounds over masked logits): ONNX Runtime's MoE kernel cannot reproduce it"


@pytest.fixture(scope="module")
def mixtral_default() -> pathlib.Path:
    """The exporter's defaults: static shapes, traced at input_ids [2, 5]."""
    return cached_export(FAMILIES["mixtral"])


@pytest.fixture(scope="module")
def mixtral_dynamic() -> pathlib.Path:
    return cached_export(FAMILIES["mixtral"], dynamic=True)


def _build(model: pathlib.Path, out: pathlib.Path, policy: str, *extra: str) -> tuple[dict, dict]:
    r, manifest, report = run_build(model, out, "--policy", policy, *SHAPES, *extra)
    assert r.returncode == 0, r.stderr
    return manifest, report


def _blocks(family: str) -> list[str]:
    return [BLOCK.get(family, "model.layers.{}.mlp").format(i) for i in range(2)]


@pytest.mark.parametrize("dynamic", [False, True], ids=["default", "dynamic"])
def test_mixtral_blocks_are_found_with_their_spec(dynamic):
    model = load_model(cached_export(FAMILIES["mixtral"], dynamic=dynamic))
    result = detect(model)
    assert [c.name for c in result.candidates] == _blocks("mixtral")
    assert all(c.supported and c.reason == "" for c in result.candidates)
    producers = {v.name: node for node in model.graph for v in node.outputs}
    for block in result.blocks:
        assert block.form == "grouped_mm"
        assert block.spec == MoESpec(
            num_experts=8, top_k=2, hidden_size=32, expert_size=48, activation="swiglu", router=RouterForm.SOFTMAX_TOPK, normalize=True
        )
        # One stacked initializer per projection, [E,in,out] (MatMul(rows, W_e)), gate columns first.
        w = block.weights
        assert (w.gate_up_layout, w.down_layout, w.gate_first, w.interleaved, w.up) == ("in_out", "in_out", True, False, None)
        assert model.graph.initializers[w.gate_up].shape == (8, 32, 96)
        assert model.graph.initializers[w.down].shape == (8, 48, 32)
        router = producers[block.router_logits]
        assert router.op_type == "Gemm" and router.inputs[0].name == block.hidden
        assert producers[block.output].op_type == "ReduceSum"
        assert block.sequence_source is not None and len(producers[block.sequence_source].outputs[0].shape) == 3


def test_mixtral_weights_are_the_models(mixtral_default):
    """The stacked initializers are the model's expert parameters, transposed to [E,in,out]."""
    import torch
    import transformers

    family = FAMILIES["mixtral"]
    torch.manual_seed(0)
    torch_model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**family.config))
    model = load_model(mixtral_default)
    for layer, block in enumerate(detect(model).blocks):
        experts = torch_model.model.layers[layer].mlp.experts
        gate_up = model.graph.initializers[block.weights.gate_up].const_value.numpy()
        down = model.graph.initializers[block.weights.down].const_value.numpy()
        np.testing.assert_array_equal(gate_up, experts.gate_up_proj.detach().numpy().transpose(0, 2, 1))
        np.testing.assert_array_equal(down, experts.down_proj.detach().numpy().transpose(0, 2, 1))


def _export(family: str, **settings) -> pathlib.Path:
    """`family`'s export; a family transformers' exporter cannot export is skipped with its error."""
    try:
        return cached_export(FAMILIES[family], **settings)
    except ExportFailed as exc:
        pytest.skip(f"transformers' exporter fails on {family}: {exc}")


def _spec(family: str, block) -> MoESpec:
    """What `family`'s blocks compute (a sigmoid_grouped block's score bias: its own, checked elsewhere)."""
    router, normalize = ROUTERS[family]
    grouping = dict(DEEPSEEK_GROUPING, score_bias=block.spec.score_bias) if router is RouterForm.SIGMOID_GROUPED else {}
    return MoESpec(8, 2, 32, FAMILIES[family].expert_size, "swiglu", router, normalize, **grouping)


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["off", "lynx"])
@pytest.mark.parametrize("family", list(ROUTERS))
def test_family_builds_and_verifies(tmp_path, family, policy):
    """Every supported family, exported with dynamic shapes, builds and verifies at batch 1/3/8 x seq 1/5."""
    path = _export(family, dynamic=True)
    result = detect(load_model(path))
    assert [(c.name, c.reason) for c in result.candidates] == [(n, "") for n in _blocks(family)]
    for block in result.blocks:
        assert block.form == "grouped_mm"
        assert block.spec == _spec(family, block)
    manifest, report = _build(path, tmp_path / "engine", policy)
    assert [b["name"] for b in manifest["blocks"]] == _blocks(family)
    assert manifest["rewrite"] == {"blocks": 2, "counts": {"grouped_mm": 2}}
    check_report(report, policy)


def test_default_export_builds_exactly(mixtral_default, tmp_path):
    """The default (static) export runs only at its traced [2, 5] shape: every case feeds that shape."""
    manifest, report = _build(mixtral_default, tmp_path / "engine", "off")
    assert manifest["rewrite"] == {"blocks": 2, "counts": {"grouped_mm": 2}}
    check_report(report, "off")
    lynx = ir.load(tmp_path / "engine" / "model.lynx.onnx")
    ops = [n.op_type for n in lynx.graph]
    # Each block's sort, per-expert groups and inverse permutation are gone.
    assert ops.count("LynxMoE") == 2
    assert {"TopK", "CumSum", "ScatterND", "ScatterElements", "Split"}.isdisjoint(ops)


def _per_expert_initializers(model: ir.Model) -> None:
    """Fold each stacked weight's Split/Squeeze into one 2-D initializer per expert."""
    graph = model.graph
    for split in [n for n in graph if n.op_type == "Split"]:
        stacked = split.inputs[0]
        if stacked.const_value is None or stacked.producer() is not None or len(stacked.shape) != 3:
            continue
        array = stacked.const_value.numpy()
        for g, part in enumerate(split.outputs):
            for squeeze, _ in list(part.uses()):
                assert squeeze.op_type == "Squeeze"
                name = f"expert_weight_{stacked.name}_{g}"
                value = ir.Value(name=name, shape=ir.Shape(array[g].shape), type=ir.TensorType(ir.DataType.FLOAT),
                                 const_value=ir.tensor(array[g], name=name))
                graph.register_initializer(value)
                ir.convenience.replace_all_uses_with(squeeze.outputs[0], value)
    common_passes.RemoveUnusedNodesPass()(model)


def test_per_expert_initializers_build_exactly(mixtral_dynamic, tmp_path):
    model = load_model(mixtral_dynamic)
    _per_expert_initializers(model)
    blocks = detect(model).blocks
    assert len(blocks) == 2
    for block in blocks:
        assert isinstance(block.weights.gate_up, tuple) and len(block.weights.gate_up) == 8
        assert isinstance(block.weights.down, tuple) and len(block.weights.down) == 8
        assert [model.graph.initializers[n].shape for n in (block.weights.gate_up[0], block.weights.down[0])] == [(32, 96), (48, 32)]
    path = tmp_path / "per_expert.onnx"
    ir.save(model, path)
    _, report = _build(path, tmp_path / "engine", "off")
    check_report(report, "off")


def _gate_up_concat(model: ir.Model) -> ir.Node:
    """The first block's Concat of its experts' gate/up rows (the one a Split reads)."""
    return next(n for n in model.graph if n.op_type == "Concat" and len(n.inputs) == 8
                and any(c.op_type == "Split" for c, _ in n.outputs[0].uses()))


def test_experts_out_of_order_are_refused(mixtral_dynamic):
    model = load_model(mixtral_dynamic)
    concat = _gate_up_concat(model)
    first, second = concat.inputs[0], concat.inputs[1]
    concat.replace_input_with(0, second)
    concat.replace_input_with(1, first)
    candidates = detect(model).candidates
    assert [c.supported for c in candidates] == [False, True]
    assert candidates[0].name == "model.layers.0.mlp.gate"  # a refused block is named after its router
    assert candidates[0].reason == "the first expert's rows do not start at row 0"


def test_outputs_left_in_sorted_order_are_refused(mixtral_dynamic, tmp_path):
    """Without the inverse permutation the rows would be summed in expert order: not the block."""
    model = load_model(mixtral_dynamic)
    scatter = next(n for n in model.graph if n.op_type == "ScatterND")
    unsort = next(n for n in model.graph if n.op_type == "GatherND" and n.inputs[1].producer() is not None
                  and scatter.outputs[0] in n.inputs[1].producer().inputs)
    unsort.replace_input_with(1, scatter.inputs[1])  # Unsqueeze(perm), not of its inverse
    candidates = detect(model).candidates
    assert [c.supported for c in candidates] == [False, True]
    reason = "expert outputs are not put back in token order (gather at the inverse of the sort)"
    assert candidates[0].reason == reason
    # `inspect` shows the reason.
    path = tmp_path / "broken.onnx"
    common_passes.RemoveUnusedNodesPass()(model)
    ir.save(model, path)
    r = lynx("inspect", path, "--json")
    shown = json.loads(r.stdout)
    assert [(b["name"], b["supported"], b["reason"]) for b in shown] == [
        ("model.layers.0.mlp.gate", False, reason), ("model.layers.1.mlp", True, "")
    ]


def test_save_pretrained_layout_builds(mixtral_dynamic, tmp_path):
    """`ExportedModel.save_pretrained` writes the weights to a `model.onnx.data` sidecar (OnnxExporter.save_program)."""
    folder = tmp_path / "exported"
    folder.mkdir()
    ir.save(ir.load(mixtral_dynamic), folder / "model.onnx", external_data="model.onnx.data")
    _, report = _build(folder / "model.onnx", tmp_path / "engine", "off")
    check_report(report, "off")


# -- DeepSeek-V3: the sigmoid grouped router ---------------------------------------------------------


def _deepseek_router_logits(ids: np.ndarray) -> list[np.ndarray]:
    """Each layer's router logits [T,E] in the exported (random, prepared) torch model, for input_ids `ids`."""
    import torch
    import transformers
    from transformers.models.deepseek_v3 import modeling_deepseek_v3

    family = FAMILIES["deepseek_v3"]
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**family.config)).eval()
    with torch.no_grad():
        family.prepare(model)
    logits: list[np.ndarray] = []
    for router in (m for m in model.modules() if isinstance(m, modeling_deepseek_v3.DeepseekV3TopkRouter)):
        router.register_forward_hook(lambda module, args, output: logits.append(output[0].detach().numpy()))
    with torch.no_grad():
        model(torch.tensor(ids), use_cache=False)
    return logits


@pytest.mark.parametrize("dynamic", [False, True], ids=["default", "dynamic"])
def test_deepseek_v3_blocks_and_spec(dynamic):
    """Both layers' routed experts form grouped_mm blocks with the router's groups, scaling and its own
    correction bias (the graph's initializer); the bias changes which experts some tokens get."""
    from lynx_export.routing import GroupedRouting, route

    model = load_model(_export("deepseek_v3", dynamic=dynamic))
    result = detect(model)
    assert [(c.name, c.supported, c.reason) for c in result.candidates] == [(n, True, "") for n in _blocks("deepseek_v3")]
    ids = np.random.default_rng(0).integers(0, 128, (3, 5))
    for block, logits in zip(result.blocks, _deepseek_router_logits(ids), strict=True):
        assert block.form == "grouped_mm"
        assert block.spec == MoESpec(8, 2, 32, 48, "swiglu", RouterForm.SIGMOID_GROUPED, True, **DEEPSEEK_GROUPING,
                                     score_bias=block.spec.score_bias)
        bias = model.graph.initializers[f"{block.name}.gate.e_score_correction_bias"].const_value.numpy()
        assert np.array_equal(np.float32(block.spec.score_bias), bias) and np.abs(bias).min() > 0
        w = block.weights
        assert (w.gate_up_layout, w.down_layout, w.gate_first, w.interleaved, w.up) == ("in_out", "in_out", True, False, None)
        assert model.graph.initializers[w.gate_up].shape == (8, 32, 96)
        assert model.graph.initializers[w.down].shape == (8, 48, 32)
        with_bias = route(logits, 2, RouterForm.SIGMOID_GROUPED, True, grouping=block.spec.grouping)
        without = route(logits, 2, RouterForm.SIGMOID_GROUPED, True, grouping=GroupedRouting(4, 2, 2.5, None))
        assert (np.sort(with_bias.ids, axis=1) != np.sort(without.ids, axis=1)).any(axis=1).sum() >= 1


# -- PhiMoE: the sparse mixer router, left as it is ---------------------------------------------------


def test_phimoe_is_reported_and_left_as_it_is(tmp_path):
    """The expert ids come from argmax rounds (a Concat of ArgMax), sorted by expert as grouped_mm's:
    each layer is reported with the reason, and the model builds unchanged."""
    source = _export("phimoe", dynamic=True)
    names = ["model.layers.0.mlp.router", "model.layers.1.mlp.router"]  # named after the router's scope
    r = lynx("inspect", source, "--json")
    assert r.returncode == 0, r.stderr
    shown = json.loads(r.stdout)
    assert [(c["name"], c["supported"], c["reason"], c["num_experts"]) for c in shown] == [(n, False, SPARSE_MIXER, None) for n in names]

    out = tmp_path / "engine"
    r, _, _ = run_build(source, out, "--policy", "off", *SHAPES)
    check_left_as_it_is(r, out, source, names, SPARSE_MIXER)


# -- ort_fusions="cuda": com.microsoft.MoE nodes, written on a CPU machine ------------------------------

# transformers.exporters.onnxruntime_fusions is a graph pass (no device check): on a CPU machine
# OnnxConfig(ort_fusions="cuda") exports the experts as batched_mm and fuses each block into
# com.microsoft.MoE (activation_type "silu", gate in fc1, up in fc3), beside CUDA attention and
# norm fusions. onnxscript's RMSNorm fusion writes one SimplifiedLayerNormalization in the default
# domain (ONNX Runtime's spelling of that contrib op); lynx_export/compiler/model_io.py lets the ONNX
# checker skip exactly that op.


@pytest.fixture(scope="module")
def mixtral_cuda_fused() -> pathlib.Path:
    return _export("mixtral", dynamic=True, ort_fusions="cuda")


def test_cuda_fusions_export_moe_nodes(mixtral_cuda_fused):
    model = load_model(mixtral_cuda_fused)
    moe = [n for n in model.graph if n.op_type == "MoE"]
    assert len(moe) == 2 and all(n.domain == "com.microsoft" for n in moe)
    for node in moe:
        assert {k: a.value for k, a in node.attributes.items()} == {"k": 2, "normalize_routing_weights": 1, "activation_type": "silu"}
        fc1, fc2, fc3 = (node.inputs[i] for i in (2, 4, 6))
        assert [fc1.shape, fc2.shape, fc3.shape] == [(8, 48, 32), (8, 32, 48), (8, 48, 32)]
    assert [n.domain for n in model.graph if n.op_type == "SimplifiedLayerNormalization"] == [""]
    result = detect(model)
    # The fused nodes carry no module scope: blocks are named by position.
    assert [(c.name, c.supported, c.reason) for c in result.candidates] == [("moe_0", True, ""), ("moe_1", True, "")]
    for block in result.blocks:
        assert block.form == "ort_moe"
        assert block.spec == MoESpec(8, 2, 32, 48, "swiglu", RouterForm.SOFTMAX_TOPK, True)
        assert block.weights.up is not None  # fc3


@pytest.mark.parametrize("experts", ["fused", "per-expert"])
def test_cuda_fusions_build_verifies(mixtral_cuda_fused, tmp_path, experts):
    """The fused export (its SimplifiedLayerNormalization sits in the default domain, where ONNX
    Runtime registers it) builds and verifies with the policy off: the reference runs its fc3
    nodes converted for ONNX Runtime's CPU kernel, and the per-expert lowering checks it without
    that kernel."""
    manifest, report = _build(mixtral_cuda_fused, tmp_path / "engine", "off", "--ort-experts", experts)
    assert manifest["rewrite"] == {"blocks": 2, "counts": {"ort_moe": 2}} and manifest["unsupported"] == []
    check_report(report, "off")

@pytest.mark.parametrize("family,form", [("qwen3_moe", "ort_moe"), ("olmoe", "ort_moe"), ("qwen2_moe", "ort_moe"), ("granitemoe", "ort_moe"),
                                         ("deepseek_v3", "batched_mm")])
def test_cuda_fusions_of_other_families(tmp_path, family, form):
    """The exporter's com.microsoft.MoE fusion covers softmax->top-k and top-k->softmax routers:
    those families become MoE nodes, DeepSeek-V3's sigmoid grouped router stays batched_mm; both
    build and verify."""
    source = _export(family, dynamic=True, ort_fusions="cuda")
    found = detect(load_model(source))
    forms = {b.form for b in found.blocks}
    assert found.blocks and not [c for c in found.candidates if not c.supported], found.candidates
    _, report = _build(source, tmp_path / "engine", "off")
    check_report(report, "off")
    assert forms == {form}
