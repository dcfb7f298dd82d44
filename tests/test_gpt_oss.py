"""gpt-oss exported by transformers' own ONNX exporter (`grouped_mm` experts unrolled per expert):
interleaved gate/up columns, expert biases gathered at the sorted expert ids, a router bias, top-k
then softmax, and the clamped SwiGLU (alpha 1.702, beta 1, limit 7).

The dynamo export through `batched_mm` experts is in tests/test_families.py; the fused
com.microsoft.MoE node with gpt-oss's attributes in tests/test_form_ort_moe.py.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import onnx
import pytest

from lynx_export.compiler.detect import detect
from lynx_export.compiler.model_io import load_model
from lynx_export.routing import RouterForm
from lynx_export.op.spec import MoESpec

pytest.importorskip("transformers.exporters")

from tests.transformers_exporter import _COMMON, Family, cached_export  # noqa: E402
from tests.transformers_models import gpt_oss_clamp_weights  # noqa: E402
from tests.cli_builds import lynx  # noqa: E402

BLOCKS = ["model.layers.0.mlp", "model.layers.1.mlp"]
# E=8, K=2, H=32, I=48; random expert biases and gate/up weights large enough that the clamp matters.
GPT_OSS = Family(
    "gpt_oss", "GptOssConfig", "GptOssForCausalLM",
    dict(_COMMON, head_dim=8, intermediate_size=48, num_local_experts=8, num_experts_per_tok=2, sliding_window=16,
         rope_parameters={"rope_type": "default", "rope_theta": 150000.0}),
    prepare=gpt_oss_clamp_weights,
)


@pytest.fixture(scope="module")
def gpt_oss() -> pathlib.Path:
    return cached_export(GPT_OSS, dynamic=True)


def test_blocks_are_found_with_their_spec(gpt_oss):
    model = load_model(gpt_oss)
    result = detect(model)
    assert [(c.name, c.supported, c.reason) for c in result.candidates] == [(n, True, "") for n in BLOCKS]
    biases = set()
    for block in result.blocks:
        assert block.form == "grouped_mm"
        assert block.spec == MoESpec(
            num_experts=8, top_k=2, hidden_size=32, expert_size=48, activation="swiglu", router=RouterForm.TOPK_SOFTMAX,
            normalize=True, activation_alpha=1.702, activation_beta=1.0, swiglu_limit=7.0,
        )
        w = block.weights
        assert (w.gate_up_layout, w.down_layout, w.gate_first, w.interleaved, w.up) == ("in_out", "in_out", True, True, None)
        shapes = {name: model.graph.initializers[name].shape for name in (w.gate_up, w.down, w.gate_up_bias, w.down_bias)}
        assert [shapes[n] for n in (w.gate_up, w.down, w.gate_up_bias, w.down_bias)] == [(8, 32, 96), (8, 48, 32), (8, 96), (8, 32)]
        biases.update((w.gate_up_bias, w.down_bias))
    assert len(biases) == 4  # random per layer (zero biases would be deduplicated into one initializer)


def test_the_clamp_matters(gpt_oss):
    """Without its Clip nodes' bounds the model's logits move far beyond the verification's tolerance."""
    import onnxruntime as ort

    proto = onnx.load(gpt_oss)
    ids = np.random.default_rng(0).integers(0, 128, (3, 5), dtype=np.int64)

    def logits(model: onnx.ModelProto) -> np.ndarray:
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run([session.get_outputs()[0].name], {"input_ids": ids})[0]

    before = logits(proto)
    # The activation's clamps have float bounds (the histogram of expert ids clamps int64 ids).
    floats = {t.name for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and not t.dims}
    clips = [n for n in proto.graph.node if n.op_type == "Clip" and n.input[2] in floats]
    assert len(clips) == 2 * len(BLOCKS)  # gate and up, per layer
    for clip in clips:
        del clip.input[1:]  # Clip(x) with no bounds is the identity
    assert np.abs(logits(proto) - before).max() > 100 * 1e-4


@pytest.mark.parametrize("policy", ["off", "lynx"])
def test_builds_and_verifies(gpt_oss, tmp_path, policy):
    out = tmp_path / "engine"
    r = lynx("build", gpt_oss, "-o", out, "--policy", policy, "--batch-sizes", "1,3,8", "--seq-lens", "1,5")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    report = json.loads((out / "report.json").read_text())
    assert [b["name"] for b in manifest["blocks"]] == BLOCKS and manifest["unsupported"] == []
    assert manifest["rewrite"] == {"blocks": 2, "counts": {"grouped_mm": 2}}
    assert report["passed"] and report["phase_gated"] and report["tolerance"] == 1e-4
    assert sorted((c["batch"], c["seq_len"]) for c in report["cases"]) == [(b, s) for b in (1, 3, 8) for s in (1, 5)]
    for case in report["cases"]:
        assert case["must_match"] == (policy == "off" or case["phase"] == "prefill")
        if case["must_match"]:
            assert case["max_abs_diff"] <= 1e-4 and case["routing_agreement"] == 1.0
    nodes = [n for n in onnx.load(out / "model.lynx.onnx").graph.node if n.op_type == "LynxMoE"]
    assert len(nodes) == 2
    for node in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["activation_alpha"] == pytest.approx(1.702) and attrs["activation_beta"] == 1.0 and attrs["swiglu_limit"] == 7.0


# -- the activation matcher on hand-built graphs ----------------------------------------------------

# Each case: the activation's nodes over gu [T,2I] (halves "g0"/"u0" by Slice when interleaved,
# by Split otherwise), ending in "act"; then what match_gated_activation finds.
_GPT_OSS_NODES = [
    ("Clip", ["g0", "", "limit"], ["g"]),
    ("Clip", ["u0", "neg_limit", "limit"], ["u"]),
    ("Mul", ["g", "alpha"], ["ga"]),
    ("Sigmoid", ["ga"], ["s"]),
    ("Mul", ["g", "s"], ["glu"]),
    ("Add", ["u", "one"], ["u1"]),
    ("Mul", ["u1", "glu"], ["act"]),
]


def _activation_model(nodes: list[tuple], interleaved: bool = True, gate_first: bool = True, dtype=np.float32,
                      constants: dict | None = None):
    import onnx_ir as ir
    from onnx import helper, numpy_helper

    values = {"limit": 7.0, "neg_limit": -7.0, "alpha": 1.702, "one": 1.0, "five": 5.0, "neg_five": -5.0, **(constants or {})}
    inits = [numpy_helper.from_array(np.array(v, dtype=dtype), k) for k, v in values.items()]
    halves = ("g0", "u0") if gate_first else ("u0", "g0")
    if interleaved:
        for name, v in (("zero", [0]), ("first", [1]), ("end", [2**62]), ("axis", [-1]), ("two", [2])):
            inits.append(numpy_helper.from_array(np.array(v, dtype=np.int64), name))
        head = [helper.make_node("Slice", ["gu", "zero", "end", "axis", "two"], [halves[0]]),
                helper.make_node("Slice", ["gu", "first", "end", "axis", "two"], [halves[1]])]
    else:
        head = [helper.make_node("Split", ["gu"], list(halves), axis=-1, num_outputs=2)]
    body = [helper.make_node(op, ins, outs) for op, ins, outs in nodes]
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    graph = helper.make_graph(head + body, "act", [helper.make_tensor_value_info("gu", elem, ["T", 8])],
                              [helper.make_tensor_value_info("act", elem, ["T", 4])], inits)
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    return next(v for v in model.graph.inputs if v.name == "gu")


def _with(replace: dict[str, tuple]) -> list[tuple]:
    """`_GPT_OSS_NODES` with nodes (by output name) replaced (None: dropped)."""
    out = []
    for op, ins, outs in _GPT_OSS_NODES:
        node = replace.get(outs[0], (op, ins, outs))
        if node is not None:
            out.append(node)
    return out


@pytest.mark.parametrize(
    "nodes,kwargs,expect",
    [
        (_GPT_OSS_NODES, {}, (True, True, 1.702, 1.0, 7.0)),
        (_GPT_OSS_NODES, {"interleaved": False}, (True, False, 1.702, 1.0, 7.0)),
        (_GPT_OSS_NODES, {"gate_first": False}, (False, True, 1.702, 1.0, 7.0)),
        (_GPT_OSS_NODES, {"dtype": np.float16}, (True, True, 1.702, 1.0, 7.0)),
        # Operands the other way round; Min/Max for the clamps.
        ([("Min", ["limit", "g0"], ["g"]), ("Max", ["u0", "neg_limit"], ["um"]), ("Min", ["um", "limit"], ["u"]),
          ("Mul", ["alpha", "g"], ["ga"]), ("Sigmoid", ["ga"], ["s"]), ("Mul", ["s", "g"], ["glu"]),
          ("Add", ["one", "u"], ["u1"]), ("Mul", ["glu", "u1"], ["act"])], {}, (True, True, 1.702, 1.0, 7.0)),
        # No clamp, no alpha, no beta: plain SwiGLU.
        ([("Sigmoid", ["g0"], ["s"]), ("Mul", ["g0", "s"], ["glu"]), ("Mul", ["glu", "u0"], ["act"])], {}, (True, True, 1.0, 0.0, None)),
    ],
)
def test_activation_parameters(nodes, kwargs, expect):
    from lynx_export.compiler.forms.match import match_gated_activation

    act = match_gated_activation(_activation_model(nodes, **kwargs))
    assert act.output.name == "act"
    assert (act.gate_first, act.interleaved, act.alpha, act.beta, act.limit) == expect


@pytest.mark.parametrize(
    "replace,reason",
    [
        ({"g": ("Clip", ["g0", "neg_limit", "limit"], ["g"])}, "gate clamped to [-7, 7], up to [-7, 7]: the gate is clamped from below"),
        ({"u": None, "u1": ("Add", ["u0", "one"], ["u1"])},
         "gate clamped to [-inf, 7], up to [-inf, inf]: gate and up are not both clamped"),
        ({"g": None, "ga": ("Mul", ["g0", "alpha"], ["ga"]), "glu": ("Mul", ["g0", "s"], ["glu"])},
         "gate clamped to [-inf, inf], up to [-7, 7]: gate and up are not both clamped"),
        ({"u": ("Clip", ["u0", "neg_five", "limit"], ["u"])}, "up to [-5, 7]: up is not clamped symmetrically"),
        ({"u": ("Clip", ["u0", "neg_five", "five"], ["u"])},
         "gate clamped to [-inf, 7], up to [-5, 5]: gate and up are clamped to different"),
        ({"u": ("Clip", ["u0", "neg_limit", "gu_max"], ["u"])}, "clamped SwiGLU: a Clip's bounds are not constant scalars"),
        # up's clamp computed but the product reads up unclamped
        ({"u1": ("Add", ["u0", "one"], ["u1"])},
         "gate clamped to [-inf, 7], up to [-inf, inf]: gate and up are not both clamped"),
        # the gate's sigmoid reads something else
        ({"s": ("Sigmoid", ["u"], ["s"])}, "expert activation is not SwiGLU"),
    ],
)
def test_other_clamps_are_refused_with_their_reason(replace, reason):
    from lynx_export.compiler.blocks import NoMatch
    from lynx_export.compiler.forms.match import match_gated_activation

    nodes = _with(replace)
    if any("gu_max" in ins for _, ins, _ in nodes):
        nodes = [("ReduceMax", ["gu"], ["gu_max"])] + nodes
    with pytest.raises(NoMatch) as info:
        match_gated_activation(_activation_model(nodes))
    assert reason in str(info.value)
