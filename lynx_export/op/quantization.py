"""Block-wise weight-only quantization of expert weights, in the layout ONNX Runtime's
`MatMulNBits` and `QMoE` read: numpy only, so the numpy reference and the GPU check can use it.

A weight W [..., N, K] (N output rows, K inputs) is cut along K into blocks of `block_size`;
each block has one scale and one zero point z, and w = (q - z) * scale. `quantize_blockwise`
writes symmetric blocks: scale = max|w| / (2^(bits-1) - 1) and the default z = 2^(bits-1), so
q = clip(round(w / scale) + z, 0, 2^bits - 1). int4 values are packed two per byte, the lower K
index in the low nibble.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lynx_export.op.spec import WeightQuantization
from lynx_export.errors import ContractError

__all__ = ["QuantizedWeight", "quantize_blockwise", "dequantize_blockwise", "pack", "unpack"]


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """q: uint8 [..., N, K*bits/8] packed; scales [..., N, K/block_size] in the weight's float
    type; zero_points None (symmetric, 2^(bits-1)) or uint8 packed like q over the blocks."""

    q: np.ndarray
    scales: np.ndarray
    bits: int
    block_size: int
    zero_points: np.ndarray | None = None

    def dequantize(self, k: int) -> np.ndarray:
        return dequantize_blockwise(self.q, self.scales, self.zero_points, self.bits, self.block_size, k)


def pack(values: np.ndarray, bits: int) -> np.ndarray:
    """uint8 [..., K] holding values < 2^bits -> [..., K*bits/8] (int4: low nibble first)."""
    values = np.asarray(values).astype(np.uint8)
    if bits == 8:
        return values
    if values.shape[-1] % 2:
        values = np.concatenate([values, np.zeros((*values.shape[:-1], 1), np.uint8)], axis=-1)
    return (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)


def unpack(packed: np.ndarray, bits: int, count: int | None = None) -> np.ndarray:
    """The first `count` (default: all) `bits`-wide values along the last axis of uint8 `packed`."""
    data = np.asarray(packed)
    if data.dtype != np.uint8:
        raise ContractError(f"quantized data must be uint8, got {data.dtype}")
    if bits == 8:
        values = data
    else:
        values = np.stack([data & 0x0F, data >> 4], axis=-1).reshape(*data.shape[:-1], 2 * data.shape[-1])
    count = values.shape[-1] if count is None else count
    if values.shape[-1] < count:
        raise ContractError(f"{data.shape[-1]} bytes hold {values.shape[-1]} {bits}-bit values, fewer than {count}")
    return values[..., :count]


def quantize_blockwise(weight: np.ndarray, bits: int, block_size: int) -> QuantizedWeight:
    """Quantize `weight` [..., N, K] along K into symmetric blocks (see the module docstring)."""
    WeightQuantization(bits, block_size)  # checks bits and block_size
    k = weight.shape[-1]
    if k % block_size:
        raise ContractError(f"the input dimension {k} is not a multiple of block_size {block_size}")
    w = weight.astype(np.float32).reshape(*weight.shape[:-1], k // block_size, block_size)
    qmax = (1 << (bits - 1)) - 1
    scales = (np.abs(w).max(axis=-1) / qmax).astype(weight.dtype if weight.dtype != np.float64 else np.float32)
    safe = np.where(scales == 0, 1, scales).astype(np.float32)[..., None]
    q = np.clip(np.rint(w / safe) + (1 << (bits - 1)), 0, (1 << bits) - 1).astype(np.uint8)
    return QuantizedWeight(pack(q.reshape(weight.shape), bits), scales, bits, block_size)


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
        raise ContractError(f"scales of shape {scale.shape} do not match weights {np.asarray(q).shape} with {blocks} blocks of {block_size}")
    values = unpack(q, quantization.bits, k).astype(np.float64)
    if zero_points is None:
        zero = np.full(scale.shape, 2.0 ** (bits - 1))
    else:
        zero = unpack(zero_points, quantization.bits, blocks).astype(np.float64)
        if zero.shape != scale.shape:
            raise ContractError(f"zero points of shape {np.asarray(zero_points).shape} do not match scales {scale.shape}")
    def per_weight(per_block: np.ndarray) -> np.ndarray:
        # Block values repeated along K, cut to K (the last block may be partial).
        return np.repeat(per_block, block_size, axis=-1)[..., :k]

    result = (values - per_weight(zero)) * per_weight(scale.astype(np.float64))
    return result.astype(np.promote_types(scale.dtype, np.float32))
