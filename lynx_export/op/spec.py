"""What one MoE block computes (`MoESpec`), independent of how an exporter spelled it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from lynx_export.routing import GroupedRouting, Router, RouterForm
from lynx_export.errors import ContractError

__all__ = ["Activation", "MoESpec", "WeightQuantization", "WEIGHT_BITS"]


class Activation:
    """Expert activations the canonical form names (strings, so specs serialise as JSON)."""

    # silu(gate) * up in general form: gate * sigmoid(alpha * gate) * (up + beta), with gate <= limit
    # and |up| <= limit when a limit is set (gpt-oss: alpha 1.702, beta 1, limit 7). Plain SwiGLU is
    # alpha 1, beta 0, no limit; the parameters are MoESpec fields.
    SWIGLU = "swiglu"


# Weight widths of quantized experts, as ONNX Runtime's MatMulNBits and QMoE pack them.
WEIGHT_BITS = (4, 8)


@dataclass(frozen=True)
class WeightQuantization:
    """Block-wise, weight-only quantization of a block's expert weights (fc1 and fc2).

    Each run of `block_size` consecutive weights along the input dimension K (H for fc1, I for
    fc2) shares one scale and one zero point: weight = (q - zero_point) * scale. `bits` 4 packs
    two values per byte, low nibble first (MatMulNBits' layout); 8 stores one per byte.
    """

    bits: int
    block_size: int

    def __post_init__(self) -> None:
        # A ValueError, as the contract's other attribute checks raise (rewritten.match catches them).
        if self.bits not in WEIGHT_BITS:
            raise ContractError(f"weight_bits must be one of {', '.join(map(str, WEIGHT_BITS))}, got {self.bits!r}")
        size = self.block_size
        if not (isinstance(size, int) and size >= 16 and size & (size - 1) == 0):
            raise ContractError(f"block_size must be a power of two >= 16 (as MatMulNBits needs), got {size!r}")


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

    @property
    def routing(self) -> Router:
        """The block's router, for the routing oracle."""
        return Router(self.top_k, self.router, self.normalize, self.grouping)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["router"] = self.router.value
        return d
