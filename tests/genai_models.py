"""Tiny random-weight checkpoints run through onnxruntime-genai's model builder, as CPU users make
their ONNX LLMs (`python -m onnxruntime_genai.models.builder -i CKPT -o OUT -p fp32|int4 -e cpu`).

Each family is a transformers config small enough to build in seconds (2 layers, H 64, 8 experts,
top-2, a 200-token vocabulary: kept apart from every inner width, since the builder takes any
Linear as wide as the vocabulary for the LM head), saved with a local word-level tokenizer (the
builder needs one; nothing is downloaded). The builder's folder (model.onnx, its .data,
genai_config.json, tokenizer files) is cached by tests/artifacts.py.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys
from typing import Any

__all__ = ["FAMILIES", "VOCAB", "builder_folder"]

VOCAB = 200
_TEXT: dict[str, Any] = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=256, head_dim=16, tie_word_embeddings=False)

# family -> (transformers model class, config class, config); expert width 64 so int4's block 32 divides it.
FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    # LFM2's MoE: a conv layer and an attention layer; sigmoid router with an expert bias, top-k in the graph.
    "lfm2_moe": ("Lfm2MoeForCausalLM", "Lfm2MoeConfig", dict(_TEXT, intermediate_size=96, moe_intermediate_size=64, num_experts=8,
                                                          num_experts_per_tok=2, num_dense_layers=0, layer_types=["conv", "full_attention"])),
    # Qwen3.5-MoE: the builder takes its vision-language class; a linear-attention and a full-attention layer, a gated shared expert.
    "qwen3_5_moe": ("Qwen3_5MoeForConditionalGeneration", "Qwen3_5MoeConfig", dict(
        text_config=dict(_TEXT, moe_intermediate_size=64, shared_expert_intermediate_size=40, num_experts=8, num_experts_per_tok=2,
                         layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2, linear_num_value_heads=2,
                         linear_key_head_dim=16, linear_value_head_dim=16,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3], "partial_rotary_factor": 1.0}),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2),
        tie_word_embeddings=False)),
    # gpt-oss: a sliding-window layer (window 64) and a full one, clamped SwiGLU with biases. fp32 only: the
    # builder's int4 path reads the original MXFP4 expert tensors.
    "gpt_oss": ("GptOssForCausalLM", "GptOssConfig", dict(_TEXT, intermediate_size=64, num_local_experts=8, num_experts_per_tok=2,
                                                        sliding_window=64, layer_types=["sliding_attention", "full_attention"])),
}


# The MoE routers' weights, scaled so that their logits spread as a trained router's do (std ~1.5
# rather than random initialisation's ~0.15, under which every expert scores alike and a policy has
# nothing to trade).
_ROUTERS, _ROUTER_SCALE = ("feed_forward.gate.weight", "mlp.gate.weight", "mlp.router.weight"), 10.0


def _checkpoint(family: str, out: pathlib.Path) -> None:
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    model_class, config_class, config = FAMILIES[family]
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**config)).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(_ROUTERS):
                parameter.mul_(_ROUTER_SCALE)
    model.save_pretrained(out)
    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="t0", eos_token="t1", bos_token="t2",
                                         pad_token="t0").save_pretrained(out)


def builder_folder(family: str, precision: str) -> pathlib.Path:
    """The builder's output folder for `family` at `precision` (fp32 or int4), from the artefact cache."""
    from tests.artifacts import cached, versions

    def make(out: pathlib.Path) -> None:
        work = out.parent
        _checkpoint(family, work / "checkpoint")
        r = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(work / "checkpoint"), "-o", str(out),
                            "-p", precision, "-e", "cpu", "-c", str(work / "cache")], capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]

    key = {"family": family, "precision": precision, "code": pathlib.Path(__file__).read_text(),
           "versions": versions("onnxruntime-genai", "onnxruntime", "transformers", "torch", "onnx-ir", "tokenizers")}
    return cached("genai-builder", key, make, folder=True)
