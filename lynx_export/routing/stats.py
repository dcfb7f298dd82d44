"""How a policy changed a batch's routing: active experts, agreement, first choices kept."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lynx_export.errors import RoutingError
from lynx_export.routing._fp32 import union
from lynx_export.routing.forms import Router, Routing, RoutingBatch

__all__ = ["SelectionStats", "selection_stats", "compare_routings", "compare_many"]


@dataclass(frozen=True)
class SelectionStats:
    """How a policy changed one batch's routing through one layer."""

    active_model: int  # distinct experts the model's own routing uses
    active_policy: int  # distinct experts after the policy
    agreement: float  # mean over valid rows of |own top-K ∩ routed top-K| / K (1.0 for no rows)
    first_choices: int  # distinct first choices of the valid rows: no policy that keeps them goes lower
    first_kept: float  # share of valid rows whose own first choice is among their routed experts (1.0 for no rows)


def selection_stats(router: Router, logits: np.ndarray, routed_logits: np.ndarray, valid: int | None = None) -> SelectionStats:
    """Compare `router`'s routing on `logits` (the router's output) with its routing on
    `routed_logits` (the same logits after a policy's mask)."""
    return compare_routings(router.route(logits, valid), router.route(routed_logits, valid), valid)


def compare_routings(own: Routing, routed: Routing, valid: int | None = None) -> SelectionStats:
    """SelectionStats of a batch routed two ways (the model's own routing first)."""
    rows = own.ids.shape[0] if valid is None else int(valid)
    if rows == 0:
        return SelectionStats(int(own.active.size), int(routed.active.size), 1.0, 0, 1.0)
    agreement, first_choices, first_kept = _kept(own.ids[:rows], routed.ids[:rows])
    return SelectionStats(int(own.active.size), int(routed.active.size), float(agreement), int(first_choices), float(first_kept))


def compare_many(own: RoutingBatch, routed: RoutingBatch) -> list[SelectionStats]:
    """compare_routings of each problem of two RoutingBatch of the same problems (the model's own
    routing first), with the same values; problems with the same valid count are compared together."""
    if own.ids.shape != routed.ids.shape or not np.array_equal(own.valid, routed.valid):
        raise RoutingError(f"the routings differ in shape ({own.ids.shape} vs {routed.ids.shape}) or valid rows")
    active_model, active_policy = own.active.sum(axis=-1), routed.active.sum(axis=-1)
    agreement, first_choices, first_kept = np.ones(len(own)), np.zeros(len(own), dtype=np.int64), np.ones(len(own))
    for rows in np.unique(own.valid[own.valid > 0]):
        chosen = np.flatnonzero(own.valid == rows)
        agreement[chosen], first_choices[chosen], first_kept[chosen] = _kept(own.ids[chosen, :rows], routed.ids[chosen, :rows])
    return [SelectionStats(int(a), int(b), float(c), int(d), float(e))
            for a, b, c, d, e in zip(active_model, active_policy, agreement, first_choices, first_kept)]


def _kept(own: np.ndarray, routed: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(agreement, distinct first choices, first choice kept) of ids [..., rows, K] routed two ways
    (rows >= 1). Means reduce over the last axis, per problem, as for one problem alone."""
    kept = (own[..., :, None] == routed[..., None, :]).any(axis=-1)  # [..., rows, K]: own choice still routed
    agreement = np.mean(kept.sum(axis=-1) / own.shape[-1], axis=-1)
    first_choices = union(own[..., :1], int(own.max()) + 1).sum(axis=-1)
    return agreement, first_choices, np.mean(kept[..., 0], axis=-1)
