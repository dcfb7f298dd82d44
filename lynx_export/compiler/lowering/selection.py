"""The policy's selection subgraph in standard ops: the logits the experts are routed on.

It mirrors `lynx_export.routing` op for op (same fp32 arithmetic, same top-k tie order); see
`lowering.ort` for how the expert implementations consume it.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from lynx_export.compiler.graph_builder import GraphBuilder
from lynx_export.errors import LoweringError
from lynx_export.op import contract as lynx_op
from lynx_export.op.spec import MoESpec
from lynx_export.routing import BudgetPolicy, LynxPolicy, OffPolicy, RouterForm, SelectionPolicy

__all__ = ["routed_logits", "kernel_routing", "grouped_routing", "optional_input", "as_float", "as_dtype"]


def _allowed_from_picks(b: GraphBuilder, picks: ir.Value, num_experts: int, row_weight: ir.Value | None) -> ir.Value:
    """[E] bool: experts picked by at least one valid row of `picks` [R,K]."""
    onehot = b.op("OneHot", picks, b.const([num_experts], np.int64), b.const([0.0, 1.0]), axis=-1)
    if row_weight is not None:
        onehot = b.op("Mul", onehot, b.op("Unsqueeze", row_weight, b.const([-1, -2], np.int64)))
    votes = b.op("ReduceMax", onehot, b.const([0, 1], np.int64), keepdims=0)
    return b.op("Greater", votes, b.const(0.0))


def _lynx_allowed(b: GraphBuilder, logits: ir.Value, spec: MoESpec, policy: LynxPolicy, batch: ir.Value, row_weight: ir.Value | None) -> ir.Value:
    k = b.const([spec.top_k], np.int64)
    width = b.const([spec.num_experts], np.int64)
    top = b.op("ReduceMax", logits, b.const([-1], np.int64), keepdims=1)
    bins = b.op("Ceil", b.op("Mul", b.const(policy.alpha), b.op("Sub", logits, top)))
    if policy.beta is not None:
        bins = b.op("Max", bins, b.const(-float(policy.beta)))
    weight = b.op("Pow", batch, bins)  # B ** bin: one bin down weighs as much as B tokens less
    voting = weight if row_weight is None else b.op("Mul", weight, b.op("Unsqueeze", row_weight, b.const([-1], np.int64)))
    popularity = b.op("ReduceSum", voting, b.const([0], np.int64), keepdims=1)
    # Rows that do not vote must not subtract their own weight either.
    score = b.op("Add", bins, b.op("Div", b.op("Sub", popularity, voting), batch))
    if policy.tie_break == "logit":
        picks = b.topk_by(score, logits, k, width)
    else:
        picks = b.topk_indices(score, k)
    return _allowed_from_picks(b, picks, spec.num_experts, row_weight)


def _budget_allowed(b: GraphBuilder, logits: ir.Value, spec: MoESpec, policy: BudgetPolicy, row_weight: ir.Value | None) -> ir.Value:
    picks = b.topk_indices(logits, b.const([spec.top_k], np.int64))
    onehot = b.op("OneHot", picks, b.const([spec.num_experts], np.int64), b.const([0.0, 1.0]), axis=-1)
    probs = b.op("Softmax", logits, axis=-1)
    if row_weight is not None:
        onehot = b.op("Mul", onehot, b.op("Unsqueeze", row_weight, b.const([-1, -2], np.int64)))
        probs = b.op("Mul", probs, b.op("Unsqueeze", row_weight, b.const([-1], np.int64)))
    counts = b.op("ReduceSum", onehot, b.const([0, 1], np.int64), keepdims=0)  # [E]
    mass = b.op("ReduceSum", probs, b.const([0], np.int64), keepdims=0)  # [E]
    row = b.const([0], np.int64)
    keep = b.topk_by(
        b.op("Unsqueeze", counts, row), b.op("Unsqueeze", mass, row), b.const([policy.budget], np.int64), b.const([spec.num_experts], np.int64)
    )
    return _allowed_from_picks(b, keep, spec.num_experts, None)


def _grouped_choice(b: GraphBuilder, logits: ir.Value, spec: MoESpec) -> tuple[ir.Value, ir.Value]:
    """(scores, choice) [T,E] of the sigmoid_grouped router on float logits, -inf marking masked
    experts: scores = sigmoid(L); choice = scores + bias within each token's kept groups, -inf
    elsewhere (routing.GroupedRouting gives the rules; this mirrors routing._grouped_choice)."""
    experts, groups = spec.num_experts, spec.num_groups
    size = experts // groups
    scores = b.op("Sigmoid", logits)
    choice = scores if spec.score_bias is None else b.op("Add", scores, b.const(np.asarray(spec.score_bias, dtype=np.float32)))
    masked = b.op("IsInf", logits, detect_positive=0)
    neg_inf = b.const(-np.inf)
    choice = b.op("Where", masked, neg_inf, choice)
    per_group = b.op("Reshape", choice, b.const([0, groups, size], np.int64))  # [T,G,S]
    best2 = b.topk(per_group, b.const([2], np.int64))[0]
    group_score = b.op("ReduceSum", b.op("Where", b.op("IsInf", best2, detect_positive=0), b.const(0.0), best2),
                       b.const([-1], np.int64), keepdims=0)  # [T,G]
    finite = b.op("Cast", b.op("Not", b.op("IsInf", per_group, detect_positive=0)), to=ir.DataType.FLOAT)
    count = b.op("Min", b.op("ReduceSum", finite, b.const([-1], np.int64), keepdims=0), b.const(float(spec.top_k)))
    kept = b.topk_by(count, group_score, b.const([spec.topk_groups], np.int64), b.const([groups], np.int64))  # [T,TG]
    onehot = b.op("OneHot", kept, b.const([groups], np.int64), b.const([0.0, 1.0]), axis=-1)  # [T,TG,G]
    kept_groups = b.op("ReduceMax", onehot, b.const([1], np.int64), keepdims=0)  # [T,G]
    per_expert = b.op("Expand", b.op("Unsqueeze", kept_groups, b.const([-1], np.int64)), b.const([1, 1, size], np.int64))
    kept_experts = b.op("Greater", b.op("Reshape", per_expert, b.const([0, experts], np.int64)), b.const(0.0))
    return scores, b.op("Where", kept_experts, choice, neg_inf)


def grouped_routing(b: GraphBuilder, logits: ir.Value, spec: MoESpec) -> tuple[ir.Value, ir.Value]:
    """(ids [T,K], weights [T,K]) of the sigmoid_grouped router on float logits (-inf: masked)."""
    scores, choice = _grouped_choice(b, logits, spec)
    values, ids = b.topk(choice, b.const([spec.top_k], np.int64))
    # An id picked among -inf choices (fewer than K allowed experts in the kept groups) weighs 0.
    weights = b.op("Where", b.op("IsInf", values, detect_positive=0), b.const(0.0), b.op("GatherElements", scores, ids, axis=1))
    if spec.normalize:
        total = b.op("ReduceSum", weights, b.const([-1], np.int64), keepdims=1)
        weights = b.op("Div", weights, b.op("Add", total, b.const(1e-20)))
    if spec.routed_scaling != 1.0:
        weights = b.op("Mul", weights, b.const(spec.routed_scaling))
    return ids, weights


def as_float(b: GraphBuilder, value: ir.Value) -> ir.Value:
    return value if value.dtype == ir.DataType.FLOAT else b.op("Cast", value, to=ir.DataType.FLOAT)


def as_dtype(b: GraphBuilder, value: ir.Value, dtype: ir.DataType | None) -> ir.Value:
    return value if dtype in (None, ir.DataType.FLOAT) else b.op("Cast", value, to=dtype)


def kernel_routing(b: GraphBuilder, routed: ir.Value, spec: MoESpec) -> tuple[ir.Value, ir.Value | None]:
    """(router_probs for com.microsoft.MoE, per-token output scale [T,1] or None).

    Softmax routers: the routed logits as they are. sigmoid_grouped: log(w) at the picked
    experts, -inf elsewhere, so that the kernel's softmax -> top-K -> renormalise yields
    w / sum(w) (the same with normalize_routing_weights 0: the K picked already sum to 1); the
    output times sum(w) is then sum_k w_k * expert_k(x). A row whose weights are all 0 gets
    router_probs 0 and scale 0.
    """
    if spec.router is not RouterForm.SIGMOID_GROUPED:
        return routed, None
    ids, weights = grouped_routing(b, as_float(b, routed), spec)
    total = b.op("ReduceSum", weights, b.const([-1], np.int64), keepdims=1)  # [T,1]
    floor = b.op("Expand", b.const(-np.inf), b.op("Shape", routed))
    log_probs = b.op("ScatterElements", floor, ids, b.op("Log", weights), axis=1)
    probs = b.op("Where", b.op("Greater", total, b.const(0.0)), log_probs, b.const(0.0))
    return as_dtype(b, probs, routed.dtype), as_dtype(b, total, routed.dtype)


def routed_logits(b: GraphBuilder, node: ir.Node, spec: MoESpec, policy: SelectionPolicy) -> ir.Value:
    """Emit the selection subgraph; return the logits the MoE kernel should route on."""
    logits = node.inputs[lynx_op.Slot.ROUTER_LOGITS]
    if isinstance(policy, OffPolicy):
        return logits
    dtype = logits.dtype
    work = logits if dtype == ir.DataType.FLOAT else b.op("Cast", logits, to=ir.DataType.FLOAT)
    shape = b.op("Shape", work)
    rows = b.op("Gather", shape, b.const(0, np.int64), axis=0)
    num_valid = optional_input(node, lynx_op.Slot.NUM_VALID)
    row_weight = None
    if num_valid is not None:
        index = b.op("Range", b.const(0, np.int64), rows, b.const(1, np.int64))
        row_weight = b.op("Cast", b.op("Less", index, num_valid), to=ir.DataType.FLOAT)
        batch = b.op("Cast", num_valid, to=ir.DataType.FLOAT)
    else:
        batch = b.op("Cast", rows, to=ir.DataType.FLOAT)
    # What the policy votes on: the logits, or the sigmoid_grouped router's selection scores.
    votes = _grouped_choice(b, work, spec)[1] if spec.router is RouterForm.SIGMOID_GROUPED else work
    if isinstance(policy, LynxPolicy):
        allowed = _lynx_allowed(b, votes, spec, policy, batch, row_weight)
    elif isinstance(policy, BudgetPolicy):
        allowed = _budget_allowed(b, votes, spec, policy, row_weight)
    else:
        raise LoweringError(f"{node.name}: policy '{policy.name}' has no ONNX Runtime lowering")
    masked = b.op("Where", allowed, work, b.const(-np.inf))
    seq_len = optional_input(node, lynx_op.Slot.SEQ_LEN)
    if seq_len is not None:
        # Prefill keeps the model's routing: the policy is a decode-step optimisation.
        masked = b.op("Where", b.op("Equal", seq_len, b.const(1, np.int64)), masked, work)
    if dtype != ir.DataType.FLOAT:
        masked = b.op("Cast", masked, to=dtype)
    return masked


def optional_input(node: ir.Node, slot: int) -> ir.Value | None:
    return node.inputs[slot] if len(node.inputs) > slot else None
