"""What every exporter form's matcher shares: graph walking, constants and shapes, the router,
the SwiGLU expert activation, the weighted combine, and the checks that bound a block.

Matchers follow graph structure, shapes and constants, never tensor names (constant folding
renames weights to `val_N`); the exporter's module scopes only name blocks.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from lynx_export.routing import RouterForm
from lynx_export.op.spec import Activation, MoESpec
from lynx_export.compiler.blocks import ExpertWeights, MoEBlock, NoMatch

# Ops that only move or relabel elements; walking through them keeps "the same tensor".
LAYOUT_OPS = frozenset({"Reshape", "Unsqueeze", "Squeeze", "Expand", "Flatten", "Identity", "Cast", "Tile"})
# Layout ops that keep every element exactly once (no Expand/Tile copies, no Cast).
RESHAPE_OPS = frozenset({"Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity"})
GATHER_OPS = frozenset({"Gather", "GatherND"})


@dataclass(frozen=True)
class Match:
    """A matched block (named by `detect`) and the nodes whose shared module scope names it."""

    block: MoEBlock
    scope_nodes: tuple[ir.Node, ...]


def const(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def const_ints(value: ir.Value | None) -> list[int] | None:
    arr = const(value)
    return None if arr is None else [int(x) for x in np.asarray(arr).reshape(-1)]


def is_weight(value: ir.Value | None) -> bool:
    return value is not None and value.const_value is not None and value.producer() is None


def relabels(value: ir.Value | None, target: ir.Value) -> bool:
    """Whether `value` is `target` seen through layout-only ops."""
    return target in behind(value, LAYOUT_OPS)


def behind(value: ir.Value | None, ops: frozenset[str]) -> list[ir.Value]:
    """`value` and the values it is a view of through `ops` (data input only), nearest first."""
    chain: list[ir.Value] = []
    while value is not None and value not in chain:
        chain.append(value)
        p = value.producer()
        if p is None or p.op_type not in ops or not p.inputs:
            break
        value = p.inputs[0]
    return chain


def forward(value: ir.Value) -> Iterator[tuple[ir.Node, int]]:
    """Yield (consumer, input index) of `value`, looking through layout-only ops."""
    for node, index in value.uses():
        if node.op_type in LAYOUT_OPS and index == 0:
            yield from forward(node.outputs[0])
        else:
            yield node, index


def single_consumer(value: ir.Value, op_types: Iterable[str], what: str) -> tuple[ir.Node, int]:
    op_types = set(op_types)
    found = [(n, i) for n, i in forward(value) if n.op_type in op_types]
    if len(found) != 1:
        raise NoMatch(f"{what}: expected one {'/'.join(sorted(op_types))} consumer, found {len(found)}")
    return found[0]


def axis_is_last(node: ir.Node, rank: int | None, default: int = -1) -> bool:
    attr = node.attributes.get("axis")
    axis = default if attr is None else attr.as_int()
    return axis == -1 or (rank is not None and axis == rank - 1)


def rank(value: ir.Value) -> int | None:
    return None if value.shape is None else len(value.shape)


def dim(value: ir.Value, axis: int) -> int | None:
    if value.shape is None or not -len(value.shape) <= axis < len(value.shape):
        return None
    d = value.shape[axis]
    return d if isinstance(d, int) else None


def module_scopes(node: ir.Node) -> list[str] | None:
    """The exporter's module scopes of `node`, outermost first, without the op's own name."""
    scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes")
    if not scopes:
        return None
    try:
        parts = [p for p in ast.literal_eval(scopes) if isinstance(p, str) and p]
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None
    return parts[:-1] if len(parts) >= 2 else None


def block_name(nodes: Iterable[ir.Node], index: int) -> str:
    """The innermost module scope the nodes share (e.g. `layers.0.mlp`), else a positional name.

    Given the router TopK and the combine, this is the MoE block even where the router is a
    module of its own (transformers' `mlp.gate`).
    """
    common: list[str] | None = None
    for node in nodes:
        scopes = module_scopes(node)
        if scopes is None:
            continue
        if common is None:
            common = scopes
        else:
            n = 0
            while n < min(len(common), len(scopes)) and common[n] == scopes[n]:
                n += 1
            common = common[:n]
    return common[-1] if common else f"moe_{index}"


def match_router(topk: ir.Node, *, spec_fields: dict[str, object] | None = None) -> tuple[ir.Value, ir.Value, RouterForm, bool, int]:
    """Return (logits, routing weights, form, normalize, K) of a router TopK.

    The routing weights are the value the experts' combine multiplies by. A `sigmoid_grouped`
    router (DeepSeek-V3's, `match_grouped_router`) has parameters beyond these: they are written
    into `spec_fields` (MoESpec field -> value); a caller that passes no dict gets NoMatch for
    it, since its spec could not hold them.
    """
    k_values = const_ints(topk.inputs[1])
    if not k_values or len(k_values) != 1:
        raise NoMatch("top-k is not a constant")
    k = k_values[0]
    if not axis_is_last(topk, rank(topk.inputs[0])):
        raise NoMatch("TopK does not run over the expert axis")
    if topk.attributes.get("largest") is not None and topk.attributes["largest"].as_int() == 0:
        raise NoMatch("TopK picks the smallest values")
    values = topk.outputs[0]
    source = topk.inputs[0]
    producer = source.producer()
    if producer is not None and producer.op_type == "Softmax" and axis_is_last(producer, rank(source)):
        logits = producer.inputs[0]
        # Renormalisation: w / ReduceSum(w) over the K axis.
        for node, index in values.uses():
            if node.op_type == "Div" and index == 0:
                denom = node.inputs[1].producer() if node.inputs[1] is not None else None
                if denom is not None and denom.op_type == "ReduceSum" and denom.inputs[0] is values:
                    return logits, node.outputs[0], RouterForm.SOFTMAX_TOPK, True, k
        return logits, values, RouterForm.SOFTMAX_TOPK, False, k
    softmaxes = [n for n, i in values.uses() if n.op_type == "Softmax" and axis_is_last(n, rank(values))]
    if len(softmaxes) == 1:
        return source, softmaxes[0].outputs[0], RouterForm.TOPK_SOFTMAX, True, k
    sigmoid = _sigmoid_router(source)
    if sigmoid is not None:
        try:
            logits, weights, normalize, fields = match_grouped_router(topk, k)
        except NoMatch as exc:
            raise NoMatch(f"{sigmoid}: not supported yet ({exc})" if sigmoid.startswith("sigmoid grouped") else f"{sigmoid}: not supported yet") from None
        if spec_fields is None:
            raise NoMatch(f"{sigmoid}: not supported by this exporter form yet")
        spec_fields.update(fields)
        return logits, weights, RouterForm.SIGMOID_GROUPED, normalize, k
    raise NoMatch("router is neither softmax->top-k nor top-k->softmax")


def match_grouped_router(topk: ir.Node, k: int) -> tuple[ir.Value, ir.Value, bool, dict[str, object]]:
    """Match DeepSeek-V3's sigmoid grouped router behind its expert TopK (transformers'
    DeepseekV3TopkRouter as torch's dynamo exporter writes it):

        scores = Sigmoid(logits); choice = Add(scores, bias [E])                 (bias optional)
        group = ReduceSum(TopK(Reshape(choice, [-1,G,S]), 2).values, axis=-1)    [T,G]
        kept = ScatterElements(zeros [T,G], TopK(group, topk_groups).indices, ones)
        masked = Where(Not(Cast(Reshape(Expand(Unsqueeze(kept, -1))))), -inf, choice)
        ids = TopK(masked, K).indices; w = GatherElements(scores, ids, axis=1)
        w = w / ReduceSum(w, -1) (+ eps)   (norm_topk_prob: optional); w = w * scaling (optional)

    Returns (logits, weights the combine multiplies by, normalize, MoESpec router fields).
    """
    masked = behind(topk.inputs[0], RESHAPE_OPS)[-1]
    where = masked.producer()
    if where is None or where.op_type != "Where" or len(where.inputs) != 3:
        raise NoMatch("the experts are not picked from group-masked scores (Where)")
    cond, on_true, on_false = where.inputs
    if _fill_value(on_true) == -np.inf and _fill_value(on_false) is None:
        choice, drop_when = on_false, True  # masked_fill(~kept, -inf)
    elif _fill_value(on_false) == -np.inf and _fill_value(on_true) is None:
        choice, drop_when = on_true, False
    else:
        raise NoMatch("the group mask does not set the other experts to -inf")
    scatter, kept_when = _group_mask_source(cond)
    if kept_when == drop_when:
        raise NoMatch("the group mask keeps the experts outside the best groups")

    # The group selection: ScatterElements(zeros, TopK(group scores, topk_groups).indices, ones).
    axis = scatter.attributes.get("axis")
    data, indices, updates = scatter.inputs[0], scatter.inputs[1], scatter.inputs[2]
    if axis is None or axis.as_int() not in (1, -1) or _fill_value(data) != 0.0 or _fill_value(updates) != 1.0:
        raise NoMatch("the kept groups are not scattered as ones into zeros")
    group_topk = indices.producer() if indices is not None else None
    if group_topk is None or group_topk.op_type != "TopK" or indices is not group_topk.outputs[1]:
        raise NoMatch("the kept groups do not come from a TopK over the group scores")
    topk_groups = _topk_k(group_topk)
    group_sum = group_topk.inputs[0].producer()
    if group_sum is None or group_sum.op_type != "ReduceSum" or _reduce_axes(group_sum) not in ([-1], [2]) or _keepdims(group_sum):
        raise NoMatch("group scores are not a sum over each group's best scores")
    best = group_sum.inputs[0].producer()
    if best is None or best.op_type != "TopK" or group_sum.inputs[0] is not best.outputs[0] or _topk_k(best) != 2:
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
    if len(gathers) != 1 or (gathers[0].attributes.get("axis") is not None and gathers[0].attributes["axis"].as_int() not in (1, -1)):
        raise NoMatch("the routing weights are not the picked experts' sigmoid scores")
    weights = gathers[0].outputs[0]
    normalize = False
    for node, index in weights.uses():
        if node.op_type == "Div" and index == 0 and _is_sum_of(node.inputs[1], weights):
            weights, normalize = node.outputs[0], True
            break
    scaling = 1.0
    for node, index in weights.uses():
        factor = _scalar(node.inputs[1 - index]) if node.op_type == "Mul" and len(node.inputs) == 2 else None
        if factor is not None:
            weights, scaling = node.outputs[0], factor
            break
    fields: dict[str, object] = {
        "num_groups": num_groups,
        "topk_groups": topk_groups,
        "routed_scaling": scaling,
        "score_bias": None if bias is None else tuple(shortest_float(x) for x in bias.astype(np.float32)),
    }
    return logits, weights, normalize, fields


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


def _topk_k(node: ir.Node) -> int:
    """The constant k of a TopK over the last axis, picking the largest values."""
    k = const_ints(node.inputs[1]) if len(node.inputs) > 1 else None
    largest = node.attributes.get("largest")
    if not k or len(k) != 1 or not axis_is_last(node, rank(node.inputs[0])) or (largest is not None and largest.as_int() == 0):
        raise NoMatch("a group TopK is not a constant top-k of the last axis")
    return k[0]


def _reduce_axes(node: ir.Node) -> list[int] | None:
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        return const_ints(node.inputs[1])
    axes = node.attributes.get("axes")
    return None if axes is None else list(axes.as_ints())


def _keepdims(node: ir.Node) -> bool:
    attr = node.attributes.get("keepdims")
    return attr is None or attr.as_int() != 0


def _is_sum_of(denominator: ir.Value | None, values: ir.Value) -> bool:
    """`denominator` is ReduceSum(values) over the last axis (keepdims), plus a small constant or not."""
    node = denominator.producer() if denominator is not None else None
    if node is not None and node.op_type == "Add" and len(node.inputs) == 2:
        eps = [_scalar(v) for v in node.inputs]
        if sum(e is not None for e in eps) != 1 or not 0 <= max(e for e in eps if e is not None) <= 1e-6:
            return False
        node = node.inputs[0 if eps[0] is None else 1].producer()
    return (
        node is not None and node.op_type == "ReduceSum" and node.inputs[0] is values and _keepdims(node)
        and _reduce_axes(node) in ([-1], [rank(values) - 1 if rank(values) else -1])
    )


def _fill_value(value: ir.Value | None) -> float | None:
    """The one value a constant-filled tensor holds: a constant whose elements are all equal, an
    Expand of one, or a ConstantOfShape. None for anything else."""
    if value is None:
        return None
    node = value.producer()
    if node is not None and node.op_type == "Expand":
        return _fill_value(node.inputs[0])
    if node is not None and node.op_type == "ConstantOfShape":
        attr = node.attributes.get("value")
        arr = np.zeros(1, dtype=np.float32) if attr is None else attr.as_tensor().numpy()
    else:
        arr = const(value)
    if arr is None or arr.size == 0 or arr.dtype.kind not in "biuf":
        return None
    flat = np.asarray(arr, dtype=np.float64).reshape(-1)
    return float(flat[0]) if (flat == flat[0]).all() else None


def _sigmoid_router(scores: ir.Value) -> str | None:
    """Name the sigmoid router behind the scores a TopK picks from, if that is what it is.

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
            name = "sigmoid grouped router" if grouped else "sigmoid router"
            return name + (" with score correction bias" if bias else "")
        if node.op_type in LAYOUT_OPS:
            value = node.inputs[0]
        elif node.op_type == "Where" and len(node.inputs) == 3:
            data = [v for v in node.inputs[1:] if v is not None and const(v) is None]
            if len(data) != 1:
                return None
            grouped = grouped or "TopK" in _ancestor_ops(node.inputs[0])
            value = data[0]
        elif node.op_type == "Add" and len(node.inputs) == 2:
            data = [v for v in node.inputs if v is not None and const(v) is None]
            if len(data) != 1:
                return None
            bias = True
            value = data[0]
        else:
            return None
    return None


def _ancestor_ops(value: ir.Value | None, limit: int = 64) -> set[str]:
    """The op types of up to `limit` nodes that `value` is computed from."""
    ops: set[str] = set()
    seen: set[ir.Node] = set()
    stack = [value]
    while stack and len(seen) < limit:
        v = stack.pop()
        node = v.producer() if v is not None else None
        if node is None or node in seen:
            continue
        seen.add(node)
        ops.add(node.op_type)
        stack.extend(node.inputs)
    return ops


SPARSE_MIXER = "PhiMoE sparse mixer router (argmax rounds over masked logits): ONNX Runtime's MoE kernel cannot reproduce it"


def expert_ids_reason(node: ir.Node) -> str:
    """Why expert ids computed by `node` (not a router TopK) form no block the pass can rewrite."""
    if node.op_type == "Concat" and len(node.inputs) >= 2:
        picks = [behind(v, LAYOUT_OPS)[-1].producer() if v is not None else None for v in node.inputs]
        # PhiMoE's sparsemixer: each round takes the argmax of the logits, the later ones with
        # the experts already picked scattered to -inf; each pick is weighted by a softmax over
        # logits masked to those within a relative jitter of the round's maximum.
        if all(p is not None and p.op_type == "ArgMax" for p in picks) and all(
            "ScatterElements" in _ancestor_ops(p.inputs[0]) for p in picks[1:]
        ):
            return SPARSE_MIXER
    if node.op_type == "ArgMax":
        return "expert ids come from an ArgMax (top-1 routing without TopK): not supported yet"
    return f"expert ids come from a {node.op_type}, not from a router TopK"


def router_hidden(logits: ir.Value, num_experts: int) -> ir.Value:
    """The hidden state [T,H] a linear router reads."""
    node = logits.producer()
    if node is None or node.op_type not in ("Gemm", "MatMul"):
        raise NoMatch("router logits are not a linear layer of the hidden state")
    a, b = node.inputs[0], node.inputs[1]
    if is_weight(a) and not is_weight(b):
        a, b = b, a
    if not is_weight(b):
        raise NoMatch("router weight is not a constant")
    if rank(a) != 2:
        raise NoMatch("router input is not a 2-D [T,H] tensor")
    return a


@dataclass(frozen=True)
class GatedActivation:
    """A matched SwiGLU: gate * sigmoid(alpha * gate) * (up + beta), with gate <= limit and
    |up| <= limit when `limit` is set (Activation.SWIGLU's parameters; plain: 1, 0, None)."""

    output: ir.Value
    gate_first: bool
    interleaved: bool
    alpha: float = 1.0
    beta: float = 0.0
    limit: float | None = None


def match_gated_activation(gate_up_out: ir.Value) -> GatedActivation:
    """Match SwiGLU over a gate/up projection, plain (silu(gate) * up) or clamped as gpt-oss's.

    The halves are split (`Split` in two along the feature axis: [gate; up] concatenated) or
    sliced with step 2 (`Slice` from 0 and from 1: rows interleaved, as gpt-oss stores them).
    gpt-oss's `(clamp(up, -L, L) + 1) * g * sigmoid(1.702 * g)`, g = clamp(gate, max=L), gives
    alpha (the constant scaling the gate inside Sigmoid), beta (the constant added to up) and the
    limit L (Clip, or Min/Max, with constant bounds); see `match_swiglu_halves`.
    """
    uses = list(forward(gate_up_out))
    splits = [n for n, _ in uses if n.op_type == "Split"]
    slices = [n for n, i in uses if n.op_type == "Slice" and i == 0]
    if splits and not slices:
        split, _ = single_consumer(gate_up_out, {"Split"}, "gate/up projection")
        if len(split.outputs) != 2 or not axis_is_last(split, rank(split.inputs[0]), default=0):
            raise NoMatch("gate/up projection is not split in two along the feature axis")
        halves, interleaved = (split.outputs[0], split.outputs[1]), False
    elif slices and not splits:
        halves, interleaved = _interleaved_halves(slices), True
    else:
        raise NoMatch("gate/up projection is neither split in two nor sliced into interleaved rows")
    output, gate_first, alpha, beta, limit = match_swiglu_halves(*halves)
    return GatedActivation(output, gate_first, interleaved, alpha, beta, limit)


def match_swiglu_halves(first: ir.Value, second: ir.Value) -> tuple[ir.Value, bool, float, float, float | None]:
    """SwiGLU over two halves of a gate/up projection, either of which may be the gate.

    Matches `g * Sigmoid(g)` or `g * Sigmoid(g * alpha)` times `u` or `u + beta` (constant
    scalars, either operand order), where g is the gate half or `Clip(gate, max=L)` and u the up
    half or `Clip(up, -L, L)` (`Min`/`Max` with constants spell the same clamps). Returns
    (output, gate_first, alpha, beta, limit); refuses clamps ONNX Runtime's SwiGLU limit does not
    express (gate clamped below, up clamped asymmetrically, different limits, one half only).
    """
    for gate_index in (0, 1):
        halves = (first, second)
        found = _swiglu_structure(halves[gate_index], halves[1 - gate_index])
        if found is None:
            continue
        output, alpha, beta, (g_lo, g_hi), (u_lo, u_hi) = found
        return output, gate_index == 0, alpha, beta, _swiglu_limit(g_lo, g_hi, u_lo, u_hi)
    raise NoMatch("expert activation is not SwiGLU (silu(gate) * up, or gate * sigmoid(alpha * gate) * (up + beta))")


Bounds = tuple[float | None, float | None]  # (lower, upper) of a clamp; None: that side is open


def _swiglu_structure(gate: ir.Value, up: ir.Value) -> tuple[ir.Value, float, float, Bounds, Bounds] | None:
    """(output, alpha, beta, gate bounds, up bounds) when `gate` and `up` form SwiGLU, else None."""
    g, g_bounds = _clamped(gate)
    u, u_bounds = _clamped(up)
    # sigmoid(g) or sigmoid(g * alpha)
    sigmoids: list[tuple[ir.Node, float]] = []
    for node, _ in g.uses():
        if node.op_type == "Sigmoid":
            sigmoids.append((node, 1.0))
        elif node.op_type == "Mul" and len(node.inputs) == 2:
            alpha = _scalar(node.inputs[1] if node.inputs[0] is g else node.inputs[0])
            if alpha is not None:
                sigmoids += [(n, alpha) for n, _ in node.outputs[0].uses() if n.op_type == "Sigmoid"]
    if len(sigmoids) != 1:
        return None
    sig, alpha = sigmoids[0]
    glu = [n for n, _ in g.uses() if n.op_type == "Mul" and set(n.inputs) == {g, sig.outputs[0]}]
    if len(glu) != 1:
        return None
    # up or up + beta, whichever the product reads
    linears: dict[ir.Value, float] = {u: 0.0}
    for node, index in u.uses():
        if node.op_type == "Add" and len(node.inputs) == 2:
            c = _scalar(node.inputs[1 - index])
            if c is not None:
                linears[node.outputs[0]] = c
    glu_out = glu[0].outputs[0]
    prod = [
        (n, linears[other])
        for n, i in glu_out.uses()
        if n.op_type == "Mul" and len(n.inputs) == 2 and (other := n.inputs[1 - i]) in linears
    ]
    if len(prod) != 1:
        return None
    return prod[0][0].outputs[0], alpha, prod[0][1], g_bounds, u_bounds


def _clamped(value: ir.Value) -> tuple[ir.Value, Bounds]:
    """`value` through the clamps (Clip, or Min/Max with a constant) that are its only use:
    (the clamped value, its bounds); `value` itself and (None, None) when not clamped."""
    lo: float | None = None
    hi: float | None = None
    for _ in range(2):
        uses = list(value.uses())
        if len(uses) != 1:
            break
        node, index = uses[0]
        if node.op_type == "Clip" and index == 0:
            bounds = _clip_bounds(node)
            if bounds is None:
                raise NoMatch("clamped SwiGLU: a Clip's bounds are not constant scalars")
            lo = bounds[0] if lo is None else (lo if bounds[0] is None else max(lo, bounds[0]))
            hi = bounds[1] if hi is None else (hi if bounds[1] is None else min(hi, bounds[1]))
        elif node.op_type in ("Min", "Max") and len(node.inputs) == 2:
            c = _scalar(node.inputs[1 - index])
            if c is None:
                break
            if node.op_type == "Min":
                hi = c if hi is None else min(hi, c)
            else:
                lo = c if lo is None else max(lo, c)
        else:
            break
        value = node.outputs[0]
    return value, (lo, hi)


def _clip_bounds(node: ir.Node) -> Bounds | None:
    """A Clip's constant (min, max), None for an open side; None when a bound is not constant."""
    bounds: list[float | None] = []
    for slot, attr in ((1, "min"), (2, "max")):
        v = node.inputs[slot] if len(node.inputs) > slot else None
        if v is not None:
            c = _scalar(v)
            if c is None:
                return None
            bounds.append(c)
        elif node.attributes.get(attr) is not None:  # Clip before opset 11
            bounds.append(shortest_float(np.float32(node.attributes[attr].as_float())))
        else:
            bounds.append(None)
    lo, hi = bounds
    return (None if lo is not None and np.isneginf(lo) else lo), (None if hi is not None and np.isposinf(hi) else hi)


def _swiglu_limit(g_lo: float | None, g_hi: float | None, u_lo: float | None, u_hi: float | None) -> float | None:
    """The SwiGLU limit L of clamps gate <= L and -L <= up <= L, or NoMatch for other clamps."""
    if g_lo is None and g_hi is None and u_lo is None and u_hi is None:
        return None
    what = f"gate clamped to {_interval(g_lo, g_hi)}, up to {_interval(u_lo, u_hi)}"
    if g_lo is not None:
        reason = "the gate is clamped from below"
    elif g_hi is None or u_lo is None or u_hi is None:
        reason = "gate and up are not both clamped"
    elif u_lo != -u_hi:
        reason = "up is not clamped symmetrically"
    elif g_hi != u_hi:
        reason = "gate and up are clamped to different limits"
    elif g_hi <= 0:
        reason = "the limit is not positive"
    else:
        return g_hi
    raise NoMatch(f"clamped SwiGLU with {what}: {reason} (supported: gate <= L and -L <= up <= L, as gpt-oss)")


def _interval(lo: float | None, hi: float | None) -> str:
    return f"[{'-inf' if lo is None else f'{lo:g}'}, {'inf' if hi is None else f'{hi:g}'}]"


def _scalar(value: ir.Value | None) -> float | None:
    """A constant floating-point scalar (any single-element shape) as the shortest decimal that
    round-trips in its own type (1.702, not float32's 1.7020000219345093)."""
    arr = const(value)
    if arr is None or arr.size != 1 or arr.dtype.kind in "biuc":  # floats only (bfloat16 included)
        return None
    return shortest_float(arr.reshape(-1)[0])


def shortest_float(x) -> float:
    """A numpy float scalar as the shortest decimal that round-trips in its own type."""
    value = float(x)
    return float(str(x)) if np.isfinite(value) else value


def _interleaved_halves(slices: list[ir.Node]) -> tuple[ir.Value, ir.Value]:
    """(even rows, odd rows) of two step-2 Slices of one value along its last axis."""
    if len(slices) != 2 or slices[0].inputs[0] is not slices[1].inputs[0]:
        raise NoMatch("gate/up projection is not sliced into two interleaved halves")
    by_start: dict[int, ir.Value] = {}
    for node in slices:
        ins = list(node.inputs) + [None] * (5 - len(node.inputs))
        starts, axes, steps = const_ints(ins[1]), const_ints(ins[3]), const_ints(ins[4])
        data_rank = rank(ins[0])
        if (
            starts is None or len(starts) != 1 or steps != [2] or axes is None or len(axes) != 1
            or not (axes[0] == -1 or (data_rank is not None and axes[0] == data_rank - 1))
        ):
            raise NoMatch("gate/up projection is not sliced into two interleaved halves")
        by_start[starts[0]] = node.outputs[0]
    if set(by_start) != {0, 1}:
        raise NoMatch("gate/up projection is not sliced into two interleaved halves")
    return by_start[0], by_start[1]


def match_bias_add(value: ir.Value, biases: Iterable[ir.Value]) -> tuple[ir.Value, ir.Value | None]:
    """`value + bias` for one of `biases` (gathered per-row expert biases), else `value` as it is.

    Returns (the sum, or `value`; the bias read, or None).
    """
    biases = tuple(biases)
    for node, index in forward(value):
        if node.op_type != "Add" or len(node.inputs) != 2:
            continue
        other = node.inputs[1 - index]
        found = [b for b in biases if relabels(other, b)]
        if len(found) == 1:
            return node.outputs[0], found[0]
    return value, None


def match_combine(expert_out: ir.Value, weights: ir.Value, k: int) -> ir.Value:
    """Match ReduceSum(expert_out * weights, axis=K), weighed before or after the [T,K,H] reshape; return [T,H]."""
    for node, index in forward(expert_out):
        if node.op_type != "Mul":
            continue
        other = node.inputs[1 - index]
        if not relabels(other, weights):
            continue
        reduce, _ = single_consumer(node.outputs[0], {"ReduceSum"}, "weighted expert outputs")
        axes = const_ints(reduce.inputs[1]) if len(reduce.inputs) > 1 else None
        keepdims = reduce.attributes.get("keepdims")
        if axes != [1] or (keepdims is not None and keepdims.as_int() != 0) or dim(reduce.inputs[0], 1) not in (None, k):
            raise NoMatch("expert outputs are not summed over the top-k axis")
        return reduce.outputs[0]
    raise NoMatch("expert outputs are not weighted by the routing weights")


@dataclass(frozen=True)
class RoutedExperts:
    """What a form found of one block, in the form every matcher reports it."""

    num_experts: int
    top_k: int
    hidden_size: int
    expert_size: int
    router: RouterForm
    normalize: bool
    router_fields: dict  # the router's own MoESpec fields (sigmoid_grouped's grouping)
    swiglu: tuple[float, float, float | None]  # activation alpha, beta, limit
    weights: ExpertWeights


def routed_block(form: str, experts: RoutedExperts, hidden: ir.Value, logits: ir.Value, output: ir.Value, source: ir.Value | None) -> MoEBlock:
    """The MoEBlock (named by `detect`) of SwiGLU experts a form matched."""
    alpha, beta, limit = experts.swiglu
    spec = MoESpec(
        num_experts=experts.num_experts, top_k=experts.top_k, hidden_size=experts.hidden_size, expert_size=experts.expert_size,
        activation=Activation.SWIGLU, router=experts.router, normalize=experts.normalize, **experts.router_fields,
        activation_alpha=alpha, activation_beta=beta, swiglu_limit=limit,
    )
    return MoEBlock(name="", form=form, spec=spec, weights=experts.weights, hidden=hidden.name, router_logits=logits.name,
                    output=output.name, sequence_source=None if source is None else source.name)


def check_bias_shapes(biases: Iterable[tuple[ir.Value | None, int]]) -> None:
    """Each stacked expert bias [E, n] fits its projection's n outputs."""
    for bias, size in biases:
        if bias is not None and dim(bias, 1) != size:
            raise NoMatch(f"expert bias shape {list(bias.shape)} does not match its projection")


def check_closed(output: ir.Value, boundary: set[ir.Value], graph: ir.Graph) -> None:
    """The block may read only its boundary values and constants.

    A Shape node reads no values, only a shape: dynamic exports size the block's tensors from
    Shape nodes of any tensor (the model's input, say), which the rewrite's node does not need.
    """
    seen: set[ir.Value] = set()
    stack = [output]
    while stack:
        value = stack.pop()
        if value in seen or value in boundary:
            continue
        seen.add(value)
        node = value.producer()
        if node is None:
            if value.const_value is None:
                raise NoMatch(f"block reads '{value.name}', which is neither its input nor a constant")
            continue
        if node.graph is not graph:
            raise NoMatch("block spans a subgraph")
        if node.op_type == "Shape":
            continue
        stack.extend(v for v in node.inputs if v is not None)


def sequence_source(hidden: ir.Value) -> ir.Value | None:
    """The [B,S,H] tensor `hidden` was flattened from (through one or more reshapes), if shown."""
    for value in behind(hidden, frozenset({"Reshape", "Flatten"}))[1:]:
        if rank(value) == 3:
            return value if dim(value, -1) in (None, dim(hidden, -1)) else None
    return None
