"""Validation of routing problems: logits, K and the valid-row count (one-line RoutingError)."""

from __future__ import annotations

import operator
from typing import Any

import numpy as np

from lynx_export.errors import RoutingError


def as_int(value: Any, what: str) -> int:
    # bool is an int to Python but never a meaningful count here.
    if isinstance(value, (bool, np.bool_)):
        raise RoutingError(f"{what} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise RoutingError(f"{what} must be an integer, got {value!r}") from None


def check_logits(logits: Any) -> np.ndarray:
    try:
        raw = np.asarray(logits)
    except (TypeError, ValueError) as exc:
        raise RoutingError(f"logits are not a numeric array ({exc})") from None
    if raw.ndim != 2:
        raise RoutingError(f"logits must be 2-D [tokens, experts], got shape {raw.shape}")
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
    tokens, experts = arr.shape
    k = as_int(top_k, "top_k")
    if not 1 <= k <= experts:
        raise RoutingError(f"top_k must be in [1, {experts}] for {experts} experts, got {k}")
    rows = tokens if valid is None else as_int(valid, "valid")
    if not 0 <= rows <= tokens:
        raise RoutingError(f"valid must be in [0, {tokens}] for {tokens} tokens, got {rows}")
    if tokens:
        finite = np.count_nonzero(np.isfinite(arr), axis=1)
        row = int(np.argmin(finite))
        if finite[row] < k:
            raise RoutingError(f"logits row {row} has {finite[row]} finite entries, fewer than top_k={k}")
    return arr, k, rows
