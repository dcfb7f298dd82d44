"""Benchmark models: the demo architecture at the shapes of real MoEs, layers scaled to the machine's cache.

A preset fixes one decoder layer's shape (H, heads, E experts of width I, top-K). Its layer
count is the smallest that puts more than `CACHE_MULTIPLE` x the machine's last-level cache of
fp32 expert weights in the model (and at least the preset's own minimum), so every decode step
streams its experts from memory. The byte estimates here are what `run_bench` checks against
the memory available before it builds anything.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

from lynx_export.evaluation.demo import DemoConfig

__all__ = ["Preset", "PRESETS", "DEFAULT_PRESET", "CACHE_MULTIPLE", "PRECISION_BITS", "scaled_model", "expert_bytes",
           "weight_bytes", "expert_fraction"]

CACHE_MULTIPLE = 4  # fp32 expert weights exceed this many last-level caches
PRECISION_BITS = {"fp32": 32, "int8": 8, "int4": 4}
SCALE_BYTES = 4  # one fp32 scale per quantization block (compiler.quantize keeps the weight's float type)


@dataclass(frozen=True)
class Preset:
    name: str
    layer: DemoConfig  # the layer shape; its num_layers is the fewest layers the preset runs
    quick: DemoConfig  # --quick: a tiny model with the same E and K (a smoke test, not a measurement)
    about: str


PRESETS: Mapping[str, Preset] = {
    p.name: p
    for p in (
        # Today's benchmark model; at least its 4 layers, so its runs stay comparable.
        Preset("demo", DemoConfig(vocab_size=256, hidden_size=1024, num_layers=4, num_heads=16, num_experts=8, top_k=2, expert_size=2048),
               DemoConfig(), "the demo architecture at benchmark size: E8 K2 H1024 I2048, 16 heads, at least 4 layers"),
        Preset("mixtral", DemoConfig(vocab_size=256, hidden_size=1024, num_layers=2, num_heads=16, num_experts=8, top_k=2, expert_size=3584),
               DemoConfig(hidden_size=64, num_heads=4, num_experts=8, top_k=2, expert_size=224),
               "Mixtral-like: E8 K2 H1024 I3584 (I/H 3.5), 16 heads"),
        Preset("fine", DemoConfig(vocab_size=256, hidden_size=1024, num_layers=2, num_heads=16, num_experts=64, top_k=8, expert_size=384),
               DemoConfig(hidden_size=64, num_heads=4, num_experts=64, top_k=8, expert_size=32),
               "fine-grained, Qwen3/OLMoE-like: E64 K8 H1024 I384, 16 heads"),
    )
}
DEFAULT_PRESET = "demo"


def _matrix_bytes(n: int, k: int, bits: int, block_size: int) -> int:
    """A weight [N,K]: fp32, or packed `bits`-bit values plus one fp32 scale per block of K."""
    if bits == 32:
        return 4 * n * k
    return n * k * bits // 8 + n * (k // block_size) * SCALE_BYTES


def expert_bytes(model: DemoConfig, precision: str = "fp32", block_size: int = 32) -> int:
    """Bytes of every expert of every layer (fc1 [2I,H] and fc2 [H,I] each)."""
    bits = PRECISION_BITS[precision]
    h, i = model.hidden_size, model.expert_size
    one = _matrix_bytes(2 * i, h, bits, block_size) + _matrix_bytes(h, i, bits, block_size)
    return model.num_layers * model.num_experts * one


def weight_bytes(model: DemoConfig, precision: str = "fp32", block_size: int = 32, dense: bool = False) -> int:
    """All weights of the model with its experts at `precision` (attention, norms, router, embedding
    and head stay fp32); `dense`: its dense twin, which drops the routers."""
    h = model.hidden_size
    router = 0 if dense else h * model.num_experts + model.num_experts
    per_layer = 4 * h * h + 2 * h + router  # qkv + o_proj, two norms
    rest = 2 * model.vocab_size * h + h  # embedding, head, final norm
    return 4 * (model.num_layers * per_layer + rest) + expert_bytes(model, precision, block_size)


def expert_fraction(model: DemoConfig) -> float:
    """Share of the fp32 weights that are expert weights."""
    return expert_bytes(model) / weight_bytes(model)


def scaled_model(preset: Preset, llc_bytes: int, layers: int | None = None) -> DemoConfig:
    """The preset's layer shape with `layers`, or with the fewest layers (at least the preset's own
    minimum) whose fp32 expert weights exceed CACHE_MULTIPLE x `llc_bytes`."""
    if layers is None:
        per_layer = expert_bytes(dataclasses.replace(preset.layer, num_layers=1))
        layers = max(preset.layer.num_layers, CACHE_MULTIPLE * llc_bytes // per_layer + 1)
    return dataclasses.replace(preset.layer, num_layers=layers)
