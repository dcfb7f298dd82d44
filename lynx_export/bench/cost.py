"""The cost model of a decode step: bytes read and FLOPs, from the model file and the step's feeds,
and the roofline bound max(bytes / read bandwidth, FLOPs / the peak of the kernel that runs them)."""

from __future__ import annotations

import pathlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from lynx_export.bench.machine import MachineRates
from lynx_export.compiler.lowering.ort import LoweredBlock

__all__ = ["StepCost", "Bound", "step_cost", "kv_cost", "bound"]

FLOAT_MATMULS = ("MatMul", "Gemm")
NBITS = "MatMulNBits"


@dataclass(frozen=True)
class StepCost:
    """What one decode step reads and computes, from the model's own initializers.

    Multiply-adds are counted by the kernel that runs them: float MatMul/Gemm, or MatMulNBits with
    `nbits`-wide weights (the experts when `expert_bits` < 32, the quantized dense twin's FFN).
    "Block" parts are the weights only the MoE layers' own nodes read (the lowering and the dense
    twin name them `<block>.n<N>`): the selection's constants, or the dense FFN that replaces the
    experts; the router, which the model's own nodes compute, is not among them.
    """

    fixed_bytes: int  # weights read every step whatever the routing (attention, norms, router, head, dense FFN)
    table_row_bytes: int  # bytes per looked-up row of gathered tables (embeddings)
    expert_bytes: int  # bytes of one expert (fc1 + fc2 slices, packed weights and scales when quantized) of one layer
    fixed_macs_per_token: int  # multiply-adds per token in fixed-weight float matmuls
    expert_macs_per_token: int  # multiply-adds per token in one layer's experts (K experts each)
    layers: int
    fixed_nbits_macs_per_token: int = 0  # multiply-adds per token in fixed-weight MatMulNBits
    nbits: int = 32  # weight width of the model's MatMulNBits (32: there are none)
    expert_bits: int = 32  # weight width of the experts (32: float, run by float kernels)
    block_bytes: int = 0  # of fixed_bytes: in the MoE layers' own nodes
    block_macs_per_token: int = 0  # of fixed_macs_per_token: in the MoE layers' own nodes
    block_nbits_macs_per_token: int = 0  # of fixed_nbits_macs_per_token: in the MoE layers' own nodes
    table_bytes: int = 0  # all rows of the gathered tables

    def weight_bytes(self, batch: int, active_per_layer: float) -> float:
        return self.fixed_bytes + batch * self.table_row_bytes + self.layers * active_per_layer * self.expert_bytes

    def flops(self, batch: int, attention_flops: float) -> float:
        macs = self.fixed_macs_per_token + self.fixed_nbits_macs_per_token + self.layers * self.expert_macs_per_token
        return 2.0 * batch * macs + attention_flops

    def compute_s(self, batch: int, attention_flops: float, rates: MachineRates) -> float:
        """Seconds of FLOPs, each kernel's at its own peak (attention runs float kernels)."""
        return attention_flops / rates.peak(32) + self._macs_s(batch, rates, self.fixed_macs_per_token, self.fixed_nbits_macs_per_token)

    def moe_weight_bytes(self, active_per_layer: float) -> float:
        """Bytes the MoE layers' own nodes read: the active experts and the block's constants."""
        return self.block_bytes + self.layers * active_per_layer * self.expert_bytes

    def moe_compute_s(self, batch: int, rates: MachineRates) -> float:
        return self._macs_s(batch, rates, self.block_macs_per_token, self.block_nbits_macs_per_token)

    def _macs_s(self, batch: int, rates: MachineRates, float_macs: int, nbits_macs: int) -> float:
        """Seconds of `batch` tokens' fixed float and MatMulNBits multiply-adds plus the experts'."""
        seconds = 2.0 * batch * (float_macs / rates.peak(32) + self.layers * self.expert_macs_per_token / rates.peak(self.expert_bits))
        return seconds + (2.0 * batch * nbits_macs / rates.peak(self.nbits) if nbits_macs else 0.0)


@dataclass(frozen=True)
class Bound:
    """A step's roofline bound, and that of its MoE layers alone (seconds)."""

    memory_s: float
    compute_s: float
    moe_memory_s: float
    moe_compute_s: float

    @property
    def step_s(self) -> float:
        return max(self.memory_s, self.compute_s)

    @property
    def kind(self) -> str:
        return "memory" if self.memory_s >= self.compute_s else "compute"

    @property
    def moe_s(self) -> float:
        return max(self.moe_memory_s, self.moe_compute_s)

    @property
    def moe_kind(self) -> str:
        return "memory" if self.moe_memory_s >= self.moe_compute_s else "compute"


def bound(cost: StepCost, batch: int, active_per_layer: float, kv_bytes: float, attention_flops: float, rates: MachineRates) -> Bound:
    return Bound(
        (cost.weight_bytes(batch, active_per_layer) + kv_bytes) / rates.read_bandwidth,
        cost.compute_s(batch, attention_flops, rates),
        cost.moe_weight_bytes(active_per_layer) / rates.read_bandwidth,
        cost.moe_compute_s(batch, rates),
    )


def _elements(value: ir.Value) -> int:
    return int(np.prod(value.const_value.shape.numpy()))


def _macs(value: ir.Value) -> tuple[int, int, int]:
    """(float multiply-adds per token, MatMulNBits multiply-adds per token, MatMulNBits bits) of a
    weight initializer, by the nodes that use it as their weight."""
    for node, index in value.uses():
        if node.op_type in FLOAT_MATMULS and len(value.shape) == 2:
            return _elements(value), 0, 32
        if node.op_type == NBITS and index == 1:
            attrs = node.attributes
            return 0, attrs["K"].as_int() * attrs["N"].as_int(), attrs["bits"].as_int()
    return 0, 0, 32


def step_cost(path: pathlib.Path, blocks: Sequence[LoweredBlock] = (), block_names: Sequence[str] = ()) -> StepCost:
    """The cost model of a model file; `blocks` say which initializers hold expert weights and
    `block_names` (default: the blocks' names) which nodes are the MoE layers' own."""
    model = ir.load(path)
    inits = model.graph.initializers
    moe_weights = {name for b in blocks for name in b.expert_weights}
    prefixes = tuple(f"{name}." for name in (block_names or [b.name for b in blocks]))
    expert_bytes = expert_macs = 0
    expert_bits = nbits = 32
    if blocks:
        per_layer = sum(inits[name].const_value.nbytes for name in moe_weights) // len(blocks)
        spec = blocks[0].spec
        expert_bytes = per_layer // spec.num_experts
        expert_macs = spec.top_k * 3 * spec.hidden_size * spec.expert_size  # SwiGLU: fc1 [2I,H], fc2 [H,I]
        widths = {_macs(inits[name])[2] for name in moe_weights} - {32}  # MatMulNBits widths of quantized experts
        if widths:
            expert_bits = nbits = widths.pop()
    fixed_bytes = table_row_bytes = table_bytes = fixed_macs = fixed_nbits_macs = 0
    block_bytes = block_macs = block_nbits_macs = 0
    for value in inits.values():
        if value.name in moe_weights or value.const_value is None:
            continue
        nbytes = value.const_value.nbytes
        uses = [n for n, _ in value.uses()]
        if uses and all(n.op_type == "Gather" and n.inputs[0] is value for n in uses) and len(value.shape) == 2:
            table_row_bytes += nbytes // value.shape[0]
            table_bytes += nbytes
            continue
        float_macs, nbits_macs, bits = _macs(value)
        if bits != 32:
            nbits = bits
        fixed_bytes += nbytes
        fixed_macs += float_macs
        fixed_nbits_macs += nbits_macs
        if uses and all((n.name or "").startswith(prefixes) for n in uses):  # read only by the MoE layers' own nodes
            block_bytes += nbytes
            block_macs += float_macs
            block_nbits_macs += nbits_macs
    return StepCost(fixed_bytes, table_row_bytes, expert_bytes, fixed_macs, expert_macs, len(blocks), fixed_nbits_macs, nbits, expert_bits,
                    block_bytes, block_macs, block_nbits_macs, table_bytes)


def kv_cost(feeds: Mapping[str, np.ndarray], first_input: str) -> tuple[int, int]:
    """(bytes, elements) of the step's KV cache: every float feed but the first input (token ids,
    or the hidden rows of a bare MoE stack)."""
    kv = [a for name, a in feeds.items() if name != first_input and np.issubdtype(a.dtype, np.floating)]
    return sum(a.nbytes for a in kv), sum(a.size for a in kv)
