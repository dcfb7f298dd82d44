"""The canonical description of one MoE block (`MoESpec`) and where its tensors live in a graph."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from lynx_export.routing import RouterForm

__all__ = ["Activation", "MoESpec", "ExpertWeights", "MoEBlock", "Candidate"]


class Activation:
    """Expert activations the canonical form names (strings, so specs serialise as JSON)."""

    SWIGLU = "swiglu"  # silu(gate) * up


@dataclass(frozen=True)
class MoESpec:
    """What an MoE block computes, independent of how an exporter spelled it.

    E experts, top-K routing over router logits [T,E], each expert an FFN H -> I -> H.
    """

    num_experts: int
    top_k: int
    hidden_size: int
    expert_size: int
    activation: str
    router: RouterForm
    normalize: bool
    shared_expert: bool = False

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["router"] = self.router.value
        return d


@dataclass(frozen=True)
class ExpertWeights:
    """How to read the stacked expert weights out of the source graph.

    `gate_up` names an initializer holding gate and up projections of every expert;
    `gate_up_layout` is "out_in" for [E,2I,H] (torch Linear order) or "in_out" for [E,H,2I];
    `gate_first` says whether the gate half precedes the up half along the 2I axis.
    `down` names [E,H,I] ("out_in") or [E,I,H] ("in_out").
    """

    gate_up: str
    gate_up_layout: str
    gate_first: bool
    down: str
    down_layout: str


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
        for key in ("num_experts", "top_k", "hidden_size", "expert_size", "activation", "router", "normalize", "shared_expert"):
            d[key] = spec.get(key)
        d["supported"] = self.supported
        d["reason"] = self.reason
        return d
