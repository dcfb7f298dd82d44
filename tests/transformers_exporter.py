"""Tiny random-weight MoE models exported by transformers' own ONNX exporter (`transformers.exporters`).

`export_with_transformers_exporter` runs `OnnxExporter().export(model, {"input_ids": ...}, OnnxConfig(...))`
with the exporter's default settings: its `grouped_mm` experts unroll per expert (see
lynx_export/compiler/forms/grouped_mm.py). The settings a test may change are `dynamic`: by default
(`dynamic=False`) the graph is traced at the sample's fixed [2, 5] shape, which runs at no other
batch or sequence length; `dynamic=True` makes every input axis symbolic; and `ort_fusions`
(`"cuda"`: the experts run as `batched_mm` and are fused into com.microsoft.MoE nodes with
separate gate (fc1) and up (fc3) weights, lynx_export/compiler/forms/ort_moe.py; a graph pass only, it
needs no GPU).

Exports are cached across test runs and pytest-xdist workers by tests/artifacts.py (`cached_export`),
keyed by the family's config, the setting, the package versions and this file's source.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import pathlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Family", "FAMILIES", "export_with_transformers_exporter", "cached_export"]

# Attention shape shared by every family: 2 layers, H=32, 4 query heads, 2 KV heads.
_COMMON: dict[str, Any] = dict(
    vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64
)


@dataclass(frozen=True)
class Family:
    """A transformers model family and the tiny config its tests export (E=8, K=2 everywhere)."""

    name: str
    config_class: str  # a `transformers` config class
    model_class: str  # a `transformers` *ForCausalLM class
    config: dict[str, Any] = field(default_factory=dict)
    expert_size: int = 48  # the routed experts' intermediate size I
    # Changes the random model (torch.no_grad) before it is exported, e.g. its weights; its source
    # is part of the cache key.
    prepare: Callable[[Any], None] | None = None


def deepseek_v3_score_bias(model) -> None:
    """DeepSeek-V3 routers with a random score correction bias (transformers initialises it to
    zero), about as spread as the sigmoid scores of the tiny router, so that it changes choices
    (as tests/transformers_models.py's `score_bias` patch)."""
    from transformers.models.deepseek_v3 import modeling_deepseek_v3

    for router in (m for m in model.modules() if isinstance(m, modeling_deepseek_v3.DeepseekV3TopkRouter)):
        router.e_score_correction_bias.normal_(0.0, 0.03)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("mixtral", "MixtralConfig", "MixtralForCausalLM",
               dict(_COMMON, intermediate_size=48, num_local_experts=8, num_experts_per_tok=2)),
        Family("qwen3_moe", "Qwen3MoeConfig", "Qwen3MoeForCausalLM",
               dict(_COMMON, intermediate_size=64, moe_intermediate_size=48, num_experts=8, num_experts_per_tok=2,
                    norm_topk_prob=True, head_dim=8)),
        Family("olmoe", "OlmoeConfig", "OlmoeForCausalLM",
               dict(_COMMON, intermediate_size=48, num_experts=8, num_experts_per_tok=2)),
        Family("qwen2_moe", "Qwen2MoeConfig", "Qwen2MoeForCausalLM",
               dict(_COMMON, intermediate_size=64, moe_intermediate_size=48, shared_expert_intermediate_size=40,
                    num_experts=8, num_experts_per_tok=2)),
        Family("granitemoe", "GraniteMoeConfig", "GraniteMoeForCausalLM",
               dict(_COMMON, intermediate_size=48, num_local_experts=8, num_experts_per_tok=2)),
        # Sigmoid scores, grouped top-k with a (random) score correction bias, routed scaling 2.5,
        # renormalised, a shared expert outside the block; every layer MoE (first_k_dense_replace=0),
        # 4 groups of 2 experts, the best 2 groups kept (tests/transformers_models.py's tiny config).
        Family("deepseek_v3", "DeepseekV3Config", "DeepseekV3ForCausalLM",
               dict(_COMMON, intermediate_size=64, moe_intermediate_size=48, n_routed_experts=8, num_experts_per_tok=2,
                    n_shared_experts=1, n_group=4, topk_group=2, first_k_dense_replace=0, kv_lora_rank=16, q_lora_rank=24,
                    qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, num_key_value_heads=4),
               prepare=deepseek_v3_score_bias),
        # The sparse mixer router (two rounds of max + masked softmax): ONNX Runtime's MoE cannot route so.
        Family("phimoe", "PhimoeConfig", "PhimoeForCausalLM",
               dict(_COMMON, intermediate_size=48, num_local_experts=8, num_experts_per_tok=2)),
    )
}


def export_with_transformers_exporter(
    family_config: Family, path: str | pathlib.Path, *, dynamic: bool = False, ort_fusions: str | None = None
) -> pathlib.Path:
    """Export `family_config`'s random-weight model (torch.manual_seed(0)) to the ONNX file `path`.

    The sample input is `input_ids` [2, 5]; the graph's outputs are the logits and the KV cache
    the model returns by default. Weights are stored inside the file. Raises what the exporter raises.
    """
    import onnx_ir as ir
    import torch
    import transformers
    from transformers.exporters import OnnxConfig, OnnxExporter

    path = pathlib.Path(path)
    config = getattr(transformers, family_config.config_class)(**family_config.config)
    torch.manual_seed(0)
    model = getattr(transformers, family_config.model_class)(config).eval()
    if family_config.prepare is not None:
        with torch.no_grad():
            family_config.prepare(model)
    input_ids = torch.randint(0, config.vocab_size, (2, 5))
    # Log lines about optional torchvision ops and the exporter's version-drift notice.
    quiet = [logging.getLogger(n) for n in ("torch.onnx._internal.exporter._registration", "transformers.exporters.utils")]
    levels = [log.level for log in quiet]
    for log in quiet:
        log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)
            warnings.filterwarnings("ignore", message="# The axis name", category=UserWarning)
            onnx_config = OnnxConfig(dynamic=dynamic, ort_fusions=ort_fusions)
            exported = OnnxExporter().export(model, {"input_ids": input_ids}, onnx_config)
    finally:
        for log, level in zip(quiet, levels):
            log.setLevel(level)
    path.parent.mkdir(parents=True, exist_ok=True)
    ir.save(exported.program, str(path))
    return path


def _cache_key(family: Family, dynamic: bool, ort_fusions: str | None = None) -> str:
    from importlib.metadata import version

    versions = {p: version(p) for p in ("transformers", "torch", "onnx", "onnxscript", "onnx-ir", "onnxruntime")}  # ort_fusions uses onnxruntime
    source = pathlib.Path(__file__).read_bytes()
    prepare = inspect.getsource(family.prepare) if family.prepare is not None else None
    blob = json.dumps(
        [family.name, family.config_class, family.model_class, family.config, dynamic, ort_fusions, versions, prepare], sort_keys=True
    )
    return hashlib.sha256(blob.encode() + source).hexdigest()[:16]


def cached_export(family: Family, *, dynamic: bool = False, ort_fusions: str | None = None) -> pathlib.Path:
    """`family`'s export through the tests' artefact cache (tests/artifacts.py); an exporter failure
    is raised, and cached too (its error text), so that every run does not retry it."""
    from tests.artifacts import cached

    def make(path: pathlib.Path) -> None:
        try:
            export_with_transformers_exporter(family, path, dynamic=dynamic, ort_fusions=ort_fusions)
        except Exception as exc:  # the exporter's own error, recorded for the matrix
            text = f"{type(exc).__name__}: {exc}".strip()
            cause = exc.__cause__
            while cause is not None:
                text += f"\n  caused by {type(cause).__name__}: {cause}"
                cause = cause.__cause__
            raise ExportFailed(text) from exc

    return cached("transformers-exporter", _cache_key(family, dynamic, ort_fusions), make, suffix=".onnx", remember=ExportFailed)


class ExportFailed(Exception):
    """transformers' exporter raised for this model; the message is its error text."""
