"""Give every value an exporter left without a shape its rank, with the dimensions that follow
from its inputs' shapes and constants (the rest unknown).

TorchScript exports record no intermediate shapes; detection's matchers read ranks (which axis
is last, whether a tensor is [T,H]) and a few dimensions (the number of experts, a grouped
router's [T,G,S] scores). ONNX shape inference would give them too, but needs the model as a
protobuf; these rules run on the IR in one walk.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import onnx_ir as ir

__all__ = ["RankInferencePass", "inferred_ranks", "value_dims", "constant_ints", "shape_dims"]

logger = logging.getLogger(__name__)

Dims = list[int | None]  # a shape: static dimensions, None where unknown

# Ops whose first output has their first input's shape.
_SAME_SHAPE = frozenset({
    "Cast", "CastLike", "Identity", "Sigmoid", "Relu", "Tanh", "Neg", "Sqrt", "Reciprocal", "Exp", "Log", "Erf",
    "Softmax", "LogSoftmax", "Abs", "Gelu", "Not", "Clip", "CumSum", "Softplus", "HardSigmoid", "LeakyRelu", "Elu",
    "Selu", "Floor", "Ceil", "Round", "Sign", "IsNaN", "IsInf", "Sin", "Cos", "Mish", "HardSwish", "Trilu",
    "Dropout", "LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization",
})
# Elementwise ops over their broadcast inputs.
_BROADCAST = frozenset({
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Mod", "Sum", "Mean", "Where", "Equal", "Less", "Greater",
    "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "BitwiseAnd", "BitwiseOr", "BitwiseXor",
})
# Ops whose output is their first input's shape, whatever they write into it.
_DATA_SHAPE = frozenset({"ScatterElements", "ScatterND", "Scatter"})


class RankInferencePass(ir.passes.InPlacePass):
    """Fill in missing shapes, node by node in graph order (ONNX graphs are sorted).

    1. A value that has a shape keeps it.
    2. A node output without one gets the shape its op's rule derives from the inputs' shapes and
       constant inputs: the rank always, each dimension where the inputs fix it.
    3. Outputs of ops without a rule, or whose inputs' ranks are unknown, stay without a shape.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            if self._try_infer(node):
                modified = True
        if modified:
            logger.debug("rank inference filled in missing shapes")
        return ir.passes.PassResult(model, modified=modified)

    def _try_infer(self, node: ir.Node) -> bool:
        """Give `node`'s outputs without a shape the shapes its rule derives; True if any got one."""
        if node.domain not in ("", "ai.onnx") or all(v.shape is not None for v in node.outputs):
            return False
        rule = _RULES.get(node.op_type)
        if rule is None:
            return False
        try:
            # A negative size (a malformed graph's) is no size.
            shapes = [None if dims is None else ir.Shape([None if d is not None and d < 0 else d for d in dims]) for dims in rule(node)]
        except (ValueError, TypeError, IndexError, KeyError, ZeroDivisionError, OverflowError, StopIteration):
            return False  # a malformed node: leave it to the checker and the matchers' reasons
        changed = False
        for value, shape in zip(node.outputs, shapes):
            if value.shape is None and shape is not None:
                value.shape = shape
                changed = True
        return changed


@contextlib.contextmanager
def inferred_ranks(model: ir.Model) -> Iterator[ir.passes.PassResult]:
    """Run RankInferencePass for the body of the `with`, then take back the shapes it filled in
    (one set meanwhile by someone else stays): the graph keeps the shapes its exporter wrote."""
    missing = [v for node in ir.traversal.RecursiveGraphIterator(model.graph) for v in node.outputs if v.shape is None]
    result = RankInferencePass()(model)
    filled = [(v, v.shape) for v in missing if v.shape is not None]
    try:
        yield result
    finally:
        for value, shape in filled:
            if value.shape is shape:
                value.shape = None


# -- reading inputs -----------------------------------------------------------------------------

def value_dims(value: ir.Value | None) -> Dims | None:
    """`value`'s shape as static dimensions (None where unknown); a constant's from its tensor."""
    if value is None:
        return None
    if value.shape is not None:
        return [d if isinstance(d, int) else None for d in value.shape]
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else list(tensor.shape.numpy())


def constant_ints(value: ir.Value | None) -> list[int] | None:
    """A constant's elements as Python ints, flattened; None for a computed value."""
    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    return None if tensor is None else [int(x) for x in np.asarray(tensor.numpy()).reshape(-1)]


def _length(value: ir.Value | None) -> int | None:
    """How many elements a 1-D shape vector holds (a Reshape target's, say): the rank it sets."""
    dims = value_dims(value)
    return dims[0] if dims is not None and len(dims) == 1 else None


def _input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if len(node.inputs) > index else None


def _axes(node: ir.Node, index: int = 1) -> list[int] | None:
    """Axes given as the node's input `index` (newer opsets) or its `axes` attribute (older)."""
    value = _input(node, index)
    if value is not None:
        return constant_ints(value)
    axes = node.attributes.get_ints("axes")
    return None if axes is None else list(axes)


def _product(dims: Sequence[int | None]) -> int | None:
    return None if None in dims else math.prod(dims)


def _unknown(n: int | None) -> Dims | None:
    return None if n is None else [None] * n


# -- rules: node -> a shape (or None) per output ------------------------------------------------

def _broadcast(*shapes: Dims | None) -> Dims | None:
    if any(s is None for s in shapes):
        return None
    n = max(len(s) for s in shapes)
    out: Dims = []
    for axis in range(n):
        known = [s[axis - n + len(s)] for s in shapes if axis - n + len(s) >= 0]
        sizes = {d for d in known if d is not None and d != 1}
        if len(sizes) == 1:
            out.append(sizes.pop())
        elif not sizes and all(d == 1 for d in known):
            out.append(1)
        else:
            out.append(None)
    return out


def _same(node: ir.Node) -> list[Dims | None]:
    return [value_dims(node.inputs[0])]


def _elementwise(node: ir.Node) -> list[Dims | None]:
    return [_broadcast(*(value_dims(v) for v in node.inputs if v is not None))]


def _transpose(node: ir.Node) -> list[Dims | None]:
    dims = value_dims(node.inputs[0])
    if dims is None:
        return [None]
    perm = node.attributes.get_ints("perm", list(range(len(dims)))[::-1])
    return [[dims[p] for p in perm]] if sorted(perm) == list(range(len(dims))) else [None]


def _topk(node: ir.Node) -> list[Dims | None]:
    dims = value_dims(node.inputs[0])
    if dims is None:
        return [None, None]
    k = constant_ints(_input(node, 1))
    axis = node.attributes.get_int("axis", -1) % len(dims)
    dims[axis] = k[0] if k is not None and len(k) == 1 else None
    return [dims, list(dims)]


def _gather(node: ir.Node) -> list[Dims | None]:
    data, indices = value_dims(node.inputs[0]), value_dims(node.inputs[1])
    if data is None or indices is None:
        return [None]
    axis = node.attributes.get_int("axis", 0) % len(data)
    return [data[:axis] + indices + data[axis + 1:]]


def _gather_nd(node: ir.Node) -> list[Dims | None]:
    data, indices = value_dims(node.inputs[0]), value_dims(node.inputs[1])
    if data is None or indices is None or not indices or indices[-1] is None:
        return [None]
    batch = node.attributes.get_int("batch_dims", 0)
    return [indices[:-1] + data[batch + indices[-1]:]]


def _matmul(node: ir.Node) -> list[Dims | None]:
    a, b = value_dims(node.inputs[0]), value_dims(node.inputs[1])
    if a is None or b is None or not a or not b:
        return [None]
    if len(a) == 1 and len(b) == 1:
        return [[]]
    if len(a) == 1:
        return [b[:-2] + b[-1:]]
    if len(b) == 1:
        return [a[:-1]]
    batch = _broadcast(a[:-2], b[:-2])
    return [None if batch is None else batch + [a[-2], b[-1]]]


def _gemm(node: ir.Node) -> list[Dims | None]:
    a, b = value_dims(node.inputs[0]), value_dims(node.inputs[1])
    rows = None if a is None or len(a) != 2 else a[1 if node.attributes.get_int("transA", 0) else 0]
    cols = None if b is None or len(b) != 2 else b[0 if node.attributes.get_int("transB", 0) else 1]
    return [[rows, cols]]


def _flatten(node: ir.Node) -> list[Dims | None]:
    dims = value_dims(node.inputs[0])
    if dims is None:
        return [[None, None]]
    axis = node.attributes.get_int("axis", 1)
    axis = axis + len(dims) if axis < 0 else axis
    return [[_product(dims[:axis]), _product(dims[axis:])]]


def shape_dims(shape: ir.Node) -> Dims | None:
    """The dimensions a Shape node outputs: its input's, cut to its `start` and `end`."""
    dims = value_dims(shape.inputs[0])
    return None if dims is None else dims[shape.attributes.get_int("start", 0):shape.attributes.get_int("end", len(dims))]


def _shape(node: ir.Node) -> list[Dims | None]:
    dims = shape_dims(node)
    return [[None if dims is None else len(dims)]]


def _reshape(node: ir.Node) -> list[Dims | None]:
    target = constant_ints(node.inputs[1])
    if target is None:
        return [_unknown(_length(node.inputs[1]))]
    data = value_dims(node.inputs[0])
    allowzero = node.attributes.get_int("allowzero", 0)
    out: Dims = []
    for axis, t in enumerate(target):
        if t > 0 or (t == 0 and allowzero):
            out.append(t)
        elif t == 0:
            out.append(data[axis] if data is not None and axis < len(data) else None)
        else:
            out.append(None)
    if -1 in target and data is not None and None not in out[: target.index(-1)] + out[target.index(-1) + 1:]:
        rest = [d for i, d in enumerate(out) if i != target.index(-1)]
        total, part = _product(data), _product(rest)
        if total is not None and part:
            out[target.index(-1)] = total // part
    return [out]


def _expand(node: ir.Node) -> list[Dims | None]:
    target = constant_ints(node.inputs[1])
    data = value_dims(node.inputs[0])
    if target is not None:
        return [_broadcast(data, [None if t == -1 else t for t in target])]
    n = _length(node.inputs[1])
    return [None if n is None or data is None else _unknown(max(n, len(data)))]


def _unsqueeze(node: ir.Node) -> list[Dims | None]:
    dims, axes = value_dims(node.inputs[0]), _axes(node)
    if dims is None or axes is None:
        return [None]
    n = len(dims) + len(axes)
    added = {a % n for a in axes}
    rest = iter(dims)
    return [[1 if i in added else next(rest) for i in range(n)]]


def _squeeze(node: ir.Node) -> list[Dims | None]:
    dims, axes = value_dims(node.inputs[0]), _axes(node)
    if dims is None:
        return [None]
    if axes is None:
        return [None if None in dims else [d for d in dims if d != 1]]
    removed = {a % len(dims) for a in axes}
    return [[d for i, d in enumerate(dims) if i not in removed]]


def _reduce(node: ir.Node) -> list[Dims | None]:
    dims = value_dims(node.inputs[0])
    if dims is None:
        return [None]
    if node.op_type in ("ArgMax", "ArgMin"):
        axes: list[int] | None = [node.attributes.get_int("axis", 0)]
    else:
        given = _input(node, 1) is not None or "axes" in node.attributes
        axes = _axes(node)
        if not given or axes == []:
            if node.attributes.get_int("noop_with_empty_axes", 0):
                return [dims]
            axes = list(range(len(dims)))
    keep = node.attributes.get_int("keepdims", 1)
    if axes is None:
        return [_unknown(len(dims))] if keep else [None]
    reduced = {a % len(dims) for a in axes} if dims else set()
    if keep:
        return [[1 if i in reduced else d for i, d in enumerate(dims)]]
    return [[d for i, d in enumerate(dims) if i not in reduced]]


def _concat(node: ir.Node) -> list[Dims | None]:
    shapes = [value_dims(v) for v in node.inputs if v is not None]
    if not shapes or any(s is None for s in shapes) or len({len(s) for s in shapes}) != 1:
        return [None]
    axis = node.attributes.get_int("axis", 0) % len(shapes[0])
    # The other axes agree between the inputs: any input's known size is the output's.
    out = _broadcast(*(s[:axis] + [1] + s[axis + 1:] for s in shapes)) or [None] * len(shapes[0])
    sizes = [s[axis] for s in shapes]
    out[axis] = None if None in sizes else sum(sizes)
    return [out]


def _split(node: ir.Node) -> list[Dims | None]:
    dims = value_dims(node.inputs[0])
    if dims is None:
        return [None] * len(node.outputs)
    axis = node.attributes.get_int("axis", 0) % len(dims)
    sizes = constant_ints(_input(node, 1))
    if sizes is None:
        attr = node.attributes.get_ints("split")
        sizes = None if attr is None else list(attr)
    n = len(node.outputs)
    if sizes is None and dims[axis] is not None and dims[axis] % n == 0:
        sizes = [dims[axis] // n] * n
    out = []
    for i in range(n):
        part = list(dims)
        part[axis] = sizes[i] if sizes is not None and len(sizes) == n else None
        out.append(part)
    return out


def _slice(node: ir.Node) -> list[Dims | None]:
    dims = value_dims(node.inputs[0])
    if dims is None:
        return [None]
    if len(node.inputs) == 1:  # Slice-1: bounds as attributes
        starts, ends = node.attributes.get_ints("starts"), node.attributes.get_ints("ends")
        axes, steps = node.attributes.get_ints("axes"), None
        starts, ends, axes = (None if a is None else list(a) for a in (starts, ends, axes))
    else:
        starts, ends = constant_ints(_input(node, 1)), constant_ints(_input(node, 2))
        axes = constant_ints(_input(node, 3)) if _input(node, 3) is not None else None
        steps = constant_ints(_input(node, 4)) if _input(node, 4) is not None else None
    if axes is None and _input(node, 3) is not None:
        return [_unknown(len(dims))]  # computed axes: any axis may be sliced
    n = len(starts) if starts is not None else len(ends) if ends is not None else None
    if n is None:
        return [_unknown(len(dims))] if axes is None else [[None if i in {a % len(dims) for a in axes} else d for i, d in enumerate(dims)]]
    axes = list(range(n)) if axes is None else axes
    out = list(dims)
    for j, axis in enumerate(axes):
        axis %= len(dims)
        step = steps[j] if steps is not None else 1
        if starts is None or ends is None or dims[axis] is None:
            out[axis] = None
        else:
            out[axis] = len(range(*slice(starts[j], ends[j], step).indices(dims[axis])))
    return [out]


def _tile(node: ir.Node) -> list[Dims | None]:
    dims, repeats = value_dims(node.inputs[0]), constant_ints(node.inputs[1])
    if dims is None:
        return [None]
    if repeats is None or len(repeats) != len(dims):
        return [_unknown(len(dims))]
    return [[None if d is None else d * r for d, r in zip(dims, repeats)]]


def _one_hot(node: ir.Node) -> list[Dims | None]:
    dims = value_dims(node.inputs[0])
    if dims is None:
        return [None]
    depth = constant_ints(node.inputs[1])
    axis = node.attributes.get_int("axis", -1)
    axis = axis + len(dims) + 1 if axis < 0 else axis
    return [dims[:axis] + [depth[0] if depth is not None and len(depth) == 1 else None] + dims[axis:]]


def _constant_of_shape(node: ir.Node) -> list[Dims | None]:
    target = constant_ints(node.inputs[0])
    return [target if target is not None else _unknown(_length(node.inputs[0]))]


_RULES: dict[str, Callable[[ir.Node], list[Dims | None]]] = {
    **{op: _same for op in _SAME_SHAPE},
    **{op: _elementwise for op in _BROADCAST},
    **{op: _same for op in _DATA_SHAPE},
    "Transpose": _transpose,
    "TopK": _topk,
    "GatherElements": lambda node: [value_dims(node.inputs[1])],
    "Gather": _gather,
    "GatherND": _gather_nd,
    "MatMul": _matmul,
    "Gemm": _gemm,
    "Flatten": _flatten,
    "Shape": _shape,
    "Size": lambda node: [[]],
    "Reshape": _reshape,
    "Expand": _expand,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    **{op: _reduce for op in ("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ArgMax", "ArgMin")},
    "Concat": _concat,
    "Split": _split,
    "Slice": _slice,
    "Tile": _tile,
    "OneHot": _one_hot,
    "ConstantOfShape": _constant_of_shape,
    "Constant": lambda node: [value_dims(node.outputs[0])],  # its value, whichever attribute holds it
    "Range": lambda node: [[None]],
    "NonZero": lambda node: [[None if (d := value_dims(node.inputs[0])) is None else len(d), None]],
}
