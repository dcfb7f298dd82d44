"""Lower `LynxMoE` nodes for ONNX Runtime: standard-op expert selection + `com.microsoft.MoE`.

The selection subgraph computes, per batch, the experts the policy allows and masks the router
logits to -inf elsewhere; ONNX Runtime's MoE kernel then routes on the masked logits and skips
experts that receive no token, so fewer active experts means fewer weight reads. The subgraph
mirrors `lynx_export.routing` op for op (same fp32 arithmetic, same top-k tie order).

The kernel routes only softmax routers itself. For `sigmoid_grouped` (DeepSeek-V3) the graph
routes: it computes each token's ids and weights w (`_grouped_routing`), hands the kernel
router_probs = log(w) at the picked experts and -inf elsewhere, whose softmax is w / sum(w), and
scales the kernel's output by sum(w) per token. The policy votes on the router's selection
scores (`routing.selection_scores`), and the mask goes on the logits as for the other routers.
ONNX Runtime's Sigmoid is an approximation (within a few ulp), not the oracle's correctly
rounded one: ids agree except for choice values that tie within that error.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from lynx_export.op import contract as lynx_op
from lynx_export.compiler.graph_builder import GraphBuilder
from lynx_export.errors import LoweringError
from lynx_export.routing import BudgetPolicy, LynxPolicy, OffPolicy, RouterForm, SelectionPolicy
from lynx_export.op.spec import Activation, MoESpec

__all__ = ["LoweredBlock", "LoweredModel", "LowerLynxMoEPass", "lower"]

MS_DOMAIN = "com.microsoft"
MIN_OPSET = 18  # the selection subgraph passes ReduceMax axes as an input


@dataclass(frozen=True)
class LoweredBlock:
    """Where a lowered block's routing can be observed (for verification)."""

    name: str
    spec: MoESpec
    router_logits: str  # the model's router output [T,E]
    routed_logits: str  # what the experts are routed on: masked in decode steps [T,E]
    expert_weights: tuple[str, ...]  # initializers holding all E experts' weights (E equal shares)


@dataclass(frozen=True)
class LoweredModel:
    model: ir.Model
    blocks: tuple[LoweredBlock, ...]


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


def _grouped_routing(b: GraphBuilder, logits: ir.Value, spec: MoESpec) -> tuple[ir.Value, ir.Value]:
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


def _as_float(b: GraphBuilder, value: ir.Value) -> ir.Value:
    return value if value.dtype == ir.DataType.FLOAT else b.op("Cast", value, to=ir.DataType.FLOAT)


def _as_dtype(b: GraphBuilder, value: ir.Value, dtype: ir.DataType | None) -> ir.Value:
    return value if dtype in (None, ir.DataType.FLOAT) else b.op("Cast", value, to=dtype)


def _kernel_routing(b: GraphBuilder, routed: ir.Value, spec: MoESpec) -> tuple[ir.Value, ir.Value | None]:
    """(router_probs for com.microsoft.MoE, per-token output scale [T,1] or None).

    Softmax routers: the routed logits as they are. sigmoid_grouped: log(w) at the picked
    experts, -inf elsewhere, so that the kernel's softmax -> top-K -> renormalise yields
    w / sum(w) (the same with normalize_routing_weights 0: the K picked already sum to 1); the
    output times sum(w) is then sum_k w_k * expert_k(x). A row whose weights are all 0 gets
    router_probs 0 and scale 0.
    """
    if spec.router is not RouterForm.SIGMOID_GROUPED:
        return routed, None
    ids, weights = _grouped_routing(b, _as_float(b, routed), spec)
    total = b.op("ReduceSum", weights, b.const([-1], np.int64), keepdims=1)  # [T,1]
    floor = b.op("Expand", b.const(-np.inf), b.op("Shape", routed))
    log_probs = b.op("ScatterElements", floor, ids, b.op("Log", weights), axis=1)
    probs = b.op("Where", b.op("Greater", total, b.const(0.0)), log_probs, b.const(0.0))
    return _as_dtype(b, probs, routed.dtype), _as_dtype(b, total, routed.dtype)


def _routed_logits(b: GraphBuilder, node: ir.Node, spec: MoESpec, policy: SelectionPolicy) -> ir.Value:
    """Emit the selection subgraph; return the logits the MoE kernel should route on."""
    logits = node.inputs[lynx_op.Slot.ROUTER_LOGITS]
    if isinstance(policy, OffPolicy):
        return logits
    dtype = logits.dtype
    work = logits if dtype == ir.DataType.FLOAT else b.op("Cast", logits, to=ir.DataType.FLOAT)
    shape = b.op("Shape", work)
    rows = b.op("Gather", shape, b.const(0, np.int64), axis=0)
    num_valid = _optional_input(node, lynx_op.Slot.NUM_VALID)
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
    seq_len = _optional_input(node, lynx_op.Slot.SEQ_LEN)
    if seq_len is not None:
        # Prefill keeps the model's routing: the policy is a decode-step optimisation.
        masked = b.op("Where", b.op("Equal", seq_len, b.const(1, np.int64)), masked, work)
    if dtype != ir.DataType.FLOAT:
        masked = b.op("Cast", masked, to=dtype)
    return masked


def _optional_input(node: ir.Node, slot: int) -> ir.Value | None:
    return node.inputs[slot] if len(node.inputs) > slot else None


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
    router_probs, scale = _kernel_routing(b, routed, spec)
    moe_inputs = [
        node.inputs[lynx_op.Slot.HIDDEN],
        router_probs,
        node.inputs[lynx_op.Slot.FC1],
        _optional_input(node, lynx_op.Slot.FC1_BIAS),
        node.inputs[lynx_op.Slot.FC2],
        _optional_input(node, lynx_op.Slot.FC2_BIAS),
    ]
    while moe_inputs[-1] is None:
        moe_inputs.pop()
    out = b.op_multi("MoE", 1, *moe_inputs, domain=MS_DOMAIN, **_moe_attributes(spec))[0]
    if scale is not None:
        out = b.op("Mul", out, scale)
    return out, (node.inputs[lynx_op.Slot.FC1].name, node.inputs[lynx_op.Slot.FC2].name)


def _routing_weights(b: GraphBuilder, routed: ir.Value, spec: MoESpec) -> ir.Value:
    """Dense routing weights [T,E]: the model's routing on `routed`, zero for unpicked experts."""
    k = b.const([spec.top_k], np.int64)
    if spec.router == RouterForm.SIGMOID_GROUPED:
        ids, values = _grouped_routing(b, _as_float(b, routed), spec)
        dense = b.op("ScatterElements", _zeros_like(b, routed), ids, values, axis=1)
        return _as_dtype(b, dense, routed.dtype)
    if spec.router == RouterForm.SOFTMAX_TOPK:
        values, ids = b.topk(b.op("Softmax", routed, axis=-1), k)
        if spec.normalize:
            values = b.op("Div", values, b.op("ReduceSum", values, b.const([-1], np.int64), keepdims=1))
    else:
        values, ids = b.topk(routed, k)
        values = b.op("Softmax", values, axis=-1)
    return b.op("ScatterElements", _zeros_like(b, routed), ids, values, axis=1)


def _zeros_like(b: GraphBuilder, value: ir.Value) -> ir.Value:
    return b.op("ConstantOfShape", b.op("Shape", value), value=ir.tensor(np.zeros(1, dtype=np.float32)))


def _conditional_experts(b: GraphBuilder, node: ir.Node, spec: MoESpec, routed: ir.Value) -> tuple[ir.Value, tuple[str, ...]]:
    """One `If` per expert: only experts that receive a token run, each on its own tokens.

    Each expert's weights are separate constant initializers, so ONNX Runtime prepacks them for
    its MatMul once at load time; an expert whose `If` is false reads no weights at all. Tokens
    are gathered per expert, run through SwiGLU, scaled by their routing weight and scatter-added
    into the output.
    """
    hidden = node.inputs[lynx_op.Slot.HIDDEN]
    gate, up = lynx_op.gate_up(node.inputs[lynx_op.Slot.FC1].const_value.numpy())  # [E,I,H] each
    fc2 = node.inputs[lynx_op.Slot.FC2].const_value.numpy()  # [E,H,I]
    fc1_bias, fc2_bias = (_optional_input(node, slot) for slot in (lynx_op.Slot.FC1_BIAS, lynx_op.Slot.FC2_BIAS))
    fc1_bias = None if fc1_bias is None else fc1_bias.const_value.numpy()  # [E,2I] interleaved like fc1
    fc2_bias = None if fc2_bias is None else fc2_bias.const_value.numpy()  # [E,H]
    weights = _routing_weights(b, routed, spec)
    active = b.op("Greater", b.op("ReduceMax", weights, b.const([0], np.int64), keepdims=0), b.const(0.0))
    acc = _zeros_like(b, hidden)
    names: list[str] = []
    for e in range(spec.num_experts):
        w_in = np.ascontiguousarray(np.concatenate([gate[e], up[e]], axis=0).T)  # [H,2I]: gate | up
        w_out = np.ascontiguousarray(fc2[e].T)  # [I,H]
        w_in_v = b.tape.initializer(ir.tensor(w_in), name=f"{node.name}.expert{e}.w_in")
        w_out_v = b.tape.initializer(ir.tensor(w_out), name=f"{node.name}.expert{e}.w_out")
        names += [w_in_v.name, w_out_v.name]
        b_in = None if fc1_bias is None else b.tape.initializer(
            ir.tensor(np.concatenate([fc1_bias[e, 0::2], fc1_bias[e, 1::2]])), name=f"{node.name}.expert{e}.b_in")
        b_out = None if fc2_bias is None else b.tape.initializer(ir.tensor(np.ascontiguousarray(fc2_bias[e])), name=f"{node.name}.expert{e}.b_out")
        index = b.const(e, np.int64)
        column = b.op("Gather", weights, index, axis=1)  # [T]

        run = b.branch()
        rows = run.op("Reshape", run.op("NonZero", run.op("Greater", column, run.const(0.0))), run.const([-1], np.int64))
        expert_out = run.swiglu_ffn(run.op("Gather", hidden, rows, axis=0), w_in_v, w_out_v, spec.expert_size, b_in=b_in, b_out=b_out,
                                    alpha=spec.activation_alpha, beta=spec.activation_beta, limit=spec.swiglu_limit)
        scaled = run.op("Mul", expert_out, run.op("Unsqueeze", run.op("Gather", column, rows, axis=0), run.const([-1], np.int64)))
        added = run.op("ScatterND", acc, run.op("Unsqueeze", rows, run.const([-1], np.int64)), scaled, reduction="add")
        skip = b.branch()
        same = skip.op("Identity", acc)
        for value in (added, same):
            value.dtype = ir.DataType.FLOAT
        acc = b.op(
            "If",
            b.op("Gather", active, index, axis=0),
            then_branch=ir.Graph((), (added,), nodes=run.tape.nodes, name=f"{node.name}.expert{e}.run"),
            else_branch=ir.Graph((), (same,), nodes=skip.tape.nodes, name=f"{node.name}.expert{e}.skip"),
        )
    return acc, tuple(names)


EXPERT_IMPLS = {"fused": _fused_experts, "conditional": _conditional_experts}


class LowerLynxMoEPass(ir.passes.InPlacePass):
    """Replace every LynxMoE node with its selection subgraph and an expert implementation.

    1. `fused`: ONNX Runtime's `com.microsoft.MoE` kernel (the default).
    2. `conditional`: standard ops, one `If` per expert, weights read only for active experts.
    """

    def __init__(self, experts: str = "fused") -> None:
        super().__init__()
        if experts not in EXPERT_IMPLS:
            raise LoweringError(f"unknown expert implementation '{experts}' (choose from {', '.join(EXPERT_IMPLS)})")
        self.experts = experts
        self.lowered: list[LoweredBlock] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.lowered = []
        graph = model.graph
        nodes = [n for n in graph if n.op_type == lynx_op.OP_TYPE and n.domain == lynx_op.DOMAIN]
        if nodes and model.opset_imports.get("", 0) < MIN_OPSET:
            raise LoweringError(f"the ONNX Runtime lowering needs opset {MIN_OPSET} or newer (the model has {model.opset_imports.get('', 0)})")
        for node in nodes:
            self.lowered.append(self._lower(graph, node))
        if self.lowered:
            if self.experts == "fused":
                model.opset_imports.setdefault(MS_DOMAIN, 1)
            model.opset_imports.pop(lynx_op.DOMAIN, None)
            common_passes.RemoveUnusedNodesPass()(model)
        return ir.passes.PassResult(model, modified=bool(self.lowered))

    def _lower(self, graph: ir.Graph, node: ir.Node) -> LoweredBlock:
        try:
            attrs = lynx_op.from_node(node)
        except (KeyError, ValueError) as exc:
            raise LoweringError(f"{node.name}: malformed LynxMoE attributes ({exc})") from None
        b = GraphBuilder(node.name)
        routed = _routed_logits(b, node, attrs.spec, attrs.policy)
        router_logits = node.inputs[lynx_op.Slot.ROUTER_LOGITS]
        if routed is not router_logits:
            routed.name = f"{node.name}.routed_logits"
        out, expert_weights = EXPERT_IMPLS[self.experts](b, node, attrs.spec, routed)
        b.replace(graph, node, out)
        return LoweredBlock(node.name, attrs.spec, router_logits.name, routed.name, expert_weights)


def lower(model: ir.Model, experts: str = "fused") -> LoweredModel:
    """Lower `model` (canonical form) in place for ONNX Runtime."""
    lowering = LowerLynxMoEPass(experts)
    lowering(model)
    return LoweredModel(model, tuple(lowering.lowered))
