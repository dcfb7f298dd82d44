"""Replace every MoE block with one dense SwiGLU FFN of width E*I: the MoE's dense twin.

The dense FFN concatenates the experts: gate and up are [H, E*I], down is [E*I, H], so the twin
holds the same parameters as the MoE (the router aside) and reads all of them every step.
It is a benchmark baseline, not an approximation of the MoE's outputs.
"""

from __future__ import annotations

import os
import pathlib
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from lynx_export.op import contract as lynx_op
from lynx_export.compiler.detect import detect
from lynx_export.errors import DetectError, RewriteError
from lynx_export.compiler.graph_builder import GraphBuilder
from lynx_export.compiler.model_io import load_model, save_model
from lynx_export.compiler.rewrite import rewrite
from lynx_export.routing import OffPolicy

__all__ = ["DenseTwinPass", "DenseTwinResult", "dense_twin", "count_parameters"]


@dataclass(frozen=True)
class DenseTwinResult:
    path: pathlib.Path
    blocks: int
    moe_parameters: int  # every initializer element of the source model
    router_parameters: int  # the routers' weights, which the twin does not need
    dense_parameters: int  # every initializer element of the twin

    @property
    def relative_difference(self) -> float:
        """|dense - (moe - router)| / (moe - router)."""
        base = self.moe_parameters - self.router_parameters
        return abs(self.dense_parameters - base) / base


def count_parameters(model: ir.Model) -> int:
    return sum(int(np.prod(v.const_value.shape.numpy())) for v in model.graph.initializers.values() if v.const_value is not None)


def _router_parameters(model: ir.Model, node: ir.Node) -> int:
    """Weights of the linear router feeding `node` (weight and optional bias)."""
    producer = node.inputs[lynx_op.Slot.ROUTER_LOGITS].producer()
    if producer is None:
        return 0
    return sum(int(np.prod(v.const_value.shape.numpy())) for v in producer.inputs if v is not None and v.is_initializer() and v.const_value is not None)


class DenseTwinPass(ir.passes.InPlacePass):
    """Replace each LynxMoE node with hidden -> MatMul [H,2EI] -> SwiGLU -> MatMul [EI,H]."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        nodes = [n for n in graph if n.op_type == lynx_op.OP_TYPE and n.domain == lynx_op.DOMAIN]
        for node in nodes:
            self._replace(graph, node)
        if nodes:
            model.opset_imports.pop(lynx_op.DOMAIN, None)
            common_passes.RemoveUnusedNodesPass()(model)
        return ir.passes.PassResult(model, modified=bool(nodes))

    @staticmethod
    def _replace(graph: ir.Graph, node: ir.Node) -> None:
        for slot in (lynx_op.Slot.FC1_BIAS, lynx_op.Slot.FC2_BIAS):
            if len(node.inputs) > slot and node.inputs[slot] is not None:
                raise RewriteError(f"{node.name}: dense twin of experts with biases is not supported")
        gate, up = lynx_op.gate_up(node.inputs[lynx_op.Slot.FC1].const_value.numpy())  # [E,I,H] each
        fc2 = node.inputs[lynx_op.Slot.FC2].const_value.numpy()  # [E,H,I]
        e, size, h = gate.shape
        width = e * size
        w_in = np.ascontiguousarray(np.concatenate([gate.reshape(width, h), up.reshape(width, h)], axis=0).T)  # [H, 2EI]
        w_out = np.ascontiguousarray(fc2.transpose(0, 2, 1).reshape(width, h))  # [EI, H]

        b = GraphBuilder(node.name)
        w_in_v = b.tape.initializer(ir.tensor(w_in), name=f"{node.name}.dense_in")
        w_out_v = b.tape.initializer(ir.tensor(w_out), name=f"{node.name}.dense_out")
        b.replace(graph, node, b.swiglu_ffn(node.inputs[lynx_op.Slot.HIDDEN], w_in_v, w_out_v, width))


def dense_twin(model_path: str | pathlib.Path, out_path: str | pathlib.Path) -> DenseTwinResult:
    """Write the dense twin of `model_path` to `out_path` (written beside, then renamed)."""
    model_path, out_path = pathlib.Path(model_path), pathlib.Path(out_path)
    model = load_model(model_path)
    moe_parameters = count_parameters(model)
    blocks = detect(model).blocks
    if not blocks:
        raise DetectError(f"{model_path}: no supported MoE block found")
    rewrite(model, blocks, OffPolicy())
    router_parameters = sum(_router_parameters(model, n) for n in model.graph if n.op_type == lynx_op.OP_TYPE)
    DenseTwinPass()(model)
    dense_parameters = count_parameters(model)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_path.with_name(f".{out_path.name}.partial")
    try:
        written = save_model(model, partial)
        if len(written) > 1:
            raise RewriteError(f"{out_path}: dense twin over the single-file limit; external data is not supported here yet")
        os.replace(partial, out_path)
    finally:
        partial.unlink(missing_ok=True)
    return DenseTwinResult(out_path, len(blocks), moe_parameters, router_parameters, dense_parameters)
