"""Tiny Hugging Face transformers models exported to ONNX, for tests (random weights, offline).

Every family is built from its `*Config` class with a tiny configuration (`TINY`), run with
transformers' `batched_mm` experts implementation (the one torch's dynamo exporter can trace: the
"eager" per-expert loop and "grouped_mm" do not export), and exported as input_ids [batch,
sequence] -> logits, no KV cache, dynamic batch and sequence. `cached_export` keeps exports
between test runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import json
import logging
import pathlib
import warnings
from dataclasses import dataclass
from typing import Any

__all__ = [
    "FAMILIES", "TINY", "TINY_MIXTRAL", "ExportFailed", "Family", "cache_key", "cached_export", "export_tiny", "export_tiny_mixtral",
    "gpt_oss_clamp_weights",
]

# Common to every family: two decoder layers, H=32, E=8, K=2, a 128-token vocabulary.
_BASE: dict[str, Any] = dict(
    vocab_size=128,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_experts_per_tok=2,
    max_position_embeddings=64,
)


@dataclass(frozen=True)
class Family:
    config: str  # transformers' config class
    model: str  # its causal LM class
    tiny: dict[str, Any]  # the tiny configuration: config fields
    patch: str | None = None  # a test-only change to the model and its code while it exports (`PATCHES`)


FAMILIES: dict[str, Family] = {
    # Experts: gate_up [E,2I,H] ([gate; up] concatenated), down [E,H,I]; softmax -> top-k, renormalised.
    "mixtral": Family("MixtralConfig", "MixtralForCausalLM", dict(_BASE, intermediate_size=48, num_local_experts=8)),
    # As Mixtral; the expert width is `moe_intermediate_size`; renormalisation by `norm_topk_prob`.
    "qwen3_moe": Family(
        "Qwen3MoeConfig", "Qwen3MoeForCausalLM",
        dict(_BASE, head_dim=8, intermediate_size=64, moe_intermediate_size=48, num_experts=8, norm_topk_prob=True),
    ),
    # softmax -> top-k, not renormalised.
    "olmoe": Family(
        "OlmoeConfig", "OlmoeForCausalLM", dict(_BASE, intermediate_size=48, num_experts=8, norm_topk_prob=False, eos_token_id=2),
    ),
    # Routed experts plus a shared expert scaled by sigmoid(Linear(x)), added to the routed sum.
    "qwen2_moe": Family(
        "Qwen2MoeConfig", "Qwen2MoeForCausalLM",
        dict(_BASE, intermediate_size=64, moe_intermediate_size=48, shared_expert_intermediate_size=40, num_experts=8,
             norm_topk_prob=False),
    ),
    # top-k over the logits, then softmax over the K picked.
    "granitemoe": Family("GraniteMoeConfig", "GraniteMoeForCausalLM", dict(_BASE, intermediate_size=48, num_local_experts=8)),
    # The sparse mixer router: two rounds of max + masked softmax (ONNX Runtime's MoE cannot route so).
    "phimoe": Family("PhimoeConfig", "PhimoeForCausalLM", dict(_BASE, intermediate_size=48, num_local_experts=8)),
    # gate_up [E,H,2I] with gate/up rows interleaved, biases, a router bias, top-k then softmax, clamped
    # SwiGLU ((clamp(up, -7, 7) + 1) * g * sigmoid(1.702 * g), g = clamp(gate, max=7)); exported
    # with random expert biases and weights large enough for the clamp to matter.
    "gpt_oss": Family(
        "GptOssConfig", "GptOssForCausalLM",
        dict(_BASE, head_dim=8, intermediate_size=48, num_local_experts=8, sliding_window=16,
             rope_parameters={"rope_type": "default", "rope_theta": 150000.0}),
        patch="clamped_swiglu",
    ),
    # Sigmoid scores, grouped top-k with a correction bias (random: transformers initialises it to
    # zero), routed scaling 2.5, renormalised, a shared expert outside the block; every layer MoE
    # (`first_k_dense_replace=0`), 4 groups of 2 experts, the best 2 groups kept.
    "deepseek_v3": Family(
        "DeepseekV3Config", "DeepseekV3ForCausalLM",
        dict(_BASE, intermediate_size=64, moe_intermediate_size=48, n_routed_experts=8, n_shared_experts=1, n_group=4,
             topk_group=2, first_k_dense_replace=0, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8,
             v_head_dim=8, num_key_value_heads=4),
        patch="score_bias",
    ),
}
# Not a released model: gpt-oss with plain SwiGLU experts (silu(gate) * up over its interleaved
# rows): its expert layout ([E,H,2I] interleaved, biases, a router bias) with the plain activation.
FAMILIES["gpt_oss_swiglu"] = dataclasses.replace(FAMILIES["gpt_oss"], patch="plain_swiglu")

TINY: dict[str, dict[str, Any]] = {name: f.tiny for name, f in FAMILIES.items()}
# E=8, K=2, H=32, I=48 in two decoder layers: exports in a few seconds on a CPU.
TINY_MIXTRAL: dict[str, Any] = TINY["mixtral"]


def _random_expert_biases(model) -> None:
    """Random gpt-oss expert biases (transformers initialises them to zero), so that they count."""
    import torch
    from transformers.models.gpt_oss import modeling_gpt_oss

    with torch.no_grad():
        for experts in (m for m in model.modules() if isinstance(m, modeling_gpt_oss.GptOssExperts)):
            experts.gate_up_proj_bias.normal_(0.0, 0.1)
            experts.down_proj_bias.normal_(0.0, 0.1)


@contextlib.contextmanager
def _plain_swiglu(model):
    """gpt-oss experts computing silu(gate) * up (gate and up rows interleaved) while exporting,
    with random expert biases."""
    import torch
    from transformers.models.gpt_oss import modeling_gpt_oss

    _random_expert_biases(model)
    cls = modeling_gpt_oss.GptOssExperts
    original = cls._apply_gate
    cls._apply_gate = lambda self, gate_up: torch.nn.functional.silu(gate_up[..., ::2]) * gate_up[..., 1::2]
    try:
        yield
    finally:
        cls._apply_gate = original


def gpt_oss_clamp_weights(model) -> None:
    """Random gpt-oss expert biases and gate/up weights large enough that the clamped SwiGLU's
    limit matters: with std 0.9 over H=32 RMS-normed inputs, about a tenth of the routed gate
    values exceed the limit 7 and a sixth of the up values leave [-7, 7] (tests check that some do)."""
    import torch
    from transformers.models.gpt_oss import modeling_gpt_oss

    with torch.no_grad():
        for experts in (m for m in model.modules() if isinstance(m, modeling_gpt_oss.GptOssExperts)):
            experts.gate_up_proj.normal_(0.0, 0.9)
            experts.gate_up_proj_bias.normal_(0.0, 0.5)
            experts.down_proj_bias.normal_(0.0, 0.1)


@contextlib.contextmanager
def _clamped_swiglu(model):
    """gpt-oss as released (clamped SwiGLU), with `gpt_oss_clamp_weights`."""
    gpt_oss_clamp_weights(model)
    yield


@contextlib.contextmanager
def _score_bias(model):
    """DeepSeek-V3 routers with a random score correction bias (transformers initialises it to
    zero), about as spread as the sigmoid scores of the tiny router, so that it changes choices."""
    import torch
    from transformers.models.deepseek_v3 import modeling_deepseek_v3

    with torch.no_grad():
        for router in (m for m in model.modules() if isinstance(m, modeling_deepseek_v3.DeepseekV3TopkRouter)):
            router.e_score_correction_bias.normal_(0.0, 0.03)
    yield


PATCHES = {"plain_swiglu": _plain_swiglu, "clamped_swiglu": _clamped_swiglu, "score_bias": _score_bias}


def _config(family: str, overrides: dict[str, Any]):
    import transformers

    spec = FAMILIES[family]
    config = getattr(transformers, spec.config)(**{**spec.tiny, **overrides})
    config._experts_implementation = "batched_mm"
    return config


def export_tiny(family: str, path: str | pathlib.Path, **config_overrides: Any) -> pathlib.Path:
    """Export a random-weight causal LM of `family` (a key of `FAMILIES`) to `path`.

    `config_overrides` replace fields of the family's tiny configuration (any field of its config
    class). Raises whatever the exporter raises when the family does not export.
    """
    import torch
    import transformers

    from lynx_export.evaluation.demo import save_onnx_program

    path = pathlib.Path(path)
    config = _config(family, config_overrides)
    torch.manual_seed(0)
    model = getattr(transformers, FAMILIES[family].model)(config).eval()
    patch = FAMILIES[family].patch

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
        with warnings.catch_warnings(), PATCHES[patch](model) if patch else contextlib.nullcontext():
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


def export_tiny_mixtral(path: str | pathlib.Path, **config_overrides: Any) -> pathlib.Path:
    """Export a random-weight `MixtralForCausalLM` (input_ids [batch, sequence] -> logits) to `path`.

    torch's dynamo exporter with the `batched_mm` experts implementation (transformers' "eager"
    and "grouped_mm" experts do not export), no KV cache, dynamic batch and sequence.
    `config_overrides` replace fields of `TINY_MIXTRAL` (any `MixtralConfig` field).
    """
    return export_tiny("mixtral", path, **config_overrides)


def cache_key(family: str, **config_overrides: Any) -> str:
    """What an export depends on: the family, its full configuration, torch and transformers, and
    the code here that exports it."""
    import torch
    import transformers

    from tests.artifacts import versions

    config = _config(family, config_overrides).to_dict()
    config.pop("transformers_version", None)
    data = json.dumps(
        {"family": family, "model": FAMILIES[family].model, "patch": FAMILIES[family].patch, "config": config,
         "experts": "batched_mm", "torch": torch.__version__, "transformers": transformers.__version__,
         "exporters": versions("onnx", "onnxscript", "onnx-ir"),
         "code": [inspect.getsource(f) for f in (export_tiny, _random_expert_biases, gpt_oss_clamp_weights, *PATCHES.values())]},
        sort_keys=True, default=str,
    )
    return f"{family}-{hashlib.sha256(data.encode()).hexdigest()[:16]}"


def cached_export(family: str, **config_overrides: Any) -> pathlib.Path:
    """`export_tiny` through the tests' artefact cache (tests/artifacts.py), keyed by `cache_key`.

    A failed export is cached too (the exception's type and first line) and raised again as
    `ExportFailed`, so a family that does not export costs its time once.
    """
    from tests.artifacts import cached

    def make(path: pathlib.Path) -> None:
        try:
            export_tiny(family, path, **config_overrides)
        except Exception as exc:  # the export itself failed: remember why
            raise ExportFailed(f"{type(exc).__name__}: {_first_line(exc)}") from exc

    return cached("transformers-dynamo", cache_key(family, **config_overrides), make, suffix=".onnx", remember=ExportFailed)


class ExportFailed(RuntimeError):
    """torch's dynamo exporter could not export the model (message: the first error line)."""


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else ""


