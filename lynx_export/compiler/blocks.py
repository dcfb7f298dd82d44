"""What detection finds: a block's spec bound to its graph values and weights, or the reason it does not match."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lynx_export.op.spec import MoESpec, WeightQuantization

__all__ = ["Names", "ExpertWeights", "MoEBlock", "Candidate", "NoMatch", "UnsupportedActivation", "UnsupportedClamp"]


class NoMatch(Exception):
    """The candidate does not match; the message is the reason shown to users.

    Subclasses name failures a caller words differently from the rest:
      1. UnsupportedActivation: experts whose activation is not SwiGLU;
      2. UnsupportedClamp, a kind of 1: a SwiGLU whose clamps the op's single limit cannot express.
    """


class UnsupportedActivation(NoMatch):
    """The experts' activation is not SwiGLU."""


class UnsupportedClamp(UnsupportedActivation):
    """A clamped SwiGLU whose clamps ONNX Runtime's SwiGLU limit cannot express."""


Names = str | tuple[str, ...]  # one initializer stacked over experts [E,...], or one per expert


@dataclass(frozen=True)
class ExpertWeights:
    """Where a block's expert weights are in the source graph and how they are laid out.

    Each field names initializers: one stacked over the experts ([E,...], a str) or one per
    expert (a tuple of E names, stacked by the rewrite).
    `gate_up` holds gate and up projections ([2I,H] per expert), or only the gate when `up` is
    given (exports that keep them apart, e.g. ONNX Runtime's fc1/fc3 or per-expert Linear pairs).
    Layouts: "out_in" is [out,in] per expert (torch Linear order), "in_out" the transpose.
    `gate_first`: the gate half precedes the up half along 2I; with `interleaved`, rows
    alternate instead (gate_first then says which row of each pair is the gate).
    `down` is [H,I] per expert ("out_in") or [I,H] ("in_out"); the biases are [2I] (in the same
    order as gate_up's rows; with `up` given, [I] each as `gate_up_bias` and `up_bias`) and [H].
    """

    gate_up: Names
    gate_up_layout: str
    gate_first: bool
    down: Names
    down_layout: str
    up: Names | None = None
    interleaved: bool = False
    gate_up_bias: Names | None = None
    up_bias: Names | None = None
    down_bias: Names | None = None
    # Block-quantized experts (a QMoE source, or a rebuilt quantized LynxMoE node): `gate_up`, `up`
    # and `down` hold packed uint8 weights [N, K*bits/8] per expert, "out_in" only; their scales
    # [N, K/block_size] and optional packed zero points follow the weight's rows, with the same
    # gate/up arrangement.
    quantization: WeightQuantization | None = None
    gate_up_scales: Names | None = None
    up_scales: Names | None = None
    down_scales: Names | None = None
    gate_up_zero_points: Names | None = None
    up_zero_points: Names | None = None
    down_zero_points: Names | None = None


@dataclass(frozen=True)
class MoEBlock:
    """A detected block: its spec plus the values that bound it in the source graph."""

    name: str
    form: str  # which exporter form matched, e.g. "batched_mm"; keys the rewrite's counts
    spec: MoESpec
    weights: ExpertWeights
    hidden: str  # [T,H] value the experts read
    router_logits: str  # [T,E] value the model's router produces (stays in the graph)
    output: str  # [T,H] value the block's combine produces
    sequence_source: str | None  # [B,S,H] value `hidden` was flattened from, for phase gating


@dataclass(frozen=True)
class Candidate:
    """One router found in the graph and whether it forms a block the pass can rewrite."""

    name: str
    block: MoEBlock | None
    reason: str = ""

    @property
    def supported(self) -> bool:
        return self.block is not None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name}
        spec = self.block.spec.to_dict() if self.block else {}
        for key in ("num_experts", "top_k", "hidden_size", "expert_size", "activation", "router", "normalize",
                    "activation_alpha", "activation_beta", "swiglu_limit"):
            d[key] = spec.get(key)
        d["supported"] = self.supported
        d["reason"] = self.reason
        return d
