"""Per-expert loop exports (`expert_loop`): a Python loop over the experts, unrolled by a tracer.

Form recognised (torch's TorchScript exporter, `dynamo=False`, of a transformers 4.x style
`MixtralSparseMoeBlock.forward`):

    hidden [T,H] = Reshape(x [B,S,H], [-1,H])
    logits [T,E] = MatMul|Gemm(hidden, W_router) (+ b_router)
    probs = Cast(Softmax(logits)); w, ids = TopK(probs, K); w = w / ReduceSum(w)   (renormalise: optional)
      or  w, ids = TopK(logits, K); w = Softmax(w)                                (top-k then softmax)
      or  DeepSeek-V3's sigmoid grouped router (match.match_grouped_router)      (sigmoid_grouped)
    mask [E,K,T] = Transpose(OneHot(ids, E), perm=[2,1,0])
    acc = zeros [T,H]                                                             (ConstantOfShape 0)
    for every expert e (unrolled, each with its own weights):
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

MoE families in this loop style (tests/loop_models.py, tests/test_form_expert_loop.py): Mixtral and
Qwen3-MoE (renormalised), OLMoE (not), Qwen2-MoE (its shared expert and sigmoid gate are added
after the running sum and stay outside the block), GraniteMoE (top-k then softmax), gpt-oss
(router bias, expert biases, clamped SwiGLU: spec activation_alpha, activation_beta,
swiglu_limit) and DeepSeek-V3 (sigmoid grouped router, spec num_groups, topk_groups,
routed_scaling, score_bias; shared expert outside the block). PhiMoE's sparse mixer router
(expert ids from a Concat of argmax rounds, not a TopK) is claimed and refused with its reason
(match.expert_ids_reason): ONNX Runtime's MoE kernel cannot route so.

Every expert 0..E-1 must appear exactly once, with the same weight shapes and layouts. The
expert's token rows are scattered to distinct rows (top-k ids are distinct), so a plain
scatter into zeros added to the running sum is the same as `index_add_`.

Torch's TorchScript exporter records no intermediate shapes, so ranks are deduced from the
graph (reshape targets, gathers, broadcasts) where the value has no shape. It also casts the
softmax to float before the TopK (`softmax(..., dtype=torch.float)`), which the shared router
matcher does not look through; `_router` tries `match_router` first and handles that. The grouped
router matcher reads the group sizes and the number of experts from shapes: where TorchScript
left them out, `_router` lends it the shapes the graph implies (a Reshape to constant [-1,G,S],
the router weight's E) for the call.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from lynx_export.compiler.forms.match import (
    LAYOUT_OPS,
    RESHAPE_OPS,
    Match,
    RoutedExperts,
    behind,
    check_closed,
    const,
    const_ints,
    expert_ids_reason,
    forward,
    is_weight,
    match_router,
    match_swiglu_halves,
    relabels,
    routed_block,
    sequence_source,
)
from lynx_export.compiler.blocks import NoMatch
from lynx_export.routing import RouterForm
from lynx_export.compiler.blocks import ExpertWeights

FORM = "expert_loop"

_CASTS = frozenset({"Cast", "Identity"})
_ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Where", "Max", "Min"})
# Ops whose outputs have their first input's rank (TopK: values and indices alike).
_SAME_RANK = frozenset({"Transpose", "TopK", "GatherElements", "Clip"})
_UNARY = frozenset({
    "Cast", "Identity", "Sigmoid", "Relu", "Tanh", "Neg", "Sqrt", "Reciprocal", "Exp", "Log", "Erf", "Softmax",
    "LogSoftmax", "Abs", "Gelu", "LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization",
})


def claims(node: ir.Node) -> bool:
    """A TopK whose expert ids are one-hot encoded into a per-expert mask, or another node
    computing ids that a per-expert loop reads so.

    Ids from something other than a TopK (PhiMoE's sparse mixer: a Concat of argmax rounds) are
    claimed so that the block is reported with the reason it cannot be rewritten
    (match.expert_ids_reason), not missed.
    """
    if node.domain not in ("", "ai.onnx"):
        return False
    if node.op_type == "TopK":
        return len(node.outputs) == 2 and bool(_one_hots(node.outputs[1]))
    if node.op_type in LAYOUT_OPS:
        return False
    return any(_read_per_expert(encoding) for v in node.outputs for encoding, _ in _one_hots(v))


def _read_per_expert(encoding: ir.Node) -> bool:
    """Whether a one-hot encoding (through casts and transposes) is read only by Gathers of
    constant experts, two or more: an unrolled loop over the experts' masks."""
    mask = encoding.outputs[0]
    while len(mask.uses()) == 1 and (user := next(iter(mask.uses()))[0]).op_type in _CASTS | {"Transpose"}:
        mask = user.outputs[0]
    uses = list(mask.uses())
    return len(uses) >= 2 and all(
        n.op_type == "Gather" and i == 0 and (picked := const(n.inputs[1])) is not None and np.ndim(picked) == 0 for n, i in uses
    )


def _one_hots(ids: ir.Value) -> list[tuple[ir.Node, ir.Value | None]]:
    """The one-hot encodings of `ids` along a new last axis: (node, depth or the arange compared with).

    OneHot(ids, E) (TorchScript), or Equal(Unsqueeze(ids, -1), arange(E)) (dynamo's decomposition).
    """
    found: list[tuple[ir.Node, ir.Value | None]] = []
    for node, index in forward(ids):
        if node.op_type == "OneHot" and index == 0:
            found.append((node, node.inputs[1]))
        elif node.op_type == "Equal" and _unsqueezed_last(node.inputs[index], ids):
            found.append((node, node.inputs[1 - index]))
    return found


def _unsqueezed_last(value: ir.Value | None, ids: ir.Value) -> bool:
    """`value` is the [T,K] `ids` with a unit axis appended ([T,K,1]), through casts."""
    chain = behind(value, frozenset({"Unsqueeze", "Cast", "Identity"}))
    if ids not in chain:
        return False
    unsqueezes = [v.producer() for v in chain[: chain.index(ids)] if v.producer().op_type == "Unsqueeze"]
    return len(unsqueezes) == 1 and const_ints(unsqueezes[0].inputs[1]) in ([-1], [2])


# -- ranks where the exporter recorded no shapes -----------------------------------------------
# A key ("rank", v) asks for v's rank, ("len", v) for how many elements a 1-D shape vector v holds
# (a reshape target's rank). Solved with an explicit stack: the residual stream of a deep model
# is a long chain.

_Key = tuple[str, ir.Value]


def _rank(value: ir.Value | None) -> int | None:
    """`value`'s rank: its shape's, else deduced from how it was computed (None when unknown)."""
    if value is None:
        return None
    if value.shape is not None:
        return len(value.shape)
    return _solve(("rank", value))


def _solve(goal: _Key) -> int | None:
    memo: dict[_Key, int | None] = {}
    expanded: set[_Key] = set()
    stack = [goal]
    while stack:
        key = stack[-1]
        if key in memo:
            stack.pop()
            continue
        deps = _deps(key)
        pending = [d for d in deps if d not in memo]
        if pending and key not in expanded:
            expanded.add(key)
            stack.extend(d for d in pending if d not in expanded)  # a cycle stays unknown
            continue
        memo[key] = _combine(key, [memo.get(d) for d in deps])
        stack.pop()
    return memo[goal]


def _known(key: _Key) -> int | None:
    """The answer without looking at producers, if the value itself tells."""
    kind, value = key
    if kind == "rank" and value.shape is not None:
        return len(value.shape)
    if kind == "len" and value.shape is not None and len(value.shape) == 1 and isinstance(value.shape[0], int):
        return value.shape[0]
    node = value.producer()
    if node is None or node.op_type == "Constant":
        arr = const(value)
        if arr is None:
            return None
        return np.asarray(arr).ndim if kind == "rank" else int(np.asarray(arr).size)
    return None


def _deps(key: _Key) -> list[_Key]:
    kind, value = key
    node = value.producer()
    if _known(key) is not None or node is None or node.op_type == "Constant":
        return []
    op, ins = node.op_type, [v for v in node.inputs]
    if kind == "len":
        if op == "Concat":
            return [("len", v) for v in ins if v is not None]
        if op == "Shape":
            return [("rank", ins[0])]
        if op in ("Cast", "Identity"):
            return [("len", ins[0])]
        if op == "Unsqueeze":
            return [("rank", ins[0])]
        return []
    if op in _UNARY or op in _SAME_RANK or op == "Unsqueeze" or op == "Squeeze" or op.startswith("Reduce"):
        return [("rank", ins[0])]
    if op in _ELEMENTWISE or op in ("Gather", "MatMul"):
        return [("rank", v) for v in ins if v is not None]
    if op == "Expand":
        return [("rank", ins[0]), ("len", ins[1])]
    if op == "Reshape":
        return [("len", ins[1])]
    return []


def _combine(key: _Key, found: list[int | None]) -> int | None:
    known = _known(key)
    if known is not None:
        return known
    kind, value = key
    node = value.producer()
    if node is None:
        return None
    op = node.op_type
    if kind == "len":
        if op == "Concat":
            return None if not found or None in found else sum(found)
        if op == "Shape":
            if node.attributes.get("start") is not None or node.attributes.get("end") is not None:
                return None
            return found[0]
        if op in ("Cast", "Identity"):
            return found[0]
        if op == "Unsqueeze":
            return 1 if found[0] == 0 else None
        return None
    if op in ("Flatten", "Gemm"):
        return 2
    if op == "Shape":
        return 1
    if not found or None in found:
        return None
    if op in _UNARY or op in _SAME_RANK:
        return found[0]
    if op in _ELEMENTWISE or op == "Expand":
        return max(found)
    if op == "Reshape":
        return found[0]
    if op == "Gather":
        return found[0] + found[1] - 1
    if op == "MatMul":
        return max(found[0], found[1], 2)
    if op in ("Unsqueeze", "Squeeze"):
        axes = const_ints(node.inputs[1]) if len(node.inputs) > 1 else None
        if axes is None:
            return None
        return found[0] + len(axes) if op == "Unsqueeze" else found[0] - len(axes)
    if op.startswith("Reduce"):
        keep = node.attributes.get("keepdims")
        return found[0] if keep is None or keep.as_int() == 1 else None
    return None


def _is_last_axis(node: ir.Node, value: ir.Value, default: int = -1) -> bool:
    attr = node.attributes.get("axis")
    axis = default if attr is None else attr.as_int()
    n = _rank(value)
    return axis == -1 or (n is not None and axis == n - 1)


# -- router -------------------------------------------------------------------------------------

def _router(topk: ir.Node, spec_fields: dict[str, object]) -> tuple[ir.Value, ir.Value, RouterForm, bool, int]:
    """(logits, routing weights, form, normalize, K): the shared matcher, else its TorchScript spelling.

    A sigmoid grouped router's parameters go into `spec_fields` (see `match_router`).
    """
    try:
        return match_router(topk, spec_fields=spec_fields)
    except NoMatch as exc:
        if str(exc).startswith("sigmoid"):  # a sigmoid router the shared matcher named
            deduced = _grouped_router_shapes(topk)
            if not deduced:
                raise
            # TorchScript records no shapes; the grouped router matcher reads the group sizes and
            # the number of experts from them. Lent the shapes the graph implies, it decides.
            try:
                for value, shape in deduced:
                    value.shape = shape
                return match_router(topk, spec_fields=spec_fields)
            finally:
                for value, _ in deduced:
                    value.shape = None
    k_values = const_ints(topk.inputs[1])
    if not k_values or len(k_values) != 1:
        raise NoMatch("top-k is not a constant")
    k = k_values[0]
    if not _is_last_axis(topk, topk.inputs[0]):
        raise NoMatch("TopK does not run over the expert axis")
    if topk.attributes.get("largest") is not None and topk.attributes["largest"].as_int() == 0:
        raise NoMatch("TopK picks the smallest values")
    values = topk.outputs[0]
    probs = behind(topk.inputs[0], _CASTS)[-1]
    softmax = probs.producer()
    if softmax is not None and softmax.op_type == "Softmax":
        if not _is_last_axis(softmax, softmax.inputs[0]):
            raise NoMatch("router softmax does not run over the expert axis")
        for node, index in forward(values):
            if node.op_type != "Div" or index != 0:
                continue
            denom = behind(node.inputs[1], _CASTS)[-1].producer()
            if denom is None or denom.op_type != "ReduceSum" or not relabels(denom.inputs[0], values):
                continue
            axes = const_ints(denom.inputs[1]) if len(denom.inputs) > 1 else None
            if axes is None or len(axes) != 1 or axes[0] not in (-1, (_rank(values) or 0) - 1):
                raise NoMatch("routing weights are renormalised over another axis than the top-k")
            return softmax.inputs[0], node.outputs[0], RouterForm.SOFTMAX_TOPK, True, k
        return softmax.inputs[0], values, RouterForm.SOFTMAX_TOPK, False, k
    softmaxes = [n for n, _ in forward(values) if n.op_type == "Softmax" and _is_last_axis(n, n.inputs[0])]
    if len(softmaxes) == 1:
        return topk.inputs[0], softmaxes[0].outputs[0], RouterForm.TOPK_SOFTMAX, True, k
    if softmax is not None and softmax.op_type == "Sigmoid":
        raise NoMatch("sigmoid router: not supported yet")
    raise NoMatch("router is neither softmax->top-k nor top-k->softmax")


def _grouped_router_shapes(topk: ir.Node) -> list[tuple[ir.Value, ir.Shape]]:
    """Shapes a grouped router behind `topk` leaves unrecorded and its graph implies: the
    [T, groups, experts per group] scores the group TopK reads (a Reshape to a constant [-1,G,S])
    and the [T,E] logits the Sigmoid reads (E from the router's weight)."""
    found: list[tuple[ir.Value, ir.Shape]] = []
    stack, seen = [topk.inputs[0]], set()
    while stack and len(seen) < 256:  # the router's nodes: the walk stops at the Sigmoid
        value = stack.pop()
        node = value.producer() if value is not None else None
        if node is None or node in seen:
            continue
        seen.add(node)
        data = node.inputs[0] if node.inputs else None
        if node.op_type == "Sigmoid":
            if data is not None and data.shape is None:
                try:
                    _, _, num_experts = _router_weight(data)
                except NoMatch:
                    continue
                found.append((data, ir.Shape([None, num_experts])))
            continue
        if node.op_type == "TopK" and node is not topk and data is not None and data.shape is None:
            reshape = data.producer()
            target = const_ints(reshape.inputs[1]) if reshape is not None and reshape.op_type == "Reshape" else None
            if target is not None and len(target) == 3 and target[0] == -1 and min(target[1:]) > 0:
                found.append((data, ir.Shape([None, *target[1:]])))
        stack.extend(node.inputs)
    return found


def _router_weight(logits: ir.Value) -> tuple[ir.Value, int, int]:
    """(hidden [T,H], H, E) of the linear layer producing the router logits (a bias may be added)."""
    node = behind(logits, _CASTS)[-1].producer()
    if node is not None and node.op_type == "Add" and len(node.inputs) == 2:
        # MatMul(hidden, W) + b: a router Linear with a bias, the MatMul being the bias's only use.
        for i in (0, 1):
            matmul, bias = node.inputs[i].producer() if node.inputs[i] is not None else None, node.inputs[1 - i]
            if matmul is not None and matmul.op_type == "MatMul" and is_weight(bias) and len(node.inputs[i].uses()) == 1:
                node = matmul
                break
    if node is None or node.op_type not in ("Gemm", "MatMul"):
        raise NoMatch("router logits are not a linear layer of the hidden state")
    linear = _linear_of(node)
    if linear is None:
        raise NoMatch("router weight is not a constant 2-D matrix")
    w = linear.weight
    h, e = (w.shape[0], w.shape[1]) if linear.layout == "in_out" else (w.shape[1], w.shape[0])
    if _rank(linear.data) != 2:
        raise NoMatch("router input is not a 2-D [T,H] tensor")
    return linear.data, int(h), int(e)


# -- per-expert pieces --------------------------------------------------------------------------

@dataclass(frozen=True)
class _Linear:
    data: ir.Value  # the activation operand
    weight: ir.Value  # constant [in,out] ("in_out") or [out,in] ("out_in")
    layout: str
    bias: ir.Value | None
    output: ir.Value


def _linear_of(node: ir.Node) -> _Linear | None:
    """`node` as x @ W (+ b) with constant W (and b), if it is one."""
    if node.op_type == "MatMul":
        a, b = node.inputs[0], node.inputs[1]
        if not is_weight(b) or is_weight(a) or b.shape is None or len(b.shape) != 2:
            return None
        output, bias = node.outputs[0], None
        adds = [(n, i) for n, i in output.uses() if n.op_type == "Add"]
        if len(adds) == 1 and len(output.uses()) == 1:
            other = adds[0][0].inputs[1 - adds[0][1]]
            if is_weight(other) and other.shape is not None and len(other.shape) == 1 and other.shape[0] == b.shape[1]:
                output, bias = adds[0][0].outputs[0], other
        return _Linear(a, b, "in_out", bias, output)
    if node.op_type == "Gemm":
        attrs = node.attributes
        if any(attrs.get(name) is not None and attrs[name].as_float() != 1.0 for name in ("alpha", "beta")):
            return None
        if attrs.get("transA") is not None and attrs["transA"].as_int() != 0:
            return None
        a, b = node.inputs[0], node.inputs[1]
        if not is_weight(b) or is_weight(a) or b.shape is None or len(b.shape) != 2:
            return None
        layout = "out_in" if attrs.get("transB") is not None and attrs["transB"].as_int() == 1 else "in_out"
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if bias is not None and (not is_weight(bias) or bias.shape is None or len(bias.shape) != 1):
            return None
        return _Linear(a, b, layout, bias, node.outputs[0])
    return None


def _in_out(linear: _Linear) -> tuple[int, int]:
    w = linear.weight.shape
    return (int(w[0]), int(w[1])) if linear.layout == "in_out" else (int(w[1]), int(w[0]))


@dataclass(frozen=True)
class _Expert:
    index: int
    token_index: ir.Value  # top_x: which token rows the expert reads
    slot_index: ir.Value  # idx: which of the token's K slots chose it
    gate: _Linear
    up: _Linear
    down: _Linear
    weighted: ir.Value  # down output times the routing weight
    activation: tuple[float, float, float | None]  # SwiGLU's (alpha, beta, limit)


def _expert_mask(ids: ir.Value, num_experts: int) -> tuple[ir.Value, tuple[int, int, int]]:
    """The one-hot expert mask the loop indexes, and its axes: (expert, token, slot)."""
    encodings = _one_hots(ids)
    if len(encodings) != 1:
        raise NoMatch(f"expected one one-hot expert mask, found {len(encodings)}")
    node, depth_value = encodings[0]
    if node.op_type == "OneHot":
        depth = const_ints(depth_value)
        if depth is None or len(depth) != 1:
            raise NoMatch("one-hot depth is not a constant")
        axis = node.attributes.get("axis")
        if axis is not None and axis.as_int() not in (-1, 2):
            raise NoMatch("expert ids are one-hot encoded along another axis than the last")
        on_off = const(node.inputs[2])
        if on_off is None or [float(x) for x in np.asarray(on_off).reshape(-1)] != [0.0, 1.0]:
            raise NoMatch("one-hot mask values are not (0, 1)")
        depth = depth[0]
    else:
        classes = const(depth_value)
        if classes is None or np.ndim(classes) != 1 or not np.array_equal(classes, np.arange(len(classes))):
            raise NoMatch("expert ids are compared with something other than arange(E)")
        depth = len(classes)
    if depth != num_experts:
        raise NoMatch(f"one-hot depth {depth} differs from the router's {num_experts} experts")
    # Casts and transposes (`.permute(2, 1, 0)`) between the encoding and the per-expert reads.
    dims = ["token", "slot", "expert"]
    mask = node.outputs[0]
    while len(mask.uses()) == 1:
        user = next(iter(mask.uses()))[0]
        if user.op_type in _CASTS:
            mask = user.outputs[0]
        elif user.op_type == "Transpose":
            perm = user.attributes.get("perm")
            order = [2, 1, 0] if perm is None else list(perm.as_ints())  # no perm: reversed
            if sorted(order) != [0, 1, 2]:
                raise NoMatch("the expert mask is not a 3-D [T,K,E] one-hot")
            dims = [dims[p] for p in order]
            mask = user.outputs[0]
        else:
            break
    return mask, (dims.index("expert"), dims.index("token"), dims.index("slot"))


def _nonzero_rows(nonzero: ir.Node) -> dict[int, ir.Value]:
    """The coordinate rows NonZero's [2,n] output is split into: {row: [n] value}."""
    rows: dict[int, ir.Value] = {}
    out = nonzero.outputs[0]
    for node, index in out.uses():
        transposed = False
        source, user = out, node
        if user.op_type == "Transpose":
            perm = user.attributes.get("perm")
            if perm is not None and list(perm.as_ints()) != [1, 0]:
                continue
            transposed = True
            source = user.outputs[0]
            users = list(source.uses())
        else:
            users = [(node, index)]
        axis_of_rows = 1 if transposed else 0
        for n, i in users:
            if i != 0:
                continue
            if n.op_type == "Split":
                attr = n.attributes.get("axis")
                if (0 if attr is None else attr.as_int()) != axis_of_rows:
                    continue
                sizes = const_ints(n.inputs[1]) if len(n.inputs) > 1 and n.inputs[1] is not None else None
                if len(n.outputs) != 2 or (sizes is not None and sizes != [1, 1]):
                    continue
                for row, part in enumerate(n.outputs):
                    squeezes = [s for s, j in part.uses() if s.op_type in ("Squeeze", "Reshape") and j == 0]
                    if len(squeezes) == 1:
                        rows[row] = squeezes[0].outputs[0]
            elif n.op_type == "Gather":
                attr = n.attributes.get("axis")
                picked = const(n.inputs[1])
                if (0 if attr is None else attr.as_int()) == axis_of_rows and picked is not None and np.ndim(picked) == 0:
                    rows[int(picked)] = n.outputs[0]
            elif n.op_type == "Slice" and (row := _sliced_row(n, axis_of_rows)) is not None:
                squeezes = [q for q, j in n.outputs[0].uses() if q.op_type in ("Squeeze", "Reshape") and j == 0]
                if len(squeezes) == 1:
                    rows[row] = squeezes[0].outputs[0]
    return rows


def _sliced_row(node: ir.Node, axis: int) -> int | None:
    """The one row r a Slice takes along `axis` ([r, r+1) with step 1), if it takes one."""
    ins = list(node.inputs) + [None] * (5 - len(node.inputs))
    starts, ends = const_ints(ins[1]), const_ints(ins[2])
    axes = [0] if ins[3] is None else const_ints(ins[3])
    steps = [1] if ins[4] is None else const_ints(ins[4])
    if not (starts and ends and axes and steps) or len(starts) != 1 or len(ends) != 1:
        return None
    if axes[0] % 2 != axis or steps != [1] or starts[0] not in (0, 1):
        return None
    row = starts[0]
    return row if ends[0] == row + 1 or (row == 1 and ends[0] >= 2) else None


def _token_rows(token: ir.Value, hidden: ir.Value, what: str) -> ir.Value:
    """The rows `hidden[top_x]` an expert reads: a Gather or GatherND of the hidden state by top_x.

    The gathered axis must be the hidden state's token axis after the unsqueezes and transposes
    in between (`hidden[None, top_x]` gathers axis 1 of Unsqueeze(hidden, 0)).
    """
    found = []
    for node, index in forward(token):
        if index != 1 or node.op_type not in ("Gather", "GatherND"):
            continue
        axis = _token_axis(node.inputs[0], hidden)
        if node.op_type == "Gather":
            attr = node.attributes.get("axis")
            ok = axis is not None and (0 if attr is None else attr.as_int()) == axis
        else:
            batch = node.attributes.get("batch_dims")
            ok = axis == 0 and (batch is None or batch.as_int() == 0) and _row_indices(node.inputs[1], token)
        if ok:
            found.append(node)
    if len(found) != 1:
        raise NoMatch(f"{what} does not read the hidden state's rows of its tokens")
    return found[0].outputs[0]


def _token_axis(data: ir.Value, hidden: ir.Value) -> int | None:
    """Where the [T,H] `hidden`'s token axis is in `data`, a view of it through Unsqueeze/Transpose."""
    ops: list[ir.Node] = []
    while data is not hidden:
        node = data.producer()
        if node is None or node.op_type not in ("Unsqueeze", "Transpose"):
            return None
        ops.append(node)
        data = node.inputs[0]
    pos, n = 0, 2
    for node in reversed(ops):
        if node.op_type == "Unsqueeze":
            axes = const_ints(node.inputs[1])
            if axes is None:
                return None
            n += len(axes)
            added = {a % n for a in axes}
            pos = [i for i in range(n) if i not in added][pos]
        else:
            perm = node.attributes.get("perm")
            order = list(range(n))[::-1] if perm is None else list(perm.as_ints())
            if sorted(order) != list(range(n)):
                return None
            pos = order.index(pos)
    return pos


def _row_consumers(value: ir.Value) -> Iterator[tuple[ir.Node, int]]:
    """Consumers of `value` through layout ops and transposes that only move unit axes."""
    for node, index in value.uses():
        if index == 0 and (node.op_type in LAYOUT_OPS or (node.op_type == "Transpose" and _moves_unit_axes(node))):
            yield from _row_consumers(node.outputs[0])
        else:
            yield node, index


def _moves_unit_axes(transpose: ir.Node) -> bool:
    """A transpose that keeps the order of all but size-1 axes (a relabelling, like a reshape)."""
    shape = transpose.inputs[0].shape
    perm = transpose.attributes.get("perm")
    if shape is None:
        return False
    order = list(range(len(shape)))[::-1] if perm is None else list(perm.as_ints())
    kept = [a for a in order if shape[a] != 1]
    return kept == sorted(kept)


def _swiglu(rows: ir.Value, what: str) -> tuple[_Linear, _Linear, _Linear, tuple[float, float, float | None]]:
    """(gate, up, down, (alpha, beta, limit)) of y = down(act(gate(rows), up(rows))), act SwiGLU:
    silu(gate) * up, or gpt-oss's clamped gate * sigmoid(alpha * gate) * (up + beta)
    (`match_swiglu_halves`; either projection may be the gate)."""
    linears = [lin for n, i in _row_consumers(rows) if i == 0 and (lin := _linear_of(n)) is not None]
    if len(linears) == 1:
        raise NoMatch(f"{what}: one fused gate/up projection, expected separate gate and up (not supported yet)")
    if len(linears) != 2:
        raise NoMatch(f"{what}: expected gate and up projections of the expert's tokens, found {len(linears)}")
    try:
        output, gate_first, alpha, beta, limit = match_swiglu_halves(linears[0].output, linears[1].output)
    except NoMatch as exc:
        if str(exc).startswith("clamped SwiGLU"):  # the clamps' own reason
            raise NoMatch(f"{what}: {exc}") from None
        raise NoMatch(f"{what}: activation is not SwiGLU (silu(gate) * up, or gate * sigmoid(alpha * gate) * (up + beta))") from None
    gate, up = linears if gate_first else linears[::-1]
    downs = [lin for n, i in forward(output) if i == 0 and (lin := _linear_of(n)) is not None]
    if len(downs) != 1:
        raise NoMatch(f"{what}: the activation does not feed one down projection")
    return gate, up, downs[0], (alpha, beta, limit)


def _is_routing_weight(value: ir.Value, weights: ir.Value, token: ir.Value, slot: ir.Value, k: int) -> bool:
    """Whether `value` is `weights[top_x, idx]` (one of the [T,K] weights per row, any unit axes)."""
    picked = behind(value, LAYOUT_OPS)[-1].producer()
    if picked is None or picked.op_type not in ("Gather", "GatherND"):
        return False
    if picked.op_type == "GatherND":
        # [T,K,...] weights read at the stacked (top_x, idx) pairs.
        batch = picked.attributes.get("batch_dims")
        pairs = behind(picked.inputs[1], _CASTS)[-1].producer()
        if (batch is not None and batch.as_int() != 0) or pairs is None or pairs.op_type != "Concat" or len(pairs.inputs) != 2:
            return False
        axis = pairs.attributes.get("axis")
        return (
            axis is not None and axis.as_int() in (-1, 1)
            and _row_indices(pairs.inputs[0], token) and _row_indices(pairs.inputs[1], slot)
            and _view_of_weights(picked.inputs[0], weights, flat=False)
        )
    axis = picked.attributes.get("axis")
    if (0 if axis is None else axis.as_int()) != 0 or not _view_of_weights(picked.inputs[0], weights, flat=True):
        return False
    # Flattened [T*K,...] weights read at top_x * K + idx.
    flat = behind(picked.inputs[1], _CASTS)[-1].producer()
    if flat is None or flat.op_type != "Add":
        return False
    for i in (0, 1):
        if not relabels(flat.inputs[i], slot):
            continue
        mul = behind(flat.inputs[1 - i], _CASTS)[-1].producer()
        if mul is None or mul.op_type != "Mul":
            continue
        for j in (0, 1):
            if relabels(mul.inputs[j], token) and _is_top_k(mul.inputs[1 - j], weights, k):
                return True
    return False


def _view_of_weights(value: ir.Value, weights: ir.Value, flat: bool) -> bool:
    """`value` is the [T,K] `weights` with unit axes appended and, if `flat`, T and K merged."""
    chain = behind(value, LAYOUT_OPS)
    if weights not in chain:
        return False
    merged = False
    for v in chain[: chain.index(weights)]:
        node = v.producer()
        if node.op_type == "Unsqueeze":
            axes = const_ints(node.inputs[1])
            if axes is None or any(0 <= a < 2 for a in axes) or (axes != [-1] and any(a < 0 for a in axes)):
                return False
        elif node.op_type == "Flatten":
            attr = node.attributes.get("axis")
            if merged or attr is None or attr.as_int() != 2:
                return False
            merged = True
        elif node.op_type == "Reshape":
            target = const_ints(node.inputs[1])
            if merged or target is None or not target or target[0] != -1 or any(t != 1 for t in target[1:]):
                return False
            merged = True
        elif node.op_type not in _CASTS:
            return False
    return merged == flat


def _is_top_k(value: ir.Value, weights: ir.Value, k: int) -> bool:
    """`value` is the constant K or the size of the weights' K axis (Gather(Shape(w), 1))."""
    if const_ints(value) == [k]:
        return True
    node = behind(value, _CASTS)[-1].producer()
    if node is None or node.op_type != "Gather" or const_ints(node.inputs[1]) != [1]:
        return False
    shape = node.inputs[0].producer()
    return shape is not None and shape.op_type == "Shape" and _view_of_weights(shape.inputs[0], weights, flat=False)


def _row_indices(indices: ir.Value, token: ir.Value) -> bool:
    """`indices` are top_x as scatter row indices ([n,1], possibly expanded over H)."""
    chain = behind(indices, frozenset({"Expand", "Unsqueeze", "Cast", "Identity", "Reshape"}))
    if token not in chain:
        return False
    for v in chain[: chain.index(token)]:
        p = v.producer()
        if p is not None and p.op_type == "Unsqueeze" and const_ints(p.inputs[1]) not in ([1], [-1]):
            return False
    return True


def _is_zeros(value: ir.Value) -> bool:
    value = behind(value, frozenset({"Cast", "Identity", "Expand"}))[-1]
    arr = const(value)
    if arr is not None:
        return not np.any(arr)
    node = value.producer()
    if node is None or node.op_type != "ConstantOfShape":
        return False
    fill = node.attributes.get("value")
    return fill is None or not np.any(fill.as_tensor().numpy())


def _accumulate(expert: _Expert, what: str) -> tuple[ir.Value, ir.Value]:
    """(running sum in, running sum out) of the expert's `index_add_`."""
    for node, index in forward(expert.weighted):
        if node.op_type not in ("ScatterElements", "ScatterND") or index != 2:
            continue
        reduction = node.attributes.get("reduction")
        reduction = "none" if reduction is None else reduction.as_string()
        if node.op_type == "ScatterElements":
            axis = node.attributes.get("axis")
            if (0 if axis is None else axis.as_int()) != 0:
                raise NoMatch(f"{what}: output is scattered along another axis than the tokens")
        if not _row_indices(node.inputs[1], expert.token_index):
            raise NoMatch(f"{what}: output is not scattered to the rows of its tokens")
        if reduction == "add":
            return node.inputs[0], node.outputs[0]
        if reduction != "none":
            raise NoMatch(f"{what}: output is scattered with reduction '{reduction}'")
        if not _is_zeros(node.inputs[0]):
            raise NoMatch(f"{what}: output overwrites rows of a non-zero tensor (scatter without reduction)")
        adds = [n for n, _ in node.outputs[0].uses() if n.op_type == "Add"]
        if len(adds) != 1:
            raise NoMatch(f"{what}: scattered output is not added to the running sum")
        add = adds[0]
        other = add.inputs[1] if add.inputs[0] is node.outputs[0] else add.inputs[0]
        return other, add.outputs[0]
    raise NoMatch(f"{what}: output is not accumulated into the block's output (index_add / ScatterND add)")


def _expert(e: int, mask_gather: ir.Node, axes: tuple[int, int, int], hidden: ir.Value, weights: ir.Value, k: int) -> _Expert:
    what = f"expert {e}"
    nonzeros = [n for n, i in forward(mask_gather.outputs[0]) if n.op_type == "NonZero"]
    if len(nonzeros) != 1:
        raise NoMatch(f"{what}: its mask is not read by one NonZero (torch.where)")
    rows = _nonzero_rows(nonzeros[0])
    # The gathered mask keeps the token and slot axes in their order.
    _, token_axis, slot_axis = axes
    token_row, slot_row = (0, 1) if token_axis < slot_axis else (1, 0)
    if token_row not in rows or slot_row not in rows:
        raise NoMatch(f"{what}: the mask's nonzero coordinates are not split into slot and token indices")
    token, slot = rows[token_row], rows[slot_row]
    tokens = _token_rows(token, hidden, what)
    gate, up, down, activation = _swiglu(tokens, what)
    muls = [(n, i) for n, i in forward(down.output) if n.op_type == "Mul"]
    if len(muls) != 1 or not _is_routing_weight(muls[0][0].inputs[1 - muls[0][1]], weights, token, slot, k):
        raise NoMatch(f"{what}: output is not weighted by its routing weight")
    return _Expert(e, token, slot, gate, up, down, muls[0][0].outputs[0], activation)


def _experts(ids: ir.Value, num_experts: int, hidden: ir.Value, weights: ir.Value, k: int) -> list[_Expert]:
    mask, axes = _expert_mask(ids, num_experts)
    by_index: dict[int, ir.Node] = {}
    for node, index in mask.uses():
        if node.op_type != "Gather" or index != 0:
            raise NoMatch(f"the expert mask is read by {node.op_type}, not only by per-expert Gathers")
        axis = node.attributes.get("axis")
        if (0 if axis is None else axis.as_int()) != axes[0]:
            raise NoMatch("the expert mask is gathered along another axis than the experts")
        picked = const(node.inputs[1])
        if picked is None or np.ndim(picked) != 0:
            raise NoMatch("the expert mask is indexed by a computed value (a loop over the experts the sample hit?)")
        e = int(picked)
        if not -num_experts <= e < num_experts:
            raise NoMatch(f"expert index {e} is outside 0..{num_experts - 1}")
        e %= num_experts
        if e in by_index:
            raise NoMatch(f"expert {e} appears more than once in the loop")
        by_index[e] = node
    missing = sorted(set(range(num_experts)) - set(by_index))
    if missing:
        raise NoMatch(f"experts {missing} of {num_experts} are missing from the loop")
    return [_expert(e, by_index[e], axes, hidden, weights, k) for e in range(num_experts)]


def _sequence_source(hidden: ir.Value, hidden_size: int) -> ir.Value | None:
    """The [B,S,H] tensor `hidden` was flattened from (rank deduced where not recorded)."""
    source = sequence_source(hidden)
    if source is not None:
        return source
    for value in behind(hidden, frozenset({"Reshape", "Flatten"}))[1:]:
        if _rank(value) == 3:
            last = value.shape[-1] if value.shape is not None else None
            return value if not isinstance(last, int) or last == hidden_size else None
    return None


def match(topk: ir.Node) -> Match:
    """The block routed by `topk` (a claimed node that is no TopK is refused with its reason)."""
    if topk.op_type != "TopK":
        raise NoMatch(expert_ids_reason(topk))
    router_fields: dict[str, object] = {}  # the sigmoid_grouped router's parameters
    logits, weights, form, normalize, k = _router(topk, router_fields)
    hidden, hidden_size, num_experts = _router_weight(logits)
    if not 1 <= k <= num_experts:
        raise NoMatch(f"top-k {k} is outside 1..{num_experts}")
    experts = _experts(topk.outputs[1], num_experts, hidden, weights, k)

    # One running sum through every expert, from zeros to the block's output.
    steps = {e.index: _accumulate(e, f"expert {e.index}") for e in experts}
    by_input: dict[ir.Value, int] = {}
    for e, (acc_in, _) in steps.items():
        if acc_in in by_input:
            raise NoMatch(f"experts {by_input[acc_in]} and {e} add to the same partial sum")
        by_input[acc_in] = e
    outputs = {acc_out for _, acc_out in steps.values()}
    starts = [v for v in by_input if v not in outputs]
    if len(starts) != 1 or not _is_zeros(starts[0]):
        raise NoMatch("expert outputs are not summed into one running sum that starts at zero")
    value, seen = starts[0], 0
    while value in by_input:
        value, seen = steps[by_input[value]][1], seen + 1
    if seen != num_experts:
        raise NoMatch("expert outputs are not summed into one running sum")
    output, zeros = value, starts[0]

    sizes = {(_in_out(x.gate), _in_out(x.up), _in_out(x.down)) for x in experts}
    if len(sizes) != 1:
        raise NoMatch("experts have different weight shapes")
    (h1, i1), (h2, i2), (i3, h3) = sizes.pop()
    if not h1 == h2 == h3 == hidden_size or not i1 == i2 == i3:
        raise NoMatch(f"expert weight shapes disagree: gate [{h1},{i1}], up [{h2},{i2}], down [{i3},{h3}] for H={hidden_size}")
    for role in ("gate", "up", "down"):
        layouts = {getattr(x, role).layout for x in experts}
        biased = {getattr(x, role).bias is not None for x in experts}
        if len(layouts) != 1 or len(biased) != 1:
            raise NoMatch(f"experts' {role} projections differ in layout or bias")
    if experts[0].gate.layout != experts[0].up.layout:
        raise NoMatch("gate and up projections have different layouts")
    activations = {x.activation for x in experts}
    if len(activations) != 1:
        raise NoMatch("experts' SwiGLU parameters (alpha, beta, limit) differ")
    alpha, beta, limit = activations.pop()

    # The block may read the hidden state (or the [B,S,H] tensor it flattens, for its shape), the
    # router logits and the zeros its sum starts from (their shape may come from the model input).
    check_closed(output, set(behind(hidden, RESHAPE_OPS)) | {logits, zeros}, topk.graph)

    def names(role: str) -> tuple[str, ...]:
        return tuple(getattr(x, role).weight.name for x in experts)

    def biases(role: str) -> tuple[str, ...] | None:
        if getattr(experts[0], role).bias is None:
            return None
        return tuple(getattr(x, role).bias.name for x in experts)

    weights = ExpertWeights(
        gate_up=names("gate"),
        gate_up_layout=experts[0].gate.layout,
        gate_first=True,
        down=names("down"),
        down_layout=experts[0].down.layout,
        up=names("up"),
        gate_up_bias=biases("gate"),
        up_bias=biases("up"),
        down_bias=biases("down"),
    )
    found = RoutedExperts(num_experts, k, hidden_size, i1, form, normalize, router_fields, (alpha, beta, limit), weights)
    block = routed_block(FORM, found, hidden, logits, output, _sequence_source(hidden, hidden_size))
    return Match(block, (topk, output.producer()))
