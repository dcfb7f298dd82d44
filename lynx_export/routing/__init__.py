"""NumPy fp32 reference of MoE routing and batch-aware expert selection: the oracle every backend is tested against.

`forms` holds the model's own routers, `policies` the selection policies, `stats` what a policy
changed; `_fp32` is the arithmetic contract a backend mirrors to agree bit for bit. `route_many`,
`SelectionPolicy.select_many` and `compare_many` run many independent problems [P, T, E] at once
with the same results as the one-problem functions (the evaluation's fast path).
"""

from __future__ import annotations

from lynx_export.errors import RoutingError
from lynx_export.routing._checks import INT32_MAX
from lynx_export.routing.forms import RouterForm, GroupedRouting, Router, Routing, RoutingBatch, route, route_many, selection_scores
from lynx_export.routing.policies import SelectionPolicy, OffPolicy, LynxPolicy, BudgetPolicy, POLICY_NAMES, TIE_BREAKS, make_policy, default_lynx_params, AUTHORS_LYNX_PARAMS
from lynx_export.routing.stats import SelectionStats, selection_stats, compare_routings, compare_many

__all__ = [
    "INT32_MAX",
    "RoutingError",
    "RouterForm",
    "GroupedRouting",
    "Router",
    "Routing",
    "RoutingBatch",
    "route",
    "route_many",
    "selection_scores",
    "SelectionPolicy",
    "OffPolicy",
    "LynxPolicy",
    "BudgetPolicy",
    "POLICY_NAMES",
    "TIE_BREAKS",
    "make_policy",
    "default_lynx_params",
    "AUTHORS_LYNX_PARAMS",
    "SelectionStats",
    "selection_stats",
    "compare_routings",
    "compare_many",
]
