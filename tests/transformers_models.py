"""Tiny Hugging Face transformers models exported to ONNX, for tests (random weights, offline)."""

from __future__ import annotations

import logging
import pathlib
import warnings
from typing import Any

__all__ = ["TINY_MIXTRAL", "export_tiny_mixtral"]

# E=8, K=2, H=32, I=48 in two decoder layers: exports in a few seconds on a CPU.
TINY_MIXTRAL: dict[str, Any] = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_local_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=64,
)


def export_tiny_mixtral(path: str | pathlib.Path, **config_overrides: Any) -> pathlib.Path:
    """Export a random-weight `MixtralForCausalLM` (input_ids [batch, sequence] -> logits) to `path`.

    torch's dynamo exporter with the `batched_mm` experts implementation (transformers' "eager"
    and "grouped_mm" experts do not export), no KV cache, dynamic batch and sequence.
    `config_overrides` replace fields of `TINY_MIXTRAL` (any `MixtralConfig` field).
    """
    import torch
    import transformers

    from lynx_export.demo import save_onnx_program

    path = pathlib.Path(path)
    config = transformers.MixtralConfig(**{**TINY_MIXTRAL, **config_overrides})
    config._experts_implementation = "batched_mm"
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(config).eval()

    class LogitsOnly(torch.nn.Module):
        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids):
            return self.model(input_ids=input_ids, use_cache=False).logits

    input_ids = torch.randint(0, config.vocab_size, (2, 5))
    shapes = {"input_ids": {0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence")}}
    # The exporter's noise about its own internals (as pyproject.toml filters for the demo model)
    # and its log lines about optional torchvision ops.
    registration_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration_log.level
    registration_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)
            warnings.filterwarnings("ignore", message="# The axis name", category=UserWarning)
            program = torch.onnx.export(
                LogitsOnly(model).eval(),
                (input_ids,),
                dynamo=True,
                optimize=True,
                input_names=["input_ids"],
                output_names=["logits"],
                dynamic_shapes=shapes,
                verbose=False,
            )
    finally:
        registration_log.setLevel(level)
    return save_onnx_program(program, path)
