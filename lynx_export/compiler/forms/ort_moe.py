"""Graphs that already hold ONNX Runtime's fused MoE operator (`com.microsoft.MoE`, `ort_moe`),
or its quantized twin `com.microsoft.QMoE` (what onnxruntime-genai's model builder writes).

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

QMoE (integer, block-wise: `compiler/ort_moe_node.py` says which) has the same layouts with
packed uint8 weights and their scales / zero points at its own slots; the block keeps them as
they are (no round trip through float), and its LynxMoE node is quantized alike.

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

from lynx_export.compiler import ort_moe_node as moe_node
from lynx_export.compiler.blocks import ExpertWeights, MoEBlock, NoMatch
from lynx_export.compiler.forms.match import Match, dim, rank, sequence_source, shortest_float
from lynx_export.compiler.graph_builder import graph_names, unique_name
from lynx_export.op.spec import Activation, MoESpec
from lynx_export.routing import RouterForm

__all__ = ["FORM", "claims", "match"]

FORM = "ort_moe"
INPUT, ROUTER = moe_node.INPUT, moe_node.ROUTER


def claims(node: ir.Node) -> bool:
    """An ONNX Runtime MoE or QMoE node."""
    return moe_node.is_moe(node)


def _swiglu_parameters(node: ir.Node) -> tuple[float, float, float | None]:
    """(alpha, beta, limit) of a SwiGLU node: g * sigmoid(alpha * g) * (u + beta) with g <= limit
    and |u| <= limit (ONNX Runtime's `activation_alpha`, `activation_beta`, `swiglu_limit`; an
    infinite or absent limit is no clamp)."""
    # ONNX float attributes are float32: 1.702, not 1.7020000219345093.
    alpha = shortest_float(np.float32(moe_node.attribute(node, "activation_alpha", 1.0)))
    beta = shortest_float(np.float32(moe_node.attribute(node, "activation_beta", 0.0)))
    limit = moe_node.attribute(node, "swiglu_limit", None)
    if limit is not None:
        limit = shortest_float(np.float32(limit))
        if math.isinf(limit) and limit > 0:
            limit = None
        elif math.isnan(limit) or limit <= 0:
            raise NoMatch(f"swiglu_limit={limit:g}: only a positive limit (or none) is supported")
    if not (math.isfinite(alpha) and math.isfinite(beta)):
        raise NoMatch(f"activation_alpha={alpha:g}, activation_beta={beta:g}: not finite")
    if limit is not None and moe_node.attribute(node, "swiglu_limit_after_activation", 0):
        raise NoMatch("swiglu_limit_after_activation=1 (the activated gate clamped, not its input): "
                      "only the gate input clamped (gate <= limit) is supported")
    return alpha, beta, limit


def _check_inputs(node: ir.Node) -> None:
    last = max(moe_node.slots(node).values())
    extra = [i for i, v in enumerate(node.inputs) if i > last and v is not None and node.op_type == "MoE"]
    if extra:
        raise NoMatch(f"MoE optional_input(s) {extra} beyond fc3_experts_bias: unknown to this version of the form")
    if moe_node.optional_input(node, INPUT) is None or moe_node.optional_input(node, ROUTER) is None:
        raise NoMatch("MoE input or router_probs is missing")
    if len(node.outputs) != 1 or not node.outputs[0].name:
        raise NoMatch("MoE node without one named output")


def match(node: ir.Node) -> Match:
    """The block of one MoE node; 3-D inputs are given [T,H] views (see the module docstring)."""
    _check_inputs(node)
    if moe_node.attribute(node, "use_sparse_mixer", 0):
        raise NoMatch("sparse mixer (PhiMoE) routing: ONNX Runtime's CPU kernel ignores it, so the original cannot be "
                      "verified, and LynxMoE has no such router")
    experts = moe_node.stacked_experts(node)
    layout, e, h, i, w = experts.layout, experts.num_experts, experts.hidden_size, experts.expert_size, experts.weights
    # silu(fc1 x) * (fc3 x) has no SwiGLU parameters (`_cpu_form` drops them).
    alpha, beta, limit = 1.0, 0.0, None
    if layout != moe_node.SEPARATE or moe_node.attribute(node, "activation_type", "relu") == "swiglu":
        alpha, beta, limit = _swiglu_parameters(node)
    if layout == moe_node.SEPARATE and (w["fc1_bias"] is None) != (w["fc3_bias"] is None):
        raise NoMatch("fc3 form with only one of fc1_bias / fc3_bias: not supported")
    k = int(moe_node.attribute(node, "k", 1))
    if not 1 <= k <= e:
        raise NoMatch(f"top-k {k} is outside 1..{e}")

    hidden, logits = node.inputs[INPUT], node.inputs[ROUTER]
    if rank(logits) not in (None, 2) or dim(logits, -1) not in (None, e):
        raise NoMatch(f"router_probs shape {list(logits.shape)} is not [T,{e}]")
    hidden_rank = rank(hidden)
    if hidden_rank not in (None, 2, 3) or dim(hidden, -1) not in (None, h):
        raise NoMatch(f"input shape {list(hidden.shape or [])} is not [T,{h}] or [B,S,{h}]")
    # MoE's input, router_probs, output and weights share one type (T), QMoE's input, router_probs
    # and output (its weights are uint8, its scales float): annotate values the graph left
    # untyped, as the rewrite and the lowering read their types.
    dtype = hidden.dtype or logits.dtype or (w["fc1"] if experts.quantization is None else w["fc1_scales"]).const_value.dtype
    for value in (hidden, logits, node.outputs[0]):
        if value.dtype is None:
            value.dtype = dtype
    if hidden_rank != 2:  # [B,S,H] (or of unknown rank): bind [T,H] views
        hidden = _flatten(node, h, dtype)
    source = sequence_source(hidden, h)

    spec = MoESpec(
        num_experts=e,
        top_k=k,
        hidden_size=h,
        expert_size=i,
        activation=Activation.SWIGLU,
        router=RouterForm.SOFTMAX_TOPK,
        normalize=bool(moe_node.attribute(node, "normalize_routing_weights", 0)),
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
        interleaved=layout == moe_node.INTERLEAVED,
        gate_up_bias=name(w["fc1_bias"]),
        up_bias=name(w["fc3_bias"]),
        down_bias=name(w["fc2_bias"]),
        quantization=experts.quantization,
        gate_up_scales=name(w["fc1_scales"]),
        up_scales=name(w["fc3_scales"]),
        down_scales=name(w["fc2_scales"]),
        gate_up_zero_points=name(w["fc1_zero_points"]),
        up_zero_points=name(w["fc3_zero_points"]),
        down_zero_points=name(w["fc2_zero_points"]),
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


def _flatten(node: ir.Node, hidden_size: int, dtype: ir.DataType) -> ir.Value:
    """Make `node` read Reshape(input, [-1,H]) and write [T,H]; its old output value (name,
    uses, graph output) becomes Reshape(that, Shape(input)). Returns the [T,H] input view."""
    graph = node.graph
    used = graph_names(graph)
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
