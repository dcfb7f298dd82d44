"""Expert implementations of the ONNX Runtime lowering: what runs the experts once the routed logits exist."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from lynx_export.compiler.graph_builder import GraphBuilder
from lynx_export.compiler.lowering.selection import as_dtype, as_float, grouped_routing, kernel_routing, optional_input
from lynx_export.errors import LoweringError
from lynx_export.op import contract as lynx_op
from lynx_export.op.quantization import QuantizedWeight
from lynx_export.op.spec import Activation, MoESpec
from lynx_export.routing import RouterForm

MS_DOMAIN = "com.microsoft"

__all__ = ["EXPERT_IMPLS", "MS_DOMAIN", "ACCURACY_LEVEL", "projection", "set_accuracy_level"]


def _moe_attributes(spec: MoESpec) -> dict[str, object]:
    if spec.activation != Activation.SWIGLU:
        raise LoweringError(f"activation '{spec.activation}' has no ONNX Runtime lowering")
    # top-k -> softmax equals softmax -> top-k -> renormalise, which is how the kernel spells it.
    normalize = spec.normalize or spec.router == RouterForm.TOPK_SOFTMAX
    attributes: dict[str, object] = {
        "k": spec.top_k,
        "activation_type": "swiglu",
        "swiglu_fusion": 1,  # gate/up rows interleaved, the canonical fc1 layout
        "activation_alpha": float(spec.activation_alpha),
        "activation_beta": float(spec.activation_beta),
        "normalize_routing_weights": int(normalize),
    }
    if spec.swiglu_limit is not None:
        attributes["swiglu_limit"] = float(spec.swiglu_limit)
    return attributes


def _fused_experts(b: GraphBuilder, node: ir.Node, spec: MoESpec, routed: ir.Value) -> tuple[ir.Value, tuple[str, ...]]:
    """ONNX Runtime's fused MoE kernel, routing on `routed`. Returns (output, expert weights)."""
    router_probs, scale = kernel_routing(b, routed, spec)
    moe_inputs = [
        node.inputs[lynx_op.Slot.HIDDEN],
        router_probs,
        node.inputs[lynx_op.Slot.FC1],
        optional_input(node, lynx_op.Slot.FC1_BIAS),
        node.inputs[lynx_op.Slot.FC2],
        optional_input(node, lynx_op.Slot.FC2_BIAS),
    ]
    while moe_inputs[-1] is None:
        moe_inputs.pop()
    out = b.op_multi("MoE", 1, *moe_inputs, domain=MS_DOMAIN, **_moe_attributes(spec))[0]
    if scale is not None:
        out = b.op("Mul", out, scale)
    return out, (node.inputs[lynx_op.Slot.FC1].name, node.inputs[lynx_op.Slot.FC2].name)


def _topk_routing(b: GraphBuilder, routed: ir.Value, spec: MoESpec) -> tuple[ir.Value, ir.Value]:
    """(ids [T,K] int64, weights [T,K]): the model's routing on `routed`."""
    k = b.const([spec.top_k], np.int64)
    if spec.router == RouterForm.SIGMOID_GROUPED:
        ids, values = grouped_routing(b, as_float(b, routed), spec)
        return ids, as_dtype(b, values, routed.dtype)
    if spec.router == RouterForm.SOFTMAX_TOPK:
        values, ids = b.topk(b.op("Softmax", routed, axis=-1), k)
        if spec.normalize:
            values = b.op("Div", values, b.op("ReduceSum", values, b.const([-1], np.int64), keepdims=1))
    else:
        values, ids = b.topk(routed, k)
        values = b.op("Softmax", values, axis=-1)
    return ids, values


def _zeros_like(b: GraphBuilder, value: ir.Value) -> ir.Value:
    return b.op("ConstantOfShape", b.op("Shape", value), value=ir.tensor(np.zeros(1, dtype=np.float32)))


# MatMulNBits' accuracy level: 4 quantizes activations to int8 and runs int8 dot products, 2.6x
# faster than level 0 for int4 weights on these CPUs (docs/BENCHMARKS.md), at a cost in accuracy
# the build measures and reports (compiler/build.py); level 0 computes in float.
ACCURACY_LEVEL = 4


def set_accuracy_level(model: ir.Model, level: int) -> int:
    """Set the accuracy level of every MatMulNBits and QMoE node (the same meaning in both) that
    has another, in place; returns how many nodes changed."""
    changed = 0
    for node in model.graph:
        if node.op_type in ("MatMulNBits", "QMoE") and node.domain == MS_DOMAIN and node.attributes.get_int("accuracy_level", 0) != level:
            node.attributes["accuracy_level"] = ir.convenience.convert_attribute("accuracy_level", level)
            changed += 1
    return changed


def _gate_up_rows(w: np.ndarray) -> np.ndarray:
    """[2I,...] rows interleaved g0,u0,g1,u1,... -> gate rows then up rows."""
    return np.concatenate(lynx_op.gate_up(w, axis=0), axis=0)


def projection(b: GraphBuilder, x: ir.Value, weight: np.ndarray | QuantizedWeight, name: str, names: list[str] | None = None) -> ir.Value:
    """x [R,K] @ weight^T for a weight [N,K] (torch Linear order): a MatMul on a float weight's
    [K,N] transpose, or MatMulNBits on a block-quantized one (packed [N,K*bits/8], scales [N,K/block]).
    The weights become initializers named `name`...; their names are appended to `names`."""

    def constant(array: np.ndarray, suffix: str = "") -> ir.Value:
        value = b.tape.initializer(ir.tensor(np.ascontiguousarray(array)), name=f"{name}{suffix}")
        if names is not None:
            names.append(value.name)
        return value

    if not isinstance(weight, QuantizedWeight):
        return b.op("MatMul", x, constant(weight.T))  # [K,N]: MatMul's layout, prepacked at load time
    n = weight.q.shape[0]
    k = weight.q.shape[1] * 8 // weight.bits
    blocks = k // weight.block_size
    inputs = [x, constant(weight.q.reshape(n, blocks, weight.block_size * weight.bits // 8)), constant(weight.scales.reshape(-1), ".scales")]
    if weight.zero_points is not None:
        inputs.append(constant(weight.zero_points.reshape(-1), ".zero_points"))
    return b.op_multi("MatMulNBits", 1, *inputs, domain=MS_DOMAIN, K=k, N=n, bits=weight.bits, block_size=weight.block_size,
                      accuracy_level=ACCURACY_LEVEL)[0]


def _expert_weights(node: ir.Node, which: int) -> list[np.ndarray | QuantizedWeight]:
    """Every expert's fc1 (which=0: [2I,H], gate rows then up rows) or fc2 (which=1: [H,I]),
    float or quantized; the node's tensors and attributes are read once."""
    slots = ((lynx_op.Slot.FC1, lynx_op.Slot.FC1_SCALES, lynx_op.Slot.FC1_ZERO_POINTS) if which == 0
             else (lynx_op.Slot.FC2, lynx_op.Slot.FC2_SCALES, lynx_op.Slot.FC2_ZERO_POINTS))
    rows = _gate_up_rows if which == 0 else (lambda w: w)
    weight, scales, zero = (None if (v := optional_input(node, s)) is None else v.const_value.numpy() for s in slots)
    quantization = lynx_op.from_node(node).quantization
    experts = range(weight.shape[0])
    if quantization is None:
        return [rows(weight[e]) for e in experts]
    return [QuantizedWeight(rows(weight[e]), rows(scales[e]), quantization.bits, quantization.block_size,
                            None if zero is None else rows(zero[e])) for e in experts]


def _per_expert_experts(b: GraphBuilder, node: ir.Node, spec: MoESpec, routed: ir.Value) -> tuple[ir.Value, tuple[str, ...]]:
    """Each expert its own MatMul chain over exactly its rows; an expert without rows gets none.

    The (token, choice) pairs are sorted by expert once and the hidden rows gathered in that
    order; one Split by the experts' row counts gives every expert its rows (zero rows for an
    expert nobody picked: its MatMuls read no weights). Each expert's weights are separate
    constants (float, prepacked by ONNX Runtime at load time, or block-quantized for
    MatMulNBits). One Concat, one scale by the routing weights and one ScatterND-add combine.
    """
    hidden = node.inputs[lynx_op.Slot.HIDDEN]
    names: list[str] = []
    bias_in, bias_out = (optional_input(node, s) for s in (lynx_op.Slot.FC1_BIAS, lynx_op.Slot.FC2_BIAS))
    bias_in = None if bias_in is None else bias_in.const_value.numpy()  # [E,2I] interleaved like fc1
    bias_out = None if bias_out is None else bias_out.const_value.numpy()  # [E,H]
    w_in, w_out = _expert_weights(node, 0), _expert_weights(node, 1)
    ids, weights = _topk_routing(b, routed, spec)
    flat_ids = b.op("Reshape", ids, b.const([-1], np.int64))  # [T*K]
    pairs = b.op("Reshape", b.op("Size", flat_ids), b.const([1], np.int64))
    # (token, choice) pairs in ascending expert order, the order of Split's row counts.
    order = b.topk(b.op("Neg", b.op("Cast", flat_ids, to=ir.DataType.FLOAT)), pairs)[1]
    counts = b.op("Cast", b.op("ReduceSum", b.op("OneHot", flat_ids, b.const([spec.num_experts], np.int64), b.const([0.0, 1.0]), axis=-1),
                               b.const([0], np.int64), keepdims=0), to=ir.DataType.INT64)  # [E] rows per expert
    token = b.op("Div", order, b.const(spec.top_k, np.int64))
    rows = b.op_multi("Split", spec.num_experts, b.op("Gather", hidden, token, axis=0), counts, axis=0)
    outputs = []
    for e in range(spec.num_experts):
        proj = projection(b, rows[e], w_in[e], f"{node.name}.expert{e}.w_in", names)
        if bias_in is not None:
            proj = b.op("Add", proj, b.const(_gate_up_rows(bias_in[e])))
        act = b.swiglu(proj, spec.expert_size, alpha=spec.activation_alpha, beta=spec.activation_beta, limit=spec.swiglu_limit)
        out = projection(b, act, w_out[e], f"{node.name}.expert{e}.w_out", names)
        outputs.append(out if bias_out is None else b.op("Add", out, b.const(bias_out[e])))
    sorted_weights = b.op("Gather", b.op("Reshape", weights, b.const([-1], np.int64)), order, axis=0)
    scaled = b.op("Mul", b.op("Concat", *outputs, axis=0), b.op("Unsqueeze", sorted_weights, b.const([-1], np.int64)))
    out = b.op("ScatterND", _zeros_like(b, hidden), b.op("Unsqueeze", token, b.const([-1], np.int64)), scaled, reduction="add")
    return out, tuple(names)


EXPERT_IMPLS = {"per-expert": _per_expert_experts, "fused": _fused_experts}  # EXPERT_IMPLEMENTATIONS' code
