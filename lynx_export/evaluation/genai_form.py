"""The demo architecture written as onnxruntime-genai's model builder writes decoders: a folder
onnxruntime-genai loads, whose attention updates its KV cache in place.

The builder takes transformers checkpoints of the architectures it knows, and none of them is the
demo's (a router with a bias, softmax -> top-k -> renormalise, plain SiLU SwiGLU experts):
Qwen3.5-MoE and LFM2 have other layers and routers, gpt-oss a clamped SwiGLU. So this module
writes the graph the builder would write for it, from the torch module's weights, op for op in
the builder's vocabulary:

    input_ids [B,S] -> Gather(embedding)
    attention_mask [B,T] -> seqlens_k = ReduceSum(mask) - 1, total_sequence_length = T   (int32)
    per layer:
        SimplifiedLayerNormalization -> MatMul (packed QKV)
        -> com.microsoft.GroupQueryAttention(do_rotary, cos/sin caches; past_key_values.N.key|value
           -> present.N.key|value, shareable with the past: onnxruntime-genai's in-place buffer)
        -> MatMul (o_proj) -> Add (residual)
        SimplifiedLayerNormalization [B,S,H] -> com.microsoft.MoE(k, softmax + top-k + renormalise,
           SwiGLU with gate/up interleaved), its router logits [T,E] = Reshape [T,H] -> MatMul + Add (bias)
        -> Add (residual)
    SimplifiedLayerNormalization -> MatMul (lm_head) -> logits [B,S,V]

The folder holds model.onnx (weights in model.onnx.data), genai_config.json and a byte-level
tokenizer (tokenizer.json: token id = byte value, as the demo's vocabulary is). Its logits match
the torch module's (tests/test_genai_form.py), and onnxruntime-genai generates its greedy tokens.
TensorRT's parser takes no com.microsoft ops: the dynamo export (`demo.export_model`) stays the
TensorRT source.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import numpy as np
import onnx_ir as ir

from lynx_export.compiler.output import staged_folder
from lynx_export.errors import OutputError
from lynx_export.evaluation.demo import DemoConfig

__all__ = ["FILES", "MAX_LENGTH", "MODEL_FILE", "export_genai_model", "byte_tokenizer"]

MODEL_FILE = "model.onnx"
MAX_LENGTH = 4096  # the rotary caches' rows: the longest sequence the graph can hold
FILES = (MODEL_FILE, f"{MODEL_FILE}.data", "genai_config.json", "tokenizer.json", "tokenizer_config.json")
_MS = "com.microsoft"
_EPS = 1e-6  # demo.RMSNorm's epsilon


def export_genai_model(model: Any, folder: pathlib.Path, max_length: int = MAX_LENGTH) -> pathlib.Path:
    """Write `model` (a module from `demo.build_demo_model`, any weights) to `folder` as an
    onnxruntime-genai model folder; written beside it and renamed, so that an interrupted export
    leaves no half folder. Returns the model file's path."""
    config: DemoConfig = model.config
    folder = pathlib.Path(folder)
    if folder.exists() and (not folder.is_dir() or {p.name for p in folder.iterdir()} - set(FILES)):
        raise OutputError(f"{folder}: exists and holds other files than an exported model folder's; give a new or empty folder")
    graph = _graph(_weights(model), config, max_length)
    with staged_folder(folder) as staging:  # replaces only this function's own files (checked above)
        ir.save(ir.Model(graph, ir_version=10), staging / MODEL_FILE, external_data=f"{MODEL_FILE}.data")
        (staging / "genai_config.json").write_text(json.dumps(_genai_config(config, max_length), indent=2) + "\n")
        (staging / "tokenizer.json").write_text(json.dumps(byte_tokenizer()) + "\n")
        (staging / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}) + "\n")
    return folder / MODEL_FILE


def _weights(model: Any) -> dict[str, np.ndarray]:
    import torch

    with torch.no_grad():
        return {name: value.detach().float().numpy().copy() for name, value in model.state_dict().items()}


def _graph(w: dict[str, np.ndarray], c: DemoConfig, max_length: int) -> ir.Graph:
    tape = ir.tape.Tape()
    head = c.hidden_size // c.num_heads

    batch, seq, total, past = "batch_size", "sequence_length", "total_sequence_length", "past_sequence_length"

    def init(name: str, array: np.ndarray) -> ir.Value:
        return tape.initializer(ir.tensor(np.ascontiguousarray(array)), name=name)

    def op(op_type: str, inputs: list, name: str, domain: str = "", rows: bool = False, **attrs: Any) -> ir.Value:
        """One node; `rows`: its output is hidden rows [B,S,H], typed so (the MoE form reads the rank)."""
        output = ir.Value(name=f"{name}/output_0", type=ir.TensorType(ir.DataType.FLOAT) if rows else None,
                          shape=ir.Shape([batch, seq, c.hidden_size]) if rows else None)
        return tape.op(op_type, inputs, attributes=attrs or None, domain=domain, name=name, output=output)

    input_ids = ir.Value(name="input_ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([batch, seq]))
    mask = ir.Value(name="attention_mask", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([batch, total]))
    inputs, outputs = [input_ids, mask], []

    one = init("one_i64", np.array([1], dtype=np.int64))
    seqlens = op("Cast", [op("Sub", [op("ReduceSum", [mask, one], "/model/attn_mask/ReduceSum", keepdims=0), one], "/model/attn_mask/Sub")],
                 "/model/attn_mask/seqlens_k", to=ir.DataType.INT32)
    total_len = op("Cast", [op("Gather", [op("Shape", [mask], "/model/attn_mask/Shape"), init("one_scalar", np.array(1, dtype=np.int64))],
                               "/model/attn_mask/Gather", axis=0)], "/model/attn_mask/total_sequence_length", to=ir.DataType.INT32)
    inv_freq = 1.0 / (c.rope_theta ** (np.arange(0, head, 2, dtype=np.float32) / head))
    freqs = np.outer(np.arange(max_length, dtype=np.float32), inv_freq)
    cos_cache, sin_cache = init("cos_cache", np.cos(freqs).astype(np.float32)), init("sin_cache", np.sin(freqs).astype(np.float32))
    flat = init("flat_shape", np.array([-1, c.hidden_size], dtype=np.int64))

    x = op("Gather", [init("model.embed_tokens.weight", w["embed.weight"]), input_ids], "/model/embed_tokens/Gather", rows=True, axis=0)
    for i in range(c.num_layers):
        p, n = f"layers.{i}.", f"/model/layers.{i}"
        h = op("SimplifiedLayerNormalization", [x, init(f"model.layers.{i}.input_layernorm.weight", w[p + "input_norm.weight"])],
               f"{n}/input_layernorm", rows=True, axis=-1, epsilon=_EPS)
        qkv = op("MatMul", [h, init(f"model.layers.{i}.attn.qkv_proj.weight", w[p + "attn.qkv.weight"].T)], f"{n}/attn/qkv_proj/MatMul")
        cache_shape = ir.Shape([batch, c.num_heads, past, head])
        past_kv = [ir.Value(name=f"past_key_values.{i}.{kind}", type=ir.TensorType(ir.DataType.FLOAT), shape=cache_shape) for kind in ("key", "value")]
        inputs += past_kv
        attn = ir.Value(name=f"{n}/attn/GroupQueryAttention/output_0")
        present_k, present_v = (ir.Value(name=f"present.{i}.{kind}", type=ir.TensorType(ir.DataType.FLOAT),
                                         shape=ir.Shape([batch, c.num_heads, total, head])) for kind in ("key", "value"))
        tape.op_multi_out("GroupQueryAttention", [qkv, None, None, *past_kv, seqlens, total_len, cos_cache, sin_cache],
                          attributes={"num_heads": c.num_heads, "kv_num_heads": c.num_heads, "scale": head**-0.5, "do_rotary": 1,
                                      "rotary_interleaved": 0, "local_window_size": -1},
                          domain=_MS, name=f"{n}/attn/GroupQueryAttention", outputs=[attn, present_k, present_v])
        outputs += [present_k, present_v]
        x = op("Add", [x, op("MatMul", [attn, init(f"model.layers.{i}.attn.o_proj.weight", w[p + "attn.o_proj.weight"].T)], f"{n}/attn/o_proj/MatMul")],
               f"{n}/attn/residual", rows=True)
        h = op("SimplifiedLayerNormalization", [x, init(f"model.layers.{i}.post_attention_layernorm.weight", w[p + "post_attn_norm.weight"])],
               f"{n}/post_attention_layernorm", rows=True, axis=-1, epsilon=_EPS)
        rows = op("Reshape", [h, flat], f"{n}/moe/Reshape")
        router = op("Add", [op("MatMul", [rows, init(f"model.layers.{i}.moe.gate.weight", w[p + "mlp.gate.weight"].T)], f"{n}/moe/router/MatMul"),
                            init(f"model.layers.{i}.moe.gate.bias", w[p + "mlp.gate.bias"])], f"{n}/moe/router/Add")
        gate_up = w[p + "mlp.gate_up_proj"]  # [E, 2I, H]: gate rows, then up rows
        fc1 = np.empty_like(gate_up)
        fc1[:, 0::2], fc1[:, 1::2] = gate_up[:, : c.expert_size], gate_up[:, c.expert_size :]  # interleaved g0,u0,g1,u1,...
        moe = op("MoE", [h, router, init(f"model.layers.{i}.moe.experts.gate_up_proj.weight", fc1), None,
                         init(f"model.layers.{i}.moe.experts.down_proj.weight", w[p + "mlp.down_proj"])],
                 f"{n}/moe/MoE", domain=_MS, rows=True, k=c.top_k, activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0,
                 normalize_routing_weights=1, use_sparse_mixer=0)
        x = op("Add", [x, moe], f"{n}/moe/residual", rows=True)
    h = op("SimplifiedLayerNormalization", [x, init("model.norm.weight", w["norm.weight"])], "/model/norm", rows=True, axis=-1, epsilon=_EPS)
    logits = op("MatMul", [h, init("lm_head.weight", w["lm_head.weight"].T)], "/lm_head/MatMul")
    logits.name, logits.type, logits.shape = "logits", ir.TensorType(ir.DataType.FLOAT), ir.Shape([batch, seq, c.vocab_size])
    return ir.Graph(inputs, [logits, *outputs], nodes=tape.nodes, initializers=tape.initializers,
                    opset_imports={"": 21, _MS: 1}, name="lynx_demo_genai")


def _genai_config(c: DemoConfig, max_length: int) -> dict[str, Any]:
    head = c.hidden_size // c.num_heads
    return {
        "model": {
            "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0,  # byte vocabulary: no special tokens; 0 (NUL) never occurs in text
            "context_length": max_length,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": MODEL_FILE, "head_size": head, "hidden_size": c.hidden_size,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"},
                "num_attention_heads": c.num_heads, "num_hidden_layers": c.num_layers, "num_key_value_heads": c.num_heads,
            },
            "type": "llama",  # a plain decoder: input ids, mask, KV caches (onnxruntime-genai has no type of the demo's own)
            "vocab_size": c.vocab_size,
        },
        "search": {"do_sample": False, "max_length": max_length, "min_length": 0, "num_beams": 1, "num_return_sequences": 1,
                   "past_present_share_buffer": True, "temperature": 1.0, "top_k": 1, "top_p": 1.0, "repetition_penalty": 1.0},
    }


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte (byte-level BPE's alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def byte_tokenizer() -> dict[str, Any]:
    """A `tokenizers` JSON for the demo's byte vocabulary: byte-level BPE without merges, so each
    byte is one token whose id is the byte's value."""
    chars = _bytes_to_unicode()
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {chars[b]: b for b in range(256)}, "merges": []},
    }
