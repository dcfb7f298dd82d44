"""Slow numpy references the tests compare the compiled graphs against."""

from __future__ import annotations

import numpy as np

from lynx_export.routing import Routing


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def moe_forward(hidden: np.ndarray, routing: Routing, fc1: np.ndarray, fc2: np.ndarray) -> np.ndarray:
    """MoE output [T,H] from canonical weights (fc1 [E,2I,H] gate/up interleaved, fc2 [E,H,I])."""
    hidden = hidden.astype(np.float64)
    out = np.zeros_like(hidden)
    for t in range(hidden.shape[0]):
        for e, w in zip(routing.ids[t], routing.weights[t]):
            proj = fc1[e].astype(np.float64) @ hidden[t]
            gate, up = proj[0::2], proj[1::2]
            out[t] += w * (fc2[e].astype(np.float64) @ (silu(gate) * up))
    return out
