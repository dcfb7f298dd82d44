"""The torch dynamo export of stacked experts run as batched matmuls (`batched_mm`).

Form recognised (torch dynamo export of stacked experts run as batched matmuls):

    logits [T,E] = Gemm|MatMul(hidden [T,H], W_router)                    (+ a router bias)
    probs = Softmax(logits); w, ids = TopK(probs, K); w = w / ReduceSum(w)   (renormalise: optional)
      or  w, ids = TopK(logits, K); w = Softmax(w)                          (top-k then softmax)
    W1[t,k] = Gather|GatherND(gate_up [E,2I,H], ids)   rows = expand(tokens) [T*K,H]
    h = MatMul(W1, rows) (+ Gather(gate_up_bias [E,2I], ids))
    g, u = Split(h) ([gate; up] concatenated) or Slice(h, 0::2), Slice(h, 1::2) (interleaved)
    a = g * Sigmoid(g) * u, or clamped as gpt-oss's: g = Clip(g, max=L), u = Clip(u, -L, L),
        a = g * Sigmoid(g * alpha) * (u + beta)   (spec: activation_alpha, activation_beta, swiglu_limit)
    y = MatMul(Gather(down [E,H,I], ids), a) (+ Gather(down_bias [E,H], ids))
    out [T,H] = ReduceSum(Reshape(y, [T,K,H]) * w, axis=1)   (or y * w weighed before the reshape)

Weights are [out,in] per expert (torch Linear order, MatMul(W, x)) or transposed ([E,H,2I] and
[E,I,H], MatMul(x, W): gpt-oss). Spellings known, which differ only in layout ops the matcher
looks through:

  * the demo model (lynx_export/evaluation/demo.py): the router and the experts read one flattened value,
    `tokens = hidden = Reshape(x [B,S,H], [-1,H])`; the combine reshapes first and weighs after,
    `ReduceSum(Reshape(y, [T,K,H]) * Unsqueeze(w), axis=1)`.
  * transformers (`config._experts_implementation = "batched_mm"`: Mixtral, Qwen2-MoE, Qwen3-MoE,
    OLMoE, GraniteMoE, ...): the block flattens x once and its router may flatten again, so the
    router reads `hidden = Reshape(tokens, [-1,H])`, a sibling view of the `tokens` the experts
    expand (`repeat_interleave`); the combine weighs the rows first,
    `ReduceSum(Reshape(y * Unsqueeze(Reshape(w, [-1])), [T,K,H]), axis=1)`. The router and the
    experts are separate modules; the block is named after their common scope. A shared expert
    (Qwen2-MoE's, with its sigmoid gate) is added after the combine and stays outside the block.

In both, `hidden` and `tokens` hold the same elements: `tokens` is `hidden` or a value `hidden`
is a reshape of. The block binds `hidden` (the router's [T,H] input) and reads `tokens` inside.

gpt-oss (in_out weights, interleaved gate/up rows, expert biases, a router bias, top-k then
softmax, clamped SwiGLU with alpha 1.702, beta 1, limit 7) is matched with its parameters.
DeepSeek-V3's sigmoid grouped router (sigmoid scores plus a correction bias, the best groups
kept, weights renormalised and scaled; match.match_grouped_router) is matched with its
parameters; its shared expert stays outside the block. Refused with its reason
(tests/test_families.py): PhiMoE's sparse mixer (expert ids from argmax rounds, claimed here so
that it is reported).
"""

from __future__ import annotations

import onnx_ir as ir

from lynx_export.compiler.blocks import NoMatch
from lynx_export.compiler.forms.match import (
    GATHER_OPS,
    LAYOUT_OPS,
    RESHAPE_OPS,
    Match,
    StackedWeights,
    behind,
    dim,
    expert_ids_reason,
    forward,
    is_weight,
    match_bias_add,
    match_combine,
    match_gated_activation,
    match_routing,
    rank,
    relabels,
    single_consumer,
    stacked_block,
)

FORM = "batched_mm"


def claims(node: ir.Node) -> bool:
    """A TopK whose expert ids index stacked expert weights, or another node computing such ids.

    Ids from something other than a TopK (PhiMoE's sparse mixer: argmax rounds) are claimed so
    that they are reported with the reason the block cannot be rewritten, not missed.
    """
    if node.domain not in ("", "ai.onnx"):
        return False
    if node.op_type == "TopK":
        return len(node.outputs) == 2 and _feeds_expert_gather(node.outputs[1])
    if node.op_type in LAYOUT_OPS:
        return False
    return any(_feeds_expert_gather(v, stacked=True) for v in node.outputs)


def _feeds_expert_gather(ids: ir.Value, stacked: bool = False) -> bool:
    """Whether `ids` index constant weights (with `stacked`: [E,*,*] expert matrices)."""
    return any(
        n.op_type in GATHER_OPS and i == 1 and is_weight(n.inputs[0]) and (not stacked or rank(n.inputs[0]) == 3)
        for n, i in forward(ids)
    )


def _expert_tokens(data: ir.Value, hidden: ir.Value, hidden_size: int | None) -> ir.Value | None:
    """The token matrix behind an expert projection's data operand, when it is the router's.

    `data` must be a layout-only view (expand, reshape) of `hidden` or of a value `hidden` is a
    reshape of, so that both hold the same [*,H] token rows.
    """
    views = behind(hidden, RESHAPE_OPS)
    for value in behind(data, LAYOUT_OPS):
        if value in views and (value is hidden or (hidden_size is not None and dim(value, -1) == hidden_size)):
            return value
    return None


def _expert_matmul(gather: ir.Node) -> tuple[ir.Node, ir.Value, str]:
    """The batched matmul that applies a gathered weight: (node, its data operand, layout)."""
    node, index = single_consumer(gather.outputs[0], {"MatMul"}, "gathered expert weight")
    data = node.inputs[1 - index]
    # MatMul(W[out,in], x[in,1]) is torch Linear order; MatMul(x[1,in], W[in,out]) the transpose.
    return node, data, "out_in" if index == 0 else "in_out"


def match(topk: ir.Node) -> Match:
    """The block routed by `topk` (a claimed node that is no TopK is refused with its reason)."""
    if topk.op_type != "TopK":
        raise NoMatch(expert_ids_reason(topk))
    router, linear = match_routing(topk)
    num_experts, k, hidden, hidden_size = linear.num_experts, router.top_k, linear.hidden, linear.hidden_size

    # Stacked expert matrices [E,*,*] and, where the experts have biases, stacked biases [E,*].
    gathers = [n for n, i in forward(topk.outputs[1]) if n.op_type in GATHER_OPS and i == 1]
    for g in gathers:
        data = g.inputs[0]
        if not is_weight(data) or rank(data) not in (2, 3) or dim(data, 0) != num_experts:
            raise NoMatch("expert ids index something other than stacked [E,*,*] expert weights")
        if g.op_type == "Gather" and g.attributes.get_int("axis", 0) != 0:
            raise NoMatch("expert weights are gathered along a non-expert axis")
    matrices = [g for g in gathers if rank(g.inputs[0]) == 3]
    biases = [g for g in gathers if rank(g.inputs[0]) == 2]
    if len(matrices) == 3:
        raise NoMatch("separate gate and up expert weights: not supported yet")
    if len(matrices) != 2:
        raise NoMatch(f"expected 2 stacked expert weights (gate_up, down), found {len(matrices)}")

    # The projection whose data operand is a view of the router's hidden state is gate_up.
    matmuls = [_expert_matmul(g) for g in matrices]
    tokens = [_expert_tokens(data, hidden, hidden_size) for _, data, _ in matmuls]
    first = [i for i, t in enumerate(tokens) if t is not None]
    if len(first) != 1:
        raise NoMatch("no expert projection reads the router's hidden state")
    up_i = first[0]
    (up_mm, _, up_layout), (down_mm, down_data, down_layout) = matmuls[up_i], matmuls[1 - up_i]
    gate_up_w, down_w = matrices[up_i].inputs[0], matrices[1 - up_i].inputs[0]

    bias_values = {g.outputs[0]: g.inputs[0] for g in biases}
    gate_up_out, gate_up_bias = match_bias_add(up_mm.outputs[0], bias_values)
    act = match_gated_activation(gate_up_out)
    if not relabels(down_data, act.output):
        raise NoMatch("down projection does not read the activation")
    down_out, down_bias = match_bias_add(down_mm.outputs[0], bias_values)
    if len(biases) != (gate_up_bias is not None) + (down_bias is not None):
        raise NoMatch("stacked expert biases are not added to the expert projections")
    output = match_combine(down_out, router.weights, k)

    two_i, h1 = (dim(gate_up_w, 1), dim(gate_up_w, 2)) if up_layout == "out_in" else (dim(gate_up_w, 2), dim(gate_up_w, 1))
    h2, i2 = (dim(down_w, 1), dim(down_w, 2)) if down_layout == "out_in" else (dim(down_w, 2), dim(down_w, 1))
    if two_i is None or two_i % 2 or h1 is None or h2 is None or i2 is None:
        raise NoMatch("expert weight shapes are not [E,2I,H] and [E,H,I]")
    if h1 != h2 or two_i // 2 != i2 or (hidden_size is not None and hidden_size != h1):
        raise NoMatch(f"expert weight shapes disagree: gate_up {list(gate_up_w.shape)}, down {list(down_w.shape)}")
    found = StackedWeights(gate_up_w.name, up_layout, down_w.name, down_layout, None if gate_up_bias is None else bias_values[gate_up_bias],
                           None if down_bias is None else bias_values[down_bias])
    return stacked_block(FORM, topk, router, act, found, (num_experts, h1, i2), hidden, output, {hidden, router.logits, tokens[up_i]})
