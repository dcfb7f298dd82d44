"""The ONNX Runtime lowering of a single LynxMoE node against the numpy routing oracle and the op's
numpy reference (lynx_export/op/reference.py)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from lynx_export.op import contract as lynx_op
from lynx_export.op import reference
from lynx_export.compiler.lowering.ort import lower
from lynx_export.routing import BudgetPolicy, LynxPolicy, OffPolicy, RouterForm, SelectionPolicy
from lynx_export.op.spec import MoESpec

H, I = 16, 24


def _reference_output(spec: MoESpec, policy: SelectionPolicy, hidden: np.ndarray, logits: np.ndarray, fc1: np.ndarray, fc2: np.ndarray,
                      **optional: object) -> np.ndarray:
    """The node's output by the op's numpy reference; `optional`: the node's optional inputs by slot name."""
    inputs = reference.LynxMoEInputs(hidden=hidden, router_logits=logits, fc1=fc1, fc2=fc2, **optional)  # type: ignore[arg-type]
    return reference.lynx_moe(inputs, spec, policy)


def _lynx_model(spec: MoESpec, policy: SelectionPolicy, fc1: np.ndarray, fc2: np.ndarray, *, phase: bool, valid: bool) -> onnx.ModelProto:
    inputs = ["hidden", "logits", "fc1", "", "fc2", "", "seq_len" if phase else "", "num_valid" if valid else ""]
    while inputs[-1] == "":
        inputs.pop()
    node = helper.make_node(lynx_op.OP_TYPE, inputs, ["out"], name="moe", domain=lynx_op.DOMAIN, **lynx_op.to_attributes(spec, policy))
    graph_inputs = [
        helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["T", spec.hidden_size]),
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["T", spec.num_experts]),
    ]
    if phase:
        graph_inputs.append(helper.make_tensor_value_info("seq_len", TensorProto.INT64, []))
    if valid:
        graph_inputs.append(helper.make_tensor_value_info("num_valid", TensorProto.INT64, []))
    graph = helper.make_graph(
        [node],
        "lynx",
        graph_inputs,
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["T", spec.hidden_size])],
        [onnx.numpy_helper.from_array(fc1, "fc1"), onnx.numpy_helper.from_array(fc2, "fc2")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(lynx_op.DOMAIN, 1)])


def _run_lowered(proto: onnx.ModelProto, feeds: dict[str, np.ndarray], experts: str = "fused") -> tuple[np.ndarray, np.ndarray]:
    lowered = lower(ir.from_proto(proto), experts)
    model = lowered.model
    routed = lowered.blocks[0].routed_logits
    value = next((v for n in model.graph for v in n.outputs if v.name == routed), None)
    if value is not None and value not in model.graph.outputs:
        model.graph.outputs.append(value)
    assert not any(n.domain == lynx_op.DOMAIN for n in model.graph)
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    out = session.run(names, feeds)
    return out[0], (out[1] if len(out) > 1 else feeds["logits"])


def _skewed_logits(rng: np.random.Generator, t: int, e: int) -> np.ndarray:
    bias = rng.standard_normal(e).astype(np.float32) * 2.0
    return (bias + rng.standard_normal((t, e)).astype(np.float32)).astype(np.float32)


def _problem(seed: int, tokens: int, form: RouterForm = RouterForm.SOFTMAX_TOPK, normalize: bool = True, e: int = 8, k: int = 2):
    """A random layer: (spec, fc1, fc2, hidden, skewed logits)."""
    rng = np.random.default_rng(seed)
    spec = MoESpec(num_experts=e, top_k=k, hidden_size=H, expert_size=I, activation="swiglu", router=form, normalize=normalize)
    fc1 = (rng.standard_normal((e, 2 * I, H)) * 0.3).astype(np.float32)
    fc2 = (rng.standard_normal((e, H, I)) * 0.3).astype(np.float32)
    hidden = rng.standard_normal((tokens, H)).astype(np.float32)
    return spec, fc1, fc2, hidden, _skewed_logits(rng, tokens, e)


POLICIES = [OffPolicy(), LynxPolicy(alpha=0.7, beta=1), LynxPolicy(alpha=3.0, beta=2), LynxPolicy(alpha=1.0, tie_break="index"), BudgetPolicy(budget=4)]


@pytest.mark.parametrize("experts", ["fused", "per-expert"])
@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: f"{p.name}-{p.params()}")
@pytest.mark.parametrize("tokens", [1, 8, 33])
@pytest.mark.parametrize("form,normalize", [(RouterForm.SOFTMAX_TOPK, True), (RouterForm.SOFTMAX_TOPK, False), (RouterForm.TOPK_SOFTMAX, True)])
def test_lowering_matches_oracle(policy, tokens, form, normalize, experts):
    spec, fc1, fc2, hidden, logits = _problem(tokens, tokens, form, normalize)
    k = spec.top_k
    out, routed = _run_lowered(_lynx_model(spec, policy, fc1, fc2, phase=False, valid=False), {"hidden": hidden, "logits": logits}, experts)

    expected = policy.select(logits, k, form, normalize)
    np.testing.assert_array_equal(np.isfinite(routed), np.isfinite(expected.masked_logits))
    np.testing.assert_allclose(out, _reference_output(spec, policy, hidden, logits, fc1, fc2), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("seq_len,expect_policy", [(1, True), (5, False)])
def test_policy_runs_only_in_decode(seq_len, expect_policy):
    spec, fc1, fc2, hidden, logits = _problem(7, 16)
    k = spec.top_k
    policy = LynxPolicy(alpha=0.7, beta=1)
    feeds = {"hidden": hidden, "logits": logits, "seq_len": np.array(seq_len, dtype=np.int64)}
    out, routed = _run_lowered(_lynx_model(spec, policy, fc1, fc2, phase=True, valid=False), feeds)
    expected = policy.select(logits, k) if expect_policy else OffPolicy().select(logits, k)
    np.testing.assert_array_equal(np.isfinite(routed), np.isfinite(expected.masked_logits))
    np.testing.assert_allclose(out, _reference_output(spec, policy, hidden, logits, fc1, fc2, seq_len=seq_len), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("policy", [LynxPolicy(alpha=0.7, beta=1), BudgetPolicy(budget=3)], ids=lambda p: p.name)
@pytest.mark.parametrize("num_valid", [1, 5, 12])
def test_padded_rows_do_not_vote(policy, num_valid):
    spec, fc1, fc2, hidden, logits = _problem(num_valid, 12)
    k = spec.top_k
    feeds = {"hidden": hidden, "logits": logits, "num_valid": np.array(num_valid, dtype=np.int64)}
    _, routed = _run_lowered(_lynx_model(spec, policy, fc1, fc2, phase=False, valid=True), feeds)
    expected = policy.select(logits, k, valid=num_valid)
    np.testing.assert_array_equal(np.isfinite(routed), np.isfinite(expected.masked_logits))


def test_per_expert_lowering_gives_each_expert_its_own_weights():
    """The per-expert lowering gives each expert its own MatMul chain over its rows (one Split by
    the experts' row counts), with its own weights in MatMul's layout."""
    spec, fc1, fc2, _, _ = _problem(0, 1)
    e = spec.num_experts
    lowered = lower(ir.from_proto(_lynx_model(spec, OffPolicy(), fc1, fc2, phase=False, valid=False)), "per-expert")
    op_types = [n.op_type for n in lowered.model.graph]
    assert op_types.count("MatMul") == 2 * e and "MoE" not in op_types and "If" not in op_types
    assert sum(n.op_type == "Split" and len(n.outputs) == e for n in lowered.model.graph) == 1  # the rows, by expert (the others: gate | up)
    names = lowered.blocks[0].expert_weights
    assert len(names) == 2 * e
    inits = lowered.model.graph.initializers
    assert [tuple(inits[n].shape) for n in names[:2]] == [(H, 2 * I), (I, H)]
    # The canonical stacked weights are gone: each byte of expert weight exists once.
    assert "fc1" not in inits and "fc2" not in inits


@pytest.mark.parametrize("experts", ["fused", "per-expert"])
def test_clamped_swiglu_with_biases(experts):
    # gpt-oss's experts: gate * sigmoid(1.702 gate) * (up + 1), gate <= 7, |up| <= 7, with biases.
    rng = np.random.default_rng(7)
    spec = MoESpec(num_experts=8, top_k=2, hidden_size=H, expert_size=I, activation="swiglu", router=RouterForm.TOPK_SOFTMAX, normalize=True,
                   activation_alpha=1.702, activation_beta=1.0, swiglu_limit=7.0)
    fc1 = (rng.standard_normal((8, 2 * I, H)) * 1.5).astype(np.float32)  # large enough that the clamps matter
    fc2 = (rng.standard_normal((8, H, I)) * 0.3).astype(np.float32)
    fc1_bias, fc2_bias = rng.standard_normal((8, 2 * I)).astype(np.float32), rng.standard_normal((8, H)).astype(np.float32)
    hidden, logits = rng.standard_normal((9, H)).astype(np.float32), _skewed_logits(rng, 9, 8)
    proto = _lynx_model(spec, OffPolicy(), fc1, fc2, phase=False, valid=False)
    node = proto.graph.node[0]
    del node.input[:]
    node.input.extend(["hidden", "logits", "fc1", "fc1_bias", "fc2", "fc2_bias"])
    proto.graph.initializer.extend([onnx.numpy_helper.from_array(fc1_bias, "fc1_bias"), onnx.numpy_helper.from_array(fc2_bias, "fc2_bias")])
    got, _ = _run_lowered(proto, {"hidden": hidden, "logits": logits}, experts)
    routing = OffPolicy().select(logits, 2, RouterForm.TOPK_SOFTMAX, True)
    projections = np.stack([fc1[e] @ hidden[t] + fc1_bias[e] for t in range(9) for e in routing.ids[t]])
    assert (projections[:, 0::2] > 7).any() and (np.abs(projections[:, 1::2]) > 7).any()  # both clamps are exercised
    want = _reference_output(spec, OffPolicy(), hidden, logits, fc1, fc2, fc1_bias=fc1_bias, fc2_bias=fc2_bias)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_every_named_expert_implementation_has_its_code():
    from lynx_export.compiler.lowering import DEFAULT_EXPERTS, EXPERT_IMPLEMENTATIONS, QUANTIZED_IMPLEMENTATIONS
    from lynx_export.compiler.lowering.experts import EXPERT_IMPLS

    assert tuple(EXPERT_IMPLS) == EXPERT_IMPLEMENTATIONS and DEFAULT_EXPERTS == "per-expert"
    assert set(QUANTIZED_IMPLEMENTATIONS) <= set(EXPERT_IMPLEMENTATIONS)
