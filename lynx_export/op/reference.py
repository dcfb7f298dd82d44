"""Node-level numpy reference of `LynxMoE`: the node's inputs and parsed attributes -> its output [T,H].

The one statement of what the op computes, which the ORT lowering tests, the GPU check and the
engine tests compare against:

1. selection: the policy runs only in decode calls (seq_len == 1, or seq_len absent); prefill
   calls use the model's own routing (policy off). Rows >= num_valid are padding: routed, but
   they never vote (the routing oracle's `valid`);
2. quantized weights (weight_bits > 0) are dequantized block-wise first: (q - zp) * scale;
3. each (token, expert) pair runs the expert's SwiGLU FFN: g, u = the even and odd rows of
   fc1[e] @ x + fc1_bias[e]; g' = min(g, limit), u' = clamp(u, -limit, limit);
   act = g' * sigmoid(alpha * g') * (u' + beta); y = fc2[e] @ act + fc2_bias[e];
4. combine: output[t] = sum over k of w[t,k] * y[t,k], in float64.

Imports numpy, the routing oracle and op/spec only, because scripts/gpu_check.py runs it where
onnx-ir may be absent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lynx_export.op.spec import Activation, MoESpec, WeightQuantization
from lynx_export.routing import OffPolicy, Routing, SelectionPolicy

__all__ = [
    "LynxMoEInputs",
    "phase_policy",
    "valid_rows",
    "select",
    "swiglu",
    "combine",
    "dequantize_blockwise",
    "float_weights",
    "lynx_moe",
]


@dataclass(frozen=True, kw_only=True)
class LynxMoEInputs:
    """A node's inputs, named and ordered as its slots (contract.Slot); None for an absent optional one."""

    hidden: np.ndarray  # [T,H]
    router_logits: np.ndarray  # [T,E]
    fc1: np.ndarray  # [E,2I,H] float, or uint8 [E,2I,H*bits/8] when quantized
    fc1_bias: np.ndarray | None = None  # [E,2I]
    fc2: np.ndarray  # [E,H,I] float, or uint8 [E,H,I*bits/8] when quantized
    fc2_bias: np.ndarray | None = None  # [E,H]
    seq_len: int | None = None
    num_valid: int | None = None
    fc1_scales: np.ndarray | None = None  # [E,2I,H/block_size]
    fc2_scales: np.ndarray | None = None  # [E,H,I/block_size]
    fc1_zero_points: np.ndarray | None = None  # uint8 [E,2I,ceil(H/block_size*bits/8)]
    fc2_zero_points: np.ndarray | None = None  # uint8 [E,H,ceil(I/block_size*bits/8)]


def phase_policy(policy: SelectionPolicy, seq_len: int | None) -> SelectionPolicy:
    """The policy a call runs: `policy` in decode (seq_len 1 or absent), the model's routing otherwise."""
    return policy if seq_len is None or int(seq_len) == 1 else OffPolicy()


def valid_rows(num_valid: int | None, tokens: int) -> int:
    """The rows that vote: num_valid clamped to [0, T] (absent, or the TensorRT filler INT64_MAX: all)."""
    return tokens if num_valid is None else max(0, min(int(num_valid), tokens))


def select(spec: MoESpec, policy: SelectionPolicy, router_logits: np.ndarray, *, seq_len: int | None = None,
           num_valid: int | None = None) -> Routing:
    """The call's routing (step 1 of the module docstring) for router_logits [T,E]."""
    logits = np.asarray(router_logits)
    chosen = phase_policy(policy, seq_len)
    rows = valid_rows(num_valid, logits.shape[0])
    return chosen.select(logits, spec.top_k, spec.router, spec.normalize, rows, grouping=spec.grouping)


def swiglu(gate: np.ndarray, up: np.ndarray, spec: MoESpec) -> np.ndarray:
    """The contract's SwiGLU with the spec's alpha, beta and limit (plain silu(gate) * up by default)."""
    if spec.swiglu_limit is not None:
        gate, up = np.minimum(gate, spec.swiglu_limit), np.clip(up, -spec.swiglu_limit, spec.swiglu_limit)
    # sigmoid as 0.5 * (1 + tanh(x / 2)): no overflow warning for large negative gates.
    sigmoid = 0.5 * (1.0 + np.tanh(0.5 * spec.activation_alpha * gate))
    return gate * sigmoid * (up + spec.activation_beta)


def combine(hidden: np.ndarray, ids: np.ndarray, weights: np.ndarray, fc1: np.ndarray, fc2: np.ndarray, spec: MoESpec, *,
            fc1_bias: np.ndarray | None = None, fc2_bias: np.ndarray | None = None) -> np.ndarray:
    """Steps 3 and 4 over a given routing (ids, weights [T,K]) and float weights: output [T,H], float64.

    Pairs of weight 0 (fill-ups of padded rows) are skipped, so an expert no token really uses
    is never read: a NaN in its weights cannot reach the output.
    """
    if spec.activation != Activation.SWIGLU:
        raise ValueError(f"activation {spec.activation!r}: the LynxMoE reference implements {Activation.SWIGLU}")
    x = np.asarray(hidden, np.float64)
    ids, weights = np.asarray(ids), np.asarray(weights, np.float64)
    out = np.zeros(x.shape, np.float64)
    for e in np.unique(ids):
        tokens, choices = np.nonzero((ids == e) & (weights != 0))
        if tokens.size == 0:
            continue
        proj = x[tokens] @ np.asarray(fc1[e], np.float64).T  # [N,2I]
        if fc1_bias is not None:
            proj = proj + np.asarray(fc1_bias[e], np.float64)
        y = swiglu(proj[:, 0::2], proj[:, 1::2], spec) @ np.asarray(fc2[e], np.float64).T  # [N,H]
        if fc2_bias is not None:
            y = y + np.asarray(fc2_bias[e], np.float64)
        # A token holds each expert at most once (its K ids are distinct), so `tokens` has no repeats.
        out[tokens] += weights[tokens, choices][:, None] * y
    return out


def _unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The first `count` `bits`-wide values along the last axis of uint8 `packed`, low nibble first."""
    data = np.asarray(packed)
    if data.dtype != np.uint8:
        raise ValueError(f"quantized data must be uint8, got {data.dtype}")
    if bits == 8:
        values = data
    else:
        values = np.stack([data & 0x0F, data >> 4], axis=-1).reshape(*data.shape[:-1], 2 * data.shape[-1])
    if values.shape[-1] < count:
        raise ValueError(f"{data.shape[-1]} bytes hold {values.shape[-1]} {bits}-bit values, fewer than {count}")
    return values[..., :count]


def dequantize_blockwise(q: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, bits: int, block_size: int,
                         k: int) -> np.ndarray:
    """Float weights [E,N,K] of block-wise quantized ones: (q - zero_point) * scale per block.

    q: uint8 [E,N,K*bits/8] (int4: two values per byte, low nibble first, as MatMulNBits and QMoE
    pack them; rows may be padded to whole blocks); scales [E,N,ceil(K/block_size)];
    zero_points: uint8 [E,N,ceil(n_blocks*bits/8)] packed the same way, or None for the symmetric
    default 2^(bits-1). Computed exactly in float64, then rounded once to float32 (float64 scales
    stay float64).
    """
    quantization = WeightQuantization(bits, block_size)  # checks bits and block_size
    blocks = math.ceil(k / block_size)
    scale = np.asarray(scales)
    if scale.shape[-1] != blocks or scale.shape[:-1] != np.asarray(q).shape[:-1]:
        raise ValueError(f"scales of shape {scale.shape} do not match weights {np.asarray(q).shape} with {blocks} blocks of {block_size}")
    values = _unpack(q, quantization.bits, k).astype(np.float64)
    if zero_points is None:
        zero = np.full(scale.shape, 2.0 ** (bits - 1))
    else:
        zero = _unpack(zero_points, quantization.bits, blocks).astype(np.float64)
        if zero.shape != scale.shape:
            raise ValueError(f"zero points of shape {np.asarray(zero_points).shape} do not match scales {scale.shape}")
    def per_weight(per_block: np.ndarray) -> np.ndarray:
        # Block values repeated along K, cut to K (the last block may be partial).
        return np.repeat(per_block, block_size, axis=-1)[..., :k]

    result = (values - per_weight(zero)) * per_weight(scale.astype(np.float64))
    return result.astype(np.promote_types(scale.dtype, np.float32))


def float_weights(inputs: LynxMoEInputs, spec: MoESpec, quantization: WeightQuantization | None) -> tuple[np.ndarray, np.ndarray]:
    """fc1 [E,2I,H] and fc2 [E,H,I] as floats: the inputs themselves, or their dequantized values."""
    if quantization is None:
        return inputs.fc1, inputs.fc2
    if inputs.fc1_scales is None or inputs.fc2_scales is None:
        raise ValueError("quantized experts need fc1_scales and fc2_scales")
    bits, block = quantization.bits, quantization.block_size
    fc1 = dequantize_blockwise(inputs.fc1, inputs.fc1_scales, inputs.fc1_zero_points, bits, block, spec.hidden_size)
    fc2 = dequantize_blockwise(inputs.fc2, inputs.fc2_scales, inputs.fc2_zero_points, bits, block, spec.expert_size)
    return fc1, fc2


def lynx_moe(inputs: LynxMoEInputs, spec: MoESpec, policy: SelectionPolicy, quantization: WeightQuantization | None = None) -> np.ndarray:
    """The node's output [T,H] (float64) for `inputs` and its parsed attributes (the module docstring's steps)."""
    routing = select(spec, policy, inputs.router_logits, seq_len=inputs.seq_len, num_valid=inputs.num_valid)
    fc1, fc2 = float_weights(inputs, spec, quantization)
    return combine(inputs.hidden, routing.ids, routing.weights, fc1, fc2, spec, fc1_bias=inputs.fc1_bias, fc2_bias=inputs.fc2_bias)
