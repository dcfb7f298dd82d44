"""ONNX Runtime's fused MoE operator already in the graph (`com.microsoft.MoE`, form `ort_moe`)."""

from __future__ import annotations

import copy
import json
import pathlib

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from lynx_export.compiler.detect import detect
from lynx_export.compiler import ort_moe_node
from lynx_export.compiler.forms import ort_moe
from lynx_export.compiler.model_io import load_model
from lynx_export.op import reference as op_reference
from lynx_export.routing import RouterForm
from lynx_export.op.spec import MoESpec
from tests.cli_builds import lynx

E, K, H, I = 8, 2, 16, 12


class Experts:
    """Random expert weights of one layer, and their numpy reference: softmax -> top-k in float64,
    then the experts and the combine by the op's reference (`activation`: SwiGLU alpha, beta, limit)."""

    def __init__(self, rng: np.random.Generator, bias: bool, gate_up_scale: float = 0.3, down_scale: float = 0.3,
                 activation: dict | None = None) -> None:
        def r(*shape: int, scale: float) -> np.ndarray:
            return (scale * rng.standard_normal(shape)).astype(np.float32)

        self.activation = activation or {}
        self.router = r(H, E, scale=1.0)
        self.gate, self.up = r(E, I, H, scale=gate_up_scale), r(E, I, H, scale=gate_up_scale)
        self.down = r(E, H, I, scale=down_scale)
        self.gate_b = r(E, I, scale=0.1) if bias else None
        self.up_b = r(E, I, scale=0.1) if bias else None
        self.down_b = r(E, H, scale=0.1) if bias else None

    def reference(self, x: np.ndarray, logits: np.ndarray, k: int = K, normalize: bool = True) -> np.ndarray:
        x64, logits = x.astype(np.float64), logits.astype(np.float64)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        ids = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
        w = np.take_along_axis(probs, ids, axis=-1)
        if normalize:
            w = w / w.sum(-1, keepdims=True)
        spec = MoESpec(num_experts=E, top_k=k, hidden_size=H, expert_size=I, activation="swiglu", router=RouterForm.SOFTMAX_TOPK,
                       normalize=normalize, activation_alpha=self.activation.get("alpha", 1.0),
                       activation_beta=self.activation.get("beta", 0.0), swiglu_limit=self.activation.get("limit"))
        zeros = np.zeros((E, I))  # a layer may drop the gate's or the up's bias alone
        halves = [zeros if b is None else b for b in (self.gate_b, self.up_b)]
        fc1_bias = None if self.gate_b is None and self.up_b is None else _interleave(*halves)
        return op_reference.combine(x64, ids, w, _interleave(self.gate, self.up), self.down, spec, fc1_bias=fc1_bias, fc2_bias=self.down_b)


def _interleave(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.stack((a, b), axis=2).reshape(a.shape[0], 2 * a.shape[1], *a.shape[2:])


def moe_inputs(x: Experts, layout: str, prefix: str) -> tuple[list[str], list[onnx.TensorProto], dict]:
    """MoE node inputs (from fc1 on), their initializers and attributes for one expert layout."""
    if layout == "interleaved":
        fc1, fc1_b, fc3, fc3_b = _interleave(x.gate, x.up), None if x.gate_b is None else _interleave(x.gate_b, x.up_b), None, None
        attrs = {"activation_type": "swiglu", "swiglu_fusion": 1}
    elif layout == "concatenated":
        fc1 = np.concatenate([x.gate, x.up], axis=1)
        fc1_b = None if x.gate_b is None else np.concatenate([x.gate_b, x.up_b], axis=1)
        fc3, fc3_b = None, None
        attrs = {"activation_type": "swiglu", "swiglu_fusion": 2}
    elif layout == "plain":  # one projection, a non-gated activation (set by the caller)
        fc1, fc1_b, fc3, fc3_b = x.gate, x.gate_b, None, None
        attrs = {"activation_type": "relu"}
    elif layout in ("fc3", "fc3_swiglu"):
        fc1, fc1_b, fc3, fc3_b = x.gate, x.gate_b, x.up, x.up_b
        attrs = {"activation_type": "silu"} if layout == "fc3" else {"activation_type": "swiglu", "swiglu_fusion": 0}
    else:
        raise ValueError(layout)
    arrays = [fc1, fc1_b, x.down, x.down_b, fc3, fc3_b]
    names = [f"{prefix}.{n}" for n in ("fc1", "fc1_bias", "fc2", "fc2_bias", "fc3", "fc3_bias")]
    inputs = [n if a is not None else "" for n, a in zip(names, arrays)]
    while inputs and inputs[-1] == "":
        inputs.pop()
    inits = [numpy_helper.from_array(np.ascontiguousarray(a), n) for n, a in zip(names, arrays) if a is not None]
    return inputs, inits, attrs


def make_model(
    path: pathlib.Path,
    layouts: tuple[str, ...] = ("interleaved",),
    *,
    bias: bool = True,
    input_3d: bool = False,
    normalize: int = 1,
    attrs: dict | list[dict | None] | None = None,
    seed: int = 0,
    gate_up_scale: float = 0.3,
    down_scale: float = 0.3,
) -> tuple[pathlib.Path, list[Experts]]:
    """x [B,S,H] -> per layer: h = Reshape(x, [-1,H]); logits = MatMul(h, Wr); y = MoE(h, or x when
    `input_3d`, logits, ...);
    x = x + Reshape(y, Shape(x)). `attrs` overrides MoE attributes: one dict per layer, or one dict
    for the last layer; SwiGLU's activation_alpha, activation_beta and swiglu_limit among them go
    into the numpy reference too. `gate_up_scale`, `down_scale`: the weights' standard deviations."""
    per_layer = attrs if isinstance(attrs, list) else [None] * (len(layouts) - 1) + [attrs]
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits = [numpy_helper.from_array(np.array([-1, H], dtype=np.int64), "flat_shape")]
    experts = []
    current = "x"
    for n, layout in enumerate(layouts):
        p = f"layers.{n}"
        layer_attrs = per_layer[n] or {}
        activation = {"alpha": layer_attrs.get("activation_alpha", 1.0), "beta": layer_attrs.get("activation_beta", 0.0),
                      "limit": layer_attrs.get("swiglu_limit")}
        ex = Experts(rng, bias, gate_up_scale, down_scale, activation)
        experts.append(ex)
        inits.append(numpy_helper.from_array(ex.router, f"{p}.router"))
        nodes += [
            helper.make_node("Reshape", [current, "flat_shape"], [f"{p}.h"]),
            helper.make_node("MatMul", [f"{p}.h", f"{p}.router"], [f"{p}.logits"]),
            helper.make_node("Shape", [current], [f"{p}.shape"]),
        ]
        inputs, layer_inits, moe_attrs = moe_inputs(ex, layout, p)
        inits += layer_inits
        moe_attrs = {"k": K, "normalize_routing_weights": normalize, **moe_attrs}
        moe_attrs.update(per_layer[n] or {})
        moe_in = current if input_3d else f"{p}.h"
        nodes.append(helper.make_node("MoE", [moe_in, f"{p}.logits", *inputs], [f"{p}.moe"], f"{p}.moe", domain="com.microsoft", **moe_attrs))
        if input_3d:
            nodes.append(helper.make_node("Add", [current, f"{p}.moe"], [f"{p}.out"]))
        else:
            nodes += [
                helper.make_node("Reshape", [f"{p}.moe", f"{p}.shape"], [f"{p}.moe3"]),
                helper.make_node("Add", [current, f"{p}.moe3"], [f"{p}.out"]),
            ]
        current = f"{p}.out"
    nodes.append(helper.make_node("Identity", [current], ["y"]))
    graph = helper.make_graph(
        nodes, "ort_moe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", H])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", H])],
        inits,
        # As exporters record them: each layer's [B,S,H] output (the next layer's input).
        value_info=[helper.make_tensor_value_info(f"layers.{n}.out", TensorProto.FLOAT, ["batch", "seq", H]) for n in range(len(layouts))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    onnx.save(model, path)
    return path, experts


def reference(experts: list[Experts], x: np.ndarray, **kw) -> np.ndarray:
    """The numpy reference of a `make_model` model on x [B,S,H]."""
    cur = x.reshape(-1, H).astype(np.float64)
    for ex in experts:
        logits = cur.astype(np.float32) @ ex.router
        cur = cur + ex.reference(cur.astype(np.float32), logits, **kw)
    return cur.reshape(x.shape)


def run_ort(model: onnx.ModelProto | pathlib.Path, x: np.ndarray) -> np.ndarray:
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return session.run(["y"], {"x": x})[0]


def _x(batch: int, seq: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, seq, H)).astype(np.float32)


def _moe_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == "MoE" and n.domain == "com.microsoft"]


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def build(model: pathlib.Path, out: pathlib.Path, policy: str, *extra: object) -> tuple[dict, dict]:
    r = lynx("build", model, "-o", out, "--policy", policy, *extra)
    assert r.returncode == 0, r.stderr
    return json.loads((out / "manifest.json").read_text()), json.loads((out / "report.json").read_text())


# -- detection ------------------------------------------------------------------------------------

EXPECTED_WEIGHTS = {  # layout -> (interleaved, fc3 given)
    "interleaved": (True, False),
    "concatenated": (False, False),
    "fc3": (False, True),
    "fc3_swiglu": (False, True),
}


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("layout", list(EXPECTED_WEIGHTS))
def test_blocks_are_found_with_their_spec(tmp_path, layout, bias):
    path, _ = make_model(tmp_path / "m.onnx", (layout, layout), bias=bias, normalize=0)
    result = detect(load_model(path))
    assert [c.name for c in result.candidates] == ["moe_0", "moe_1"]
    assert all(c.supported and c.reason == "" for c in result.candidates)
    interleaved, has_fc3 = EXPECTED_WEIGHTS[layout]
    for n, block in enumerate(result.blocks):
        p = f"layers.{n}"
        assert block.form == "ort_moe"
        assert block.spec == MoESpec(
            num_experts=E, top_k=K, hidden_size=H, expert_size=I, activation="swiglu", router=RouterForm.SOFTMAX_TOPK, normalize=False
        )
        w = block.weights
        assert (w.gate_up, w.down, w.gate_up_layout, w.down_layout, w.gate_first) == (f"{p}.fc1", f"{p}.fc2", "out_in", "out_in", True)
        assert w.interleaved is interleaved
        assert w.up == (f"{p}.fc3" if has_fc3 else None)
        assert w.gate_up_bias == (f"{p}.fc1_bias" if bias else None)
        assert w.up_bias == (f"{p}.fc3_bias" if bias and has_fc3 else None)
        assert w.down_bias == (f"{p}.fc2_bias" if bias else None)
        # The 2-D input is bound as it is; the router stays; the [B,S,H] value gives the phase.
        assert (block.hidden, block.router_logits, block.output) == (f"{p}.h", f"{p}.logits", f"{p}.moe")
        assert block.sequence_source == ("x" if n == 0 else "layers.0.out")


def test_normalize_follows_the_attribute(tmp_path):
    path, _ = make_model(tmp_path / "m.onnx", normalize=1)
    assert detect(load_model(path)).blocks[0].spec.normalize is True


def test_3d_input_is_bound_through_flattened_views(tmp_path):
    """A [B,S,H] input: the node is given Reshape views; the model computes the same."""
    path, experts = make_model(tmp_path / "m.onnx", ("interleaved", "fc3"), input_3d=True)
    model = load_model(path)
    blocks = detect(model).blocks
    assert len(blocks) == 2
    values = {v.name: v for node in model.graph for v in node.outputs}
    for n, block in enumerate(blocks):
        hidden, output = values[block.hidden], values[block.output]
        assert hidden.producer().op_type == "Reshape" and hidden.producer().inputs[0].name == ("x" if n == 0 else "layers.0.out")
        assert output.producer().op_type == "MoE" and list(output.shape)[-1] == H and len(output.shape) == 2
        assert block.sequence_source == ("x" if n == 0 else "layers.0.out")
        # The old output name is the [B,S,H] view of the new [T,H] output.
        view = values[f"layers.{n}.moe"]
        assert view.producer().op_type == "Reshape" and view.producer().inputs[0] is output
    # Matching again finds the same blocks and changes nothing more.
    count = len(list(model.graph))
    assert detect(model).blocks == blocks and len(list(model.graph)) == count
    # The rewired model still computes the original; graph outputs keep their names.
    assert [v.name for v in model.graph.outputs] == ["y"]
    ort_moe_node.to_cpu_form(model)  # the fc3 layer, to run on CPU
    x = _x(2, 3)
    np.testing.assert_allclose(run_ort(ir.serde.serialize_model(model), x), reference(experts, x), atol=1e-4)


# -- unsupported nodes ----------------------------------------------------------------------------

GPT_OSS = {"activation_alpha": 1.702, "activation_beta": 1.0, "swiglu_limit": 7.0}
# Layers (layout, attribute overrides) of one model: a supported layer, then one per refusal.
UNSUPPORTED = [
    ("interleaved", None, ""),
    ("plain", {"activation_type": "relu"}, "activation 'relu' is not gated"),
    ("plain", {"activation_type": "gelu"}, "activation 'gelu' is not gated"),
    ("plain", {"activation_type": "silu"}, "activation 'silu' is not gated"),
    ("interleaved", {"use_sparse_mixer": 1}, "sparse mixer (PhiMoE) routing: ONNX Runtime's CPU kernel ignores it"),
    ("interleaved", None, "fc1 (gate/up) weights 'layers.5.fc1' is not a constant initializer"),
]


def _weight_through_identity(path: pathlib.Path, name: str) -> None:
    """Make `name` a computed value: Identity of an initializer renamed `<name>.raw`."""
    model = onnx.load(path)
    init = next(t for t in model.graph.initializer if t.name == name)
    init.name = f"{name}.raw"
    model.graph.node.insert(0, helper.make_node("Identity", [init.name], [name]))
    onnx.save(model, path)


@pytest.fixture(scope="module")
def unsupported_onnx(tmp_path_factory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("unsupported") / "model.onnx"
    make_model(path, tuple(layout for layout, _, _ in UNSUPPORTED), attrs=[a for _, a, _ in UNSUPPORTED], bias=False)
    _weight_through_identity(path, f"layers.{len(UNSUPPORTED) - 1}.fc1")
    return path


@pytest.mark.parametrize("fusion", [None, 1])
def test_geglu_experts_are_refused_with_the_true_reason(tmp_path, fusion):
    """Gemma's MoE as onnxruntime-genai's builder writes it (activation_type geglu): gated, by gelu.
    (ONNX Runtime's CPU kernel cannot even load such a node, so a model holding one cannot be
    verified on CPU: detection alone names it.)"""
    path = tmp_path / "model.onnx"
    make_model(path, ("plain",), attrs=[{"activation_type": "geglu", **({} if fusion is None else {"swiglu_fusion": fusion})}], bias=False)
    [candidate] = detect(load_model(path)).candidates
    assert not candidate.supported
    assert candidate.reason == ("activation 'geglu' is gated by another function (gelu(gate) * up): LynxMoE experts are SwiGLU (silu(gate) * up) "
                                "only, and ONNX Runtime's CPU MoE kernel does not run it either")


def test_unsupported_nodes_give_one_line_reasons(unsupported_onnx):
    r = lynx("inspect", unsupported_onnx, "--json")
    assert r.returncode == 0, r.stderr
    candidates = json.loads(r.stdout)
    assert len(candidates) == len(UNSUPPORTED)
    for c, (_, _, reason) in zip(candidates, UNSUPPORTED):
        assert c["supported"] is (reason == "")
        assert reason in c["reason"] and "\n" not in c["reason"]
        if not reason:
            assert (c["num_experts"], c["top_k"], c["hidden_size"], c["expert_size"]) == (E, K, H, I)


def test_unsupported_nodes_are_left_in_place(unsupported_onnx, tmp_path):
    # The fused kernel is the original's own: the five layers left as they are route on the
    # rewritten layer's output, and the per-expert lowering's fp32 sums (4e-5 off here) can flip
    # a near-tied expert choice in them (6e-3 at batch 4, seq 3). Per-expert numerics are tested
    # against the reference in test_ort_lowering.py and the form tests above.
    manifest, report = build(unsupported_onnx, tmp_path / "out", "off", "--batch-sizes", "1,4", "--seq-lens", "1,3", "--ort-experts", "fused")
    assert report["passed"]
    assert manifest["rewrite"]["counts"] == {"ort_moe": 1}
    assert len(manifest["unsupported"]) == len(UNSUPPORTED) - 1
    canonical = onnx.load(tmp_path / "out" / "model.lynx.onnx")
    assert [n.op_type for n in canonical.graph.node].count("LynxMoE") == 1
    left = _moe_nodes(canonical)
    assert [n.name for n in left] == [f"layers.{n}.moe" for n in range(1, len(UNSUPPORTED))]
    # Left exactly as they were (inputs and attributes).
    original = {n.name: n for n in _moe_nodes(onnx.load(unsupported_onnx))}
    for node in left:
        assert list(node.input) == list(original[node.name].input) and _attrs(node) == _attrs(original[node.name])


@pytest.mark.parametrize(
    "layout,attrs,reason",
    [
        ("fc3", {"activation_type": "gelu"}, "gated 'gelu' experts (fc3 given)"),
        ("fc3", {"activation_type": "swiglu", "swiglu_fusion": 1}, "gate/up layout is ambiguous"),
        # ONNX Runtime's CPU kernel refuses both (the second aborts the process), so they are
        # detection-only here, not in the model `unsupported_onnx` builds.
        ("interleaved", {**GPT_OSS, "swiglu_limit_after_activation": 1},
         "swiglu_limit_after_activation=1 (the activated gate clamped"),
        ("interleaved", {"swiglu_limit": -1.0}, "swiglu_limit=-1: only a positive limit (or none) is supported"),
        ("interleaved", {"swiglu_limit": 0.0}, "swiglu_limit=0: only a positive limit (or none) is supported"),
        ("interleaved", {"swiglu_fusion": 0}, "swiglu_fusion=0 but no fc3"),
        ("interleaved", {"swiglu_fusion": 3}, "unknown swiglu_fusion 3"),
        ("interleaved", {"k": 9}, "top-k 9 is outside 1..8"),
    ],
)
def test_other_refusals(tmp_path, layout, attrs, reason):
    path, _ = make_model(tmp_path / "m.onnx", (layout,), attrs=attrs)
    model = load_model(path)
    before = len(list(model.graph))
    (candidate,) = detect(model).candidates
    assert not candidate.supported and reason in candidate.reason
    assert len(list(model.graph)) == before  # a refused node is not touched


def test_fc3_form_with_one_bias_is_refused(tmp_path):
    path = tmp_path / "m.onnx"
    make_model(path, ("fc3",))
    model = onnx.load(path)
    node = _moe_nodes(model)[0]
    node.input[7] = ""  # fc3 bias dropped, fc1 bias kept
    onnx.save(model, path)
    (candidate,) = detect(load_model(path)).candidates
    assert "only one of fc1_bias / fc3_bias" in candidate.reason


def test_swiglu_limit_infinity_is_no_clamp(tmp_path):
    path, _ = make_model(tmp_path / "m.onnx", attrs={"swiglu_limit": float("inf")})
    (candidate,) = detect(load_model(path)).candidates
    assert candidate.supported and candidate.block.spec.swiglu_limit is None


@pytest.mark.parametrize("layout", ["interleaved", "concatenated", "fc3_swiglu"])
def test_swiglu_parameters_go_into_the_spec(tmp_path, layout):
    """gpt-oss's SwiGLU (alpha 1.702, beta 1, limit 7; float32 attributes) as the spec's decimals."""
    path, _ = make_model(tmp_path / "m.onnx", (layout,), attrs=GPT_OSS)
    (block,) = detect(load_model(path)).blocks
    spec = block.spec
    assert (spec.activation, spec.activation_alpha, spec.activation_beta, spec.swiglu_limit) == ("swiglu", 1.702, 1.0, 7.0)
    assert not spec.plain_swiglu


def test_silu_with_fc3_is_plain_swiglu(tmp_path):
    """activation_type 'silu' with fc3 is silu(fc1 x) * (fc3 x): no SwiGLU parameters (as `to_cpu_form` treats it)."""
    path, _ = make_model(tmp_path / "m.onnx", ("fc3",))
    (block,) = detect(load_model(path)).blocks
    assert block.spec.plain_swiglu


# -- building -------------------------------------------------------------------------------------

BATCHES, SEQS = (1, 3, 16), (1, 5)


@pytest.mark.parametrize(
    "layout,bias,input_3d",
    [
        ("interleaved", True, False),
        ("interleaved", False, False),
        ("concatenated", True, False),
        ("fc3", True, False),
        ("fc3", False, False),
        ("fc3_swiglu", True, False),
        ("interleaved", True, True),
        ("fc3", True, True),
    ],
)
def test_build_policy_off_verifies(tmp_path, layout, bias, input_3d):
    path, experts = make_model(tmp_path / "m.onnx", (layout, layout), bias=bias, input_3d=input_3d)
    out = tmp_path / "out"
    manifest, report = build(path, out, "off", "--batch-sizes", ",".join(map(str, BATCHES)), "--seq-lens", ",".join(map(str, SEQS)))
    assert report["passed"] and report["phase_gated"]
    assert {(c["batch"], c["seq_len"]) for c in report["cases"]} == {(b, s) for b in BATCHES for s in SEQS}
    assert all(c["must_match"] and c["max_abs_diff"] <= 1e-4 for c in report["cases"])
    assert manifest["rewrite"]["counts"] == {"ort_moe": 2} and manifest["unsupported"] == []
    assert [b["form"] for b in manifest["blocks"]] == ["ort_moe", "ort_moe"]
    canonical = onnx.load(out / "model.lynx.onnx")
    assert [n.op_type for n in canonical.graph.node].count("LynxMoE") == 2 and not _moe_nodes(canonical)
    # Against numpy too, not only against ONNX Runtime's own kernel on the original.
    for batch, seq in ((1, 1), (4, 6)):
        x = _x(batch, seq)
        np.testing.assert_allclose(run_ort(out / "model.ort.onnx", x), reference(experts, x), atol=1e-4)


@pytest.mark.parametrize("layout", ["interleaved", "concatenated", "fc3_swiglu"])
def test_gpt_oss_swiglu_builds_with_policy_off(tmp_path, layout):
    """gpt-oss's clamped SwiGLU (alpha 1.702, beta 1, limit 7) with biases, weights large enough
    that the clamp matters (and down weights small enough that outputs stay O(1), where the
    absolute tolerance means what it does elsewhere): the LynxMoE node carries the parameters,
    and the build verifies against ONNX Runtime's kernel on the original and against numpy."""
    path, experts = make_model(tmp_path / "m.onnx", (layout, layout), attrs=[GPT_OSS, GPT_OSS], gate_up_scale=1.5, down_scale=0.02)
    # The clamp matters: many pre-activations leave [-7, 7], and without it numpy differs.
    x = _x(4, 6)
    h = x.reshape(-1, H)
    pre = np.concatenate([np.einsum("eih,th->tei", experts[0].gate, h), np.einsum("eih,th->tei", experts[0].up, h)])
    assert (np.abs(pre) > 7).mean() > 0.1
    unclamped = [copy.copy(ex) for ex in experts]
    for ex in unclamped:
        ex.activation = {**ex.activation, "limit": None}
    assert np.abs(reference(unclamped, x) - reference(experts, x)).max() > 1e-2

    out = tmp_path / "out"
    manifest, report = build(path, out, "off", "--batch-sizes", ",".join(map(str, BATCHES)), "--seq-lens", ",".join(map(str, SEQS)))
    assert report["passed"] and report["phase_gated"] and manifest["rewrite"]["counts"] == {"ort_moe": 2}
    assert all(c["must_match"] and c["max_abs_diff"] <= 1e-4 for c in report["cases"])
    lynx = [n for n in onnx.load(out / "model.lynx.onnx").graph.node if n.op_type == "LynxMoE"]
    assert len(lynx) == 2
    for node in lynx:
        attrs = _attrs(node)
        assert attrs["activation_alpha"] == pytest.approx(1.702) and attrs["activation_beta"] == 1.0 and attrs["swiglu_limit"] == 7.0
    for batch, seq in ((1, 1), (4, 6)):
        x = _x(batch, seq)
        np.testing.assert_allclose(run_ort(out / "model.ort.onnx", x), reference(experts, x), atol=1e-4)


@pytest.mark.parametrize("layout,input_3d", [("interleaved", False), ("fc3", True)])
def test_build_policy_lynx(tmp_path, layout, input_3d):
    path, _ = make_model(tmp_path / "m.onnx", (layout, layout), input_3d=input_3d)
    manifest, report = build(path, tmp_path / "out", "lynx", "--batch-sizes", "1,8,32", "--seq-lens", "1,6")
    assert report["passed"] and report["phase_gated"] and manifest["policy"]["name"] == "lynx"
    prefill = [c for c in report["cases"] if c["phase"] == "prefill"]
    assert prefill and all(c["must_match"] and c["max_abs_diff"] <= 1e-4 for c in prefill)
    decode = [c for c in report["cases"] if c["phase"] == "decode"]
    assert all(c["mean_active_experts_policy"] <= c["mean_active_experts_model"] for c in decode)


# -- the CPU-runnable reference ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "layout,bias",
    [(layout, bias) for layout in ("concatenated", "fc3", "fc3_swiglu") for bias in ("both", "none")]
    + [(layout, bias) for layout in ("fc3", "fc3_swiglu") for bias in ("gate_only", "up_only")],
)
def test_cpu_form_matches_numpy(tmp_path, layout, bias):
    """Nodes ONNX Runtime's CPU kernel refuses become interleaved SwiGLU computing the same
    (a missing fc1 or fc3 bias next to a given one counts as zeros)."""
    path, experts = make_model(tmp_path / "m.onnx", (layout, layout), bias=bias != "none")
    if bias in ("gate_only", "up_only"):
        proto = onnx.load(path)
        slot = 7 if bias == "gate_only" else 3
        for node, ex in zip(_moe_nodes(proto), experts):
            node.input[slot] = ""
            if bias == "gate_only":
                ex.up_b = None
            else:
                ex.gate_b = None
        onnx.save(proto, path)
    x = _x(3, 4)
    with pytest.raises(Exception, match="FC3 is not implemented|swiglu_fusion=1"):
        run_ort(path, x)

    model = ir.load(path)
    assert ort_moe_node.to_cpu_form(model)
    proto = ir.serde.serialize_model(model)
    for node in _moe_nodes(proto):
        attrs = _attrs(node)
        assert attrs["activation_type"] == b"swiglu" and attrs["swiglu_fusion"] == 1
        assert len(node.input) <= 6  # no fc3
    names = {t.name for t in proto.graph.initializer}
    assert not any(n.endswith(".fc3") or n.endswith(".fc1") for n in names)  # replaced weights are gone
    np.testing.assert_allclose(run_ort(proto, x), reference(experts, x), atol=1e-4)


def test_cpu_form_keeps_runnable_nodes(tmp_path):
    path, _ = make_model(tmp_path / "m.onnx", ("interleaved",))
    model = ir.load(path)
    assert not ort_moe_node.to_cpu_form(model)
    (node,) = [n for n in model.graph if ort_moe.claims(n)]
    assert [v.name for v in node.inputs[2:]] == ["layers.0.fc1", "layers.0.fc1_bias", "layers.0.fc2", "layers.0.fc2_bias"]
