"""Learned routing for random-weight benchmark models: feed a router trace's logits to compiled models.

A trace (`lynx-export trace`) holds a trained model's router logits on held-out text. The
benchmark turns every block's router output into a graph input (`with_router_inputs`) and feeds
it, per timed decode step, the trace's logits of one position for the batch's sequences
(`trace_steps`): the experts then see learned routing while the weights stay random. Model layer
l reads trace layer l mod L (a trace of L layers repeats its layers over a deeper model), and the
steps cycle over the second half of the trace's positions: the first positions of a byte-level
text (no context yet) route atypically.

The rewritten model is a copy with its weights in a data file beside it (`NAME.data`): a copy
of the weights costs seconds and disk space, nothing in what is timed.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from lynx_export.compiler.lowering.ort import LoweredBlock
from lynx_export.errors import DataError
from lynx_export.evaluation.trace import RouterTrace
from lynx_export.routing import RouterForm

__all__ = ["check_trace", "with_router_inputs", "trace_steps", "trace_positions", "routed_only", "TOKENS_DIM"]

TOKENS_DIM = "router_tokens"  # the symbolic T of the router-logits inputs [T, E]


def check_trace(trace: RouterTrace, path: pathlib.Path, where: str, *, num_experts: int, top_k: int,
                router: RouterForm = RouterForm.SOFTMAX_TOPK, max_batch: int) -> None:
    """Refuse (DataError, one line) a trace whose routing the model at `where` cannot replay: other
    E, K or router form, or fewer sequences than the largest batch (each row is one sequence)."""
    sequences, _, experts = trace.shape
    if experts != num_experts or trace.top_k != top_k:
        raise DataError(f"{path}: the trace routes E={experts}, K={trace.top_k}; {where} has E={num_experts}, K={top_k}")
    if trace.router is not router:
        raise DataError(f"{path}: the trace's router is {trace.router.value}; {where} routes {router.value}")
    if sequences < max_batch:
        raise DataError(f"{path}: the trace holds {sequences} sequences, fewer than the largest batch size {max_batch} "
                        f"(each row of a step is one sequence)")


def trace_positions(trace: RouterTrace) -> range:
    """The positions the steps cycle over: the second half of the trace's."""
    positions = trace.shape[1]
    return range(positions // 2, positions)


def trace_steps(trace: RouterTrace, input_names: Sequence[str], batch: int, steps: int) -> list[dict[str, np.ndarray]]:
    """Router-logit feeds of `steps` decode steps of `batch` rows: step r feeds input l (model layer l)
    trace layer l mod L at the r-th position of `trace_positions` (cycling), rows = the first
    `batch` sequences; contiguous float32 [batch, E] each."""
    positions = trace_positions(trace)
    layers = trace.logits
    return [{name: np.ascontiguousarray(layers[l % len(layers)][:batch, positions[r % len(positions)], :], dtype=np.float32)
             for l, name in enumerate(input_names)}
            for r in range(steps)]


def routed_only(blocks: Sequence[LoweredBlock]) -> tuple[LoweredBlock, ...]:
    """The blocks of a trace-fed model as `verify.probe_copy` should probe them: their router logits
    are graph inputs (read them from the feed), so only routed logits a node computes (a policy's
    masked logits) become extra outputs; blocks routing on the input itself need none."""
    return tuple(dataclasses.replace(b, router_logits=b.routed_logits) for b in blocks if b.routed_logits != b.router_logits)


def with_router_inputs(path: pathlib.Path, blocks: Sequence[LoweredBlock], out_path: pathlib.Path) -> tuple[str, ...]:
    """Write a copy of the compiled model `path` at `out_path` (its weights in `out_path`.data) in
    which every block's router logits are a graph input [T, E] float32 of the same name, the
    router's nodes and weights removed (nothing else uses them). Returns the inputs' names in
    block order."""
    model = ir.load(path)
    graph = model.graph
    inputs = {v.name for v in graph.inputs}
    produced = {v.name: v for node in graph for v in node.outputs}
    for block in blocks:
        if block.router_logits not in inputs:  # a model may route on an input already
            graph.inputs.append(_as_input(produced[block.router_logits], block, path))
            inputs.add(block.router_logits)
    common_passes.RemoveUnusedNodesPass()(model)
    ir.save(model, out_path, external_data=f"{out_path.name}.data")
    return tuple(b.router_logits for b in blocks)


def _as_input(value: ir.Value, block: LoweredBlock, path: pathlib.Path) -> ir.Value:
    """A graph input standing in for `value` (renamed away) in every use."""
    if value.dtype is not None and value.dtype != ir.DataType.FLOAT:
        raise DataError(f"{path}: block {block.name}'s router logits '{value.name}' are {value.dtype.name}; the trace feeds float32")
    name = value.name
    value.name = f"{name}.computed"
    replacement = ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([TOKENS_DIM, block.spec.num_experts]))
    # A graph output of the router logits becomes the input itself, which ONNX Runtime returns as given.
    value.replace_all_uses_with(replacement, replace_graph_outputs=True)
    return replacement
