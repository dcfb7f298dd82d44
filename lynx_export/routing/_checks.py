"""Validation of routing problems: logits, K and the valid-row count (one-line RoutingError)."""

from __future__ import annotations

import operator
from typing import Any

import numpy as np

from lynx_export.errors import RoutingError

# The widest integer the LynxMoE op carries: its integer attributes and plugin fields, and TensorRT's
# profile dimensions, are int32 (op/contract.py re-exports it as the op's fact).
INT32_MAX = 2**31 - 1


def as_int(value: Any, what: str) -> int:
    # bool is an int to Python but never a meaningful count here.
    if isinstance(value, (bool, np.bool_)):
        raise RoutingError(f"{what} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise RoutingError(f"{what} must be an integer, got {value!r}") from None


_LAYOUTS = {2: "2-D [tokens, experts]", 3: "3-D [problems, tokens, experts]"}


def check_logits(logits: Any, ndim: int = 2) -> np.ndarray:
    try:
        raw = np.asarray(logits)
    except (TypeError, ValueError) as exc:
        raise RoutingError(f"logits are not a numeric array ({exc})") from None
    if raw.ndim != ndim:
        raise RoutingError(f"logits must be {_LAYOUTS[ndim]}, got shape {raw.shape}")
    if raw.dtype.kind not in "biuf":
        raise RoutingError(f"logits must be real numbers, got dtype {raw.dtype}")
    with np.errstate(over="ignore", invalid="ignore"):
        # A fresh C-ordered copy: results never alias the caller's array, and reductions see one layout.
        arr = np.array(raw, dtype=np.float32, order="C", copy=True)
    if np.isnan(arr).any():
        raise RoutingError("logits contain NaN")
    if np.isposinf(arr).any():
        if raw.dtype.kind == "f" and not np.isposinf(raw).any():
            raise RoutingError("logits overflow float32")
        raise RoutingError("logits contain +inf")
    if raw.dtype.kind == "f" and raw.dtype.itemsize > 4 and np.count_nonzero(np.isinf(arr)) != np.count_nonzero(np.isinf(raw)):
        raise RoutingError("logits overflow float32")
    return arr


def check_problem(logits: Any, top_k: Any, valid: Any) -> tuple[np.ndarray, int, int]:
    """Validated (float32 logits, K, number of valid rows)."""
    arr = check_logits(logits)
    k = _check_top_k(top_k, arr.shape[1])
    rows = _check_valid(valid, arr.shape[0])
    _check_finite_rows(arr, k)
    return arr, k, rows


def check_problems(logits: Any, top_k: Any, valid: Any) -> tuple[np.ndarray, int, np.ndarray]:
    """Validated (float32 logits [P, T, E], K, valid rows per problem [P] int64) of a stack of
    independent problems, each held to check_problem's rules. valid: None (every row), one count
    for all problems, or one count per problem."""
    arr = check_logits(logits, ndim=3)
    problems, tokens, experts = arr.shape
    k = _check_top_k(top_k, experts)
    if valid is None or np.ndim(valid) == 0:
        rows = np.full(problems, _check_valid(valid, tokens), dtype=np.int64)
    else:
        raw = np.asarray(valid)
        if raw.shape != (problems,) or (raw.size and raw.dtype.kind not in "iu"):
            raise RoutingError(f"valid must be an integer or {problems} integers (one per problem), got {raw.dtype} of shape {raw.shape}")
        rows = raw.astype(np.int64)
        bad = np.flatnonzero((rows < 0) | (rows > tokens))
        if bad.size:
            raise RoutingError(f"valid must be in [0, {tokens}] for {tokens} tokens, got {raw[bad[0]]} for problem {bad[0]}")
    _check_finite_rows(arr, k)
    return arr, k, rows


def _check_top_k(top_k: Any, experts: int) -> int:
    k = as_int(top_k, "top_k")
    if not 1 <= k <= experts:
        raise RoutingError(f"top_k must be in [1, {experts}] for {experts} experts, got {k}")
    return k


def _check_valid(valid: Any, tokens: int) -> int:
    rows = tokens if valid is None else as_int(valid, "valid")
    if not 0 <= rows <= tokens:
        raise RoutingError(f"valid must be in [0, {tokens}] for {tokens} tokens, got {rows}")
    return rows


def _check_finite_rows(arr: np.ndarray, k: int) -> None:
    """Every row [..., E] needs K finite logits; the message names the first row without."""
    if arr.size:
        finite = np.count_nonzero(np.isfinite(arr), axis=-1)
        where = np.unravel_index(int(np.argmin(finite)), finite.shape)
        if finite[where] < k:
            place = f"row {where[-1]}" if arr.ndim == 2 else f"problem {where[0]} row {where[1]}"
            raise RoutingError(f"logits {place} has {finite[where]} finite entries, fewer than top_k={k}")
