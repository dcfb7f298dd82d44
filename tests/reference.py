"""Slow numpy references the tests compare the compiled graphs against."""

from __future__ import annotations

import numpy as np

from lynx_export.routing import Routing


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def moe_forward(
    hidden: np.ndarray,
    routing: Routing,
    fc1: np.ndarray,
    fc2: np.ndarray,
    *,
    fc1_bias: np.ndarray | None = None,
    fc2_bias: np.ndarray | None = None,
    alpha: float = 1.0,
    beta: float = 0.0,
    limit: float | None = None,
) -> np.ndarray:
    """MoE output [T,H] from canonical weights (fc1 [E,2I,H] gate/up interleaved, fc2 [E,H,I]),
    optional biases (fc1_bias interleaved like fc1) and the SwiGLU parameters of the contract:
    gate * sigmoid(alpha * gate) * (up + beta), gate clamped to <= limit and up to [-limit, limit]."""
    hidden = hidden.astype(np.float64)
    out = np.zeros_like(hidden)
    for t in range(hidden.shape[0]):
        for e, w in zip(routing.ids[t], routing.weights[t]):
            proj = fc1[e].astype(np.float64) @ hidden[t]
            if fc1_bias is not None:
                proj = proj + fc1_bias[e]
            gate, up = proj[0::2], proj[1::2]
            if limit is not None:
                gate, up = np.minimum(gate, limit), np.clip(up, -limit, limit)
            act = gate / (1.0 + np.exp(-alpha * gate)) * (up + beta)
            y = fc2[e].astype(np.float64) @ act
            out[t] += w * (y if fc2_bias is None else y + fc2_bias[e])
    return out
