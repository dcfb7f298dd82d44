"""The fp32 arithmetic every routing function is built from, and the contract backends mirror."""

from __future__ import annotations

import numpy as np

# Arithmetic contract (what a backend must reproduce to agree bit for bit):
# - every value is float32; +, -, *, / and ceil are IEEE fp32 operations;
# - exp, pow and sigmoid are the correctly rounded fp32 results: they are evaluated in float64 and
#   rounded once, because numpy's own fp32 SIMD exp/pow differ from the correctly rounded value by
#   an ulp on a third of the inputs, and differently on different CPUs (ONNX Runtime's Sigmoid is
#   an approximation too: its sigmoid_grouped ids agree except where scores tie within an ulp);
# - every sum runs sequentially in index order (np.add.accumulate), because np.sum switches to
#   pairwise summation depending on the array's shape and memory layout;
# - top-K takes the K largest values, equal values by lower index (what ONNX TopK does).
#
# Every function works on the last axis (rows of experts) whatever the leading axes, so a stack of
# problems [P, T, E] goes through the same code, with the same results, as each problem [T, E]:
# element-wise fp32 operations and per-row sorts do not depend on the other rows, and a sequential
# sum over tokens (axis -2) adds the same values in the same order.

F32 = np.float32
NEG_INF = np.float32(-np.inf)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-x)), correctly rounded to fp32; sigmoid(-inf) = 0."""
    with np.errstate(over="ignore"):
        return (1.0 / (1.0 + np.exp(-x.astype(np.float64)))).astype(np.float32)


def softmax(x: np.ndarray) -> np.ndarray:
    """Row softmax in fp32 with max subtraction; exp(-inf) = 0; a row of only -inf gives zeros."""
    top = np.max(x, axis=-1, keepdims=True)
    # -inf - -inf would be NaN; shifting such a row by 0 makes all its exps 0 instead.
    top = np.where(np.isfinite(top), top, F32(0))
    exps = exp(x - top)
    return safe_divide(exps, sum_sequential(exps, axis=-1)[..., None])


def exp(x: np.ndarray) -> np.ndarray:
    return np.exp(x.astype(np.float64)).astype(np.float32)


def power(base: np.float32, exponent: np.ndarray) -> np.ndarray:
    with np.errstate(under="ignore"):
        return np.power(np.float64(base), exponent.astype(np.float64)).astype(np.float32)


def sum_sequential(x: np.ndarray, axis: int) -> np.ndarray:
    if x.shape[axis] == 0:
        return np.sum(x, axis=axis, dtype=np.float32)
    return np.take(np.add.accumulate(x, axis=axis, dtype=np.float32), -1, axis=axis)


def safe_divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    # den is 0 only where every numerator is 0 (a row with no finite logit): keep zeros, not NaN.
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def topk(x: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values per row, equal values by lower index (ONNX TopK order)."""
    return np.argsort(-x, axis=-1, kind="stable")[..., :k].astype(np.int64, copy=False)


def topk_by(primary: np.ndarray, secondary: np.ndarray, k: int) -> np.ndarray:
    """Top-k of `primary` per row, equal values by larger `secondary`, then lower index.

    Spelled as two stable sorts so that a backend can mirror it with two TopK ops: order the
    columns by `secondary`, then take the top-k of `primary` in that order.
    """
    order = np.argsort(-secondary, axis=-1, kind="stable")
    permuted = np.take_along_axis(primary, order, axis=-1)
    position = np.argsort(-permuted, axis=-1, kind="stable")[..., :k]
    return np.take_along_axis(order, position, axis=-1).astype(np.int64, copy=False)


def union(picks: np.ndarray, experts: int) -> np.ndarray:
    """[..., E] bool: the experts named in picks [..., T, K] (per leading index: [T, K] -> [E])."""
    lead = picks.shape[:-2]
    flat = _rows_of_picks(picks)
    mask = np.zeros((flat.shape[0], experts), dtype=bool)
    mask[np.arange(flat.shape[0])[:, None], flat] = True
    return mask.reshape(*lead, experts)


def counts(picks: np.ndarray, experts: int) -> np.ndarray:
    """[..., E] int64: how often each expert is named in picks [..., T, K]."""
    lead = picks.shape[:-2]
    flat = _rows_of_picks(picks)
    offset = flat + experts * np.arange(flat.shape[0], dtype=np.int64)[:, None]
    return np.bincount(offset.ravel(), minlength=flat.shape[0] * experts).astype(np.int64).reshape(*lead, experts)


def _rows_of_picks(picks: np.ndarray) -> np.ndarray:
    """picks [..., T, K] as [prod(...), T*K] (explicit sizes: a reshape with -1 fails on 0 problems)."""
    return picks.reshape(int(np.prod(picks.shape[:-2], dtype=np.int64)), picks.shape[-2] * picks.shape[-1])
