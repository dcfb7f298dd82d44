"""Quantize the expert weights of every LynxMoE node, weight-only and block-wise (`--quantize`).

Only the experts change: fc1 [E,2I,H] and fc2 [E,H,I] become packed uint8 tensors with one
scale per block of `block_size` inputs (`op.quantization`), the node records `weight_bits` and
`block_size`; attention, router, head and biases stay as they are. `DequantizeExpertsPass` is
the inverse used for verification: the same node with each expert weight replaced by its
dequantized value, which is what the quantized kernels must reproduce.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from lynx_export.errors import RewriteError
from lynx_export.op import contract as lynx_op
from lynx_export.op.quantization import QuantizedWeight, quantize_blockwise
from lynx_export.op.spec import MoESpec, WeightQuantization

__all__ = ["PRECISIONS", "DEFAULT_BLOCK_SIZE", "QuantizeOptions", "QuantizeExpertsPass", "DequantizeExpertsPass", "check_block_size"]

PRECISIONS = {"int4": 4, "int8": 8}
# Measured (docs/BENCHMARKS.md, "Cost per active and per inactive expert", Block size): 32, 64
# and 128 run at the same MatMulNBits speed on these CPUs; 32 loses least (int4 weight error and
# int8-activation kernel error on the trained model).
DEFAULT_BLOCK_SIZE = 32

_WEIGHT_SLOTS = ((lynx_op.Slot.FC1, lynx_op.Slot.FC1_SCALES), (lynx_op.Slot.FC2, lynx_op.Slot.FC2_SCALES))


@dataclass(frozen=True)
class QuantizeOptions:
    precision: str  # "int4" or "int8"
    block_size: int = DEFAULT_BLOCK_SIZE

    @property
    def quantization(self) -> WeightQuantization:
        return WeightQuantization(bits=PRECISIONS[self.precision], block_size=self.block_size)


def check_block_size(spec: MoESpec, block_size: int, where: str) -> None:
    """One-line RewriteError unless `block_size` divides both of the block's input dimensions."""
    for what, k in (("hidden size H", spec.hidden_size), ("expert width I", spec.expert_size)):
        if k % block_size:
            raise RewriteError(f"{where}: --block-size {block_size} does not divide the {what} = {k}; choose a power of two that divides "
                               f"both H = {spec.hidden_size} and I = {spec.expert_size}")


def _lynx_nodes(model: ir.Model) -> list[ir.Node]:
    return [n for n in model.graph if lynx_op.is_lynx_node(n)]


def _set_input(node: ir.Node, slot: int, value: ir.Value | None) -> None:
    if value is None and len(node.inputs) <= slot:
        return
    if len(node.inputs) <= slot:
        node.resize_inputs(slot + 1)
    node.replace_input_with(slot, value)


def _register(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, const_value=ir.tensor(np.ascontiguousarray(array), name=name))
    graph.register_initializer(value)
    return value


def _drop_if_unused(graph: ir.Graph, value: ir.Value | None) -> None:
    if value is not None and not list(value.uses()) and not value.is_graph_output() and value.name in graph.initializers:
        del graph.initializers[value.name]


class QuantizeExpertsPass(ir.passes.InPlacePass):
    """Quantize every float LynxMoE node's fc1 and fc2 (one node's weights converted at a time)."""

    def __init__(self, options: QuantizeOptions) -> None:
        super().__init__()
        self.options = options
        # Node name -> relative RMS error of its dequantized expert weights (fc1 and fc2 together):
        # sqrt(sum (w' - w)^2 / sum w^2), the weights' own loss, before any kernel runs them.
        self.weight_errors: dict[str, float] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        nodes = [n for n in _lynx_nodes(model) if lynx_op.from_node(n).quantization is None]
        quantization = self.options.quantization
        for node in nodes:
            attrs = lynx_op.from_node(node)
            check_block_size(attrs.spec, quantization.block_size, node.name)
            squared_error = squared_norm = 0.0
            for slot, scale_slot in _WEIGHT_SLOTS:
                old = node.inputs[slot]
                weight = old.const_value.numpy()
                q = quantize_blockwise(weight, quantization.bits, quantization.block_size)
                delta = q.dequantize(weight.shape[-1]).astype(np.float64) - weight
                squared_error += float(np.sum(delta * delta))
                squared_norm += float(np.sum(np.square(weight, dtype=np.float64)))
                _set_input(node, slot, _register(graph, f"{old.name}.q{quantization.bits}", q.q))
                _set_input(node, scale_slot, _register(graph, f"{old.name}.scales", q.scales))
                _drop_if_unused(graph, old)
            lynx_op.write_attributes(node, attrs.spec, attrs.policy, quantization)
            self.weight_errors[node.name] = float(np.sqrt(squared_error / squared_norm)) if squared_norm else 0.0
        return ir.passes.PassResult(model, modified=bool(nodes))


class DequantizeExpertsPass(ir.passes.InPlacePass):
    """Replace every quantized LynxMoE node's weights by their dequantized float values."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        nodes = [n for n in _lynx_nodes(model) if lynx_op.from_node(n).quantization is not None]
        for node in nodes:
            attrs = lynx_op.from_node(node)
            quantization = attrs.quantization
            dtype = node.inputs[lynx_op.Slot.HIDDEN].dtype
            for (slot, scale_slot), zero_slot, k in zip(_WEIGHT_SLOTS, (lynx_op.Slot.FC1_ZERO_POINTS, lynx_op.Slot.FC2_ZERO_POINTS),
                                                        (attrs.spec.hidden_size, attrs.spec.expert_size)):
                q, scales = node.inputs[slot], node.inputs[scale_slot]
                zero = node.inputs[zero_slot] if len(node.inputs) > zero_slot else None
                weight = QuantizedWeight(q.const_value.numpy(), scales.const_value.numpy(), quantization.bits, quantization.block_size,
                                         None if zero is None else zero.const_value.numpy())
                dense = weight.dequantize(k).astype(dtype.numpy() if dtype is not None else np.float32)
                _set_input(node, slot, _register(graph, f"{q.name}.dequantized", dense))
                for old_slot in (scale_slot, zero_slot):
                    _set_input(node, old_slot, None)
                for old in (q, scales, zero):
                    _drop_if_unused(graph, old)
            while node.inputs and node.inputs[-1] is None:
                node.resize_inputs(len(node.inputs) - 1)
            for name in ("weight_bits", "block_size"):
                node.attributes.pop(name, None)
        return ir.passes.PassResult(model, modified=bool(nodes))


