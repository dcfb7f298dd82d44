"""Graphs that already hold ONNX Runtime's fused MoE operator (`com.microsoft.MoE`, `ort_moe`),
or its quantized twin `com.microsoft.QMoE` (what onnxruntime-genai's model builder writes).

Form recognised (ONNX Runtime contrib op, domain `com.microsoft`, version 1):

    output = MoE(input [T,H] | [B,S,H], router_probs [T,E],
                 fc1 [E,2I,H] | [E,I,H], fc1_bias?, fc2 [E,H,I], fc2_bias?, fc3 [E,I,H]?, fc3_bias?;
                 k, activation_type, normalize_routing_weights, swiglu_fusion, activation_alpha,
                 activation_beta, swiglu_limit, use_sparse_mixer)

`router_probs` holds the router's raw logits (the kernel takes their softmax, picks the top k and
renormalises them when `normalize_routing_weights` is 1): router `softmax_topk`. The model's
router stays in the graph and keeps feeding the block.

onnxruntime-genai's builder writes LFM2's router before the node instead (`_upstream_router`):

    s = sigmoid(L); ids = TopK(s + bias [E], k)
    router_probs = ScatterElements(ConstantOfShape(-10000), ids, Log(Clip(GatherElements(s, ids))))

so the node's softmax gives s[ids] / sum(s[ids]), and any other expert none. That is the sigmoid
router with a correction bias (`sigmoid_grouped`, one group, no scaling, renormalised): the block
binds L as its router logits, and the scatter, no longer read, goes with the node. Expert layouts, all SwiGLU
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

import dataclasses
import math

import numpy as np
import onnx_ir as ir

from lynx_export.compiler import ort_moe_node as moe_node
from lynx_export.compiler.blocks import ExpertWeights, MoEBlock, NoMatch
from lynx_export.compiler.forms.match import Match, const, dim, rank, sequence_source, shortest_float
from lynx_export.compiler.graph_builder import graph_names, unique_name
from lynx_export.op.spec import Activation, MoESpec
from lynx_export.routing import GroupedRouting, RouterForm

__all__ = ["FORM", "claims", "match"]

FORM = "ort_moe"
INPUT, ROUTER = moe_node.INPUT, moe_node.ROUTER


def claims(node: ir.Node) -> bool:
    """An ONNX Runtime MoE or QMoE node."""
    return moe_node.is_moe(node)


def _sigmoid_input(value: ir.Value) -> ir.Value | None:
    """x where `value` is sigmoid(x): Sigmoid(x), or Reciprocal(1 + Exp(Neg(x))) as the builder spells it."""
    node = value.producer()
    if node is not None and node.op_type == "Sigmoid":
        return node.inputs[0]
    if node is None or node.op_type != "Reciprocal":
        return None
    add = node.inputs[0].producer()
    if add is None or add.op_type != "Add":
        return None
    for exp_in, one in (add.inputs, add.inputs[::-1]):
        exp, one = exp_in.producer(), const(one)
        if exp is not None and exp.op_type == "Exp" and one is not None and one.size == 1 and float(one.ravel()[0]) == 1.0:
            neg = exp.inputs[0].producer()
            if neg is not None and neg.op_type == "Neg":
                return neg.inputs[0]
    return None


def _upstream_router(probs: ir.Value, k: int, e: int) -> tuple[ir.Value, GroupedRouting] | None:
    """(L, the grouping) of the LFM2 form in the module docstring, None for any other producer."""
    scatter = probs.producer()
    if scatter is None or scatter.op_type != "ScatterElements" or len(scatter.inputs) != 3 or None in scatter.inputs:
        return None
    fill_node, ids, updates = scatter.inputs[0].producer(), scatter.inputs[1], scatter.inputs[2]
    fill_value = fill_node.attributes.get("value") if fill_node is not None and fill_node.op_type == "ConstantOfShape" else None
    fill = fill_value.value.numpy() if fill_value is not None else None
    topk = ids.producer()
    if (fill is None or fill.size != 1 or not float(fill.ravel()[0]) <= -1e3 or topk is None or topk.op_type != "TopK"
            or topk.outputs[1] is not ids or scatter.attributes.get_int("axis", 0) not in (1, -1)
            or scatter.attributes.get_string("reduction", "none") != "none"):
        return None
    k_value = const(topk.inputs[1]) if len(topk.inputs) > 1 else None  # (a TopK before opset 10 holds k as an attribute)
    if topk.attributes.get_int("largest", 1) != 1 or topk.attributes.get_int("axis", -1) not in (1, -1) or k_value is None \
            or k_value.size != 1 or int(k_value.ravel()[0]) != k:
        return None
    log = updates.producer()
    inner = log.inputs[0] if log is not None and log.op_type == "Log" else None
    clip = inner.producer() if inner is not None else None
    gather = (clip.inputs[0] if clip is not None and clip.op_type == "Clip" else inner).producer() if inner is not None else None
    if gather is None or gather.op_type != "GatherElements" or gather.inputs[1] is not ids or gather.attributes.get_int("axis", 0) not in (1, -1):
        return None
    scores, choice = gather.inputs[0], topk.inputs[0].producer()
    if choice is None or choice.op_type != "Add" or scores not in choice.inputs:
        return None
    bias = const(choice.inputs[1] if choice.inputs[0] is scores else choice.inputs[0])
    logits = _sigmoid_input(scores)
    if logits is None or bias is None or bias.size != e:
        return None
    return logits, GroupedRouting(1, 1, 1.0, tuple(shortest_float(x) for x in bias.astype(np.float32).ravel()))


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
    upstream = _upstream_router(logits, k, e)
    if upstream is not None:
        logits = upstream[0]
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
        router=RouterForm.SOFTMAX_TOPK if upstream is None else RouterForm.SIGMOID_GROUPED,
        # The softmax of log-scores renormalises them whatever the node's flag says.
        normalize=bool(moe_node.attribute(node, "normalize_routing_weights", 0)) or upstream is not None,
        **({} if upstream is None else dataclasses.asdict(upstream[1])),
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
