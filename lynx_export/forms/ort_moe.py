"""Graphs that already hold ONNX Runtime's fused MoE operator (`com.microsoft.MoE`, `ort_moe`).

Form recognised (ONNX Runtime contrib op, domain `com.microsoft`, version 1):

    output = MoE(input [T,H] | [B,S,H], router_probs [T,E],
                 fc1 [E,2I,H] | [E,I,H], fc1_bias?, fc2 [E,H,I], fc2_bias?, fc3 [E,I,H]?, fc3_bias?;
                 k, activation_type, normalize_routing_weights, swiglu_fusion, activation_alpha,
                 activation_beta, swiglu_limit, use_sparse_mixer)

`router_probs` holds the router's raw logits (the kernel takes their softmax, picks the top k and
renormalises them when `normalize_routing_weights` is 1): router `softmax_topk`. The model's
router stays in the graph and keeps feeding the block. Expert layouts, all SwiGLU
g * sigmoid(alpha * g) * (u + beta) (plain: silu(g) * u):

  * `activation_type="swiglu"`, `swiglu_fusion=1`: fc1 rows interleaved g0,u0,g1,u1,... (the
    only gated layout ONNX Runtime's CPU kernel runs, and the canonical fc1);
  * `activation_type="swiglu"`, `swiglu_fusion=2`: fc1 rows concatenated [g | u];
  * fc3 given (`activation_type="silu"`, or `"swiglu"` with `swiglu_fusion=0`): g = fc1 x and
    u = fc3 x, as transformers' CUDA fusions emit them. ONNX Runtime's CPU kernel refuses fc3
    (NOT_IMPLEMENTED) and `swiglu_fusion` other than 1; `to_cpu_form` rewrites such nodes into the
    equivalent interleaved form so that the original model can be run as a reference.

SwiGLU's `activation_alpha`, `activation_beta` and `swiglu_limit` (g <= limit, |u| <= limit; none
or infinite: no clamp) become the spec's parameters: gpt-oss's alpha=1.702, beta=1, limit=7 is
supported (a `silu` node with fc3 is plain silu(g) * u). `swiglu_limit_after_activation=1`
(clamping the activated gate), non-gated activations, sparse-mixer routing and weights that are
not constant initializers are refused.

A block binds `hidden` [T,H] and `output` [T,H], which the LynxMoE contract wants. So a matched
node that reads a 3-D [B,S,H] input (or one of unknown rank) is given flattened views: `match`
inserts `Reshape(input, [-1,H])` before the node and `Reshape(output, Shape(input))` after it
(the old output value, its name, uses and graph-output place included, becomes that 3-D view);
the block binds the [T,H] values, and its `sequence_source` is the [B,S,H] input. `match` also
types the node's input, router_probs and output where the graph left them untyped (all are the
weights' type T), as the rewrite and the lowering read their types. Refused nodes are not
touched, and matching again finds the same block without changing the graph.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from lynx_export.forms.match import Match, NoMatch, behind, const, dim, rank, shortest_float, unique_name
from lynx_export.routing import RouterForm
from lynx_export.spec import Activation, ExpertWeights, MoEBlock, MoESpec

__all__ = ["FORM", "claims", "match", "to_cpu_form", "CpuMoEFormPass"]

FORM = "ort_moe"
DOMAIN = "com.microsoft"

# Input slots of com.microsoft.MoE.
INPUT, ROUTER, FC1, FC1_BIAS, FC2, FC2_BIAS, FC3, FC3_BIAS = range(8)

# Gate/up layouts of a gated node.
INTERLEAVED = "interleaved"  # swiglu, swiglu_fusion=1: fc1 [E,2I,H] rows g0,u0,g1,u1,...
CONCATENATED = "concatenated"  # swiglu, swiglu_fusion=2: fc1 [E,2I,H] rows [g | u]
SEPARATE = "fc3"  # fc1 [E,I,H] is the gate, fc3 [E,I,H] the up projection


def claims(node: ir.Node) -> bool:
    """An ONNX Runtime MoE node."""
    return node.op_type == "MoE" and node.domain == DOMAIN


def _attr(node: ir.Node, name: str, default):
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def _input(node: ir.Node, slot: int) -> ir.Value | None:
    return node.inputs[slot] if len(node.inputs) > slot else None


def _layout(node: ir.Node) -> str:
    """Which gated layout the node's attributes and inputs spell, or NoMatch."""
    activation = _attr(node, "activation_type", "relu")
    fusion = _attr(node, "swiglu_fusion", 0)
    has_fc3 = _input(node, FC3) is not None
    if _input(node, FC3_BIAS) is not None and not has_fc3:
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


def _swiglu_parameters(node: ir.Node) -> tuple[float, float, float | None]:
    """(alpha, beta, limit) of a SwiGLU node: g * sigmoid(alpha * g) * (u + beta) with g <= limit
    and |u| <= limit (ONNX Runtime's `activation_alpha`, `activation_beta`, `swiglu_limit`; an
    infinite or absent limit is no clamp)."""
    # ONNX float attributes are float32: 1.702, not 1.7020000219345093.
    alpha = shortest_float(np.float32(_attr(node, "activation_alpha", 1.0)))
    beta = shortest_float(np.float32(_attr(node, "activation_beta", 0.0)))
    limit = _attr(node, "swiglu_limit", None)
    if limit is not None:
        limit = shortest_float(np.float32(limit))
        if math.isinf(limit) and limit > 0:
            limit = None
        elif math.isnan(limit) or limit <= 0:
            raise NoMatch(f"swiglu_limit={limit:g}: only a positive limit (or none) is supported")
    if not (math.isfinite(alpha) and math.isfinite(beta)):
        raise NoMatch(f"activation_alpha={alpha:g}, activation_beta={beta:g}: not finite")
    if limit is not None and _attr(node, "swiglu_limit_after_activation", 0):
        raise NoMatch("swiglu_limit_after_activation=1 (the activated gate clamped, not its input): "
                      "only the gate input clamped (gate <= limit) is supported")
    return alpha, beta, limit


def _weight(node: ir.Node, slot: int, what: str, required: bool = True) -> ir.Value | None:
    value = _input(node, slot)
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


def _experts(node: ir.Node) -> tuple[str, int, int, int, dict[str, ir.Value | None]]:
    """(layout, E, H, I, weights by role) of a gated node whose weights are initializers."""
    layout = _layout(node)
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


def _check_inputs(node: ir.Node) -> None:
    extra = [i for i, v in enumerate(node.inputs) if i > FC3_BIAS and v is not None]
    if extra:
        raise NoMatch(f"MoE input(s) {extra} beyond fc3_experts_bias: unknown to this version of the form")
    if _input(node, INPUT) is None or _input(node, ROUTER) is None:
        raise NoMatch("MoE input or router_probs is missing")
    if len(node.outputs) != 1 or not node.outputs[0].name:
        raise NoMatch("MoE node without one named output")


def match(node: ir.Node) -> Match:
    """The block of one MoE node; 3-D inputs are given [T,H] views (see the module docstring)."""
    _check_inputs(node)
    if _attr(node, "use_sparse_mixer", 0):
        raise NoMatch("sparse mixer (PhiMoE) routing: ONNX Runtime's CPU kernel ignores it, so the original cannot be "
                      "verified, and LynxMoE has no such router")
    layout, e, h, i, w = _experts(node)
    # silu(fc1 x) * (fc3 x) has no SwiGLU parameters (`_cpu_form` drops them).
    alpha, beta, limit = 1.0, 0.0, None
    if layout != SEPARATE or _attr(node, "activation_type", "relu") == "swiglu":
        alpha, beta, limit = _swiglu_parameters(node)
    if layout == SEPARATE and (w["fc1_bias"] is None) != (w["fc3_bias"] is None):
        raise NoMatch("fc3 form with only one of fc1_bias / fc3_bias: not supported")
    k = int(_attr(node, "k", 1))
    if not 1 <= k <= e:
        raise NoMatch(f"top-k {k} is outside 1..{e}")

    hidden, logits = node.inputs[INPUT], node.inputs[ROUTER]
    if rank(logits) not in (None, 2) or dim(logits, -1) not in (None, e):
        raise NoMatch(f"router_probs shape {list(logits.shape)} is not [T,{e}]")
    hidden_rank = _rank(hidden)
    if hidden_rank not in (None, 2, 3) or dim(hidden, -1) not in (None, h):
        raise NoMatch(f"input shape {list(hidden.shape or [])} is not [T,{h}] or [B,S,{h}]")
    # MoE's input, router_probs, output and weights share one type (T): annotate values the
    # graph left untyped, as the rewrite and the lowering read their types.
    dtype = w["fc1"].const_value.dtype
    for value in (hidden, logits, node.outputs[0]):
        if value.dtype is None:
            value.dtype = dtype
    if hidden_rank != 2:  # [B,S,H] (or of unknown rank): bind [T,H] views
        hidden = _flatten(node, h, dtype)
    source = _sequence_source(hidden, h)

    spec = MoESpec(
        num_experts=e,
        top_k=k,
        hidden_size=h,
        expert_size=i,
        activation=Activation.SWIGLU,
        router=RouterForm.SOFTMAX_TOPK,
        normalize=bool(_attr(node, "normalize_routing_weights", 0)),
        activation_alpha=alpha,
        activation_beta=beta,
        swiglu_limit=limit,
    )
    name = lambda v: None if v is None else v.name  # noqa: E731
    weights = ExpertWeights(
        gate_up=w["fc1"].name,
        gate_up_layout="out_in",
        gate_first=True,
        down=w["fc2"].name,
        down_layout="out_in",
        up=name(w["fc3"]),
        interleaved=layout == INTERLEAVED,
        gate_up_bias=name(w["fc1_bias"]),
        up_bias=name(w["fc3_bias"]),
        down_bias=name(w["fc2_bias"]),
    )
    block = MoEBlock(
        name="",
        form=FORM,
        spec=spec,
        weights=weights,
        hidden=hidden.name,
        router_logits=logits.name,
        output=node.outputs[0].name,
        sequence_source=None if source is None else source.name,
    )
    return Match(block, (node,))


def _rank(value: ir.Value) -> int | None:
    """The value's rank, from its shape or else from a Reshape (constant shape) or Flatten making it."""
    if rank(value) is not None:
        return rank(value)
    producer = value.producer()
    if producer is not None and producer.op_type == "Flatten":
        return 2
    if producer is not None and producer.op_type == "Reshape" and len(producer.inputs) > 1:
        shape = const(producer.inputs[1])
        return None if shape is None else int(np.asarray(shape).size)
    return None


def _sequence_source(hidden: ir.Value, hidden_size: int) -> ir.Value | None:
    """The [B,S,H] value `hidden` was flattened from (through reshapes), if shown."""
    for value in behind(hidden, frozenset({"Reshape", "Flatten"}))[1:]:
        if rank(value) == 3:
            return value if dim(value, -1) in (None, hidden_size) else None
    return None


def _names(graph: ir.Graph) -> set[str]:
    names = {v.name for v in graph.inputs if v.name} | set(graph.initializers)
    for n in graph:
        names.update(v.name for v in n.outputs if v.name)
    return names


def _flatten(node: ir.Node, hidden_size: int, dtype: ir.DataType) -> ir.Value:
    """Make `node` read Reshape(input, [-1,H]) and write [T,H]; its old output value (name,
    uses, graph output) becomes Reshape(that, Shape(input)). Returns the [T,H] input view."""
    graph = node.graph
    used = _names(graph)
    x, y = node.inputs[INPUT], node.outputs[0]
    prefix = node.name or y.name
    t = dim(x, 0) * dim(x, 1) if rank(x) == 3 and dim(x, 0) is not None and dim(x, 1) is not None else None
    shape_2d = ir.Value(name=unique_name(f"{prefix}.tokens_shape", used), const_value=ir.tensor(np.array([-1, hidden_size], dtype=np.int64)))
    graph.register_initializer(shape_2d)
    flatten = ir.node("Reshape", [x, shape_2d], name=unique_name(f"{prefix}.flatten", used))
    tokens = flatten.outputs[0]
    tokens.name = unique_name(f"{prefix}.tokens", used)
    tokens.dtype, tokens.shape = dtype, ir.Shape([t, hidden_size])
    graph.insert_before(node, flatten)
    node.replace_input_with(INPUT, tokens)

    old_name, old_shape = y.name, y.shape
    y.name = unique_name(f"{prefix}.output_tokens", used)
    y.shape = ir.Shape([t, hidden_size])
    shape_of = ir.node("Shape", [x], name=unique_name(f"{prefix}.shape", used))
    shape_of.outputs[0].name = unique_name(f"{prefix}.input_shape", used)
    unflatten = ir.node("Reshape", [None, shape_of.outputs[0]], name=unique_name(f"{prefix}.unflatten", used))
    view = unflatten.outputs[0]
    view.dtype, view.shape = dtype, old_shape
    y.replace_all_uses_with(view, replace_graph_outputs=True)
    unflatten.replace_input_with(0, y)
    view.name = old_name
    graph.insert_after(node, (shape_of, unflatten))
    return tokens


# -- a CPU-runnable reference ---------------------------------------------------------------------


def _interleave(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """[E,I,...] gate and up -> [E,2I,...] with rows g0,u0,g1,u1,..."""
    stacked = np.stack((gate, up), axis=2)
    return np.ascontiguousarray(stacked.reshape(gate.shape[0], 2 * gate.shape[1], *gate.shape[2:]))


def _cpu_form(graph: ir.Graph, node: ir.Node, used: set[str]) -> bool:
    """Rewrite one MoE node that ONNX Runtime's CPU kernel refuses into swiglu_fusion=1."""
    try:
        layout, _, _, i, w = _experts(node)
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
    if _attr(node, "activation_type", "relu") == "silu":  # silu(fc1 x) * (fc3 x) is plain SwiGLU
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
        nodes = [n for n in graph if claims(n)]
        used = _names(graph) if nodes else set()
        modified = False
        for node in nodes:
            modified |= _cpu_form(graph, node, used)
        return ir.passes.PassResult(model, modified=modified)


def to_cpu_form(model: ir.Model) -> bool:
    """Apply `CpuMoEFormPass` to `model` in place; return whether any node changed."""
    return CpuMoEFormPass()(model).modified
