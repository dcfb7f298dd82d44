"""The matcher vocabulary every exporter form uses, in one import: graph reading (`graph`), linear
layers (`linear`), the router (`router`), the SwiGLU activation (`swiglu`), and here the weighted
combine, stacked expert biases, and the block a form reports and how it is named.

Matchers follow graph structure, shapes and constants, never tensor names (constant folding
renames weights to `val_N`); the exporter's module scopes only name blocks.
"""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Collection, Iterable
from dataclasses import dataclass

import onnx_ir as ir

from lynx_export.compiler.blocks import ExpertWeights, MoEBlock, NoMatch
from lynx_export.compiler.forms.graph import (
    CAST_OPS,
    GATHER_OPS,
    LAYOUT_OPS,
    RESHAPE_OPS,
    Upstream,
    axis_is_last,
    behind,
    check_closed,
    const,
    const_ints,
    derived_from,
    dim,
    fill_value,
    forward,
    is_weight,
    is_zeros,
    keepdims,
    rank,
    reduce_axes,
    relabels,
    scalar,
    shortest_float,
    single_consumer,
    static_ints,
    upstream,
)
from lynx_export.compiler.forms.linear import Linear, linear_producing, match_linear
from lynx_export.compiler.forms.router import SPARSE_MIXER, RouterLinear, RouterMatch, expert_ids_reason, match_router, router_linear
from lynx_export.compiler.forms.swiglu import NOT_SWIGLU, SwiGLU, match_gated_activation, match_swiglu_halves
from lynx_export.op.spec import Activation, MoESpec

__all__ = [
    # graph
    "CAST_OPS", "GATHER_OPS", "LAYOUT_OPS", "RESHAPE_OPS", "Upstream", "axis_is_last", "behind", "check_closed", "const",
    "const_ints", "derived_from", "dim", "fill_value", "forward", "is_weight", "is_zeros", "keepdims", "rank",
    "reduce_axes", "relabels", "scalar", "shortest_float", "single_consumer", "static_ints", "upstream",
    # linear, router, swiglu
    "Linear", "linear_producing", "match_linear",
    "SPARSE_MIXER", "RouterLinear", "RouterMatch", "expert_ids_reason", "match_router", "router_linear",
    "NOT_SWIGLU", "SwiGLU", "match_gated_activation", "match_swiglu_halves",
    # blocks
    "Match", "RoutedExperts", "StackedWeights", "match_routing", "routed_block", "stacked_block", "match_combine", "match_bias_add", "check_bias_shapes",
    "sequence_source", "module_scopes", "block_name",
]


@dataclass(frozen=True)
class Match:
    """A matched block (named by `detect`) and the nodes whose shared module scope names it."""

    block: MoEBlock
    scope_nodes: tuple[ir.Node, ...]


@dataclass(frozen=True)
class RoutedExperts:
    """What a form found of one block's router and SwiGLU experts, as every matcher reports it."""

    router: RouterMatch
    activation: SwiGLU
    num_experts: int
    hidden_size: int
    expert_size: int
    weights: ExpertWeights


def routed_block(form: str, experts: RoutedExperts, hidden: ir.Value, output: ir.Value, source: ir.Value | None) -> MoEBlock:
    """The MoEBlock (named by `detect`) of SwiGLU experts a form matched."""
    router, act = experts.router, experts.activation
    grouping = {} if router.grouping is None else dataclasses.asdict(router.grouping)
    spec = MoESpec(
        num_experts=experts.num_experts, top_k=router.top_k, hidden_size=experts.hidden_size, expert_size=experts.expert_size,
        activation=Activation.SWIGLU, router=router.form, normalize=router.normalize, **grouping,
        activation_alpha=act.alpha, activation_beta=act.beta, swiglu_limit=act.limit,
    )
    return MoEBlock(name="", form=form, spec=spec, weights=experts.weights, hidden=hidden.name, router_logits=router.logits.name,
                    output=output.name, sequence_source=None if source is None else source.name)


def match_combine(expert_out: ir.Value, weights: ir.Value, k: int) -> ir.Value:
    """Match ReduceSum(expert_out * weights, axis=K), weighed before or after the [T,K,H] reshape; return [T,H]."""
    for node, index in forward(expert_out):
        if node.op_type != "Mul":
            continue
        other = node.inputs[1 - index]
        if not relabels(other, weights):
            continue
        reduce, _ = single_consumer(node.outputs[0], {"ReduceSum"}, "weighted expert outputs")
        if reduce_axes(reduce) != [1] or keepdims(reduce) or dim(reduce.inputs[0], 1) not in (None, k):
            raise NoMatch("expert outputs are not summed over the top-k axis")
        return reduce.outputs[0]
    raise NoMatch("expert outputs are not weighted by the routing weights")


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


def check_bias_shapes(biases: Iterable[tuple[ir.Value | None, int]]) -> None:
    """Each stacked expert bias [E, n] fits its projection's n outputs."""
    for bias, size in biases:
        if bias is not None and dim(bias, 1) != size:
            raise NoMatch(f"expert bias shape {list(bias.shape)} does not match its projection")


def match_routing(topk: ir.Node) -> tuple[RouterMatch, RouterLinear]:
    """The router whose expert choice is `topk` and the linear layer computing its logits; top-k
    within 1..E."""
    router = match_router(topk)
    linear = router_linear(router.logits)
    if not 1 <= router.top_k <= linear.num_experts:
        raise NoMatch(f"top-k {router.top_k} is outside 1..{linear.num_experts}")
    return router, linear


@dataclass(frozen=True)
class StackedWeights:
    """Where a stacked-weights form found its experts' parameters: the [E,...] tensors' names and
    layouts ("out_in" or "in_out"), and the biases [E,n] added to their projections."""

    gate_up: str
    gate_up_layout: str
    down: str
    down_layout: str
    gate_up_bias: ir.Value | None = None
    down_bias: ir.Value | None = None


def stacked_block(form: str, topk: ir.Node, router: RouterMatch, act: SwiGLU, found: StackedWeights, sizes: tuple[int, int, int],
                  hidden: ir.Value, output: ir.Value, reads: Collection[ir.Value]) -> Match:
    """The steps every stacked-weights form ends with: the biases fit their projections, the block
    reads only `reads` and constants (`check_closed`), and its weights, MoEBlock and Match.
    `sizes`: (E, H, I)."""
    num_experts, hidden_size, expert_size = sizes
    check_bias_shapes([(found.gate_up_bias, 2 * expert_size), (found.down_bias, hidden_size)])
    check_closed(output, reads, topk.graph)
    weights = ExpertWeights(
        found.gate_up, found.gate_up_layout, act.gate_first, found.down, found.down_layout, interleaved=act.interleaved,
        gate_up_bias=None if found.gate_up_bias is None else found.gate_up_bias.name,
        down_bias=None if found.down_bias is None else found.down_bias.name,
    )
    experts = RoutedExperts(router, act, num_experts, hidden_size, expert_size, weights)
    return Match(routed_block(form, experts, hidden, output, sequence_source(hidden, hidden_size)), (topk, output.producer()))


def sequence_source(hidden: ir.Value, hidden_size: int) -> ir.Value | None:
    """The [B,S,H] tensor `hidden` [T,H] was flattened from (through reshapes), if shown."""
    for value in behind(hidden, frozenset({"Reshape", "Flatten"}))[1:]:
        if rank(value) == 3:
            return value if dim(value, -1) in (None, hidden_size) else None
    return None


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
