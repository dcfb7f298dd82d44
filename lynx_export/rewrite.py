"""Rewrite each detected MoE block into one `LynxMoE` node (the canonical form).

The model's router stays in the graph and feeds the node; expert weights are converted once
into the canonical layout (fc1 [E,2I,H] gate/up interleaved, fc2 [E,H,I]); the block's old
expert subgraph becomes dead and is removed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from lynx_export import op as lynx_op
from lynx_export.errors import RewriteError
from lynx_export.routing import SelectionPolicy
from lynx_export.spec import ExpertWeights, MoEBlock, Names

__all__ = ["LynxMoEFusionPass", "RewriteResult", "rewrite", "CanonicalWeights", "canonical_expert_weights"]


@dataclass(frozen=True)
class RewriteResult:
    model: ir.Model
    rewritten: tuple[str, ...]
    counts: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class CanonicalWeights:
    fc1: np.ndarray  # [E,2I,H], gate/up rows interleaved
    fc2: np.ndarray  # [E,H,I]
    fc1_bias: np.ndarray | None  # [E,2I], interleaved like fc1
    fc2_bias: np.ndarray | None  # [E,H]


def canonical_expert_weights(
    gate_up: np.ndarray,
    down: np.ndarray,
    layout: ExpertWeights,
    up: np.ndarray | None = None,
    gate_up_bias: np.ndarray | None = None,
    up_bias: np.ndarray | None = None,
    down_bias: np.ndarray | None = None,
) -> CanonicalWeights:
    """Convert stacked source expert weights (as `layout` describes them) to the canonical form."""
    if layout.gate_up_layout == "in_out":
        gate_up = gate_up.transpose(0, 2, 1)
        up = None if up is None else up.transpose(0, 2, 1)
    if layout.down_layout == "in_out":
        down = down.transpose(0, 2, 1)

    def split(rows: np.ndarray, second: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """(gate, up) along axis 1 of a gate/up tensor [E,2I,...] (or of gate and up given apart)."""
        if second is not None:
            return rows, second
        n = rows.shape[1]
        if layout.interleaved:
            halves = (rows[:, 0::2], rows[:, 1::2])
        else:
            halves = (rows[:, : n // 2], rows[:, n // 2 :])
        return halves if layout.gate_first else halves[::-1]

    def interleave(gate: np.ndarray, up_rows: np.ndarray) -> np.ndarray:
        # ONNX Runtime's fused SwiGLU reads gate and up from alternating rows.
        stacked = np.stack((gate, up_rows), axis=2)
        return np.ascontiguousarray(stacked.reshape(gate.shape[0], 2 * gate.shape[1], *gate.shape[2:]))

    fc1 = interleave(*split(gate_up, up))
    fc1_bias = None
    if gate_up_bias is not None:
        fc1_bias = interleave(*split(gate_up_bias, up_bias))
    return CanonicalWeights(fc1, np.ascontiguousarray(down), fc1_bias, None if down_bias is None else np.ascontiguousarray(down_bias))


def _values_by_name(graph: ir.Graph) -> dict[str, ir.Value]:
    values: dict[str, ir.Value] = {v.name: v for v in graph.inputs if v.name}
    values.update(graph.initializers)
    for node in graph:
        values.update((v.name, v) for v in node.outputs if v.name)
    return values


class LynxMoEFusionPass(ir.passes.InPlacePass):
    """Replace each block's expert subgraph with a LynxMoE node carrying `policy`.

    1. Converted weights become new initializers `<block>.fc1` / `<block>.fc2`.
    2. When the block's tokens were flattened from [B,S,H], the node gets S as its phase input.
    3. The old combine output's uses move to the node's output; dead nodes go away.
    """

    def __init__(self, blocks: Sequence[MoEBlock], policy: SelectionPolicy) -> None:
        super().__init__()
        self.blocks = tuple(blocks)
        self.policy = policy

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        values = _values_by_name(graph)
        for block in self.blocks:
            self._rewrite_block(graph, values, block)
        if self.blocks:
            model.opset_imports.setdefault(lynx_op.DOMAIN, 1)
            common_passes.RemoveUnusedNodesPass()(model)
        return ir.passes.PassResult(model, modified=bool(self.blocks))

    @staticmethod
    def _canonical_values(w: ExpertWeights, lookup: Callable[[str], ir.Value], tape: ir.tape.Tape,
                          fresh: Callable[[str], str]) -> tuple[ir.Value | None, ...]:
        """(fc1, fc1_bias, fc2, fc2_bias) values in the canonical layout: the source's own when it
        is canonical already, else new initializers converted from it."""
        if _is_canonical(w):
            return tuple(None if n is None else lookup(n) for n in (w.gate_up, w.gate_up_bias, w.down, w.down_bias))

        def stacked(names: Names | None) -> np.ndarray | None:
            if names is None:
                return None
            if isinstance(names, str):
                return lookup(names).const_value.numpy()
            return np.stack([lookup(n).const_value.numpy() for n in names])

        c = canonical_expert_weights(stacked(w.gate_up), stacked(w.down), w, stacked(w.up), stacked(w.gate_up_bias), stacked(w.up_bias),
                                     stacked(w.down_bias))
        arrays = {"fc1": c.fc1, "fc1_bias": c.fc1_bias, "fc2": c.fc2, "fc2_bias": c.fc2_bias}
        return tuple(None if a is None else tape.initializer(ir.tensor(a), name=fresh(suffix)) for suffix, a in arrays.items())

    def _rewrite_block(self, graph: ir.Graph, values: dict[str, ir.Value], block: MoEBlock) -> None:
        def lookup(name: str) -> ir.Value:
            try:
                return values[name]
            except KeyError:
                raise RewriteError(f"block {block.name}: value '{name}' is not in the graph") from None

        output = lookup(block.output)
        anchor = output.producer()
        if anchor is None:
            raise RewriteError(f"block {block.name}: output '{block.output}' has no producer")

        tape = ir.tape.Tape()
        taken = set(graph.initializers)

        def fresh(suffix: str) -> str:
            # A model rewritten before already holds `<block>.fc1` and friends.
            name, n = f"{block.name}.{suffix}", 1
            while name in taken:
                n += 1
                name = f"{block.name}.{suffix}.{n}"
            taken.add(name)
            return name

        weights = self._canonical_values(block.weights, lookup, tape, fresh)
        seq_len = None
        if block.sequence_source is not None:
            shape = tape.op("Shape", [lookup(block.sequence_source)])
            index = tape.initializer(ir.tensor(np.array(1, dtype=np.int64)), name=fresh("seq_axis"))
            seq_len = tape.op("Gather", [shape, index], {"axis": 0})
        inputs: list[ir.Value | None] = [None] * len(lynx_op.Slot)
        inputs[lynx_op.Slot.HIDDEN] = lookup(block.hidden)
        inputs[lynx_op.Slot.ROUTER_LOGITS] = lookup(block.router_logits)
        for slot, value in zip((lynx_op.Slot.FC1, lynx_op.Slot.FC1_BIAS, lynx_op.Slot.FC2, lynx_op.Slot.FC2_BIAS), weights):
            inputs[slot] = value
        inputs[lynx_op.Slot.SEQ_LEN] = seq_len
        while inputs and inputs[-1] is None:
            inputs.pop()
        result = tape.op(
            lynx_op.OP_TYPE,
            inputs,
            lynx_op.to_attributes(block.spec, self.policy),
            domain=lynx_op.DOMAIN,
            name=block.name,
        )
        result.name = f"{block.name}.output"
        result.shape = output.shape
        result.dtype = output.dtype
        for init in tape.initializers:
            graph.register_initializer(init)
        graph.insert_before(anchor, tape.nodes)
        output.replace_all_uses_with(result, replace_graph_outputs=True)


def _is_canonical(w: ExpertWeights) -> bool:
    """Whether the source weights are stacked in the canonical layout already (a LynxMoE node's)."""
    stacked = all(isinstance(n, str) for n in (w.gate_up, w.down, w.gate_up_bias or "", w.down_bias or ""))
    return (stacked and w.up is None and w.up_bias is None and w.interleaved and w.gate_first
            and w.gate_up_layout == "out_in" and w.down_layout == "out_in")


def rewrite(model: ir.Model, blocks: Sequence[MoEBlock], policy: SelectionPolicy) -> RewriteResult:
    """Rewrite `blocks` of `model` in place and report what was done."""
    LynxMoEFusionPass(blocks, policy)(model)
    return RewriteResult(model, tuple(b.name for b in blocks), dict(Counter(b.form for b in blocks)))
