"""Graph reading every matcher shares: constants, shapes, views through layout ops, and one
bounded walk back through producers.

Matchers follow graph structure, shapes and constants, never tensor names (constant folding
renames weights to `val_N`). Shapes the exporter left out are filled in with their ranks before
detection (`compiler.ranks.RankInferencePass`), so `rank` and `dim` read recorded or deduced
shapes alike.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from lynx_export.compiler.blocks import NoMatch
from lynx_export.compiler.ranks import constant_ints as const_ints
from lynx_export.compiler.ranks import shape_dims

__all__ = [
    "LAYOUT_OPS", "RESHAPE_OPS", "GATHER_OPS", "CAST_OPS",
    "const", "const_ints", "static_ints", "is_weight", "scalar", "shortest_float", "fill_value", "is_zeros",
    "rank", "dim", "axis_is_last", "reduce_axes", "keepdims",
    "behind", "relabels", "forward", "single_consumer",
    "Upstream", "upstream", "derived_from", "check_closed",
]

# Ops that only move or relabel elements; walking through them keeps "the same tensor".
LAYOUT_OPS = frozenset({"Reshape", "Unsqueeze", "Squeeze", "Expand", "Flatten", "Identity", "Cast", "Tile"})
# Layout ops that keep every element exactly once (no Expand/Tile copies, no Cast).
RESHAPE_OPS = frozenset({"Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity"})
GATHER_OPS = frozenset({"Gather", "GatherND"})
CAST_OPS = frozenset({"Cast", "Identity"})


# -- constants ----------------------------------------------------------------------------------

def const(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def is_weight(value: ir.Value | None) -> bool:
    return value is not None and value.const_value is not None and value.producer() is None


def shortest_float(x) -> float:
    """A numpy float scalar as the shortest decimal that round-trips in its own type."""
    value = float(x)
    return float(str(x)) if np.isfinite(value) else value


def scalar(value: ir.Value | None) -> float | None:
    """A constant floating-point scalar (any single-element shape) as the shortest decimal that
    round-trips in its own type (1.702, not float32's 1.7020000219345093)."""
    arr = const(value)
    if arr is None or arr.size != 1 or arr.dtype.kind in "biuc":  # floats only (bfloat16 included)
        return None
    return shortest_float(arr.reshape(-1)[0])


def fill_value(value: ir.Value | None) -> float | None:
    """The one value a constant-filled tensor holds: a constant whose elements are all equal, an
    Expand of one, or a ConstantOfShape. None for anything else."""
    if value is None:
        return None
    node = value.producer()
    if node is not None and node.op_type == "Expand":
        return fill_value(node.inputs[0])
    if node is not None and node.op_type == "ConstantOfShape":
        tensor = node.attributes.get_tensor("value")
        arr = np.zeros(1, dtype=np.float32) if tensor is None else tensor.numpy()
    else:
        arr = const(value)
    if arr is None or arr.size == 0 or arr.dtype.kind not in "biuf":
        return None
    flat = np.asarray(arr, dtype=np.float64).reshape(-1)
    return float(flat[0]) if (flat == flat[0]).all() else None


def is_zeros(value: ir.Value) -> bool:
    """A tensor of zeros (a constant, an Expand of one or a ConstantOfShape), through casts."""
    return fill_value(behind(value, CAST_OPS)[-1]) == 0.0


# Integer ops a shape computation is made of, evaluated by `static_ints`.
_INT_OPS = {
    "Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Equal": np.equal,
    "Div": lambda a, b: np.trunc(a / b).astype(np.int64),  # ONNX integer Div truncates
}


def static_ints(value: ir.Value | None, depth: int = 12) -> list[int] | None:
    """The integers a small shape computation yields when they are fixed by the graph: constants,
    static dimensions read by Shape (and Gather/Slice of it), and integer arithmetic on them
    (torch's `x.shape[-1] // 2`, an `expand(-1, H)` target). None where anything is unknown."""
    arr = _static(value, depth)
    return None if arr is None else [int(x) for x in arr.reshape(-1)]


def _static(value: ir.Value | None, depth: int) -> np.ndarray | None:
    arr = const(value)
    if arr is not None:
        return np.asarray(arr).astype(np.int64) if arr.dtype.kind in "biu" else None
    node = value.producer() if value is not None else None
    if node is None or depth == 0:
        return None
    op, ins = node.op_type, node.inputs
    if op == "Shape":
        dims = shape_dims(node)
        return None if dims is None or None in dims else np.array(dims, dtype=np.int64)
    if op in ("Gather", "Slice") and ins and (shape := ins[0].producer()) is not None and shape.op_type == "Shape":
        return _static_dims_of_shape(node, depth)
    args = [_static(v, depth - 1) if v is not None else None for v in ins]
    if op == "ConstantOfShape":
        fill = node.attributes.get_tensor("value")
        fill_arr = np.zeros(1, dtype=np.int64) if fill is None else fill.numpy()
        if args[0] is None or fill_arr.dtype.kind not in "biu":
            return None
        return np.full(args[0].reshape(-1), fill_arr.reshape(-1)[0], dtype=np.int64)
    if any(a is None for a in args) or not args:
        return None
    if op in ("Cast", "Identity", "Squeeze", "Unsqueeze", "Reshape", "Flatten"):
        return args[0].reshape(-1) if args[0].ndim <= 1 else None
    if op == "Concat":
        return np.concatenate([a.reshape(-1) for a in args])
    if op == "Div" and len(args) == 2 and not np.all(args[1]):
        return None
    if op in _INT_OPS and len(args) == 2:
        return _INT_OPS[op](args[0], args[1]).astype(np.int64)
    if op == "Where" and len(args) == 3:
        return np.where(args[0], args[1], args[2]).astype(np.int64)
    return None


def _static_dims_of_shape(node: ir.Node, depth: int) -> np.ndarray | None:
    """Gather or Slice of a Shape: the picked dimensions, where those are static."""
    dims = shape_dims(node.inputs[0].producer())
    if dims is None:
        return None
    if node.op_type == "Gather":
        picked = _static(node.inputs[1], depth - 1)
        if picked is None or not all(-len(dims) <= i < len(dims) for i in picked.reshape(-1)):
            return None
        values = [dims[i] for i in picked.reshape(-1)]
        out_shape = picked.shape
    else:
        bounds = [_static(v, depth - 1) if v is not None else None for v in node.inputs[1:]]
        if len(bounds) < 2 or bounds[0] is None or bounds[1] is None or any(b is None for b in bounds[2:]):
            return None
        step = int(bounds[3][0]) if len(bounds) > 3 else 1
        values = dims[slice(int(bounds[0][0]), int(bounds[1][0]), step)]
        out_shape = (len(values),)
    return None if None in values else np.array(values, dtype=np.int64).reshape(out_shape)


# -- shapes and attributes ----------------------------------------------------------------------

def rank(value: ir.Value | None) -> int | None:
    return None if value is None or value.shape is None else len(value.shape)


def dim(value: ir.Value, axis: int) -> int | None:
    if value.shape is None or not -len(value.shape) <= axis < len(value.shape):
        return None
    d = value.shape[axis]
    return d if isinstance(d, int) else None


def axis_is_last(node: ir.Node, rank: int | None, default: int = -1) -> bool:
    axis = node.attributes.get_int("axis", default)
    return axis == -1 or (rank is not None and axis == rank - 1)


def reduce_axes(node: ir.Node) -> list[int] | None:
    """A Reduce* node's axes: its second input (opset 13/18 on) or its `axes` attribute."""
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        return const_ints(node.inputs[1])
    axes = node.attributes.get_ints("axes")
    return None if axes is None else list(axes)


def keepdims(node: ir.Node) -> bool:
    return node.attributes.get_int("keepdims", 1) != 0


# -- views through layout ops -------------------------------------------------------------------

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


def relabels(value: ir.Value | None, target: ir.Value) -> bool:
    """Whether `value` is `target` seen through layout-only ops."""
    return target in behind(value, LAYOUT_OPS)


def forward(value: ir.Value, ops: frozenset[str] = LAYOUT_OPS) -> Iterator[tuple[ir.Node, int]]:
    """Yield (consumer, input index) of `value`, looking through `ops` (layout-only by default)."""
    for node, index in value.uses():
        if node.op_type in ops and index == 0:
            yield from forward(node.outputs[0], ops)
        else:
            yield node, index


def single_consumer(value: ir.Value, op_types: Iterable[str], what: str) -> tuple[ir.Node, int]:
    op_types = set(op_types)
    found = [(n, i) for n, i in forward(value) if n.op_type in op_types]
    if len(found) != 1:
        raise NoMatch(f"{what}: expected one {'/'.join(sorted(op_types))} consumer, found {len(found)}")
    return found[0]


# -- the walk back ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Upstream:
    """What a walk back from a value reached."""

    values: tuple[ir.Value, ...]  # reached, nearest first, the start included; none of `stop`
    complete: bool  # False when the walk stopped at its limit with values left to visit

    def op_types(self) -> set[str]:
        return {p.op_type for v in self.values if (p := v.producer()) is not None}

    def free_inputs(self) -> list[ir.Value]:
        """Values reached that no node computes and that are no constants: graph inputs."""
        return [v for v in self.values if v.producer() is None and v.const_value is None]


def upstream(value: ir.Value | None, *, stop: Collection[ir.Value] = (), read_shapes: bool = True,
             limit: int | None = 64) -> Upstream:
    """Walk back from `value` through the inputs of the nodes computing it, breadth first.

    The walk does not enter `stop`. With `read_shapes=False` it does not walk past a Shape node,
    which reads no values, only a shape: dynamic exports size a block's tensors from Shape nodes
    of any tensor (the model's input, say). At most `limit` values are reached (None: no limit).
    """
    reached: dict[ir.Value, None] = {}
    queue = deque([value])
    while queue:
        v = queue.popleft()
        if v is None or v in reached or v in stop:
            continue
        if limit is not None and len(reached) >= limit:
            return Upstream(tuple(reached), complete=False)
        reached[v] = None
        node = v.producer()
        if node is not None and (read_shapes or node.op_type != "Shape"):
            queue.extend(node.inputs)
    return Upstream(tuple(reached), complete=True)


def derived_from(value: ir.Value | None, sources: Collection[ir.Value], limit: int = 64) -> bool:
    """Whether `value` is computed only from `sources`, constants and shapes (within `limit` values)."""
    walk = upstream(value, stop=sources, read_shapes=False, limit=limit)
    return walk.complete and not walk.free_inputs()


def check_closed(output: ir.Value, boundary: Collection[ir.Value], graph: ir.Graph) -> None:
    """The block may read only its boundary values, constants and shapes (see `upstream`)."""
    walk = upstream(output, stop=boundary, read_shapes=False, limit=None)
    for value in walk.values:
        node = value.producer()
        if node is None and value.const_value is None:
            raise NoMatch(f"block reads '{value.name}', which is neither its input nor a constant")
        if node is not None and node.graph is not graph:
            raise NoMatch("block spans a subgraph")
