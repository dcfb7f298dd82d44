"""Find MoE blocks in an ONNX graph and describe each as an `MoEBlock` (spec + bindings).

Detection is anchored on router TopK nodes and follows graph structure, shapes and constants,
never tensor names: constant folding renames weights (`val_N`). Each TopK that looks like a
router becomes a `Candidate`; a candidate the pass cannot rewrite carries the reason.

Form recognised (torch dynamo export of stacked experts run as batched matmuls):

    logits [T,E] = Gemm|MatMul(hidden [T,H], W_router)
    probs = Softmax(logits); w, ids = TopK(probs, K); w = w / ReduceSum(w)   (renormalise: optional)
      or  w, ids = TopK(logits, K); w = Softmax(w)                          (top-k then softmax)
    W1[t,k] = Gather|GatherND(gate_up [E,2I,H], ids)   rows = expand(tokens) [T*K,H]
    g, u = Split(MatMul(W1, rows)); a = g * Sigmoid(g) * u
    y = MatMul(Gather(down [E,H,I], ids), a)
    out [T,H] = ReduceSum(Reshape(y, [T,K,H]) * w, axis=1)   (or y * w weighed before the reshape)

Two spellings of it are known; they differ only in layout ops, which the matcher looks through:

  * the demo model (lynx_export/demo.py): the router and the experts read one flattened value,
    `tokens = hidden = Reshape(x [B,S,H], [-1,H])`; the combine reshapes first and weighs after,
    `ReduceSum(Reshape(y, [T,K,H]) * Unsqueeze(w), axis=1)`.
  * transformers (Mixtral and its kind, `batched_mm` experts): the block flattens x once and its
    `MixtralTopKRouter` flattens again, so the router reads `hidden = Reshape(tokens, [-1,H])`,
    a sibling view of the `tokens` the experts expand (`repeat_interleave`); the combine weighs
    the rows first, `ReduceSum(Reshape(y * Unsqueeze(Reshape(w, [-1])), [T,K,H]), axis=1)`.
    The router and the experts are separate modules; the block is named after their common scope.

In both, `hidden` and `tokens` hold the same elements: `tokens` is `hidden` or a value `hidden`
is a reshape of. The block binds `hidden` (the router's [T,H] input) and reads `tokens` inside.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace

import numpy as np
import onnx_ir as ir

from lynx_export.routing import RouterForm
from lynx_export.spec import Activation, Candidate, ExpertWeights, MoEBlock, MoESpec

__all__ = ["DetectResult", "detect", "MAX_CANDIDATES"]

# Ops that only move or relabel elements; walking through them keeps "the same tensor".
_LAYOUT_OPS = frozenset({"Reshape", "Unsqueeze", "Squeeze", "Expand", "Flatten", "Identity", "Cast", "Tile"})
# Layout ops that keep every element exactly once (no Expand/Tile copies, no Cast).
_RESHAPE_OPS = frozenset({"Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity"})
_GATHER_OPS = frozenset({"Gather", "GatherND"})
MAX_CANDIDATES = 4096


@dataclass(frozen=True)
class DetectResult:
    """Every router found, in graph order."""

    candidates: tuple[Candidate, ...]

    @property
    def blocks(self) -> tuple[MoEBlock, ...]:
        return tuple(c.block for c in self.candidates if c.block is not None)


class _NoMatch(Exception):
    """Internal: the candidate does not match; the message is the reason shown to users."""


def detect(model: ir.Model) -> DetectResult:
    """Return a Candidate for every router-like TopK in the main graph."""
    candidates: list[Candidate] = []
    used_names: set[str] = set()
    for node in model.graph:
        if node.op_type != "TopK" or node.domain not in ("", "ai.onnx"):
            continue
        if not _feeds_expert_gather(node.outputs[1]):
            continue  # a TopK that selects no expert weights (e.g. sampling) is not a router
        try:
            block, combine = _match_block(node)
        except _NoMatch as exc:
            name = _unique(_block_name([node], len(candidates)), used_names)
            candidates.append(Candidate(name, None, str(exc)))
            continue
        name = _unique(_block_name([node, combine], len(candidates)), used_names)
        candidates.append(Candidate(name, replace(block, name=name)))
    return DetectResult(tuple(candidates))


# -- graph helpers -------------------------------------------------------------------------------


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def _const_ints(value: ir.Value | None) -> list[int] | None:
    arr = _const(value)
    return None if arr is None else [int(x) for x in np.asarray(arr).reshape(-1)]


def _is_weight(value: ir.Value | None) -> bool:
    return value is not None and value.const_value is not None and value.producer() is None


def _relabels(value: ir.Value | None, target: ir.Value) -> bool:
    """Whether `value` is `target` seen through layout-only ops."""
    return target in _behind(value, _LAYOUT_OPS)


def _behind(value: ir.Value | None, ops: frozenset[str]) -> list[ir.Value]:
    """`value` and the values it is a view of through `ops` (data input only), nearest first."""
    chain: list[ir.Value] = []
    while value is not None and value not in chain:
        chain.append(value)
        p = value.producer()
        if p is None or p.op_type not in ops or not p.inputs:
            break
        value = p.inputs[0]
    return chain


def _forward(value: ir.Value) -> Iterator[tuple[ir.Node, int]]:
    """Yield (consumer, input index) of `value`, looking through layout-only ops."""
    for node, index in value.uses():
        if node.op_type in _LAYOUT_OPS and index == 0:
            yield from _forward(node.outputs[0])
        else:
            yield node, index


def _single_consumer(value: ir.Value, op_types: Iterable[str], what: str) -> tuple[ir.Node, int]:
    op_types = set(op_types)
    found = [(n, i) for n, i in _forward(value) if n.op_type in op_types]
    if len(found) != 1:
        raise _NoMatch(f"{what}: expected one {'/'.join(sorted(op_types))} consumer, found {len(found)}")
    return found[0]


def _axis_is_last(node: ir.Node, rank: int | None, default: int = -1) -> bool:
    attr = node.attributes.get("axis")
    axis = default if attr is None else attr.as_int()
    return axis == -1 or (rank is not None and axis == rank - 1)


def _rank(value: ir.Value) -> int | None:
    return None if value.shape is None else len(value.shape)


def _dim(value: ir.Value, axis: int) -> int | None:
    if value.shape is None or not -len(value.shape) <= axis < len(value.shape):
        return None
    d = value.shape[axis]
    return d if isinstance(d, int) else None


def _module_scopes(node: ir.Node) -> list[str] | None:
    """The exporter's module scopes of `node`, outermost first, without the op's own name."""
    scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes")
    if not scopes:
        return None
    try:
        parts = [p for p in ast.literal_eval(scopes) if isinstance(p, str) and p]
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None
    return parts[:-1] if len(parts) >= 2 else None


def _block_name(nodes: Iterable[ir.Node], index: int) -> str:
    """The innermost module scope the nodes share (e.g. `layers.0.mlp`), else a positional name.

    Given the router TopK and the combine, this is the MoE block even where the router is a
    module of its own (transformers' `mlp.gate`).
    """
    common: list[str] | None = None
    for node in nodes:
        scopes = _module_scopes(node)
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


def _unique(name: str, used: set[str]) -> str:
    candidate, n = name, 1
    while candidate in used:
        n += 1
        candidate = f"{name}_{n}"
    used.add(candidate)
    return candidate


def _feeds_expert_gather(ids: ir.Value) -> bool:
    return any(n.op_type in _GATHER_OPS and i == 1 and _is_weight(n.inputs[0]) for n, i in _forward(ids))


# -- the matcher -----------------------------------------------------------------------------------


def _match_router(topk: ir.Node) -> tuple[ir.Value, ir.Value, RouterForm, bool, int]:
    """Return (logits, routing weights, form, normalize, K) of a router TopK."""
    k_values = _const_ints(topk.inputs[1])
    if not k_values or len(k_values) != 1:
        raise _NoMatch("top-k is not a constant")
    k = k_values[0]
    if not _axis_is_last(topk, _rank(topk.inputs[0])):
        raise _NoMatch("TopK does not run over the expert axis")
    if topk.attributes.get("largest") is not None and topk.attributes["largest"].as_int() == 0:
        raise _NoMatch("TopK picks the smallest values")
    values = topk.outputs[0]
    source = topk.inputs[0]
    producer = source.producer()
    if producer is not None and producer.op_type == "Softmax" and _axis_is_last(producer, _rank(source)):
        logits = producer.inputs[0]
        # Renormalisation: w / ReduceSum(w) over the K axis.
        for node, index in values.uses():
            if node.op_type == "Div" and index == 0:
                denom = node.inputs[1].producer() if node.inputs[1] is not None else None
                if denom is not None and denom.op_type == "ReduceSum" and denom.inputs[0] is values:
                    return logits, node.outputs[0], RouterForm.SOFTMAX_TOPK, True, k
        return logits, values, RouterForm.SOFTMAX_TOPK, False, k
    softmaxes = [n for n, i in values.uses() if n.op_type == "Softmax" and _axis_is_last(n, _rank(values))]
    if len(softmaxes) == 1:
        return source, softmaxes[0].outputs[0], RouterForm.TOPK_SOFTMAX, True, k
    if producer is not None and producer.op_type == "Sigmoid":
        raise _NoMatch("sigmoid router: not supported yet")
    raise _NoMatch("router is neither softmax->top-k nor top-k->softmax")


def _router_hidden(logits: ir.Value, num_experts: int) -> ir.Value:
    """The hidden state [T,H] a linear router reads."""
    node = logits.producer()
    if node is None or node.op_type not in ("Gemm", "MatMul"):
        raise _NoMatch("router logits are not a linear layer of the hidden state")
    a, b = node.inputs[0], node.inputs[1]
    if _is_weight(a) and not _is_weight(b):
        a, b = b, a
    if not _is_weight(b):
        raise _NoMatch("router weight is not a constant")
    if _rank(a) != 2:
        raise _NoMatch("router input is not a 2-D [T,H] tensor")
    return a


def _expert_tokens(data: ir.Value, hidden: ir.Value, hidden_size: int | None) -> ir.Value | None:
    """The token matrix behind an expert projection's data operand, when it is the router's.

    `data` must be a layout-only view (expand, reshape) of `hidden` or of a value `hidden` is a
    reshape of, so that both hold the same [*,H] token rows.
    """
    views = _behind(hidden, _RESHAPE_OPS)
    for value in _behind(data, _LAYOUT_OPS):
        if value in views and (value is hidden or (hidden_size is not None and _dim(value, -1) == hidden_size)):
            return value
    return None


def _expert_matmul(gather: ir.Node) -> tuple[ir.Node, ir.Value, str]:
    """The batched matmul that applies a gathered weight: (node, its data operand, layout)."""
    node, index = _single_consumer(gather.outputs[0], {"MatMul"}, "gathered expert weight")
    data = node.inputs[1 - index]
    # MatMul(W[out,in], x[in,1]) is torch Linear order; MatMul(x[1,in], W[in,out]) the transpose.
    return node, data, "out_in" if index == 0 else "in_out"


def _match_swiglu(gate_up_out: ir.Value) -> tuple[ir.Value, bool]:
    """Match g, u = Split(x); g * Sigmoid(g) * u. Returns (activation output, gate_first)."""
    split, _ = _single_consumer(gate_up_out, {"Split"}, "gate/up projection")
    if len(split.outputs) != 2 or not _axis_is_last(split, _rank(split.inputs[0]), default=0):
        raise _NoMatch("gate/up projection is not split in two along the feature axis")
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
    raise _NoMatch("expert activation is not SwiGLU (silu(gate) * up)")


def _match_combine(expert_out: ir.Value, weights: ir.Value, k: int) -> ir.Value:
    """Match ReduceSum(expert_out * weights, axis=K), weighed before or after the [T,K,H] reshape; return [T,H]."""
    for node, index in _forward(expert_out):
        if node.op_type != "Mul":
            continue
        other = node.inputs[1 - index]
        if not _relabels(other, weights):
            continue
        reduce, _ = _single_consumer(node.outputs[0], {"ReduceSum"}, "weighted expert outputs")
        axes = _const_ints(reduce.inputs[1]) if len(reduce.inputs) > 1 else None
        keepdims = reduce.attributes.get("keepdims")
        if axes != [1] or (keepdims is not None and keepdims.as_int() != 0) or _dim(reduce.inputs[0], 1) not in (None, k):
            raise _NoMatch("expert outputs are not summed over the top-k axis")
        return reduce.outputs[0]
    raise _NoMatch("expert outputs are not weighted by the routing weights")


def _check_closed(output: ir.Value, boundary: set[ir.Value], graph: ir.Graph) -> None:
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
                raise _NoMatch(f"block reads '{value.name}', which is neither its input nor a constant")
            continue
        if node.graph is not graph:
            raise _NoMatch("block spans a subgraph")
        stack.extend(v for v in node.inputs if v is not None)


def _sequence_source(hidden: ir.Value) -> ir.Value | None:
    """The [B,S,H] tensor `hidden` was flattened from (through one or more reshapes), if shown."""
    for value in _behind(hidden, frozenset({"Reshape", "Flatten"}))[1:]:
        if _rank(value) == 3:
            return value if _dim(value, -1) in (None, _dim(hidden, -1)) else None
    return None


def _match_block(topk: ir.Node) -> tuple[MoEBlock, ir.Node]:
    """The block routed by `topk` (named by the caller) and the node producing its output."""
    logits, weights, form, normalize, k = _match_router(topk)
    num_experts = _dim(logits, -1)
    if num_experts is None:
        raise _NoMatch("number of experts (router logits' last dim) is not static")
    if not 1 <= k <= num_experts:
        raise _NoMatch(f"top-k {k} is outside 1..{num_experts}")
    hidden = _router_hidden(logits, num_experts)
    hidden_size = _dim(hidden, -1)

    gathers = [n for n, i in _forward(topk.outputs[1]) if n.op_type in _GATHER_OPS and i == 1]
    for g in gathers:
        data = g.inputs[0]
        if not _is_weight(data) or _rank(data) != 3 or _dim(data, 0) != num_experts:
            raise _NoMatch("expert ids index something other than stacked [E,*,*] expert weights")
        if g.op_type == "Gather" and g.attributes.get("axis") is not None and g.attributes["axis"].as_int() != 0:
            raise _NoMatch("expert weights are gathered along a non-expert axis")
    if len(gathers) == 3:
        raise _NoMatch("separate gate and up expert weights: not supported yet")
    if len(gathers) != 2:
        raise _NoMatch(f"expected 2 stacked expert weights (gate_up, down), found {len(gathers)}")

    # The projection whose data operand is a view of the router's hidden state is gate_up.
    matmuls = [_expert_matmul(g) for g in gathers]
    tokens = [_expert_tokens(data, hidden, hidden_size) for _, data, _ in matmuls]
    first = [i for i, t in enumerate(tokens) if t is not None]
    if len(first) != 1:
        raise _NoMatch("no expert projection reads the router's hidden state")
    up_i = first[0]
    (up_mm, _, up_layout), (down_mm, down_data, down_layout) = matmuls[up_i], matmuls[1 - up_i]
    gate_up_w, down_w = gathers[up_i].inputs[0], gathers[1 - up_i].inputs[0]

    act, gate_first = _match_swiglu(up_mm.outputs[0])
    if not _relabels(down_data, act):
        raise _NoMatch("down projection does not read the activation")
    output = _match_combine(down_mm.outputs[0], weights, k)

    two_i, h1 = (_dim(gate_up_w, 1), _dim(gate_up_w, 2)) if up_layout == "out_in" else (_dim(gate_up_w, 2), _dim(gate_up_w, 1))
    h2, i2 = (_dim(down_w, 1), _dim(down_w, 2)) if down_layout == "out_in" else (_dim(down_w, 2), _dim(down_w, 1))
    if two_i is None or two_i % 2 or h1 is None or h2 is None or i2 is None:
        raise _NoMatch("expert weight shapes are not [E,2I,H] and [E,H,I]")
    if h1 != h2 or two_i // 2 != i2 or (hidden_size is not None and hidden_size != h1):
        raise _NoMatch(f"expert weight shapes disagree: gate_up {list(gate_up_w.shape)}, down {list(down_w.shape)}")

    _check_closed(output, {hidden, logits, tokens[up_i]}, topk.graph)
    spec = MoESpec(
        num_experts=num_experts,
        top_k=k,
        hidden_size=h1,
        expert_size=i2,
        activation=Activation.SWIGLU,
        router=form,
        normalize=normalize,
    )
    source = _sequence_source(hidden)
    block = MoEBlock(
        name="",
        form="batched_mm",
        spec=spec,
        weights=ExpertWeights(gate_up_w.name, up_layout, gate_first, down_w.name, down_layout),
        hidden=hidden.name,
        router_logits=logits.name,
        output=output.name,
        sequence_source=None if source is None else source.name,
    )
    return block, output.producer()
