"""Replace every MoE block with one dense SwiGLU FFN of width E*I: the MoE's dense twin.

The dense FFN concatenates the experts: gate and up are [H, E*I], down is [E*I, H], so the twin
holds the same parameters as the MoE (the router aside) and reads all of them every step.
It is a benchmark baseline, not an approximation of the MoE's outputs. With `quantize` its FFN
weights are block-quantized as the experts' are (`compiler.quantize`) and run by MatMulNBits
(`lowering.experts.projection`), so the twin compares with the MoE at the same precision.
"""

from __future__ import annotations

import pathlib
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from lynx_export.compiler.output import staged_files
from lynx_export.op import contract as lynx_op
from lynx_export.compiler.detect import detect
from lynx_export.errors import DetectError, RewriteError
from lynx_export.compiler.graph_builder import GraphBuilder
from lynx_export.compiler.lowering.experts import MS_DOMAIN, projection
from lynx_export.compiler.model_io import load_model, save_model
from lynx_export.compiler.quantize import QuantizeOptions, check_block_size
from lynx_export.compiler.rewrite import rewrite
from lynx_export.op.quantization import quantize_blockwise
from lynx_export.routing import OffPolicy

__all__ = ["DenseTwinPass", "DenseTwinResult", "dense_twin", "count_parameters"]


@dataclass(frozen=True)
class DenseTwinResult:
    path: pathlib.Path
    blocks: int
    moe_parameters: int  # every initializer element of the source model
    router_parameters: int  # the routers' weights, which the twin does not need
    dense_parameters: int  # every parameter of the twin (a quantized weight counts its unpacked elements)
    block_names: tuple[str, ...] = ()  # the replaced blocks; the dense FFNs' nodes and weights are named `<block>.`

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
    """Replace each LynxMoE node with hidden -> [H,2EI] -> SwiGLU -> [EI,H].

    1. Float (`quantize` None): two MatMuls on float weights `<block>.dense_in` [H,2EI] and
       `<block>.dense_out` [EI,H].
    2. Quantized: two MatMulNBits on the same weights block-quantized along their inputs
       (`<block>.dense_in` packed with `<block>.dense_in.scales`, the same for dense_out).
    """

    def __init__(self, quantize: QuantizeOptions | None = None) -> None:
        super().__init__()
        self.quantize = quantize
        self.replaced: list[str] = []
        self.parameters = 0  # unpacked elements of the dense FFN weights written
        self.stored_elements = 0  # elements of their initializers as stored (packed, scales)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        nodes = [n for n in graph if lynx_op.is_lynx_node(n)]
        self.replaced, self.parameters, self.stored_elements = [], 0, 0
        for node in nodes:
            self._replace(graph, node)
            self.replaced.append(node.name)
        if nodes:
            model.opset_imports.pop(lynx_op.DOMAIN, None)
            if self.quantize is not None:
                model.opset_imports.setdefault(MS_DOMAIN, 1)
            common_passes.RemoveUnusedNodesPass()(model)
        return ir.passes.PassResult(model, modified=bool(nodes))

    def _replace(self, graph: ir.Graph, node: ir.Node) -> None:
        for slot in (lynx_op.Slot.FC1_BIAS, lynx_op.Slot.FC2_BIAS):
            if len(node.inputs) > slot and node.inputs[slot] is not None:
                raise RewriteError(f"{node.name}: dense twin of experts with biases is not supported")
        attrs = lynx_op.from_node(node)
        if attrs.quantization is not None:
            raise RewriteError(f"{node.name}: dense twin of already-quantized experts is not supported")
        gate, up = lynx_op.gate_up(node.inputs[lynx_op.Slot.FC1].const_value.numpy())  # [E,I,H] each
        fc2 = node.inputs[lynx_op.Slot.FC2].const_value.numpy()  # [E,H,I]
        e, size, h = gate.shape
        width = e * size
        w_in = np.concatenate([gate.reshape(width, h), up.reshape(width, h)], axis=0)  # [2EI, H]: gate | up, torch Linear order
        w_out = fc2.transpose(1, 0, 2).reshape(h, width)  # [H, EI]
        self.parameters += w_in.size + w_out.size

        b = GraphBuilder(node.name)
        hidden = node.inputs[lynx_op.Slot.HIDDEN]
        if self.quantize is None:
            w_in_v = b.tape.initializer(ir.tensor(np.ascontiguousarray(w_in.T)), name=f"{node.name}.dense_in")  # [H, 2EI]
            w_out_v = b.tape.initializer(ir.tensor(np.ascontiguousarray(w_out.T)), name=f"{node.name}.dense_out")  # [EI, H]
            out = b.swiglu_ffn(hidden, w_in_v, w_out_v, width)
        else:
            check_block_size(attrs.spec, self.quantize.block_size, node.name)
            bits, block = self.quantize.quantization.bits, self.quantize.block_size
            names: list[str] = []
            proj = projection(b, hidden, quantize_blockwise(w_in, bits, block), f"{node.name}.dense_in", names)
            act = b.swiglu(proj, width)
            out = projection(b, act, quantize_blockwise(w_out, bits, block), f"{node.name}.dense_out", names)
        weights = [v for v in b.tape.initializers if v.name.startswith(f"{node.name}.dense_")]
        self.stored_elements += sum(int(np.prod(v.const_value.shape.numpy())) for v in weights)
        b.replace(graph, node, out)


def dense_twin(model_path: str | pathlib.Path, out_path: str | pathlib.Path, quantize: QuantizeOptions | None = None) -> DenseTwinResult:
    """Write the dense twin of `model_path` to `out_path`, its FFN weights block-quantized with
    `quantize` (None: float). Written in a folder beside, then renamed; weights over the
    single-file limit go to `<out_path>.data` beside it."""
    model_path, out_path = pathlib.Path(model_path), pathlib.Path(out_path)
    model = load_model(model_path)
    moe_parameters = count_parameters(model)
    blocks = detect(model).blocks
    if not blocks:
        raise DetectError(f"{model_path}: no supported MoE block found")
    rewrite(model, blocks, OffPolicy())
    router_parameters = sum(_router_parameters(model, n) for n in model.graph if lynx_op.is_lynx_node(n))
    twin = DenseTwinPass(quantize)
    twin(model)
    dense_parameters = count_parameters(model) - twin.stored_elements + twin.parameters
    # Written under their final names (the model names its data file), the model last.
    with staged_files(out_path.parent, last=out_path.name) as staging:
        written = save_model(model, staging / out_path.name)
    if len(written) == 1:  # a stale data file of an earlier, larger twin would mislead
        (out_path.parent / f"{out_path.name}.data").unlink(missing_ok=True)
    return DenseTwinResult(out_path, len(blocks), moe_parameters, router_parameters, dense_parameters, tuple(twin.replaced))
