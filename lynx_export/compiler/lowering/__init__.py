"""Lowerings of LynxMoE nodes into what a backend runs.

The ONNX Runtime lowering's expert implementations by name (`--ort-experts`), and which of them
run quantized experts, are here, where the command line reads them without importing a lowering.
"""

EXPERT_IMPLEMENTATIONS = ("per-expert", "fused")  # the first is the default
DEFAULT_EXPERTS = EXPERT_IMPLEMENTATIONS[0]
QUANTIZED_IMPLEMENTATIONS = ("per-expert",)  # the implementations that run quantized experts

__all__ = ["DEFAULT_EXPERTS", "EXPERT_IMPLEMENTATIONS", "QUANTIZED_IMPLEMENTATIONS"]
