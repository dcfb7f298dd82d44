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
from lynx_export.spec import MoEBlock

# Ops that only move or relabel elements; walking through them keeps "the same tensor".
LAYOUT_OPS = frozenset({"Reshape", "Unsqueeze", "Squeeze", "Expand", "Flatten", "Identity", "Cast", "Tile"})
# Layout ops that keep every element exactly once (no Expand/Tile copies, no Cast).
RESHAPE_OPS = frozenset({"Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity"})
GATHER_OPS = frozenset({"Gather", "GatherND"})


class NoMatch(Exception):
    """The candidate does not match; the message is the reason shown to users."""


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


def match_router(topk: ir.Node) -> tuple[ir.Value, ir.Value, RouterForm, bool, int]:
    """Return (logits, routing weights, form, normalize, K) of a router TopK."""
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
        raise NoMatch(f"{sigmoid}: not supported yet")
    raise NoMatch("router is neither softmax->top-k nor top-k->softmax")


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


def match_swiglu(gate_up_out: ir.Value) -> tuple[ir.Value, bool]:
    """Match g, u = Split(x); g * Sigmoid(g) * u. Returns (activation output, gate_first)."""
    split, _ = single_consumer(gate_up_out, {"Split"}, "gate/up projection")
    if len(split.outputs) != 2 or not axis_is_last(split, rank(split.inputs[0]), default=0):
        raise NoMatch("gate/up projection is not split in two along the feature axis")
    for gate_index in (0, 1):
        gate, up = split.outputs[gate_index], split.outputs[1 - gate_index]
        sig = [n for n, i in gate.uses() if n.op_type == "Sigmoid"]
        if len(sig) != 1:
            continue
        silu = [n for n, _ in gate.uses() if n.op_type == "Mul" and sig[0].outputs[0] in n.inputs]
        if len(silu) != 1:
            continue
        prod = [n for n, _ in silu[0].outputs[0].uses() if n.op_type == "Mul" and up in n.inputs]
        if len(prod) == 1:
            return prod[0].outputs[0], gate_index == 0
    raise NoMatch("expert activation is not SwiGLU (silu(gate) * up)")


CLAMPED_SWIGLU = "clamped SwiGLU (gpt-oss) activation: not supported yet"


def match_gated_activation(gate_up_out: ir.Value) -> tuple[ir.Value, bool, bool]:
    """Match SwiGLU over a gate/up projection: silu(gate) * up.

    The halves are split (`Split` in two along the feature axis: [gate; up] concatenated) or
    sliced with step 2 (`Slice` from 0 and from 1: rows interleaved, as gpt-oss stores them).
    Returns (activation output, gate_first, interleaved). gpt-oss's clamped SwiGLU
    (`(clamp(up) + 1) * g * sigmoid(alpha * g)`, g = clamp(gate)) is refused by name.
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
    if any(n.op_type == "Clip" for half in halves for n, _ in forward(half)):
        raise NoMatch(CLAMPED_SWIGLU)
    for gate_index in (0, 1):
        gate, up = halves[gate_index], halves[1 - gate_index]
        sig = [n for n, i in gate.uses() if n.op_type == "Sigmoid"]
        if len(sig) != 1:
            continue
        silu = [n for n, _ in gate.uses() if n.op_type == "Mul" and sig[0].outputs[0] in n.inputs]
        if len(silu) != 1:
            continue
        prod = [n for n, _ in silu[0].outputs[0].uses() if n.op_type == "Mul" and up in n.inputs]
        if len(prod) == 1:
            return prod[0].outputs[0], gate_index == 0, interleaved
    raise NoMatch("expert activation is not SwiGLU (silu(gate) * up)")


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


def check_closed(output: ir.Value, boundary: set[ir.Value], graph: ir.Graph) -> None:
    """The block may read only its boundary values and constants."""
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
        stack.extend(v for v in node.inputs if v is not None)


def sequence_source(hidden: ir.Value) -> ir.Value | None:
    """The [B,S,H] tensor `hidden` was flattened from (through one or more reshapes), if shown."""
    for value in behind(hidden, frozenset({"Reshape", "Flatten"}))[1:]:
        if rank(value) == 3:
            return value if dim(value, -1) in (None, dim(hidden, -1)) else None
    return None
