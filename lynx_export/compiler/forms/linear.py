"""Linear layers with constant weights, `x @ W (+ b)`: a router, or one expert's projection."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from lynx_export.compiler.forms.graph import const, is_weight, rank

__all__ = ["Linear", "match_linear", "linear_producing"]


@dataclass(frozen=True)
class Linear:
    """`output = data @ W (+ bias)` with a constant W.

    `weight` is the constant W ([in,out], layout "in_out"; [out,in], "out_in") or, where the
    layer reads one expert's slice of stacked parameters (`F.linear(x, gate_up_proj[e])`), the
    stacked [E,*,*] constant, `expert` being e. `bias` is [out] (or stacked [E,out] likewise).
    """

    data: ir.Value
    weight: ir.Value
    layout: str
    bias: ir.Value | None
    output: ir.Value
    expert: int | None = None

    @property
    def in_out(self) -> tuple[int, int]:
        """(in, out) sizes of the layer."""
        rows, cols = self.weight.shape[-2], self.weight.shape[-1]
        return (int(rows), int(cols)) if self.layout == "in_out" else (int(cols), int(rows))


def _constant_slice(value: ir.Value | None, ndim: int) -> tuple[ir.Value, int | None] | None:
    """(the constant, None) for a constant of rank `ndim`; (the stacked constant, e) for
    Gather(stacked constant [E,...], e, axis=0) with a constant scalar e; else None."""
    if is_weight(value) and rank(value) == ndim:
        return value, None
    node = value.producer() if value is not None else None
    if node is None or node.op_type != "Gather" or node.attributes.get_int("axis", 0) != 0:
        return None
    stacked, index = node.inputs[0], const(node.inputs[1])
    if not is_weight(stacked) or rank(stacked) != ndim + 1 or index is None or np.ndim(index) != 0:
        return None
    e = int(index)
    return (stacked, e) if 0 <= e < stacked.shape[0] else None


def _weight_operand(value: ir.Value) -> tuple[ir.Value, int | None, bool] | None:
    """(constant, expert, transposed) of a MatMul's weight operand, seen through a 2-D Transpose."""
    transposed = False
    node = value.producer()
    if node is not None and node.op_type == "Transpose" and list(node.attributes.get_ints("perm", [1, 0])) == [1, 0]:
        value, transposed = node.inputs[0], True
    found = _constant_slice(value, 2)
    return None if found is None else (*found, transposed)


def _bias_of(value: ir.Value | None, size: int, expert: int | None) -> ir.Value | None:
    """The constant [size] bias `value` is (one expert's row of stacked biases where `expert` is set)."""
    found = _constant_slice(value, 1)
    if found is None or found[1] != expert or found[0].shape[-1] != size:
        return None
    return found[0]


def match_linear(node: ir.Node) -> Linear | None:
    """`node` as x @ W (+ b) with constant W (and b), if it is one.

    MatMul(x, W) (W [in,out], or Transpose(W [out,in])), its bias the Add that is its only use;
    or Gemm(x, W, b) without scaling or a transposed x (transB: W is [out,in]).
    """
    if node.op_type == "MatMul" and len(node.inputs) == 2:
        a, b = node.inputs
        operand = _weight_operand(b) if b is not None else None
        if operand is None or is_weight(a) or a is None:
            return None
        weight, expert, transposed = operand
        layout = "out_in" if transposed else "in_out"
        output, bias = node.outputs[0], None
        uses = list(output.uses())
        if len(uses) == 1 and uses[0][0].op_type == "Add":
            add, index = uses[0]
            size = weight.shape[-2] if transposed else weight.shape[-1]
            found = _bias_of(add.inputs[1 - index], size, expert)
            if found is not None:
                output, bias = add.outputs[0], found
        return Linear(a, weight, layout, bias, output, expert)
    if node.op_type == "Gemm":
        attrs = node.attributes
        if attrs.get_float("alpha", 1.0) != 1.0 or attrs.get_float("beta", 1.0) != 1.0 or attrs.get_int("transA", 0) != 0:
            return None
        a, b = node.inputs[0], node.inputs[1]
        found = _constant_slice(b, 2)
        if found is None or is_weight(a):
            return None
        weight, expert = found
        layout = "out_in" if attrs.get_int("transB", 0) == 1 else "in_out"
        c = node.inputs[2] if len(node.inputs) > 2 else None
        bias = None if c is None else _bias_of(c, weight.shape[-2] if layout == "out_in" else weight.shape[-1], expert)
        if c is not None and bias is None:
            return None
        return Linear(a, weight, layout, bias, node.outputs[0], expert)
    return None


def linear_producing(value: ir.Value) -> Linear | None:
    """The linear layer whose output (bias included) is `value`, if one is."""
    node = value.producer()
    if node is None:
        return None
    candidates = [node]
    if node.op_type == "Add":
        candidates = [p for v in node.inputs if v is not None and (p := v.producer()) is not None and p.op_type == "MatMul"]
    for candidate in candidates:
        linear = match_linear(candidate)
        if linear is not None and linear.output is value:
            return linear
    return None
