"""Lower `LynxMoE` nodes for ONNX Runtime: standard-op expert selection, then an expert implementation.

The selection subgraph (`selection`) computes, per batch, the experts the policy allows and
masks the router logits to -inf elsewhere; the experts (`experts`: one MatMul chain per expert,
ONNX Runtime's MoE kernel, or one If per expert) then route on the masked logits, and an expert
no token picked reads no weights, so fewer active experts means fewer weight reads. The subgraph
mirrors `lynx_export.routing` op for op (same fp32 arithmetic, same top-k tie order).

ONNX Runtime's MoE kernel routes only softmax routers itself. For `sigmoid_grouped` (DeepSeek-V3) the graph
routes: it computes each token's ids and weights w (`_grouped_routing`), hands the kernel
router_probs = log(w) at the picked experts and -inf elsewhere, whose softmax is w / sum(w), and
scales the kernel's output by sum(w) per token. The policy votes on the router's selection
scores (`routing.selection_scores`), and the mask goes on the logits as for the other routers.
ONNX Runtime's Sigmoid is an approximation (within a few ulp), not the oracle's correctly
rounded one: ids agree except for choice values that tie within that error.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from lynx_export.compiler.graph_builder import GraphBuilder
from lynx_export.compiler.lowering import DEFAULT_EXPERTS, QUANTIZED_IMPLEMENTATIONS
from lynx_export.compiler.lowering.experts import EXPERT_IMPLS, MS_DOMAIN
from lynx_export.compiler.lowering.selection import routed_logits
from lynx_export.compiler.quantize import DequantizeExpertsPass
from lynx_export.errors import LoweringError
from lynx_export.op import contract as lynx_op
from lynx_export.op.spec import MoESpec
from lynx_export.routing import OffPolicy

__all__ = ["LoweredBlock", "LoweredModel", "LowerLynxMoEPass", "lower", "lower_reference", "MIN_OPSET", "EXPERT_IMPLS"]

MIN_OPSET = 18  # the selection subgraph passes ReduceMax axes as an input


@dataclass(frozen=True)
class LoweredBlock:
    """Where a lowered block's routing can be observed (for verification)."""

    name: str
    spec: MoESpec
    router_logits: str  # the model's router output [T,E]
    routed_logits: str  # what the experts are routed on: masked in decode steps [T,E]
    expert_weights: tuple[str, ...]  # initializers holding all E experts' weights (E equal shares)


@dataclass(frozen=True)
class LoweredModel:
    model: ir.Model
    blocks: tuple[LoweredBlock, ...]


class LowerLynxMoEPass(ir.passes.InPlacePass):
    """Replace every LynxMoE node with its selection subgraph and an expert implementation.

    1. `fused`: ONNX Runtime's `com.microsoft.MoE` kernel.
    2. `per-expert`: one MatMul (float) or MatMulNBits (quantized) chain per expert over exactly
       its rows, gathered once in expert order and split; an expert without rows reads nothing
       (the default).
    """

    def __init__(self, experts: str = DEFAULT_EXPERTS) -> None:
        super().__init__()
        if experts not in EXPERT_IMPLS:
            raise LoweringError(f"unknown expert implementation '{experts}' (choose from {', '.join(EXPERT_IMPLS)})")
        self.experts = experts
        self.lowered: list[LoweredBlock] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.lowered = []
        graph = model.graph
        nodes = [n for n in graph if lynx_op.is_lynx_node(n)]
        if nodes and model.opset_imports.get("", 0) < MIN_OPSET:
            raise LoweringError(f"the ONNX Runtime lowering needs opset {MIN_OPSET} or newer (the model has {model.opset_imports.get('', 0)})")
        for node in nodes:
            self.lowered.append(self._lower(graph, node))
        if self.lowered:
            model.opset_imports.setdefault(MS_DOMAIN, 1)  # com.microsoft.MoE, MatMulNBits
            model.opset_imports.pop(lynx_op.DOMAIN, None)
            common_passes.RemoveUnusedNodesPass()(model)
        return ir.passes.PassResult(model, modified=bool(self.lowered))

    def _lower(self, graph: ir.Graph, node: ir.Node) -> LoweredBlock:
        try:
            attrs = lynx_op.from_node(node)
        except (KeyError, ValueError) as exc:
            raise LoweringError(f"{node.name}: malformed LynxMoE attributes ({exc})") from None
        if attrs.quantization is not None and self.experts not in QUANTIZED_IMPLEMENTATIONS:
            raise LoweringError(f"{node.name}: --ort-experts {self.experts} runs float experts only; quantized experts run "
                                f"{' or '.join(QUANTIZED_IMPLEMENTATIONS)}")
        b = GraphBuilder(node.name)
        routed = routed_logits(b, node, attrs.spec, attrs.policy)
        router_logits = node.inputs[lynx_op.Slot.ROUTER_LOGITS]
        if routed is not router_logits:
            routed.name = f"{node.name}.routed_logits"
        out, expert_weights = EXPERT_IMPLS[self.experts](b, node, attrs.spec, routed)
        b.replace(graph, node, out)
        return LoweredBlock(node.name, attrs.spec, router_logits.name, routed.name, expert_weights)


def lower(model: ir.Model, experts: str = DEFAULT_EXPERTS) -> LoweredModel:
    """Lower `model` (canonical form) in place for ONNX Runtime."""
    lowering = LowerLynxMoEPass(experts)
    lowering(model)
    return LoweredModel(model, tuple(lowering.lowered))


def lower_reference(model: ir.Model) -> LoweredModel:
    """Lower `model` (canonical form) in place as the reference a build of it is verified against:
    every block with its policy off (the model's own routing) and its quantized experts replaced
    by their dequantized values, run by the fused kernel, code apart from the per-expert chains
    the builds ship."""
    DequantizeExpertsPass()(model)
    for node in model.graph:
        if lynx_op.is_lynx_node(node):
            lynx_op.write_attributes(node, lynx_op.from_node(node).spec, OffPolicy())
    return lower(model, "fused")
