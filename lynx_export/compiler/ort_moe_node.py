"""ONNX Runtime's fused MoE nodes (`com.microsoft.MoE` and its quantized `QMoE`): their input
slots, the gated expert layouts they spell, and the equivalent form the CPU kernels run (fc3
and concatenated gate/up interleaved into one fc1), which verification runs as the original's
reference.

QMoE stores each expert weight as MatMulNBits does: uint8 [E, N, K*bits/8] (int4 low nibble
first), block scales [E, N, K/block_size] and optional packed zero points (default 2^(bits-1)).
Only integer block-wise QMoE (`quant_type` "int", a `block_size`, one `expert_weight_bits` for
every weight, raw `weights_prepacked` 0) describes LynxMoE's quantized experts; the rest is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from lynx_export.compiler.blocks import NoMatch
from lynx_export.compiler.graph_builder import graph_names, unique_name
from lynx_export.op.spec import WeightQuantization

__all__ = ["DOMAIN", "INPUT", "ROUTER", "is_moe", "slots", "attribute", "optional_input", "gated_layout", "quantization",
           "StackedExperts", "stacked_experts", "CpuMoEFormPass", "to_cpu_form"]

DOMAIN = "com.microsoft"

INPUT, ROUTER = 0, 1
# Input slots of each op by role; a role missing from an op's map is not one of its inputs.
MOE_SLOTS = {"fc1": 2, "fc1_bias": 3, "fc2": 4, "fc2_bias": 5, "fc3": 6, "fc3_bias": 7}
QMOE_SLOTS = {"fc1": 2, "fc1_scales": 3, "fc1_bias": 4, "fc2": 5, "fc2_scales": 6, "fc2_bias": 7, "fc3": 8, "fc3_scales": 9,
              "fc3_bias": 10, "fc1_zero_points": 11, "fc2_zero_points": 12, "fc3_zero_points": 13}
# What travels with a gate/up weight's rows: its bias, scales and zero points.
ROW_PARTS = ("", "_bias", "_scales", "_zero_points")

# Gate/up layouts of a gated node.
INTERLEAVED = "interleaved"  # swiglu, swiglu_fusion=1: fc1 [E,2I,H] rows g0,u0,g1,u1,...
CONCATENATED = "concatenated"  # swiglu, swiglu_fusion=2: fc1 [E,2I,H] rows [g | u]
SEPARATE = "fc3"  # fc1 [E,I,H] is the gate, fc3 [E,I,H] the up projection


def is_moe(node: ir.Node) -> bool:
    """An ONNX Runtime MoE or QMoE node."""
    return node.op_type in ("MoE", "QMoE") and node.domain == DOMAIN


def slots(node: ir.Node) -> dict[str, int]:
    return QMOE_SLOTS if node.op_type == "QMoE" else MOE_SLOTS


def attribute(node: ir.Node, name: str, default):
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def optional_input(node: ir.Node, slot: int) -> ir.Value | None:
    return node.inputs[slot] if len(node.inputs) > slot else None


def gated_layout(node: ir.Node) -> str:
    """Which gated layout the node's attributes and inputs spell, or NoMatch."""
    activation = attribute(node, "activation_type", "relu")
    fusion = attribute(node, "swiglu_fusion", 0)
    has_fc3 = optional_input(node, slots(node)["fc3"]) is not None
    if optional_input(node, slots(node)["fc3_bias"]) is not None and not has_fc3:
        raise NoMatch("fc3 bias given without fc3 weights")
    if activation == "silu" and has_fc3:
        return SEPARATE  # silu(fc1 x) * (fc3 x)
    if activation == "swiglu":
        if fusion == 0:
            if not has_fc3:
                raise NoMatch("swiglu with swiglu_fusion=0 but no fc3 (up projection) weights")
            return SEPARATE
        if has_fc3:
            raise NoMatch(f"swiglu with swiglu_fusion={fusion} and fc3 weights: gate/up layout is ambiguous")
        if fusion == 1:
            return INTERLEAVED
        if fusion == 2:
            return CONCATENATED
        raise NoMatch(f"unknown swiglu_fusion {fusion}")
    if activation in _OTHER_GATED:  # gated, but not by silu (Gemma's MoE from onnxruntime-genai's builder: geglu)
        raise NoMatch(f"activation '{activation}' is gated by another function ({_OTHER_GATED[activation]}): LynxMoE experts are SwiGLU "
                      "(silu(gate) * up) only, and ONNX Runtime's CPU MoE kernel does not run it either")
    if has_fc3:
        raise NoMatch(f"gated '{activation}' experts (fc3 given): only silu(gate) * up (SwiGLU) is supported")
    raise NoMatch(f"activation '{activation}' is not gated: LynxMoE experts are SwiGLU (silu(gate) * up)")


# Gated activations ONNX Runtime's MoE names besides swiglu, and what they compute.
_OTHER_GATED = {"geglu": "gelu(gate) * up"}


def quantization(node: ir.Node) -> WeightQuantization | None:
    """The block quantization a QMoE node's weights carry (None for MoE), or NoMatch."""
    if node.op_type != "QMoE":
        return None
    kind = attribute(node, "quant_type", "int")
    if kind != "int":
        raise NoMatch(f"QMoE quant_type '{kind}': only integer block-wise quantization is supported")
    bits = int(attribute(node, "expert_weight_bits", 4))
    for name in ("fc1_expert_weight_bits", "fc2_expert_weight_bits", "fc3_expert_weight_bits"):
        if int(attribute(node, name, bits)) != bits:
            raise NoMatch(f"QMoE {name}={attribute(node, name, bits)} differs from expert_weight_bits={bits}: mixed widths are not supported")
    if int(attribute(node, "weights_prepacked", 0)) != 0:
        raise NoMatch("QMoE weights_prepacked: an execution provider's prepacked layout, not the raw [E,N,K/pack] one")
    block = int(attribute(node, "block_size", 0))
    if block <= 0:
        raise NoMatch("QMoE with per-channel scales (no block_size): LynxMoE's quantized experts are block-wise")
    extra = [i for i, v in enumerate(node.inputs) if i > QMOE_SLOTS["fc3_zero_points"] and v is not None]
    if extra:
        raise NoMatch(f"QMoE input(s) {extra} (router_weights, FP4/FP8 scales) are not supported")
    try:
        return WeightQuantization(bits, block)
    except ValueError as exc:
        raise NoMatch(f"QMoE {exc}") from None


def _weight(node: ir.Node, slot: int, what: str, required: bool) -> ir.Value | None:
    value = optional_input(node, slot)
    if value is None:
        if required:
            raise NoMatch(f"{what} is missing")
        return None
    if value.const_value is None or value.producer() is not None or value.is_graph_input():
        raise NoMatch(f"{what} '{value.name}' is not a constant initializer")
    if value.shape is None:
        raise NoMatch(f"{what} '{value.name}' has no shape")
    return value


def _shape(value: ir.Value | None) -> list[int] | None:
    return None if value is None else [int(d) for d in value.const_value.shape]


def _expect(value: ir.Value | None, what: str, shape: list[int]) -> None:
    if value is not None and _shape(value) != shape:
        raise NoMatch(f"{what} has shape {_shape(value)}, expected {shape}")


@dataclass(frozen=True)
class StackedExperts:
    """A gated node's experts: layout, sizes, weights by role (`QMOE_SLOTS`' keys, None where
    absent or not an input of the op) and, for QMoE, their quantization."""

    layout: str
    num_experts: int
    hidden_size: int
    expert_size: int
    weights: dict[str, ir.Value | None]
    quantization: WeightQuantization | None


def stacked_experts(node: ir.Node) -> StackedExperts:
    """The experts of a gated node whose weights are initializers, or NoMatch."""
    layout = gated_layout(node)
    quant = quantization(node)
    names = {"fc1": "fc1 (gate/up) weights", "fc2": "fc2 (down) weights", "fc3": "fc3 (up) weights"}
    needed = {"fc1", "fc2"} | ({"fc3"} if layout == SEPARATE else set())
    if quant is not None:
        needed |= {f"{role}_scales" for role in needed}
    w = {role: _weight(node, slot, names.get(role, role.replace("_", " ")), required=role in needed)
         for role, slot in slots(node).items()}
    s1, s2 = _shape(w["fc1"]), _shape(w["fc2"])
    if len(s1) != 3 or len(s2) != 3:
        raise NoMatch(f"expert weights are not stacked 3-D tensors: fc1 {s1}, fc2 {s2}")
    per_element = 1 if quant is None else 8 // quant.bits  # weights per stored element along K
    e, rows, h = s1[0], s1[1], s1[2] * per_element
    i = s2[2] * per_element
    if s2[:2] != [e, h] or rows != (i if layout == SEPARATE else 2 * i) or min(e, h, i) < 1:
        want = "[E,I,H] (with fc3)" if layout == SEPARATE else "[E,2I,H]"
        packed = "" if quant is None else f", H and I counted as {quant.bits}-bit values"
        raise NoMatch(f"expert weight shapes disagree: fc1 {s1} (expected {want}), fc2 {s2} (expected [E,H,I]{packed})")
    _expect(w.get("fc3"), "fc3 weights", [e, i, h // per_element])
    _expect(w.get("fc1_bias"), "fc1 bias", [e, rows])
    _expect(w.get("fc2_bias"), "fc2 bias", [e, h])
    _expect(w.get("fc3_bias"), "fc3 bias", [e, i])
    if quant is not None:
        for role, (n, k) in {"fc1": (rows, h), "fc2": (h, i), "fc3": (i, h)}.items():
            if k % quant.block_size:
                raise NoMatch(f"QMoE block_size {quant.block_size} does not divide {role}'s input dimension {k}")
            blocks = k // quant.block_size
            _expect(w.get(f"{role}_scales"), f"{role} scales", [e, n, blocks])
            _expect(w.get(f"{role}_zero_points"), f"{role} zero points", [e, n, -(-blocks * quant.bits // 8)])
    return StackedExperts(layout, e, h, i, {role: w.get(role) for role in QMOE_SLOTS}, quant)


# -- a CPU-runnable reference ---------------------------------------------------------------------


def _interleave(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """[E,I,...] gate and up -> [E,2I,...] with rows g0,u0,g1,u1,..."""
    stacked = np.stack((gate, up), axis=2)
    return np.ascontiguousarray(stacked.reshape(gate.shape[0], 2 * gate.shape[1], *gate.shape[2:]))


def _gate_and_up(experts: StackedExperts, part: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(gate, up) rows of one part of fc1 ("", "_bias", "_scales", "_zero_points"); None if absent."""
    w = experts.weights
    first, second = w[f"fc1{part}"], w[f"fc3{part}"]
    if first is None and second is None:
        return None
    if experts.layout == CONCATENATED:
        rows = first.const_value.numpy()
        return rows[:, : experts.expert_size], rows[:, experts.expert_size :]
    gate = None if first is None else first.const_value.numpy()
    up = None if second is None else second.const_value.numpy()
    # One bias given: the other is zero. (Scales are required with their weights.)
    return (np.zeros_like(up) if gate is None else gate), (np.zeros_like(gate) if up is None else up)


def _cpu_form(graph: ir.Graph, node: ir.Node, used: set[str]) -> bool:
    """Rewrite one (Q)MoE node that ONNX Runtime's CPU kernel refuses into swiglu_fusion=1."""
    try:
        experts = stacked_experts(node)
    except NoMatch:
        return False
    if experts.layout == INTERLEAVED:
        return False
    roles = slots(node)
    prefix = node.name or node.outputs[0].name
    old = [experts.weights[f"fc{n}{part}"] for n in (1, 3) for part in ROW_PARTS]
    for part in ROW_PARTS:
        if f"fc1{part}" not in roles:
            continue
        halves = _gate_and_up(experts, part)
        fused = None
        if halves is not None:
            fused = ir.Value(name=unique_name(f"{prefix}.fc1{part}_interleaved", used), const_value=ir.tensor(_interleave(*halves)))
            graph.register_initializer(fused)
        slot = roles[f"fc1{part}"]
        if fused is not None and len(node.inputs) <= slot:
            node.resize_inputs(slot + 1)
        if len(node.inputs) > slot:
            node.replace_input_with(slot, fused)
        if f"fc3{part}" in roles and len(node.inputs) > roles[f"fc3{part}"]:
            node.replace_input_with(roles[f"fc3{part}"], None)
    while node.inputs and node.inputs[-1] is None:
        node.resize_inputs(len(node.inputs) - 1)
    if attribute(node, "activation_type", "relu") == "silu":  # silu(fc1 x) * (fc3 x) is plain SwiGLU
        for attr in ("activation_alpha", "activation_beta", "swiglu_limit", "swiglu_limit_after_activation"):
            node.attributes.pop(attr, None)
        node.attributes["activation_type"] = ir.convenience.convert_attribute("activation_type", "swiglu")
    node.attributes["swiglu_fusion"] = ir.convenience.convert_attribute("swiglu_fusion", 1)
    for value in old:
        if value is not None and not list(value.uses()) and not value.is_graph_output() and value.name in graph.initializers:
            del graph.initializers[value.name]
    return True


class CpuMoEFormPass(ir.passes.InPlacePass):
    """Rewrite MoE and QMoE nodes ONNX Runtime's CPU kernels cannot run (fc3, swiglu_fusion 0 or 2)
    into the equivalent swiglu_fusion=1 form: fc1/fc3 (or fc1's halves) interleaved into one fc1,
    biases, scales and zero points likewise; the other attributes (k, routing, SwiGLU
    alpha/beta/limit, quantization) are kept. Nodes whose weights are not initializers, or not
    gated, are left as they are (main graph only, as `detect` reads it)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        nodes = [n for n in graph if is_moe(n)]
        used = graph_names(graph) if nodes else set()
        modified = False
        for node in nodes:
            modified |= _cpu_form(graph, node, used)
        return ir.passes.PassResult(model, modified=modified)


def to_cpu_form(model: ir.Model) -> bool:
    """Apply `CpuMoEFormPass` to `model` in place; return whether any node changed."""
    return CpuMoEFormPass()(model).modified
