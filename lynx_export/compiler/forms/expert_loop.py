"""Per-expert loop exports (`expert_loop`): a Python loop over the experts, unrolled by a tracer.

Form recognised (torch's TorchScript exporter, `dynamo=False`, of a transformers 4.x style
`MixtralSparseMoeBlock.forward`):

    hidden [T,H] = Reshape(x [B,S,H], [-1,H])
    logits [T,E] = MatMul|Gemm(hidden, W_router) (+ b_router)
    probs = Cast(Softmax(logits)); w, ids = TopK(probs, K); w = w / ReduceSum(w)   (renormalise: optional)
      or  w, ids = TopK(logits, K); w = Softmax(w)                                (top-k then softmax)
      or  DeepSeek-V3's sigmoid grouped router (router.match_router)             (sigmoid_grouped)
    mask [E,K,T] = Transpose(OneHot(ids, E), perm=[2,1,0])
    acc = zeros [T,H]                                                             (ConstantOfShape 0)
    for every expert e (unrolled, each with its own weights; loop_experts.py):
        idx, top_x = NonZero(Gather(mask, e))          (Transpose, Split, Squeeze: the two rows)
        rows = Reshape(Gather(Unsqueeze(hidden, 0), top_x, axis=1), [-1,H])
        y = MatMul(silu(MatMul(rows, W1_e)) * MatMul(rows, W3_e), W2_e)           (silu = g * Sigmoid(g))
          (each projection may add a bias; the activation may be gpt-oss's clamped SwiGLU:
           g = Clip(g, max=L), u = Clip(u, -L, L), a = g * Sigmoid(g * alpha) * (u + beta))
        y = y * Gather(Flatten(Unsqueeze(w)), top_x * K + idx)                   (routing_weights[top_x, idx, None])
        acc = acc + ScatterElements(zeros, Expand(Unsqueeze(top_x, 1)), y, axis=0) (index_add_)
          or  acc = ScatterElements|ScatterND(acc, top_x, y, reduction="add")
    out [T,H] = acc

torch's dynamo exporter (`dynamo=True`) unrolls the same loop with other ops, also matched:
the one-hot is Equal(Unsqueeze(ids, -1), arange(E)); NonZero's rows are Sliced; the rows are
GatherND(Transpose(Unsqueeze(hidden, 0)), Unsqueeze(top_x, -1)); the projections are
Gemm(rows, W[out,in], transB=1); the weight is GatherND(Unsqueeze(w, -1), [top_x, idx]); the
sum is ScatterND(acc, Unsqueeze(top_x, -1), y, reduction="add") from Expand(0, [T,H]).

The same computation arranged differently is matched too (tests/loop_models.py ARRANGEMENTS):
the rows as `hidden[top_x]` (Gather of axis 0), the coordinates from `torch.nonzero` (its
columns), the sum by `scatter_add_` (TorchScript slices y to the index's shape first: the whole
of y) or `index_put_(accumulate=True)` (ScatterND into zeros, added), and transformers 5's
stacked expert parameters indexed per expert, `F.linear(rows, gate_up_proj[e]).chunk(2, -1)`:
one fused gate/up projection (split in two, or two Slices of its halves), its weight one
expert's slice of the stacked parameter (Gather(gate_up_proj, e), bound as the stacked
initializer) or a per-expert initializer where the exporter folded the slice.

MoE families in this loop style (tests/loop_models.py, tests/test_form_expert_loop.py): Mixtral and
Qwen3-MoE (renormalised), OLMoE (not), Qwen2-MoE (its shared expert and sigmoid gate are added
after the running sum and stay outside the block), GraniteMoE (top-k then softmax), gpt-oss
(router bias, expert biases, clamped SwiGLU: spec activation_alpha, activation_beta,
swiglu_limit) and DeepSeek-V3 (sigmoid grouped router, spec num_groups, topk_groups,
routed_scaling, score_bias; shared expert outside the block). PhiMoE's sparse mixer router
(expert ids from a Concat of argmax rounds, not a TopK) is claimed and refused with its reason
(router.expert_ids_reason): ONNX Runtime's MoE kernel cannot route so.

Every expert 0..E-1 must appear exactly once, with the same weight shapes and layouts. The
expert's token rows are scattered to distinct rows (top-k ids are distinct), so a plain
scatter into zeros added to the running sum is the same as `index_add_`.

Torch's TorchScript exporter records no intermediate shapes: detection reads the ranks and
dimensions `compiler.ranks.RankInferencePass` deduces. It also casts the softmax to float before
the TopK (`softmax(..., dtype=torch.float)`): the router is matched looking through casts.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from lynx_export.compiler.blocks import ExpertWeights, Names, NoMatch
from lynx_export.compiler.forms.loop_experts import Expert, accumulate, match_experts, one_hots
from lynx_export.compiler.forms.match import (
    CAST_OPS,
    LAYOUT_OPS,
    RESHAPE_OPS,
    Linear,
    Match,
    RoutedExperts,
    behind,
    check_closed,
    const,
    expert_ids_reason,
    is_zeros,
    match_router,
    routed_block,
    router_linear,
    sequence_source,
)

__all__ = ["FORM", "claims", "match"]

FORM = "expert_loop"


def claims(node: ir.Node) -> bool:
    """A TopK whose expert ids are one-hot encoded into a per-expert mask, or another node
    computing ids that a per-expert loop reads so.

    Ids from something other than a TopK (PhiMoE's sparse mixer: a Concat of argmax rounds) are
    claimed so that the block is reported with the reason it cannot be rewritten
    (router.expert_ids_reason), not missed.
    """
    if node.domain not in ("", "ai.onnx"):
        return False
    if node.op_type == "TopK":
        return len(node.outputs) == 2 and bool(one_hots(node.outputs[1]))
    if node.op_type in LAYOUT_OPS:
        return False
    return any(_read_per_expert(encoding) for v in node.outputs for encoding, _ in one_hots(v))


def _read_per_expert(encoding: ir.Node) -> bool:
    """Whether a one-hot encoding (through casts and transposes) is read only by Gathers of
    constant experts, two or more: an unrolled loop over the experts' masks."""
    mask = encoding.outputs[0]
    while len(mask.uses()) == 1 and (user := next(iter(mask.uses()))[0]).op_type in CAST_OPS | {"Transpose"}:
        mask = user.outputs[0]
    uses = list(mask.uses())
    return len(uses) >= 2 and all(
        n.op_type == "Gather" and i == 0 and (picked := const(n.inputs[1])) is not None and np.ndim(picked) == 0 for n, i in uses
    )


def _running_sum(experts: list[Expert]) -> tuple[ir.Value, ir.Value]:
    """(zeros it starts from, block output): one running sum through every expert."""
    steps = {e.index: accumulate(e, f"expert {e.index}") for e in experts}
    by_input: dict[ir.Value, int] = {}
    for e, (acc_in, _) in steps.items():
        if acc_in in by_input:
            raise NoMatch(f"experts {by_input[acc_in]} and {e} add to the same partial sum")
        by_input[acc_in] = e
    outputs = {acc_out for _, acc_out in steps.values()}
    starts = [v for v in by_input if v not in outputs]
    if len(starts) != 1 or not is_zeros(starts[0]):
        raise NoMatch("expert outputs are not summed into one running sum that starts at zero")
    value, seen = starts[0], 0
    while value in by_input:
        value, seen = steps[by_input[value]][1], seen + 1
    if seen != len(experts):
        raise NoMatch("expert outputs are not summed into one running sum")
    return starts[0], value


def _stacked(linears: list[Linear], role: str) -> tuple[Names, Names | None]:
    """(weights, biases) of one projection over the experts in loop order: one initializer per
    expert (tuples of names), or the stacked parameters each expert reads its own slice of."""
    if all(lin.expert is None for lin in linears):
        biases = None if linears[0].bias is None else tuple(lin.bias.name for lin in linears)
        return tuple(lin.weight.name for lin in linears), biases
    if [lin.expert for lin in linears] == list(range(len(linears))) and len({(lin.weight, lin.bias) for lin in linears}) == 1:
        return linears[0].weight.name, None if linears[0].bias is None else linears[0].bias.name
    raise NoMatch(f"experts' {role} weights are neither one per expert nor their slices of one stacked parameter")


def _check_consistent(experts: list[Expert]) -> None:
    """Every expert has the same projections (layout, bias, fused gate/up or not) and SwiGLU."""
    if len({x.up is None for x in experts}) != 1:
        raise NoMatch("experts differ in whether gate and up are one projection")
    roles = {"gate": lambda x: x.gate_up, "down": lambda x: x.down}
    if experts[0].up is not None:
        roles["up"] = lambda x: x.up
    for role, of in roles.items():
        if len({(of(x).layout, of(x).bias is not None) for x in experts}) != 1:
            raise NoMatch(f"experts' {role} projections differ in layout or bias")
    if experts[0].up is not None and experts[0].gate_up.layout != experts[0].up.layout:
        raise NoMatch("gate and up projections have different layouts")
    if len({(x.activation.alpha, x.activation.beta, x.activation.limit) for x in experts}) != 1:
        raise NoMatch("experts' SwiGLU parameters (alpha, beta, limit) differ")
    if len({(x.activation.gate_first, x.activation.interleaved) for x in experts}) != 1:
        raise NoMatch("experts order their fused gate and up rows differently")


def _expert_size(experts: list[Expert], hidden_size: int) -> int:
    """I, from weight shapes that every expert shares and that fit H."""
    sizes = {(x.gate_up.in_out, None if x.up is None else x.up.in_out, x.down.in_out) for x in experts}
    if len(sizes) != 1:
        raise NoMatch("experts have different weight shapes")
    (h1, i1), up, (i3, h3) = sizes.pop()
    if up is None:
        if i1 % 2 or not h1 == h3 == hidden_size or i1 // 2 != i3:
            raise NoMatch(f"expert weight shapes disagree: gate/up [{h1},{i1}], down [{i3},{h3}] for H={hidden_size}")
        return i3
    h2, i2 = up
    if not h1 == h2 == h3 == hidden_size or not i1 == i2 == i3:
        raise NoMatch(f"expert weight shapes disagree: gate [{h1},{i1}], up [{h2},{i2}], down [{i3},{h3}] for H={hidden_size}")
    return i1


def match(topk: ir.Node) -> Match:
    """The block routed by `topk` (a claimed node that is no TopK is refused with its reason)."""
    if topk.op_type != "TopK":
        raise NoMatch(expert_ids_reason(topk))
    router = match_router(topk, look_through=CAST_OPS)
    linear = router_linear(router.logits)
    hidden, hidden_size, num_experts, k = linear.hidden, linear.hidden_size, linear.num_experts, router.top_k
    if not 1 <= k <= num_experts:
        raise NoMatch(f"top-k {k} is outside 1..{num_experts}")
    experts = match_experts(topk.outputs[1], num_experts, hidden, router.weights, k)
    zeros, output = _running_sum(experts)
    _check_consistent(experts)
    expert_size = _expert_size(experts, hidden_size)

    # The block may read the hidden state (or the [B,S,H] tensor it flattens, for its shape), the
    # router logits and the zeros its sum starts from (their shape may come from the model input).
    check_closed(output, set(behind(hidden, RESHAPE_OPS)) | {router.logits, zeros}, topk.graph)

    first = experts[0]
    gate_up, gate_up_bias = _stacked([x.gate_up for x in experts], "gate")
    down, down_bias = _stacked([x.down for x in experts], "down")
    up, up_bias = (None, None) if first.up is None else _stacked([x.up for x in experts], "up")
    weights = ExpertWeights(
        gate_up=gate_up,
        gate_up_layout=first.gate_up.layout,
        gate_first=True if first.up is not None else first.activation.gate_first,
        down=down,
        down_layout=first.down.layout,
        up=up,
        interleaved=first.activation.interleaved,
        gate_up_bias=gate_up_bias,
        up_bias=up_bias,
        down_bias=down_bias,
    )
    found = RoutedExperts(router, first.activation, num_experts, hidden_size, expert_size, weights)
    block = routed_block(FORM, found, hidden, output, sequence_source(hidden, hidden_size))
    return Match(block, (topk, output.producer()))
