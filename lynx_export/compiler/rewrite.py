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

from lynx_export.op import contract as lynx_op
from lynx_export.errors import RewriteError
from lynx_export.routing import SelectionPolicy
from lynx_export.compiler.blocks import ExpertWeights, MoEBlock, Names

__all__ = ["LynxMoEFusionPass", "RewriteResult", "rewrite", "CanonicalWeights", "canonical_expert_weights", "canonical_fc1", "canonical_fc1_bias", "canonical_fc2"]


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


def _gate_and_up(rows: np.ndarray, second: np.ndarray | None, layout: ExpertWeights) -> tuple[np.ndarray, np.ndarray]:
    """(gate, up) along axis 1 of a gate/up tensor [E,2I,...] (or of gate and up given apart)."""
    if second is not None:
        return rows, second
    n = rows.shape[1]
    halves = lynx_op.gate_up(rows) if layout.interleaved else (rows[:, : n // 2], rows[:, n // 2 :])
    return halves if layout.gate_first else halves[::-1]


def _interleave(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    # ONNX Runtime's fused SwiGLU reads gate and up from alternating rows.
    return np.ascontiguousarray(np.stack((gate, up), axis=2).reshape(gate.shape[0], 2 * gate.shape[1], *gate.shape[2:]))


def canonical_fc1(gate_up: np.ndarray, layout: ExpertWeights, up: np.ndarray | None = None) -> np.ndarray:
    """fc1 [E,2I,H], gate/up rows interleaved, from stacked source gate/up weights."""
    if layout.gate_up_layout == "in_out":
        gate_up = gate_up.transpose(0, 2, 1)
        up = None if up is None else up.transpose(0, 2, 1)
    return _interleave(*_gate_and_up(gate_up, up, layout))


def canonical_fc1_bias(gate_up_bias: np.ndarray, layout: ExpertWeights, up_bias: np.ndarray | None = None) -> np.ndarray:
    """fc1's bias [E,2I], interleaved like fc1."""
    return _interleave(*_gate_and_up(gate_up_bias, up_bias, layout))


def canonical_fc2(down: np.ndarray, layout: ExpertWeights) -> np.ndarray:
    """fc2 [E,H,I] from stacked source down weights."""
    return np.ascontiguousarray(down.transpose(0, 2, 1) if layout.down_layout == "in_out" else down)


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
    return CanonicalWeights(
        canonical_fc1(gate_up, layout, up),
        canonical_fc2(down, layout),
        None if gate_up_bias is None else canonical_fc1_bias(gate_up_bias, layout, up_bias),
        None if down_bias is None else np.ascontiguousarray(down_bias),
    )


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
                          fresh: Callable[[str], str], float_type: ir.DataType | None) -> dict[int, ir.Value]:
        """Slot -> value of the canonical expert inputs (fc1, fc2, their biases and, for quantized
        experts, scales and zero points): the source's own when it is canonical already, else new
        initializers converted from it. Quantized scales take the hidden state's float type."""
        parts = {  # slot -> (gate/up rows, up rows given apart) or (down,), the rows' conversion
            lynx_op.Slot.FC1: (w.gate_up, w.up), lynx_op.Slot.FC1_BIAS: (w.gate_up_bias, w.up_bias),
            lynx_op.Slot.FC2: (w.down,), lynx_op.Slot.FC2_BIAS: (w.down_bias,),
        }
        if w.quantization is not None:
            parts.update({
                lynx_op.Slot.FC1_SCALES: (w.gate_up_scales, w.up_scales), lynx_op.Slot.FC2_SCALES: (w.down_scales,),
                lynx_op.Slot.FC1_ZERO_POINTS: (w.gate_up_zero_points, w.up_zero_points), lynx_op.Slot.FC2_ZERO_POINTS: (w.down_zero_points,),
            })
        canonical = _is_canonical(w)

        def stacked(names: Names | None) -> np.ndarray | None:
            if names is None:
                return None
            if isinstance(names, str):
                return lookup(names).const_value.numpy()
            return np.stack([lookup(n).const_value.numpy() for n in names])

        def stacked_shape(names: Names) -> list[int]:
            if isinstance(names, str):
                return list(lookup(names).const_value.shape)
            return [len(names), *lookup(names[0]).const_value.shape]

        def swapped(shape: list[int], swap: bool) -> list[int]:
            return [shape[0], shape[2], shape[1]] if swap else shape

        def doubled(shape: list[int], apart: bool) -> list[int]:
            return [shape[0], shape[1] * 2, *shape[2:]] if apart else shape

        scales = {lynx_op.Slot.FC1_SCALES, lynx_op.Slot.FC2_SCALES}

        def plan(slot: int, names: tuple[Names | None, ...]) -> tuple[Callable[[], list[int]], Callable[[], np.ndarray]]:
            """(canonical shape, conversion) of one slot's tensor."""
            first = names[0]
            if slot in (lynx_op.Slot.FC1, lynx_op.Slot.FC2):
                transpose = (w.gate_up_layout if slot == lynx_op.Slot.FC1 else w.down_layout) == "in_out"
            else:
                transpose = False  # biases are 1-D per expert; scales and zero points follow "out_in" rows
            if slot == lynx_op.Slot.FC2 or len(names) == 1:
                return (lambda: swapped(stacked_shape(first), transpose),
                        lambda: canonical_fc2(stacked(first), w) if slot == lynx_op.Slot.FC2 else np.ascontiguousarray(stacked(first)))
            second = names[1]
            if slot == lynx_op.Slot.FC1:
                return (lambda: doubled(swapped(stacked_shape(first), transpose), second is not None),
                        lambda: canonical_fc1(stacked(first), w, stacked(second)))
            return (lambda: doubled(stacked_shape(first), second is not None),
                    lambda: canonical_fc1_bias(stacked(first), w, stacked(second)))

        # Converted when the model is saved, one tensor at a time, so that a model's expert weights
        # are never held twice in memory.
        values: dict[int, ir.Value] = {}
        suffix = {lynx_op.Slot.FC1: "fc1", lynx_op.Slot.FC1_BIAS: "fc1_bias", lynx_op.Slot.FC2: "fc2", lynx_op.Slot.FC2_BIAS: "fc2_bias",
                  lynx_op.Slot.FC1_SCALES: "fc1_scales", lynx_op.Slot.FC2_SCALES: "fc2_scales",
                  lynx_op.Slot.FC1_ZERO_POINTS: "fc1_zero_points", lynx_op.Slot.FC2_ZERO_POINTS: "fc2_zero_points"}
        for slot, names in parts.items():
            if names[0] is None:
                continue
            dtype = lookup(names[0] if isinstance(names[0], str) else names[0][0]).const_value.dtype
            recast = slot in scales and float_type is not None and dtype != float_type
            if canonical and not recast:
                values[slot] = lookup(names[0])
                continue
            shape, convert = plan(slot, names)
            if recast:
                # QMoE may keep float16 scales beside float32 activations; MatMulNBits wants one type.
                dtype, convert = float_type, (lambda convert=convert, t=float_type.numpy(): convert().astype(t))
            lazy = ir.LazyTensor(lambda convert=convert: ir.tensor(convert()), dtype=dtype, shape=ir.Shape(shape()), name=fresh(suffix[slot]))
            values[slot] = tape.initializer(lazy, name=lazy.name)
        return values

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

        weights = self._canonical_values(block.weights, lookup, tape, fresh, lookup(block.hidden).dtype)
        seq_len = None
        if block.sequence_source is not None:
            shape = tape.op("Shape", [lookup(block.sequence_source)])
            index = tape.initializer(ir.tensor(np.array(1, dtype=np.int64)), name=fresh("seq_axis"))
            seq_len = tape.op("Gather", [shape, index], {"axis": 0})
        inputs: list[ir.Value | None] = [None] * len(lynx_op.Slot)
        inputs[lynx_op.Slot.HIDDEN] = lookup(block.hidden)
        inputs[lynx_op.Slot.ROUTER_LOGITS] = lookup(block.router_logits)
        for slot, value in weights.items():
            inputs[slot] = value
        inputs[lynx_op.Slot.SEQ_LEN] = seq_len
        while inputs and inputs[-1] is None:
            inputs.pop()
        result = tape.op(
            lynx_op.OP_TYPE,
            inputs,
            lynx_op.to_attributes(block.spec, self.policy, block.weights.quantization),
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
