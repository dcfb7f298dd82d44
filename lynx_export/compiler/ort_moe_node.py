"""ONNX Runtime's fused MoE node (`com.microsoft.MoE`): its input slots, the gated expert layouts
it spells, and the equivalent form its CPU kernel runs (fc3 and concatenated gate/up
interleaved into one fc1), which verification runs as the original's reference.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from lynx_export.compiler.blocks import NoMatch
from lynx_export.compiler.graph_builder import graph_names, unique_name

__all__ = ["DOMAIN", "is_moe", "attribute", "optional_input", "gated_layout", "stacked_experts", "CpuMoEFormPass", "to_cpu_form"]

DOMAIN = "com.microsoft"

# Input slots of com.microsoft.MoE.
INPUT, ROUTER, FC1, FC1_BIAS, FC2, FC2_BIAS, FC3, FC3_BIAS = range(8)

# Gate/up layouts of a gated node.
INTERLEAVED = "interleaved"  # swiglu, swiglu_fusion=1: fc1 [E,2I,H] rows g0,u0,g1,u1,...
CONCATENATED = "concatenated"  # swiglu, swiglu_fusion=2: fc1 [E,2I,H] rows [g | u]
SEPARATE = "fc3"  # fc1 [E,I,H] is the gate, fc3 [E,I,H] the up projection


def is_moe(node: ir.Node) -> bool:
    """An ONNX Runtime MoE node."""
    return node.op_type == "MoE" and node.domain == DOMAIN


def attribute(node: ir.Node, name: str, default):
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def optional_input(node: ir.Node, slot: int) -> ir.Value | None:
    return node.inputs[slot] if len(node.inputs) > slot else None


def gated_layout(node: ir.Node) -> str:
    """Which gated layout the node's attributes and inputs spell, or NoMatch."""
    activation = attribute(node, "activation_type", "relu")
    fusion = attribute(node, "swiglu_fusion", 0)
    has_fc3 = optional_input(node, FC3) is not None
    if optional_input(node, FC3_BIAS) is not None and not has_fc3:
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
    if has_fc3:
        raise NoMatch(f"gated '{activation}' experts (fc3 given): only silu(gate) * up (SwiGLU) is supported")
    raise NoMatch(f"activation '{activation}' is not gated: LynxMoE experts are SwiGLU (silu(gate) * up)")


def _weight(node: ir.Node, slot: int, what: str, required: bool = True) -> ir.Value | None:
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


def stacked_experts(node: ir.Node) -> tuple[str, int, int, int, dict[str, ir.Value | None]]:
    """(layout, E, H, I, weights by role) of a gated node whose weights are initializers."""
    layout = gated_layout(node)
    fc1 = _weight(node, FC1, "fc1 (gate/up) weights")
    fc2 = _weight(node, FC2, "fc2 (down) weights")
    fc3 = _weight(node, FC3, "fc3 (up) weights", required=layout == SEPARATE)
    fc1_bias = _weight(node, FC1_BIAS, "fc1 bias", required=False)
    fc2_bias = _weight(node, FC2_BIAS, "fc2 bias", required=False)
    fc3_bias = _weight(node, FC3_BIAS, "fc3 bias", required=False)
    s1, s2 = _shape(fc1), _shape(fc2)
    if len(s1) != 3 or len(s2) != 3:
        raise NoMatch(f"expert weights are not stacked 3-D tensors: fc1 {s1}, fc2 {s2}")
    e, rows, h = s1
    i = s2[2]
    if s2 != [e, h, i] or rows != (i if layout == SEPARATE else 2 * i) or min(e, h, i) < 1:
        want = "[E,I,H] (with fc3)" if layout == SEPARATE else "[E,2I,H]"
        raise NoMatch(f"expert weight shapes disagree: fc1 {s1} (expected {want}), fc2 {s2} (expected [E,H,I])")
    _expect(fc3, "fc3 weights", [e, i, h])
    _expect(fc1_bias, "fc1 bias", [e, rows])
    _expect(fc2_bias, "fc2 bias", [e, h])
    _expect(fc3_bias, "fc3 bias", [e, i])
    weights = {"fc1": fc1, "fc2": fc2, "fc3": fc3, "fc1_bias": fc1_bias, "fc2_bias": fc2_bias, "fc3_bias": fc3_bias}
    return layout, e, h, i, weights


# -- a CPU-runnable reference ---------------------------------------------------------------------


def _interleave(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """[E,I,...] gate and up -> [E,2I,...] with rows g0,u0,g1,u1,..."""
    stacked = np.stack((gate, up), axis=2)
    return np.ascontiguousarray(stacked.reshape(gate.shape[0], 2 * gate.shape[1], *gate.shape[2:]))


def _cpu_form(graph: ir.Graph, node: ir.Node, used: set[str]) -> bool:
    """Rewrite one MoE node that ONNX Runtime's CPU kernel refuses into swiglu_fusion=1."""
    try:
        layout, _, _, i, w = stacked_experts(node)
    except NoMatch:
        return False
    if layout == INTERLEAVED:
        return False
    fc1 = w["fc1"].const_value.numpy()
    b1 = None if w["fc1_bias"] is None else w["fc1_bias"].const_value.numpy()
    if layout == CONCATENATED:
        gate, up = fc1[:, :i], fc1[:, i:]
        gate_b, up_b = (None, None) if b1 is None else (b1[:, :i], b1[:, i:])
    else:
        gate, up = fc1, w["fc3"].const_value.numpy()
        gate_b = b1
        up_b = None if w["fc3_bias"] is None else w["fc3_bias"].const_value.numpy()
        if (gate_b is None) != (up_b is None):  # one bias given: the other is zero
            given = gate_b if gate_b is not None else up_b
            gate_b = np.zeros_like(given) if gate_b is None else gate_b
            up_b = np.zeros_like(given) if up_b is None else up_b
    prefix = node.name or node.outputs[0].name
    fused = ir.Value(name=unique_name(f"{prefix}.fc1_interleaved", used), const_value=ir.tensor(_interleave(gate, up)))
    graph.register_initializer(fused)
    fused_b = None
    if gate_b is not None:
        fused_b = ir.Value(name=unique_name(f"{prefix}.fc1_bias_interleaved", used), const_value=ir.tensor(_interleave(gate_b, up_b)))
        graph.register_initializer(fused_b)
    old = [w["fc1"], w["fc1_bias"], w["fc3"], w["fc3_bias"]]
    node.replace_input_with(FC1, fused)
    node.replace_input_with(FC1_BIAS, fused_b)
    node.resize_inputs(min(len(node.inputs), FC3))
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
    """Rewrite MoE nodes ONNX Runtime's CPU kernel cannot run (fc3, swiglu_fusion 0 or 2) into
    the equivalent swiglu_fusion=1 form: fc1/fc3 (or fc1's halves) interleaved into one fc1,
    biases likewise; the other attributes (k, routing, SwiGLU alpha/beta/limit) are kept.
    Nodes whose weights are not initializers, or not gated, are left as they are (main graph
    only, as `detect` reads it)."""

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
