"""Graphs lynx-export has rewritten already: each `LynxMoE` node is a block again.

A second build then replaces every node with one carrying the new policy (its canonical weights,
quantized ones with their scales and zero points, pass through unchanged) instead of rewriting twice, so `build model.lynx.onnx` works like
`build model.onnx`.
"""

from __future__ import annotations

import onnx_ir as ir

from lynx_export.op import contract as lynx_op
from lynx_export.compiler.forms.match import Match, is_weight
from lynx_export.compiler.blocks import NoMatch
from lynx_export.compiler.blocks import ExpertWeights, MoEBlock

FORM = "lynx_moe"


def claims(node: ir.Node) -> bool:
    return lynx_op.is_lynx_node(node)


def _input(node: ir.Node, slot: lynx_op.Slot) -> ir.Value | None:
    return node.inputs[slot] if len(node.inputs) > slot else None


def _sequence_source(seq_len: ir.Value | None) -> str | None:
    """The [B,S,H] value behind the phase input the rewrite writes: Gather(Shape(x), 1)."""
    gather = seq_len.producer() if seq_len is not None else None
    shape = gather.inputs[0].producer() if gather is not None and gather.op_type == "Gather" and gather.inputs[0] is not None else None
    if shape is None or shape.op_type != "Shape" or shape.inputs[0] is None:
        return None
    return shape.inputs[0].name


def match(node: ir.Node) -> Match:
    try:
        attrs = lynx_op.from_node(node)
    except (KeyError, ValueError, TypeError) as exc:
        raise NoMatch(f"malformed LynxMoE attributes ({exc})") from None
    slots = [lynx_op.Slot.FC1, lynx_op.Slot.FC1_BIAS, lynx_op.Slot.FC2, lynx_op.Slot.FC2_BIAS]
    if attrs.quantization is not None:
        slots += [lynx_op.Slot.FC1_SCALES, lynx_op.Slot.FC2_SCALES, lynx_op.Slot.FC1_ZERO_POINTS, lynx_op.Slot.FC2_ZERO_POINTS]
    weights = {slot: _input(node, slot) for slot in slots}
    if any(v is not None and not is_weight(v) for v in weights.values()) or weights[lynx_op.Slot.FC1] is None or weights[lynx_op.Slot.FC2] is None:
        raise NoMatch("LynxMoE expert weights are not constant initializers")
    seq_len = _input(node, lynx_op.Slot.SEQ_LEN)
    source = _sequence_source(seq_len)
    if seq_len is not None and source is None:
        raise NoMatch("LynxMoE seq_len is not the sequence length of a [B,S,H] value")
    if _input(node, lynx_op.Slot.NUM_VALID) is not None:
        raise NoMatch("LynxMoE num_valid input: a rebuild would not carry it over")
    if attrs.quantization is not None and (weights[lynx_op.Slot.FC1_SCALES] is None or weights[lynx_op.Slot.FC2_SCALES] is None):
        raise NoMatch("quantized LynxMoE node without fc1_scales and fc2_scales")
    name_of = {slot: None if v is None else v.name for slot, v in weights.items()}
    name_of.update({s: name_of.get(s) for s in lynx_op.Slot})
    block = MoEBlock(
        name=node.name or "",
        form=FORM,
        spec=attrs.spec,
        weights=ExpertWeights(name_of[lynx_op.Slot.FC1], "out_in", True, name_of[lynx_op.Slot.FC2], "out_in", interleaved=True,
                              gate_up_bias=name_of[lynx_op.Slot.FC1_BIAS], down_bias=name_of[lynx_op.Slot.FC2_BIAS],
                              quantization=attrs.quantization, gate_up_scales=name_of[lynx_op.Slot.FC1_SCALES],
                              down_scales=name_of[lynx_op.Slot.FC2_SCALES], gate_up_zero_points=name_of[lynx_op.Slot.FC1_ZERO_POINTS],
                              down_zero_points=name_of[lynx_op.Slot.FC2_ZERO_POINTS]),
        hidden=node.inputs[lynx_op.Slot.HIDDEN].name,
        router_logits=node.inputs[lynx_op.Slot.ROUTER_LOGITS].name,
        output=node.outputs[0].name,
        sequence_source=source,
    )
    return Match(block, (node,))
