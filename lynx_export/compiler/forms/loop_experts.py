"""One expert of an unrolled per-expert loop (`expert_loop`): its tokens, its SwiGLU FFN, its
routing weight and its addition to the running sum.

For expert e, as transformers 4.x's Mixtral loop and its rearrangements write it:

    idx, top_x = torch.where(expert_mask[e])      (or the columns of torch.nonzero(expert_mask[e]))
    rows = hidden[None, top_x].reshape(-1, H)     (or hidden[top_x])
    y = down(act(gate(rows), up(rows)))           (separate Linears, or one fused gate_up projection
                                                   split in two: stacked parameters gate_up_proj[e])
    y = y * routing_weights[top_x, idx, None]
    final.index_add_(0, top_x, y)                 (or scatter_add_ / index_put_(accumulate=True))
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from lynx_export.compiler.blocks import NoMatch, UnsupportedActivation, UnsupportedClamp
from lynx_export.compiler.forms.match import (
    CAST_OPS,
    LAYOUT_OPS,
    NOT_SWIGLU,
    Linear,
    SwiGLU,
    behind,
    const,
    const_ints,
    dim,
    forward,
    is_zeros,
    match_gated_activation,
    match_linear,
    match_swiglu_halves,
    relabels,
    static_ints,
)

__all__ = ["Expert", "one_hots", "match_experts", "accumulate"]


@dataclass(frozen=True)
class Expert:
    """Expert `index` of the loop: which rows it reads, its projections and its weighted output."""

    index: int
    token_index: ir.Value  # top_x: which token rows the expert reads
    slot_index: ir.Value  # idx: which of the token's K slots chose it
    gate_up: Linear  # the gate projection, or the fused gate/up projection when `up` is None
    up: Linear | None
    down: Linear
    activation: SwiGLU
    weighted: ir.Value  # down output times the routing weight


def one_hots(ids: ir.Value) -> list[tuple[ir.Node, ir.Value | None]]:
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
    chain = behind(value, CAST_OPS | {"Unsqueeze"})
    if ids not in chain:
        return False
    unsqueezes = [v.producer() for v in chain[: chain.index(ids)] if v.producer().op_type == "Unsqueeze"]
    return len(unsqueezes) == 1 and const_ints(unsqueezes[0].inputs[1]) in ([-1], [2])


def _expert_mask(ids: ir.Value, num_experts: int) -> tuple[ir.Value, tuple[int, int, int]]:
    """The one-hot expert mask the loop indexes, and its axes: (expert, token, slot)."""
    encodings = one_hots(ids)
    if len(encodings) != 1:
        raise NoMatch(f"expected one one-hot expert mask, found {len(encodings)}")
    node, depth_value = encodings[0]
    if node.op_type == "OneHot":
        depth = const_ints(depth_value)
        if depth is None or len(depth) != 1:
            raise NoMatch("one-hot depth is not a constant")
        if node.attributes.get_int("axis", -1) not in (-1, 2):
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
        if user.op_type in CAST_OPS:
            mask = user.outputs[0]
        elif user.op_type == "Transpose":
            order = list(user.attributes.get_ints("perm", [2, 1, 0]))  # no perm: reversed
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
        if node.op_type == "Transpose":
            if list(node.attributes.get_ints("perm", [1, 0])) != [1, 0]:
                continue
            users, axis_of_rows = list(node.outputs[0].uses()), 1
        else:
            users, axis_of_rows = [(node, index)], 0
        for n, i in users:
            if i != 0:
                continue
            if n.op_type == "Split":
                sizes = const_ints(n.inputs[1]) if len(n.inputs) > 1 and n.inputs[1] is not None else None
                if n.attributes.get_int("axis", 0) != axis_of_rows or len(n.outputs) != 2 or (sizes is not None and sizes != [1, 1]):
                    continue
                for row, part in enumerate(n.outputs):
                    squeezes = [s for s, j in part.uses() if s.op_type in ("Squeeze", "Reshape") and j == 0]
                    if len(squeezes) == 1:
                        rows[row] = squeezes[0].outputs[0]
            elif n.op_type == "Gather":
                picked = const(n.inputs[1])
                if n.attributes.get_int("axis", 0) == axis_of_rows and picked is not None and np.ndim(picked) == 0:
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
            ok = axis is not None and node.attributes.get_int("axis", 0) == axis
        else:
            ok = axis == 0 and node.attributes.get_int("batch_dims", 0) == 0 and _row_indices(node.inputs[1], token)
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
            order = list(node.attributes.get_ints("perm", list(range(n))[::-1]))
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
    if shape is None:
        return False
    order = list(transpose.attributes.get_ints("perm", list(range(len(shape)))[::-1]))
    kept = [a for a in order if shape[a] != 1]
    return kept == sorted(kept)


def _swiglu(rows: ir.Value, what: str) -> tuple[Linear, Linear | None, Linear, SwiGLU]:
    """(gate or fused gate/up, up or None, down, activation) of y = down(act(gate(rows), up(rows))),
    act SwiGLU: silu(gate) * up, or gpt-oss's clamped gate * sigmoid(alpha * gate) * (up + beta)
    (either projection may be the gate), or the same over the halves of one fused projection."""
    linears = [lin for n, i in _row_consumers(rows) if i == 0 and (lin := match_linear(n)) is not None]
    if len(linears) not in (1, 2):
        raise NoMatch(f"{what}: expected gate and up projections of the expert's tokens, found {len(linears)}")
    try:
        if len(linears) == 1:
            act = match_gated_activation(linears[0].output)
        else:
            act = match_swiglu_halves(linears[0].output, linears[1].output)
    except UnsupportedClamp as exc:  # the clamps' own reason
        raise NoMatch(f"{what}: {exc}") from None
    except UnsupportedActivation:
        raise NoMatch(f"{what}: {NOT_SWIGLU}") from None
    except NoMatch as exc:
        raise NoMatch(f"{what}: {exc}") from None
    if len(linears) == 1:
        gate_up, up = linears[0], None
    else:
        gate_up, up = linears if act.gate_first else linears[::-1]
    downs = [lin for n, i in forward(act.output) if i == 0 and (lin := match_linear(n)) is not None]
    if len(downs) != 1:
        raise NoMatch(f"{what}: the activation does not feed one down projection")
    return gate_up, up, downs[0], act


def _is_routing_weight(value: ir.Value, weights: ir.Value, token: ir.Value, slot: ir.Value, k: int) -> bool:
    """Whether `value` is `weights[top_x, idx]` (one of the [T,K] weights per row, any unit axes)."""
    picked = behind(value, LAYOUT_OPS)[-1].producer()
    if picked is None or picked.op_type not in ("Gather", "GatherND"):
        return False
    if picked.op_type == "GatherND":
        # [T,K,...] weights read at the stacked (top_x, idx) pairs.
        pairs = behind(picked.inputs[1], CAST_OPS)[-1].producer()
        if picked.attributes.get_int("batch_dims", 0) != 0 or pairs is None or pairs.op_type != "Concat" or len(pairs.inputs) != 2:
            return False
        return (
            pairs.attributes.get_int("axis", 0) in (-1, 1)
            and _row_indices(pairs.inputs[0], token) and _row_indices(pairs.inputs[1], slot)
            and _view_of_weights(picked.inputs[0], weights, flat=False)
        )
    if picked.attributes.get_int("axis", 0) != 0 or not _view_of_weights(picked.inputs[0], weights, flat=True):
        return False
    # Flattened [T*K,...] weights read at top_x * K + idx.
    flat = behind(picked.inputs[1], CAST_OPS)[-1].producer()
    if flat is None or flat.op_type != "Add":
        return False
    for i in (0, 1):
        if not relabels(flat.inputs[i], slot):
            continue
        mul = behind(flat.inputs[1 - i], CAST_OPS)[-1].producer()
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
            if merged or node.attributes.get_int("axis", 1) != 2:
                return False
            merged = True
        elif node.op_type == "Reshape":
            target = const_ints(node.inputs[1])
            if merged or target is None or not target or target[0] != -1 or any(t != 1 for t in target[1:]):
                return False
            merged = True
        elif node.op_type not in CAST_OPS:
            return False
    return merged == flat


def _is_top_k(value: ir.Value, weights: ir.Value, k: int) -> bool:
    """`value` is the constant K or the size of the weights' K axis (Gather(Shape(w), 1))."""
    if const_ints(value) == [k]:
        return True
    node = behind(value, CAST_OPS)[-1].producer()
    if node is None or node.op_type != "Gather" or const_ints(node.inputs[1]) != [1]:
        return False
    shape = node.inputs[0].producer()
    return shape is not None and shape.op_type == "Shape" and _view_of_weights(shape.inputs[0], weights, flat=False)


def _row_indices(indices: ir.Value, token: ir.Value) -> bool:
    """`indices` are top_x as scatter row indices ([n,1], possibly expanded over H)."""
    chain = behind(indices, CAST_OPS | {"Expand", "Unsqueeze", "Reshape"})
    if token not in chain:
        return False
    for v in chain[: chain.index(token)]:
        p = v.producer()
        if p is not None and p.op_type == "Unsqueeze" and const_ints(p.inputs[1]) not in ([1], [-1]):
            return False
    return True


def _scattered(weighted: ir.Value) -> Iterator[tuple[ir.Node, int]]:
    """Consumers of an expert's output, through layout ops and the Slice TorchScript writes
    before a `scatter_add_` (the output cut to the index's shape: its own, `_whole`)."""
    for node, index in forward(weighted):
        if node.op_type == "Slice" and index == 0 and _whole(node, weighted):
            yield from forward(node.outputs[0])
        else:
            yield node, index


def _whole(node: ir.Node, weighted: ir.Value) -> bool:
    """A Slice of [n,H] `weighted` from 0 to the shape of the [n,H] indices that the scatter
    reading it scatters by: the rows top_x expanded over exactly H columns."""
    starts = const_ints(node.inputs[1]) if len(node.inputs) > 1 else None
    ends = node.inputs[2].producer() if len(node.inputs) > 2 and node.inputs[2] is not None else None
    if len(node.inputs) > 3 or not starts or any(starts) or ends is None or ends.op_type != "Shape":
        return False
    indices = ends.inputs[0]
    expand = indices.producer()
    if expand is None or expand.op_type != "Expand":
        return False
    target, width = static_ints(expand.inputs[1]), dim(weighted, -1)
    return target is not None and len(target) == 2 and target[0] == 1 and width is not None and target[1] == width and all(
        n.op_type in ("ScatterElements", "ScatterND") and i == 2 and n.inputs[1] is indices for n, i in node.outputs[0].uses()
    )


def accumulate(expert: Expert, what: str) -> tuple[ir.Value, ir.Value]:
    """(running sum in, running sum out) of the expert's `index_add_` (or the scatter spelling it)."""
    for node, index in _scattered(expert.weighted):
        if node.op_type not in ("ScatterElements", "ScatterND") or index != 2:
            continue
        reduction = node.attributes.get_string("reduction", "none")
        if node.op_type == "ScatterElements" and node.attributes.get_int("axis", 0) != 0:
            raise NoMatch(f"{what}: output is scattered along another axis than the tokens")
        if not _row_indices(node.inputs[1], expert.token_index):
            raise NoMatch(f"{what}: output is not scattered to the rows of its tokens")
        if reduction == "add":
            return node.inputs[0], node.outputs[0]
        if reduction != "none":
            raise NoMatch(f"{what}: output is scattered with reduction '{reduction}'")
        if not is_zeros(node.inputs[0]):
            raise NoMatch(f"{what}: output overwrites rows of a non-zero tensor (scatter without reduction)")
        adds = [n for n, _ in node.outputs[0].uses() if n.op_type == "Add"]
        if len(adds) != 1:
            raise NoMatch(f"{what}: scattered output is not added to the running sum")
        add = adds[0]
        other = add.inputs[1] if add.inputs[0] is node.outputs[0] else add.inputs[0]
        return other, add.outputs[0]
    raise NoMatch(f"{what}: output is not accumulated into the block's output (index_add / ScatterND add)")


def _expert(e: int, mask_gather: ir.Node, axes: tuple[int, int, int], hidden: ir.Value, weights: ir.Value, k: int) -> Expert:
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
    gate_up, up, down, activation = _swiglu(tokens, what)
    muls = [(n, i) for n, i in forward(down.output) if n.op_type == "Mul"]
    if len(muls) != 1 or not _is_routing_weight(muls[0][0].inputs[1 - muls[0][1]], weights, token, slot, k):
        raise NoMatch(f"{what}: output is not weighted by its routing weight")
    return Expert(e, token, slot, gate_up, up, down, activation, muls[0][0].outputs[0])


def match_experts(ids: ir.Value, num_experts: int, hidden: ir.Value, weights: ir.Value, k: int) -> list[Expert]:
    """Experts 0..E-1 of the loop that reads the expert ids' one-hot mask, in expert order."""
    mask, axes = _expert_mask(ids, num_experts)
    by_index: dict[int, ir.Node] = {}
    for node, index in mask.uses():
        if node.op_type != "Gather" or index != 0:
            raise NoMatch(f"the expert mask is read by {node.op_type}, not only by per-expert Gathers")
        if node.attributes.get_int("axis", 0) != axes[0]:
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
