"""The experts' SwiGLU activation, plain (silu(gate) * up) or clamped as gpt-oss's, over one
fused gate/up projection or two separate ones."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from lynx_export.compiler.blocks import NoMatch, UnsupportedActivation, UnsupportedClamp
from lynx_export.compiler.forms.graph import axis_is_last, dim, forward, rank, scalar, shortest_float, static_ints

__all__ = ["SwiGLU", "match_gated_activation", "match_swiglu_halves", "NOT_SWIGLU"]

NOT_SWIGLU = "activation is not SwiGLU (silu(gate) * up, or gate * sigmoid(alpha * gate) * (up + beta))"


@dataclass(frozen=True)
class SwiGLU:
    """A matched SwiGLU: gate * sigmoid(alpha * gate) * (up + beta), with gate <= limit and
    |up| <= limit when `limit` is set (Activation.SWIGLU's parameters; plain: 1, 0, None).

    `gate_first`: the gate is the first half of the projection (or the first of two projections);
    `interleaved`: the halves are alternate rows of one projection rather than its two halves.
    """

    output: ir.Value
    gate_first: bool
    interleaved: bool = False
    alpha: float = 1.0
    beta: float = 0.0
    limit: float | None = None


def match_gated_activation(gate_up_out: ir.Value) -> SwiGLU:
    """SwiGLU over the halves of one fused gate/up projection.

    The halves are split (`Split` in two along the feature axis, or two `Slice`s of its halves,
    as TorchScript writes `chunk(2, -1)`: [gate; up] concatenated) or sliced with step 2 (`Slice`
    from 0 and from 1: rows interleaved, as gpt-oss stores them). See `match_swiglu_halves` for
    the activation and its parameters.
    """
    uses = list(forward(gate_up_out))
    splits = [n for n, _ in uses if n.op_type == "Split"]
    slices = [n for n, i in uses if n.op_type == "Slice" and i == 0]
    if splits and not slices:
        if len(splits) != 1:
            raise NoMatch(f"gate/up projection: expected one Split consumer, found {len(splits)}")
        halves, interleaved = _split_halves(splits[0]), False
    elif slices and not splits:
        halves, interleaved = _sliced_halves(slices)
    else:
        raise NoMatch("gate/up projection is neither split in two nor sliced into interleaved rows")
    found = match_swiglu_halves(*halves)
    return SwiGLU(found.output, found.gate_first, interleaved, found.alpha, found.beta, found.limit)


def _split_halves(split: ir.Node) -> tuple[ir.Value, ir.Value]:
    sizes = static_ints(split.inputs[1]) if len(split.inputs) > 1 and split.inputs[1] is not None else None
    if sizes is None and split.attributes.get_ints("split") is not None:
        sizes = list(split.attributes.get_ints("split"))
    if (len(split.outputs) != 2 or not axis_is_last(split, rank(split.inputs[0]), default=0)
            or (sizes is not None and (len(sizes) != 2 or sizes[0] != sizes[1]))):
        raise NoMatch("gate/up projection is not split in two along the feature axis")
    return split.outputs[0], split.outputs[1]


def _sliced_halves(slices: list[ir.Node]) -> tuple[tuple[ir.Value, ir.Value], bool]:
    """((first half, second half), interleaved) of two Slices of one value along its last axis:
    rows 0::2 and 1::2 (interleaved), or [0, n/2) and [n/2, n) (contiguous halves)."""
    what = "gate/up projection is not sliced into two interleaved or contiguous halves"
    if len(slices) != 2 or slices[0].inputs[0] is not slices[1].inputs[0]:
        raise NoMatch(what)
    data = slices[0].inputs[0]
    bounds = []
    for node in slices:
        ins = list(node.inputs) + [None] * (5 - len(node.inputs))
        starts, ends = static_ints(ins[1]), static_ints(ins[2])
        axes = [0] if ins[3] is None else static_ints(ins[3])
        steps = [1] if ins[4] is None else static_ints(ins[4])
        if starts is None or ends is None or axes is None or steps is None or not len(starts) == len(ends) == len(axes) == len(steps) == 1:
            raise NoMatch(what)
        if not (axes[0] == -1 or (rank(data) is not None and axes[0] == rank(data) - 1)):
            raise NoMatch(what)
        bounds.append((starts[0], ends[0], steps[0], node.outputs[0]))
    bounds.sort(key=lambda b: b[0])
    (s0, e0, step0, first), (s1, e1, step1, second) = bounds
    if step0 == step1 == 2 and (s0, s1) == (0, 1):
        return (first, second), True
    size = dim(data, -1)
    if step0 == step1 == 1 and size is not None and size % 2 == 0 and (s0, s1) == (0, size // 2) and e0 == size // 2 and e1 >= size:
        return (first, second), False
    raise NoMatch(what)


def match_swiglu_halves(first: ir.Value, second: ir.Value) -> SwiGLU:
    """SwiGLU over two halves of a gate/up projection, either of which may be the gate.

    Matches `g * Sigmoid(g)` or `g * Sigmoid(g * alpha)` times `u` or `u + beta` (constant
    scalars, either operand order), where g is the gate half or `Clip(gate, max=L)` and u the up
    half or `Clip(up, -L, L)` (`Min`/`Max` with constants spell the same clamps). gpt-oss's
    `(clamp(up, -L, L) + 1) * g * sigmoid(1.702 * g)`, g = clamp(gate, max=L), gives alpha 1.702,
    beta 1 and limit L. Refuses clamps ONNX Runtime's SwiGLU limit does not express (gate clamped
    below, up clamped asymmetrically, different limits, one half only) with UnsupportedClamp,
    and other activations with UnsupportedActivation.
    """
    for gate_index in (0, 1):
        halves = (first, second)
        found = _swiglu_structure(halves[gate_index], halves[1 - gate_index])
        if found is None:
            continue
        output, alpha, beta, (g_lo, g_hi), (u_lo, u_hi) = found
        return SwiGLU(output, gate_index == 0, False, alpha, beta, _swiglu_limit(g_lo, g_hi, u_lo, u_hi))
    raise UnsupportedActivation(f"expert {NOT_SWIGLU}")


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
            alpha = scalar(node.inputs[1] if node.inputs[0] is g else node.inputs[0])
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
            c = scalar(node.inputs[1 - index])
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
                raise UnsupportedClamp("clamped SwiGLU: a Clip's bounds are not constant scalars")
            lo = bounds[0] if lo is None else (lo if bounds[0] is None else max(lo, bounds[0]))
            hi = bounds[1] if hi is None else (hi if bounds[1] is None else min(hi, bounds[1]))
        elif node.op_type in ("Min", "Max") and len(node.inputs) == 2:
            c = scalar(node.inputs[1 - index])
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
            c = scalar(v)
            if c is None:
                return None
            bounds.append(c)
        elif (legacy := node.attributes.get_float(attr)) is not None:  # Clip before opset 11
            bounds.append(shortest_float(np.float32(legacy)))
        else:
            bounds.append(None)
    lo, hi = bounds
    return (None if lo is not None and np.isneginf(lo) else lo), (None if hi is not None and np.isposinf(hi) else hi)


def _swiglu_limit(g_lo: float | None, g_hi: float | None, u_lo: float | None, u_hi: float | None) -> float | None:
    """The SwiGLU limit L of clamps gate <= L and -L <= up <= L, or UnsupportedClamp for other clamps."""
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
    raise UnsupportedClamp(f"clamped SwiGLU with {what}: {reason} (supported: gate <= L and -L <= up <= L, as gpt-oss)")


def _interval(lo: float | None, hi: float | None) -> str:
    return f"[{'-inf' if lo is None else f'{lo:g}'}, {'inf' if hi is None else f'{hi:g}'}]"
