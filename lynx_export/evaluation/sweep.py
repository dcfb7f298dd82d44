"""What an accuracy sweep shares between the evaluation and the trace replay: the policies it
tries, how sequences are grouped into decode batches, and confidence intervals."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from lynx_export.errors import DataError
from lynx_export.routing import (
    AUTHORS_LYNX_PARAMS,
    BudgetPolicy,
    LynxPolicy,
    OffPolicy,
    Router,
    Routing,
    RoutingBatch,
    SelectionPolicy,
    SelectionStats,
    compare_many,
    compare_routings,
    make_policy,
)

__all__ = ["policy_label", "policy_grid", "select_step", "select_steps", "batch_groups", "mean_ci", "budget_sizes", "LYNX_ALPHAS", "LYNX_BETAS", "MAX_BUDGETS"]

LYNX_ALPHAS = (0.35, 0.7, 1.4, 3.0)
LYNX_BETAS = (None, 1, 2)
MAX_BUDGETS = 8  # budget sizes a grid sweeps: each costs one decode per batch size
_Z95 = 1.959964


def policy_label(policy: SelectionPolicy) -> str:
    if isinstance(policy, LynxPolicy):
        beta = "-" if policy.beta is None else policy.beta
        tie = "" if policy.tie_break == "logit" else f" tie={policy.tie_break}"
        return f"lynx a={policy.alpha:g} b={beta}{tie}"
    if isinstance(policy, BudgetPolicy):
        return f"budget n={policy.budget}"
    return policy.name


def policy_grid(num_experts: int, top_k: int, grid: bool = True) -> list[SelectionPolicy]:
    """`off`, the default LYNX policy for (E, K), and with `grid` LYNX over alpha x beta (the
    authors' beta for (E, K) added when it is not among LYNX_BETAS) and budget sizes
    (`budget_sizes`). The default comes second; no policy appears twice."""
    chosen: list[SelectionPolicy] = [OffPolicy(), make_policy("lynx", num_experts=num_experts, top_k=top_k)]
    if grid:
        authors = AUTHORS_LYNX_PARAMS.get((num_experts, top_k))
        betas = LYNX_BETAS + ((authors[1],) if authors and authors[1] not in LYNX_BETAS else ())
        chosen += [LynxPolicy(alpha=a, beta=b) for a in LYNX_ALPHAS for b in betas]
        chosen += [BudgetPolicy(budget=n) for n in budget_sizes(num_experts, top_k)]
    unique: list[SelectionPolicy] = []
    for policy in chosen:
        if policy not in unique:
            unique.append(policy)
    return unique


def budget_sizes(num_experts: int, top_k: int) -> list[int]:
    """Every budget from K+1 to E-1 when there are at most MAX_BUDGETS of them, else the multiples
    of K in that range (E64/K8: 16, 24, ..., 56), at most MAX_BUDGETS of them evenly spaced."""
    every = list(range(top_k + 1, num_experts))
    if len(every) <= MAX_BUDGETS:
        return every
    multiples = [n for n in every if n % top_k == 0]
    if len(multiples) <= MAX_BUDGETS:
        return multiples
    picks = np.linspace(0, len(multiples) - 1, MAX_BUDGETS).round().astype(int)
    return [multiples[i] for i in sorted(set(picks))]


def select_step(policy: SelectionPolicy, logits: np.ndarray, router: Router) -> tuple[Routing, SelectionStats]:
    """One decode step of one layer: the policy's routing of the batch, and how it differs from
    the model's own routing."""
    chosen = router.select(policy, logits)
    return chosen, compare_routings(router.route(logits), chosen)


def select_steps(policy: SelectionPolicy, logits: np.ndarray, router: Router) -> tuple[RoutingBatch, list[SelectionStats]]:
    """select_step of each of P independent steps [P, B, E] at once, with the same results bit for
    bit (RoutingBatch.problem(p) is step p's Routing). The caller must make sure the steps are
    independent: no step's logits may depend on another step's selection."""
    chosen = router.select_many(policy, logits)
    return chosen, compare_many(router.route_many(logits), chosen)


def batch_groups(count: int, batch: int, seed: int = 0) -> list[np.ndarray]:
    """Indices of `count` sequences in decode batches of `batch`, in a fixed random order (so a batch
    mixes unrelated text, as a server's batch does). A remainder smaller than `batch` is dropped."""
    if batch < 1 or batch > count:
        raise DataError(f"batch size {batch} must be in [1, {count}] (the number of sequences)")
    order = np.random.default_rng(seed).permutation(count)
    return [order[i : i + batch] for i in range(0, count - batch + 1, batch)]


def mean_ci(samples: Sequence[float] | np.ndarray) -> tuple[float, float, float]:
    """Mean and its 95% normal-approximation interval (independent samples)."""
    x = np.asarray(samples, dtype=np.float64)
    if x.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(x.mean())
    half = _Z95 * float(x.std(ddof=1)) / math.sqrt(x.size) if x.size > 1 else 0.0
    return mean, mean - half, mean + half
