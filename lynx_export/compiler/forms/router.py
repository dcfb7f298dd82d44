"""The router behind a block's TopK: its form, logits, routing weights and parameters, the linear
layer computing its logits, and why expert ids that come from no TopK cannot be rewritten."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from lynx_export.compiler.blocks import NoMatch
from lynx_export.compiler.forms.graph import (
    CAST_OPS,
    LAYOUT_OPS,
    RESHAPE_OPS,
    axis_is_last,
    behind,
    const,
    const_ints,
    dim,
    fill_value,
    forward,
    keepdims,
    rank,
    reduce_axes,
    relabels,
    scalar,
    shortest_float,
    upstream,
)
from lynx_export.compiler.forms.linear import linear_producing
from lynx_export.errors import RoutingError
from lynx_export.routing import GroupedRouting, RouterForm

__all__ = ["RouterMatch", "match_router", "RouterLinear", "router_linear", "expert_ids_reason", "SPARSE_MIXER"]

SPARSE_MIXER = "PhiMoE sparse mixer router (argmax rounds over masked logits): ONNX Runtime's MoE kernel cannot reproduce it"


@dataclass(frozen=True)
class RouterMatch:
    """A matched router: [T,E] logits in, [T,K] routing weights out (what the combine multiplies by)."""

    logits: ir.Value
    weights: ir.Value
    form: RouterForm
    normalize: bool
    top_k: int
    grouping: GroupedRouting | None = None  # sigmoid_grouped's parameters


def match_router(topk: ir.Node, *, look_through: frozenset[str] = frozenset()) -> RouterMatch:
    """The router whose expert choice is `topk`: softmax -> top-k (renormalised or not), top-k ->
    softmax, or DeepSeek-V3's sigmoid grouped router (`_match_grouped`).

    `look_through`: ops allowed between the softmax and the TopK and between a renormalisation's
    sum and its division, besides the layout ops around the weights (TorchScript casts the
    softmax to float before the TopK: CAST_OPS). Sigmoid routers other than the grouped one
    are refused with their name.
    """
    k = _top_k(topk)
    values = topk.outputs[0]
    scores = behind(topk.inputs[0], look_through)[-1]
    softmax = scores.producer()
    if softmax is not None and softmax.op_type == "Softmax":
        if not axis_is_last(softmax, rank(softmax.inputs[0])):
            raise NoMatch("router softmax does not run over the expert axis")
        renormalised = _renormalised(values, look_through)
        weights = values if renormalised is None else renormalised
        return RouterMatch(softmax.inputs[0], weights, RouterForm.SOFTMAX_TOPK, renormalised is not None, k)
    softmaxes = [n for n, _ in forward(values) if n.op_type == "Softmax" and axis_is_last(n, rank(n.inputs[0]))]
    if len(softmaxes) == 1:
        return RouterMatch(topk.inputs[0], softmaxes[0].outputs[0], RouterForm.TOPK_SOFTMAX, True, k)
    sigmoid = _sigmoid_router(topk.inputs[0])
    if sigmoid is not None:
        try:
            return _match_grouped(topk, k)
        except NoMatch as exc:
            detail = f" ({exc})" if sigmoid.grouped else ""
            raise NoMatch(f"{sigmoid}: not supported yet{detail}") from None
    raise NoMatch("router is neither softmax->top-k nor top-k->softmax")


def _top_k(topk: ir.Node) -> int:
    """The constant K of a TopK picking the largest values along the last axis."""
    k = const_ints(topk.inputs[1]) if len(topk.inputs) > 1 else None
    if not k or len(k) != 1:
        raise NoMatch("top-k is not a constant")
    if not axis_is_last(topk, rank(topk.inputs[0])):
        raise NoMatch("TopK does not run over the expert axis")
    if topk.attributes.get_int("largest", 1) == 0:
        raise NoMatch("TopK picks the smallest values")
    return k[0]


def _renormalised(weights: ir.Value, look_through: frozenset[str]) -> ir.Value | None:
    """`weights / ReduceSum(weights, -1)` (plus a small constant or not) if the graph divides so."""
    for node, index in forward(weights):
        if node.op_type == "Div" and index == 0 and _is_sum_of(node.inputs[1], weights, look_through):
            return node.outputs[0]
    return None


def _is_sum_of(denominator: ir.Value | None, values: ir.Value, look_through: frozenset[str]) -> bool:
    """`denominator` is ReduceSum(values) over the last axis (keepdims), plus at most 1e-6 or not."""
    node = behind(denominator, look_through)[-1].producer() if denominator is not None else None
    if node is not None and node.op_type == "Add" and len(node.inputs) == 2:
        eps = [scalar(v) for v in node.inputs]
        if sum(e is not None for e in eps) != 1 or not 0 <= max(e for e in eps if e is not None) <= 1e-6:
            return False
        node = behind(node.inputs[0 if eps[0] is None else 1], look_through)[-1].producer()
    if node is None or node.op_type != "ReduceSum" or not relabels(node.inputs[0], values) or not keepdims(node):
        return False
    if reduce_axes(node) not in ([-1], [(rank(values) or 0) - 1]):
        raise NoMatch("routing weights are renormalised over another axis than the top-k")
    return True


@dataclass(frozen=True)
class _Sigmoid:
    """A sigmoid router found behind a TopK's scores (`_sigmoid_router`)."""

    grouped: bool  # its scores are masked to groups picked by another TopK
    bias: bool  # a constant is added to its scores

    def __str__(self) -> str:
        return f"sigmoid {'grouped ' if self.grouped else ''}router" + (" with score correction bias" if self.bias else "")


def _sigmoid_router(scores: ir.Value) -> _Sigmoid | None:
    """The sigmoid router behind the scores a TopK picks from, if that is what it is.

    Walks back through layout ops, a constant added to the scores (DeepSeek-V3's
    `e_score_correction_bias`) and `masked_fill`s (`Where(mask, -inf, scores)`; a mask computed
    from another TopK is the group-limited selection of DeepSeek-V3's grouped router).
    """
    bias = grouped = False
    value: ir.Value | None = scores
    for _ in range(32):
        node = value.producer() if value is not None else None
        if node is None:
            return None
        if node.op_type == "Sigmoid":
            return _Sigmoid(grouped, bias)
        if node.op_type in LAYOUT_OPS:
            value = node.inputs[0]
            continue
        if node.op_type == "Where" and len(node.inputs) == 3:
            data = [v for v in node.inputs[1:] if v is not None and const(v) is None]
            grouped = grouped or "TopK" in upstream(node.inputs[0]).op_types()
        elif node.op_type == "Add" and len(node.inputs) == 2:
            data = [v for v in node.inputs if v is not None and const(v) is None]
            bias = True
        else:
            return None
        if len(data) != 1:
            return None
        value = data[0]
    return None


def _match_grouped(topk: ir.Node, k: int) -> RouterMatch:
    """DeepSeek-V3's sigmoid grouped router behind its expert TopK (transformers'
    DeepseekV3TopkRouter as torch's dynamo exporter writes it):

        scores = Sigmoid(logits); choice = Add(scores, bias [E])                 (bias optional)
        group = ReduceSum(TopK(Reshape(choice, [-1,G,S]), 2).values, axis=-1)    [T,G]
        kept = ScatterElements(zeros [T,G], TopK(group, topk_groups).indices, ones)
        masked = Where(Not(Cast(Reshape(Expand(Unsqueeze(kept, -1))))), -inf, choice)
        ids = TopK(masked, K).indices; w = GatherElements(scores, ids, axis=1)
        w = w / ReduceSum(w, -1) (+ eps)   (norm_topk_prob: optional); w = w * scaling (optional)
    """
    masked = behind(topk.inputs[0], RESHAPE_OPS)[-1]
    where = masked.producer()
    if where is None or where.op_type != "Where" or len(where.inputs) != 3:
        raise NoMatch("the experts are not picked from group-masked scores (Where)")
    cond, on_true, on_false = where.inputs
    if fill_value(on_true) == -np.inf and fill_value(on_false) is None:
        choice, drop_when = on_false, True  # masked_fill(~kept, -inf)
    elif fill_value(on_false) == -np.inf and fill_value(on_true) is None:
        choice, drop_when = on_true, False
    else:
        raise NoMatch("the group mask does not set the other experts to -inf")
    scatter, kept_when = _group_mask_source(cond)
    if kept_when == drop_when:
        raise NoMatch("the group mask keeps the experts outside the best groups")

    # The group selection: ScatterElements(zeros, TopK(group scores, topk_groups).indices, ones).
    data, indices, updates = scatter.inputs[0], scatter.inputs[1], scatter.inputs[2]
    if scatter.attributes.get_int("axis", 0) not in (1, -1) or fill_value(data) != 0.0 or fill_value(updates) != 1.0:
        raise NoMatch("the kept groups are not scattered as ones into zeros")
    group_topk = indices.producer() if indices is not None else None
    if group_topk is None or group_topk.op_type != "TopK" or indices is not group_topk.outputs[1]:
        raise NoMatch("the kept groups do not come from a TopK over the group scores")
    topk_groups = _group_top_k(group_topk)
    group_sum = group_topk.inputs[0].producer()
    if group_sum is None or group_sum.op_type != "ReduceSum" or reduce_axes(group_sum) not in ([-1], [2]) or keepdims(group_sum):
        raise NoMatch("group scores are not a sum over each group's best scores")
    best = group_sum.inputs[0].producer()
    if best is None or best.op_type != "TopK" or group_sum.inputs[0] is not best.outputs[0] or _group_top_k(best) != 2:
        raise NoMatch("group scores do not sum each group's 2 best scores")
    per_group = best.inputs[0]
    num_groups, size = dim(per_group, 1), dim(per_group, 2)
    if rank(per_group) != 3 or num_groups is None or size is None or not relabels(per_group, choice):
        raise NoMatch("group scores are not taken over [T, groups, experts per group] of the scores")

    # choice = scores (+ bias); scores = Sigmoid(logits).
    bias = None
    node = choice.producer()
    if node is not None and node.op_type == "Add" and len(node.inputs) == 2:
        constants = [const(v) for v in node.inputs]
        if sum(c is not None for c in constants) != 1:
            raise NoMatch("the score correction bias is not a constant")
        at = 0 if constants[0] is not None else 1
        bias, scores = constants[at], node.inputs[1 - at]
    else:
        scores = choice
    sigmoid = scores.producer()
    if sigmoid is None or sigmoid.op_type != "Sigmoid":
        raise NoMatch("router scores are not a sigmoid of the logits")
    logits = sigmoid.inputs[0]
    experts = dim(logits, -1)
    if experts is None or num_groups * size != experts:
        raise NoMatch(f"{num_groups} groups of {size} do not cover the router's {experts} experts")
    if not 1 <= topk_groups <= num_groups or k > topk_groups * size:
        raise NoMatch(f"top-{k} of {topk_groups} kept groups of {size} experts")
    if bias is not None:
        if bias.size not in (1, experts) or (bias.ndim and bias.shape[-1] != bias.size):
            raise NoMatch(f"score correction bias of shape {list(bias.shape)} for {experts} experts")
        bias = np.broadcast_to(bias.reshape(-1), (experts,))

    # Weights: the picked experts' scores, renormalised (optional), scaled (optional).
    gathers = [n for n, i in forward(topk.outputs[1]) if n.op_type == "GatherElements" and i == 1 and relabels(n.inputs[0], scores)]
    if len(gathers) != 1 or gathers[0].attributes.get_int("axis", 1) not in (1, -1):
        raise NoMatch("the routing weights are not the picked experts' sigmoid scores")
    weights = gathers[0].outputs[0]
    renormalised = _renormalised(weights, frozenset())
    if renormalised is not None:
        weights = renormalised
    scaling = 1.0
    for node, index in weights.uses():
        factor = scalar(node.inputs[1 - index]) if node.op_type == "Mul" and len(node.inputs) == 2 else None
        if factor is not None:
            weights, scaling = node.outputs[0], factor
            break
    try:
        grouping = GroupedRouting(num_groups, topk_groups, scaling,
                                  None if bias is None else tuple(shortest_float(x) for x in bias.astype(np.float32)))
    except RoutingError as exc:
        raise NoMatch(f"grouped router parameters: {exc}") from None
    return RouterMatch(logits, weights, RouterForm.SIGMOID_GROUPED, renormalised is not None, k, grouping)


def _group_mask_source(cond: ir.Value) -> tuple[ir.Node, bool]:
    """The ScatterElements a [T,E] group mask expands from, and whether `cond` is true for the
    experts of the scattered groups (False when it is their negation).

    Between them only Not, Cast and layout ops; each group's flag must be repeated over its
    experts (an Unsqueeze at the last axis, expanded and reshaped): contiguous groups.
    """
    kept = True
    value: ir.Value | None = cond
    unsqueezed = False
    for _ in range(16):
        node = value.producer() if value is not None else None
        if node is None:
            break
        if node.op_type == "ScatterElements" and unsqueezed:
            return node, kept
        if node.op_type == "Not":
            kept = not kept
        elif node.op_type == "Unsqueeze":
            axes = const_ints(node.inputs[1]) if len(node.inputs) > 1 else None
            if axes not in ([-1], [rank(node.inputs[0])]) or unsqueezed:
                break
            unsqueezed = True
        elif node.op_type not in LAYOUT_OPS:
            break
        value = node.inputs[0]
    raise NoMatch("the expert mask is not the kept groups repeated over their experts")


def _group_top_k(node: ir.Node) -> int:
    try:
        return _top_k(node)
    except NoMatch:
        raise NoMatch("a group TopK is not a constant top-k of the last axis") from None


@dataclass(frozen=True)
class RouterLinear:
    """The linear layer computing a router's logits [T,E] from the hidden state [T,H]."""

    hidden: ir.Value
    hidden_size: int
    num_experts: int


def router_linear(logits: ir.Value) -> RouterLinear:
    """The linear layer (with a bias or not) that computes `logits`, seen through casts."""
    source = behind(logits, CAST_OPS)[-1]
    linear = linear_producing(source)
    if linear is None:
        node = source.producer()
        if node is not None and node.op_type in ("Gemm", "MatMul"):
            raise NoMatch("router weight is not a constant 2-D matrix")
        raise NoMatch("router logits are not a linear layer of the hidden state")
    if linear.expert is not None:
        raise NoMatch("router weight is not a constant 2-D matrix")
    if rank(linear.data) != 2:
        raise NoMatch("router input is not a 2-D [T,H] tensor")
    hidden_size, num_experts = linear.in_out
    return RouterLinear(linear.data, hidden_size, num_experts)


def expert_ids_reason(node: ir.Node) -> str:
    """Why expert ids computed by `node` (not a router TopK) form no block the pass can rewrite."""
    if node.op_type == "Concat" and len(node.inputs) >= 2:
        picks = [behind(v, LAYOUT_OPS)[-1].producer() if v is not None else None for v in node.inputs]
        # PhiMoE's sparsemixer: each round takes the argmax of the logits, the later ones with
        # the experts already picked scattered to -inf; each pick is weighted by a softmax over
        # logits masked to those within a relative jitter of the round's maximum.
        if all(p is not None and p.op_type == "ArgMax" for p in picks) and all(
            "ScatterElements" in upstream(p.inputs[0]).op_types() for p in picks[1:]
        ):
            return SPARSE_MIXER
    if node.op_type == "ArgMax":
        return "expert ids come from an ArgMax (top-1 routing without TopK): not supported yet"
    return f"expert ids come from a {node.op_type}, not from a router TopK"
