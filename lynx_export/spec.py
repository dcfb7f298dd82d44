"""The canonical description of one MoE block (`MoESpec`) and where its tensors live in a graph."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from lynx_export.routing import GroupedRouting, RouterForm

__all__ = ["Activation", "MoESpec", "Names", "ExpertWeights", "MoEBlock", "Candidate"]


class Activation:
    """Expert activations the canonical form names (strings, so specs serialise as JSON)."""

    # silu(gate) * up in general form: gate * sigmoid(alpha * gate) * (up + beta), with gate <= limit
    # and |up| <= limit when a limit is set (gpt-oss: alpha 1.702, beta 1, limit 7). Plain SwiGLU is
    # alpha 1, beta 0, no limit; the parameters are MoESpec fields.
    SWIGLU = "swiglu"


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
    # SwiGLU parameters (see Activation.SWIGLU).
    activation_alpha: float = 1.0
    activation_beta: float = 0.0
    swiglu_limit: float | None = None
    # The sigmoid_grouped router's parameters (see routing.GroupedRouting); the defaults elsewhere.
    num_groups: int = 1
    topk_groups: int = 1
    routed_scaling: float = 1.0
    score_bias: tuple[float, ...] | None = None

    @property
    def plain_swiglu(self) -> bool:
        return self.activation_alpha == 1.0 and self.activation_beta == 0.0 and self.swiglu_limit is None

    @property
    def grouping(self) -> GroupedRouting | None:
        """The routing functions' `grouping` argument: set for sigmoid_grouped, None otherwise."""
        if self.router is not RouterForm.SIGMOID_GROUPED:
            return None
        return GroupedRouting(self.num_groups, self.topk_groups, self.routed_scaling, self.score_bias)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["router"] = self.router.value
        return d


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
        for key in ("num_experts", "top_k", "hidden_size", "expert_size", "activation", "router", "normalize", "shared_expert",
                    "activation_alpha", "activation_beta", "swiglu_limit"):
            d[key] = spec.get(key)
        d["supported"] = self.supported
        d["reason"] = self.reason
        return d
