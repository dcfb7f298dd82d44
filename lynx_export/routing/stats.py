"""How a policy changed a batch's routing: active experts, agreement, first choices kept."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lynx_export.routing.forms import GroupedRouting, RouterForm, Routing, route

__all__ = ["SelectionStats", "selection_stats", "compare_routings"]


@dataclass(frozen=True)
class SelectionStats:
    """How a policy changed one batch's routing through one layer."""

    active_model: int  # distinct experts the model's own routing uses
    active_policy: int  # distinct experts after the policy
    agreement: float  # mean over valid rows of |own top-K ∩ routed top-K| / K (1.0 for no rows)
    first_choices: int  # distinct first choices of the valid rows: no policy that keeps them goes lower
    first_kept: float  # share of valid rows whose own first choice is among their routed experts (1.0 for no rows)


def selection_stats(
    logits: np.ndarray,
    routed_logits: np.ndarray,
    top_k: int,
    form: RouterForm = RouterForm.SOFTMAX_TOPK,
    normalize: bool = True,
    valid: int | None = None,
    *,
    grouping: GroupedRouting | None = None,
) -> SelectionStats:
    """Compare the routing on `logits` (the router's output) with the routing on `routed_logits`
    (the same logits after a policy's mask)."""
    own = route(logits, top_k, form, normalize, valid, grouping=grouping)
    return compare_routings(own, route(routed_logits, top_k, form, normalize, valid, grouping=grouping), valid)


def compare_routings(own: Routing, routed: Routing, valid: int | None = None) -> SelectionStats:
    """SelectionStats of a batch routed two ways (the model's own routing first)."""
    rows = own.ids.shape[0] if valid is None else int(valid)
    if rows == 0:
        return SelectionStats(int(own.active.size), int(routed.active.size), 1.0, 0, 1.0)
    kept = (own.ids[:rows, :, None] == routed.ids[:rows, None, :]).any(axis=2)  # [rows, K]: own choice still routed
    return SelectionStats(
        int(own.active.size),
        int(routed.active.size),
        float(np.mean(kept.sum(axis=1) / own.ids.shape[1])),
        int(np.unique(own.ids[:rows, 0]).size),
        float(np.mean(kept[:, 0])),
    )
