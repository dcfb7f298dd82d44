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

from dataclasses import dataclass

import numpy as np

from lynx_export.op.contract import gate_up
from lynx_export.op.quantization import dequantize_blockwise
from lynx_export.op.spec import Activation, MoESpec, WeightQuantization
from lynx_export.routing import OffPolicy, Routing, SelectionPolicy
from lynx_export.errors import ContractError

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
    return spec.routing.select(chosen, logits, rows)


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
        raise ContractError(f"activation {spec.activation!r}: the LynxMoE reference implements {Activation.SWIGLU}")
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
        y = swiglu(*gate_up(proj, axis=-1), spec) @ np.asarray(fc2[e], np.float64).T  # [N,H]
        if fc2_bias is not None:
            y = y + np.asarray(fc2_bias[e], np.float64)
        # A token holds each expert at most once (its K ids are distinct), so `tokens` has no repeats.
        out[tokens] += weights[tokens, choices][:, None] * y
    return out


def float_weights(inputs: LynxMoEInputs, spec: MoESpec, quantization: WeightQuantization | None) -> tuple[np.ndarray, np.ndarray]:
    """fc1 [E,2I,H] and fc2 [E,H,I] as floats: the inputs themselves, or their dequantized values."""
    if quantization is None:
        return inputs.fc1, inputs.fc2
    if inputs.fc1_scales is None or inputs.fc2_scales is None:
        raise ContractError("quantized experts need fc1_scales and fc2_scales")
    bits, block = quantization.bits, quantization.block_size
    fc1 = dequantize_blockwise(inputs.fc1, inputs.fc1_scales, inputs.fc1_zero_points, bits, block, spec.hidden_size)
    fc2 = dequantize_blockwise(inputs.fc2, inputs.fc2_scales, inputs.fc2_zero_points, bits, block, spec.expert_size)
    return fc1, fc2


def lynx_moe(inputs: LynxMoEInputs, spec: MoESpec, policy: SelectionPolicy, quantization: WeightQuantization | None = None) -> np.ndarray:
    """The node's output [T,H] (float64) for `inputs` and its parsed attributes (the module docstring's steps)."""
    routing = select(spec, policy, inputs.router_logits, seq_len=inputs.seq_len, num_valid=inputs.num_valid)
    fc1, fc2 = float_weights(inputs, spec, quantization)
    return combine(inputs.hidden, routing.ids, routing.weights, fc1, fc2, spec, fc1_bias=inputs.fc1_bias, fc2_bias=inputs.fc2_bias)
