"""transformers' own ONNX exporter (`transformers.exporters.OnnxExporter`, default settings):
`grouped_mm` experts unrolled per expert (`grouped_mm`).

transformers 5.x runs MoE experts with its `grouped_mm` implementation by default: the (token,
slot) pairs are sorted by expert and each expert's contiguous run of rows is multiplied by that
expert's weight (`torch._grouped_mm`, or transformers' `grouped_mm_fallback` op). The exporter
translates that op (its `_aten_grouped_mm`) into one Range/Gather/MatMul group per expert and a
Concat, the number of experts being static. A tiny Mixtral (E=8, K=2, H=32, I=48) exports as:

    logits [T,E] = Gemm(hidden [T,H], router.weight, transB=1)          (hidden = Reshape(tokens))
    w, ids = TopK(Softmax(logits), K); w = w / ReduceSum(w)            (match.match_router)
    sorted_ids, perm = TopK(Reshape(ids, [-1]), N, largest=0)          (argsort, N = T*K)
    rows [N,H] = GatherND(tokens [T,H], Unsqueeze(perm // K))          (floor division spelled
                 Sub(Div(perm, K), Cast(And(Equal(Less(perm, 0), ..), Cast(Mod(perm, K))))))
    sw [N]     = GatherND(Reshape(w, [-1]), Unsqueeze(perm))           (routing weights, sorted)
    counts [E] = ScatterElements(zeros[E], Clip(Cast(sorted_ids)), ones, reduction=add)  (histc)
    e_0..e_E-1 = Split(Cast(CumSum(Cast(counts))), E)                  (each expert's end row)
    W1_0..W1_E-1 = Split(gate_up [E,H,2I], E, axis=0)                  (stacked initializer, in_out)
    per expert g:  r_g = Range(e_g-1 (0 for g=0), e_g, 1)
                   y_g = MatMul(Gather(rows, r_g), Squeeze(W1_g, [0]))    [n_g,2I]
    gu [N,2I] = Concat(y_0..y_E-1, axis=0); g, u = Split(gu); a = g * Sigmoid(g) * u
    per expert g:  z_g = MatMul(Gather(a, r_g), Squeeze(Split(down [E,I,H])_g, [0]))   [n_g,H]
    y [N,H] = Concat(z_0..z_E-1, axis=0) * Unsqueeze(sw)
    inv = ScatterND(empty [N], Unsqueeze(perm), Range(0, N, 1))        (inverse permutation)
    out [T,H] = ReduceSum(Reshape(GatherND(y, Unsqueeze(inv)), [T,K,H]), axis=1)

The weights are the model's stacked expert parameters, constant-folded into [E,in,out]
initializers (`gate_up` [E,H,2I] with gate columns first, `down` [E,I,H]) and split per expert
by a `Split` the optimiser keeps; per-expert 2-D initializers (an export whose folding split them)
are taken too. With the exporter's default `dynamic=False` every shape is static (N, the Range
end of the inverse permutation, are constants); with `dynamic=True` they are computed from
`Shape` nodes, which the block may read (they only size its tensors).

gpt-oss adds its stacked biases to the concatenated rows, gathered at the sorted expert ids,
`gu = Concat(..) + GatherND(gate_up_bias [E,2I], Unsqueeze(sorted_ids))` (down's likewise), slices
gate and up from interleaved columns (`Slice(gu, 0::2)`, `Slice(gu, 1::2)`) and clamps its SwiGLU
(match.match_gated_activation: alpha, beta and limit go into the spec).

DeepSeek-V3's sigmoid grouped router (match.match_grouped_router: sigmoid scores plus a correction
bias, the best groups kept, weights renormalised and scaled) routes the same sorted dispatch; its
parameters go into the spec, and its shared expert stays outside the block. PhiMoE's sparse mixer
computes the sorted expert ids as a Concat of ArgMax rounds, not a TopK: that node is claimed so
that the block is reported with its reason (match.expert_ids_reason), not missed.

`ort_fusions="cuda"` exports `batched_mm` experts fused into com.microsoft.MoE instead: another form.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from lynx_export.compiler.blocks import Names, NoMatch
from lynx_export.compiler.forms.match import (
    GATHER_OPS,
    LAYOUT_OPS,
    RESHAPE_OPS,
    Match,
    StackedWeights,
    axis_is_last,
    behind,
    const,
    const_ints,
    derived_from,
    dim,
    expert_ids_reason,
    forward,
    is_weight,
    keepdims,
    match_bias_add,
    match_combine,
    match_gated_activation,
    match_routing,
    rank,
    reduce_axes,
    relabels,
    stacked_block,
    upstream,
)

FORM = "grouped_mm"

# Ops an index or offset passes through unchanged in value (a scalar squeezed, an int cast).
_VALUE_OPS = frozenset({"Squeeze", "Unsqueeze", "Reshape", "Identity", "Cast"})


def claims(node: ir.Node) -> bool:
    """A router TopK whose expert ids are sorted (argsorted by a smallest-first TopK), or another
    node computing expert ids that are sorted and dispatched so.

    Ids from something other than a TopK (PhiMoE's sparse mixer: a Concat of argmax rounds) are
    claimed so that the block is reported with the reason it cannot be rewritten, not missed.
    """
    if node.domain not in ("", "ai.onnx"):
        return False
    if _is_topk(node):
        return not _smallest(node) and bool(_sorts(node.outputs[1]))
    if node.op_type in LAYOUT_OPS:
        return False
    return any(_dispatches(sort) for v in node.outputs for sort in _sorts(v))


def _is_topk(node: ir.Node) -> bool:
    return node.op_type == "TopK" and node.domain in ("", "ai.onnx")


def _smallest(node: ir.Node) -> bool:
    return node.attributes.get_int("largest", 1) == 0


def _sorts(ids: ir.Value) -> list[ir.Node]:
    return [n for n, i in forward(ids) if _is_topk(n) and i == 0 and _smallest(n)]


def _dispatches(sort: ir.Node) -> bool:
    """Whether an argsort's permutation is divided by a constant (the token of each sorted
    (token, slot) pair, perm // K): the sort dispatches expert ids, not something else."""
    perm = sort.outputs[1]
    return any(
        n.op_type == "Div" and i == 0 and (k := const_ints(n.inputs[1])) is not None and len(k) == 1 and k[0] >= 1
        for n, i in forward(perm)
    )


def _source(value: ir.Value | None) -> ir.Value | None:
    """`value` seen through value-preserving ops (squeeze, cast, ...)."""
    chain = behind(value, _VALUE_OPS)
    return chain[-1] if chain else None


def _row_gather(node: ir.Node) -> bool:
    """A gather of whole rows (axis 0): Gather(data, idx [N]) or GatherND(data, idx [N,1])."""
    if node.op_type == "Gather":
        return node.attributes.get_int("axis", 0) == 0
    if node.op_type == "GatherND":
        idx = node.inputs[1]
        return node.attributes.get_int("batch_dims", 0) == 0 and dim(idx, -1) == 1 and rank(idx) in (None, 2)
    return False


def _check_full_sort(sort: ir.Node) -> None:
    """The argsort TopK sorts all of its 1-D input: k is its length."""
    data = sort.inputs[0]
    if rank(data) != 1 or not axis_is_last(sort, 1):
        raise NoMatch("expert ids are not flattened before they are sorted")
    k = const_ints(sort.inputs[1])
    if k is not None:
        if len(k) != 1 or dim(data, 0) is None or k[0] != dim(data, 0):
            raise NoMatch("the sort of expert ids keeps only part of them")
        return
    shapes = [v.producer() for v in upstream(sort.inputs[1], limit=8).values]
    if not any(p is not None and p.op_type == "Shape" and p.inputs[0] in behind(data, RESHAPE_OPS) for p in shapes):
        raise NoMatch("the sort of expert ids keeps only part of them")


def _floor_div(perm: ir.Value, k: int) -> list[ir.Value]:
    """Values that compute perm // k (the token of each sorted (token, slot) pair)."""
    found = [perm] if k == 1 else []
    for div, index in forward(perm):
        if div.op_type != "Div" or index != 0 or const_ints(div.inputs[1]) != [k]:
            continue
        q = div.outputs[0]
        found.append(q)  # perm >= 0: integer division is floor division
        # Floor-division correction for negative dividends: zero here, as perm >= 0.
        found.extend(n.outputs[0] for n, i in q.uses() if n.op_type == "Sub" and i == 0 and derived_from(n.inputs[1], {perm}))
    return found


def _sorted_rows(perm: ir.Value, k: int, hidden: ir.Value, hidden_size: int | None) -> tuple[ir.Value, ir.Value]:
    """(rows [N,H], tokens): the token rows gathered in expert-sorted order, and the [T,H] tensor read."""
    views = behind(hidden, RESHAPE_OPS)
    for q in _floor_div(perm, k):
        for node, index in forward(q):
            if node.op_type not in GATHER_OPS or index != 1 or not _row_gather(node):
                continue
            for tokens in behind(node.inputs[0], RESHAPE_OPS):
                if tokens in views and rank(tokens) == 2 and (tokens is hidden or dim(tokens, -1) == hidden_size):
                    return node.outputs[0], tokens
    raise NoMatch(f"no gather of the router's hidden state at the sorted positions // {k} (sorted token rows)")


def _sorted_weights(perm: ir.Value, weights: ir.Value) -> ir.Value:
    """The routing weights gathered in expert-sorted order."""
    found = [
        n.outputs[0]
        for n, i in forward(perm)
        if n.op_type in GATHER_OPS and i == 1 and _row_gather(n) and relabels(n.inputs[0], weights)
    ]
    if len(found) != 1:
        raise NoMatch(f"routing weights: expected one gather in expert-sorted order, found {len(found)}")
    return found[0]


def _expert_groups(rows: ir.Value, num_experts: int, what: str) -> tuple[list[ir.Node], list[ir.Value], str, ir.Value]:
    """The per-expert groups reading `rows`: (Ranges, weights, layout, Concat output), in expert order."""
    gathers = [n for n, i in rows.uses() if n.op_type == "Gather" and i == 0]
    if len(gathers) != num_experts:
        raise NoMatch(f"{what}: expected {num_experts} per-expert row groups (Range/Gather/MatMul), found {len(gathers)}")
    groups: dict[ir.Value, tuple[ir.Node, ir.Value, str]] = {}
    for gather in gathers:
        rng = gather.inputs[1].producer() if gather.inputs[1] is not None else None
        if gather.attributes.get_int("axis", 0) != 0 or rng is None or rng.op_type != "Range":
            raise NoMatch(f"{what}: an expert's rows are not a Range of the sorted rows")
        uses = list(gather.outputs[0].uses())
        if len(uses) != 1 or uses[0][0].op_type != "MatMul":
            raise NoMatch(f"{what}: an expert's rows do not feed one MatMul")
        mm, index = uses[0]
        out = mm.outputs[0]
        if any(n.op_type == "Add" for n, _ in out.uses()):
            raise NoMatch(f"{what}: expert biases: not supported yet")
        # MatMul(x[n,in], W[in,out]) is the transpose of torch Linear order; MatMul(W[out,in], x) is not used by the exporter.
        groups[out] = (rng, mm.inputs[1 - index], "in_out" if index == 0 else "out_in")
    concats = {n for out in groups for n, _ in out.uses() if n.op_type == "Concat"}
    if len(concats) != 1:
        raise NoMatch(f"{what}: the experts' outputs are not concatenated once")
    concat = concats.pop()
    if list(concat.inputs) != list(dict.fromkeys(concat.inputs)) or set(concat.inputs) != set(groups):
        raise NoMatch(f"{what}: the concatenation holds something other than the {num_experts} experts' outputs")
    if concat.attributes.get_int("axis", 0) not in (0, -2) or any(len(list(out.uses())) != 1 for out in groups):
        raise NoMatch(f"{what}: the experts' outputs are not concatenated along the rows")
    ordered = [groups[v] for v in concat.inputs]
    layouts = {layout for _, _, layout in ordered}
    if len(layouts) != 1:
        raise NoMatch(f"{what}: experts multiply their weights in different orders")
    return [r for r, _, _ in ordered], [w for _, w, _ in ordered], layouts.pop(), concat.outputs[0]


def _check_offsets(ranges: list[ir.Node], counted: set[ir.Value]) -> None:
    """Expert g's rows are [end(g-1), end(g)): the ends are a CumSum of per-expert counts, split in expert order."""
    ends = []
    for g, rng in enumerate(ranges):
        start, end, step = rng.inputs
        if const_ints(step) != [1]:
            raise NoMatch("an expert's row range does not step by 1")
        if g == 0:
            if const_ints(start) != [0]:
                raise NoMatch("the first expert's rows do not start at row 0")
        elif _source(start) is not ends[-1]:
            raise NoMatch(f"expert {g}'s rows do not start where expert {g - 1}'s end")
        ends.append(_source(end))
    splits = {e.producer() for e in ends}
    split = splits.pop() if len(splits) == 1 else None
    sizes = const_ints(split.inputs[1]) if split is not None and len(split.inputs) > 1 and split.inputs[1] is not None else None
    if split is None or split.op_type != "Split" or [*split.outputs] != ends or sizes not in (None, [1] * len(ends)):
        raise NoMatch("expert row ranges do not end at one Split of the cumulative counts, in expert order")
    cumsum = _source(split.inputs[0]).producer()
    if cumsum is None or cumsum.op_type != "CumSum" or cumsum.attributes.get_int("exclusive", 0) or cumsum.attributes.get_int("reverse", 0):
        raise NoMatch("expert row ranges are not a running sum of per-expert counts")
    if rank(cumsum.inputs[0]) != 1 or not any(v in upstream(cumsum.inputs[0]).values for v in counted):
        raise NoMatch("per-expert row counts are not counted from the expert ids")


def _sorted_biases(sorted_ids: ir.Value, num_experts: int) -> dict[ir.Value, ir.Value]:
    """Rows of stacked [E,*] initializers gathered at the sorted expert ids: {gathered: stacked}."""
    found: dict[ir.Value, ir.Value] = {}
    for node, index in forward(sorted_ids):
        if node.op_type in GATHER_OPS and index == 1 and _row_gather(node) and is_weight(node.inputs[0]):
            data = node.inputs[0]
            if rank(data) != 2 or dim(data, 0) != num_experts:
                raise NoMatch("sorted expert ids index something other than stacked [E,*] expert biases")
            found[node.outputs[0]] = data
    return found


def _same_range(a: ir.Node, b: ir.Node) -> bool:
    return a is b or all(_source(x) is _source(y) for x, y in zip(a.inputs, b.inputs))


def _expert_weights(values: list[ir.Value], what: str) -> tuple[Names, tuple[int, int]]:
    """Names of the per-expert weights: one stacked [E,a,b] initializer split per expert, or E [a,b] ones."""
    stacked: set[ir.Value] = set()
    for g, value in enumerate(values):
        squeeze = value.producer()
        if squeeze is not None and squeeze.op_type == "Squeeze":
            if len(squeeze.inputs) < 2 or const_ints(squeeze.inputs[1]) != [0] or rank(squeeze.inputs[0]) != 3:
                raise NoMatch(f"{what}: an expert's weight is not one slice of stacked weights")
            part = squeeze.inputs[0]
            split = part.producer()
            if split is not None and split.op_type == "Split" and split.attributes.get_int("axis", 0) == 0 and split.outputs[g] is part:
                sizes = const_ints(split.inputs[1]) if len(split.inputs) > 1 and split.inputs[1] is not None else None
                if is_weight(split.inputs[0]) and sizes in (None, [1] * len(values)) and len(split.outputs) == len(values):
                    stacked.add(split.inputs[0])
                    continue
        elif squeeze is not None and squeeze.op_type == "Gather" and squeeze.attributes.get_int("axis", 0) == 0:
            if is_weight(squeeze.inputs[0]) and const_ints(squeeze.inputs[1]) == [g] and rank(squeeze.inputs[1]) == 0:
                stacked.add(squeeze.inputs[0])
                continue
        elif is_weight(value) and rank(value) == 2:
            continue
        raise NoMatch(f"{what}: expert weights are neither slices of one stacked initializer nor per-expert initializers")
    if stacked:
        if len(stacked) != 1 or any(is_weight(v) for v in values):
            raise NoMatch(f"{what}: expert weights come from more than one stacked initializer")
        weight = stacked.pop()
        if rank(weight) != 3 or dim(weight, 0) != len(values):
            raise NoMatch(f"{what}: stacked expert weights are not [E,*,*]")
        a, b = dim(weight, 1), dim(weight, 2)
        names: Names = weight.name
    else:
        shapes = {tuple(v.shape) for v in values}
        if len(shapes) != 1:
            raise NoMatch(f"{what}: per-expert weights differ in shape")
        a, b = shapes.pop()
        names = tuple(v.name for v in values)
    if not isinstance(a, int) or not isinstance(b, int):
        raise NoMatch(f"{what}: expert weight shapes are not static")
    return names, (a, b)


def _inverse_permutation(indices: ir.Value, perm: ir.Value) -> bool:
    """Whether `indices` (through layout ops) is perm's inverse: ScatterND/ScatterElements of 0..N-1 at perm, or argsort(perm)."""
    for value in behind(indices, RESHAPE_OPS):
        node = value.producer()
        if node is None:
            continue
        if node.op_type in ("ScatterND", "ScatterElements") and len(node.inputs) == 3:
            if node.op_type == "ScatterElements" and node.attributes.get_int("axis", 0) != 0:
                return False
            return relabels(node.inputs[1], perm) and _is_arange(node.inputs[2])
        if _is_topk(node) and _smallest(node) and value is node.outputs[1] and relabels(node.inputs[0], perm):
            return True
    return False


def _is_arange(value: ir.Value | None) -> bool:
    """0, 1, ..., N-1: a Range(0, N, 1) or such a constant."""
    arr = const(value)
    if arr is not None:
        return arr.ndim == 1 and np.array_equal(arr, np.arange(arr.shape[0]))
    node = value.producer() if value is not None else None
    return node is not None and node.op_type == "Range" and const_ints(node.inputs[0]) == [0] and const_ints(node.inputs[2]) == [1]


def _match_combine(y: ir.Value, perm: ir.Value, weights: ir.Value, sorted_weights: ir.Value, k: int) -> ir.Value:
    """out [T,H]: the expert rows weighed (in sorted or token order), put back in token order, summed over K."""
    weighed = [n for n, i in forward(y) if n.op_type == "Mul" and relabels(n.inputs[1 - i], sorted_weights)]
    value = weighed[0].outputs[0] if len(weighed) == 1 else y
    unsort = [n for n, i in forward(value) if n.op_type in GATHER_OPS and i == 0 and _row_gather(n)]
    if len(unsort) != 1 or not _inverse_permutation(unsort[0].inputs[1], perm):
        raise NoMatch("expert outputs are not put back in token order (gather at the inverse of the sort)")
    back = unsort[0].outputs[0]
    if not weighed:
        return match_combine(back, weights, k)
    reduces = [n for n, i in forward(back) if i == 0]
    if len(reduces) != 1 or reduces[0].op_type != "ReduceSum":
        raise NoMatch("weighted expert outputs are not summed over the top-k slots")
    reduce = reduces[0]
    if reduce_axes(reduce) != [1] or keepdims(reduce) or rank(reduce.inputs[0]) != 3 or dim(reduce.inputs[0], 1) not in (None, k):
        raise NoMatch("expert outputs are not summed over the top-k axis")
    return reduce.outputs[0]


def match(topk: ir.Node) -> Match:
    """The block routed by `topk` (a claimed node that is no TopK is refused with its reason)."""
    if not _is_topk(topk):
        raise NoMatch(expert_ids_reason(topk))
    router, linear = match_routing(topk)
    num_experts, k, hidden, hidden_size = linear.num_experts, router.top_k, linear.hidden, linear.hidden_size

    ids = topk.outputs[1]
    sorts = _sorts(ids)
    if len(sorts) != 1:
        raise NoMatch(f"expected the expert ids sorted once, found {len(sorts)} sorts")
    sort = sorts[0]
    _check_full_sort(sort)
    sorted_ids, perm = sort.outputs
    rows, tokens = _sorted_rows(perm, k, hidden, hidden_size)
    sorted_weights = _sorted_weights(perm, router.weights)

    up_ranges, up_values, up_layout, gate_up_rows = _expert_groups(rows, num_experts, "gate/up projection")
    _check_offsets(up_ranges, {sorted_ids, ids})
    # Stacked expert biases [E,*] (gpt-oss) gathered at the sorted expert ids, added to the rows.
    bias_values = _sorted_biases(sorted_ids, num_experts)
    gate_up_out, gate_up_bias = match_bias_add(gate_up_rows, bias_values)
    act = match_gated_activation(gate_up_out)
    down_ranges, down_values, down_layout, down_rows = _expert_groups(act.output, num_experts, "down projection")
    if not all(_same_range(a, b) for a, b in zip(up_ranges, down_ranges)):
        raise NoMatch("down projection: an expert reads other rows than its gate/up projection wrote")
    down_out, down_bias = match_bias_add(down_rows, bias_values)
    if len(bias_values) != (gate_up_bias is not None) + (down_bias is not None):
        raise NoMatch("stacked expert biases are not added to the expert projections")
    output = _match_combine(down_out, perm, router.weights, sorted_weights, k)

    gate_up_w, (a1, b1) = _expert_weights(up_values, "gate/up projection")
    down_w, (a2, b2) = _expert_weights(down_values, "down projection")
    two_i, h1 = (b1, a1) if up_layout == "in_out" else (a1, b1)
    h2, i2 = (b2, a2) if down_layout == "in_out" else (a2, b2)
    if two_i % 2 or h1 != h2 or two_i // 2 != i2 or (hidden_size is not None and hidden_size != h1):
        raise NoMatch(f"expert weight shapes disagree: gate/up [{a1},{b1}], down [{a2},{b2}] per expert")
    found = StackedWeights(gate_up_w, up_layout, down_w, down_layout, None if gate_up_bias is None else bias_values[gate_up_bias],
                           None if down_bias is None else bias_values[down_bias])
    return stacked_block(FORM, topk, router, act, found, (num_experts, h1, i2), hidden, output, {hidden, router.logits, tokens})
