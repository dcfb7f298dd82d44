"""Batch-aware expert selection policies (off, lynx, budget) and their defaults per model shape."""

from __future__ import annotations

import abc
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from lynx_export.errors import RoutingError
from lynx_export.routing._checks import as_int, check_problem
from lynx_export.routing._fp32 import F32, NEG_INF, power, softmax, sum_sequential, topk, topk_by, union
from lynx_export.routing.forms import GroupedRouting, RouterForm, Routing, check_form, check_grouping, grouped_choice, route_checked

__all__ = ["SelectionPolicy", "OffPolicy", "LynxPolicy", "BudgetPolicy", "POLICY_NAMES", "TIE_BREAKS", "BETA_MAX", "make_policy", "default_lynx_params", "AUTHORS_LYNX_PARAMS"]

TIE_BREAKS = ("logit", "index")
BETA_MAX = 2**31 - 1  # beta travels as an int32 attribute and plugin field
POLICY_NAMES = ("off", "lynx", "budget")

# The LYNX authors' shipped (alpha, beta) per (num_experts, top_k).
AUTHORS_LYNX_PARAMS: dict[tuple[int, int], tuple[float, int | None]] = {
    (8, 2): (0.7, 1),
    (64, 8): (3.0, 4),
    (128, 8): (3.0, 2),
    (128, 4): (3.0, 2),
}
# Where this project measured accuracy under batched decode on a trained model, its choice
# replaces the authors' value (docs/ACCURACY.md): for E8/K2 the authors' (0.7, 1) cost 5
# points of next-token accuracy at batch 16 and 64; (3.0, 1) stayed within 0.4 points at every
# batch size while still cutting active experts (by 32% at batch 4, 11% at batch 16).
_MEASURED_LYNX_PARAMS: dict[tuple[int, int], tuple[float, int | None]] = {
    (8, 2): (3.0, 1),
}
_LYNX_DEFAULTS = {**AUTHORS_LYNX_PARAMS, **_MEASURED_LYNX_PARAMS}
_LYNX_FALLBACK: tuple[float, int | None] = (1.0, None)



class SelectionPolicy(abc.ABC):
    """A batch-aware expert selection policy for one MoE layer at one decode step.

    A policy chooses, from the whole batch's router logits, the set of experts tokens may use
    (`allowed`); `select` then routes every token with the model's own router restricted to
    that set, so each token still gets K experts.

    For `sigmoid_grouped` the policy votes on the values the router ranks experts by, as if
    they were logits: the choice values sigmoid(L) + bias with every expert outside the token's
    kept groups at -inf (`selection_scores`); so a token alone in the batch keeps the model's
    experts under LYNX's logit tie break, as with the other routers.
    """

    name: ClassVar[str]

    @abc.abstractmethod
    def allowed(self, logits: np.ndarray, top_k: int, valid: int | None = None) -> np.ndarray:
        """[E] bool: the experts tokens may be routed to in this batch.

        Only rows < valid (default T) vote; padded rows never change the result.
        """

    def select(
        self,
        logits: np.ndarray,
        top_k: int,
        form: RouterForm = RouterForm.SOFTMAX_TOPK,
        normalize: bool = True,
        valid: int | None = None,
        *,
        grouping: GroupedRouting | None = None,
    ) -> Routing:
        """Route the batch through the model's router with experts outside `allowed` masked to -inf.

        Padded rows (>= valid) are routed too but never vote and never count in `active`. A row
        left with fewer than K finite logits after masking (possible only for padded rows, or for
        logits already holding -inf) is filled up with masked experts of weight 0; a row with no
        finite logit gets all-zero weights. For `sigmoid_grouped` (parameters in `grouping`) the
        policy votes on `selection_scores`, and a row is filled up so only when no `topk_groups`
        groups hold K allowed experts (see GroupedRouting).
        """
        arr, k, rows = check_problem(logits, top_k, valid)
        router = check_form(form)
        groups = check_grouping(router, grouping, arr, k)
        votes = arr if groups is None else grouped_choice(arr, groups, k)[1]
        mask = np.asarray(self.allowed(votes, k, rows))
        if mask.dtype != np.bool_ or mask.shape != (arr.shape[1],):
            raise RoutingError(f"policy '{self.name}' returned a {mask.dtype} mask of shape {mask.shape}, expected bool ({arr.shape[1]},)")
        return route_checked(np.where(mask, arr, NEG_INF), k, router, bool(normalize), rows, groups)

    def params(self) -> dict[str, Any]:
        """The policy's parameters as JSON-able values (its dataclass fields)."""
        if not dataclasses.is_dataclass(self):
            return {}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass(frozen=True)
class OffPolicy(SelectionPolicy):
    """No selection: every expert is allowed, so select() equals route()."""

    name: ClassVar[str] = "off"

    def allowed(self, logits: np.ndarray, top_k: int, valid: int | None = None) -> np.ndarray:
        arr, _, _ = check_problem(logits, top_k, valid)
        return np.ones(arr.shape[1], dtype=bool)


@dataclass(frozen=True)
class LynxPolicy(SelectionPolicy):
    """LYNX batch-aware selection: tokens trade their weaker experts for ones the batch already uses.

    With B valid tokens, per token t and expert e:
      bin[t,e]   = ceil(alpha * (L[t,e] - max_e L[t,:]))      <= 0, clamped to >= -beta if beta is set
      w[t,e]     = B ** bin[t,e]                               one bin down weighs as much as B tokens less
      pop[e]     = sum of w[t,e] over valid t                  sequential in t
      score[t,e] = bin[t,e] + (pop[e] - w[t,e]) / B            the token's own vote excluded
    each valid token picks the top-K of its scores and the allowed set is the union of the picks.
    Since 0 <= (pop - w) / B < 1, popularity only reorders experts within a bin.

    tie_break "index" orders equal scores by lower expert index (the authors' behaviour, which can
    drop a token's best expert); "logit" orders them by higher original logit, then lower index,
    so a batch of one token keeps exactly the model's experts.
    """

    name: ClassVar[str] = "lynx"

    alpha: float
    beta: int | None = None
    tie_break: str = "logit"

    def __post_init__(self) -> None:
        # Coerced to plain Python types so params() is JSON-able whatever the caller passed.
        if isinstance(self.alpha, (bool, np.bool_)) or not isinstance(self.alpha, (int, float, np.integer, np.floating)):
            raise RoutingError(f"alpha must be a number, got {self.alpha!r}")
        alpha = float(self.alpha)
        if not (math.isfinite(alpha) and 0 < alpha <= float(np.finfo(np.float32).max) and F32(alpha) > 0):
            raise RoutingError(f"alpha must be a finite number > 0 that float32 holds, got {alpha!r}")
        object.__setattr__(self, "alpha", alpha)
        if self.beta is not None:
            beta = as_int(self.beta, "beta")
            if not 0 <= beta <= BETA_MAX:
                raise RoutingError(f"beta must be None or in [0, {BETA_MAX}] (the LynxMoE op's int32 attribute), got {beta}")
            object.__setattr__(self, "beta", beta)
        if self.tie_break not in TIE_BREAKS:
            raise RoutingError(f"tie_break must be one of {', '.join(TIE_BREAKS)}, got {self.tie_break!r}")
        object.__setattr__(self, "tie_break", str(self.tie_break))

    def allowed(self, logits: np.ndarray, top_k: int, valid: int | None = None) -> np.ndarray:
        arr, k, rows = check_problem(logits, top_k, valid)
        experts = arr.shape[1]
        if rows == 0:
            return np.ones(experts, dtype=bool)
        voters = arr[:rows]
        batch = F32(rows)
        top = voters.max(axis=1, keepdims=True)
        # -inf logits land in bin -inf (weight 0, score -inf) unless beta lifts them to -beta.
        bins = np.ceil(F32(self.alpha) * (voters - top))
        if self.beta is not None:
            bins = np.maximum(bins, F32(-self.beta))
        weight = power(batch, bins)
        popularity = sum_sequential(weight, axis=0)
        score = bins + (popularity - weight) / batch
        if self.tie_break == "logit":
            picks = topk_by(score, voters, k)
        else:
            picks = topk(score, k)
        return union(picks, experts)


@dataclass(frozen=True)
class BudgetPolicy(SelectionPolicy):
    """Keep the `budget` experts most often in the valid tokens' model top-K.

    Popularity = number of valid tokens whose plain top-K of the logits holds the expert; equal
    counts are ordered by larger summed softmax probability over the valid tokens, then by lower
    index. Exactly `budget` experts are allowed (zero-vote experts fill up when fewer have votes).
    """

    name: ClassVar[str] = "budget"

    budget: int

    def __post_init__(self) -> None:
        budget = as_int(self.budget, "budget")
        if budget < 1:
            raise RoutingError(f"budget must be >= 1, got {budget}")
        object.__setattr__(self, "budget", budget)

    def allowed(self, logits: np.ndarray, top_k: int, valid: int | None = None) -> np.ndarray:
        arr, k, rows = check_problem(logits, top_k, valid)
        experts = arr.shape[1]
        if not k <= self.budget <= experts:
            raise RoutingError(f"budget must be in [top_k={k}, {experts}] for {experts} experts, got {self.budget}")
        if rows == 0:
            return np.ones(experts, dtype=bool)
        voters = arr[:rows]
        counts = np.bincount(topk(voters, k).ravel(), minlength=experts).astype(np.int64)
        mass = sum_sequential(softmax(voters), axis=0)
        keep = topk_by(counts[None, :], mass[None, :], self.budget)
        return union(keep, experts)


def make_policy(
    name: str,
    *,
    alpha: float | None = None,
    beta: int | None = None,
    budget: int | None = None,
    tie_break: str = "logit",
    num_experts: int | None = None,
    top_k: int | None = None,
) -> SelectionPolicy:
    """Build a policy by name ("off", "lynx" or "budget").

    lynx: alpha None takes default_lynx_params(num_experts, top_k), whose beta applies unless beta
    is given. budget: budget is required and, when num_experts/top_k are given, checked against
    them. Parameters that do not belong to the named policy are ignored.
    """
    if name == "off":
        return OffPolicy()
    if name == "lynx":
        if alpha is None:
            if num_experts is None or top_k is None:
                raise RoutingError("lynx needs alpha, or num_experts and top_k to take the default parameters")
            alpha, default_beta = default_lynx_params(num_experts, top_k)
            beta = default_beta if beta is None else beta
        return LynxPolicy(alpha=alpha, beta=beta, tie_break=tie_break)
    if name == "budget":
        if budget is None:
            raise RoutingError("the budget policy needs budget")
        policy = BudgetPolicy(budget=budget)
        low = 1 if top_k is None else as_int(top_k, "top_k")
        high = None if num_experts is None else as_int(num_experts, "num_experts")
        if policy.budget < low or (high is not None and policy.budget > high):
            bounds = f"[top_k={low}, " + ("num_experts]" if high is None else f"num_experts={high}]")
            raise RoutingError(f"budget must be in {bounds}, got {policy.budget}")
        return policy
    raise RoutingError(f"unknown policy {name!r}; valid names: {', '.join(POLICY_NAMES)}")


def default_lynx_params(num_experts: int, top_k: int) -> tuple[float, int | None]:
    """The default (alpha, beta) for a model with E experts and top-K routing: the value this
    project measured where it has one, else the LYNX authors' shipped value, else (1.0, None)."""
    experts = as_int(num_experts, "num_experts")
    k = as_int(top_k, "top_k")
    if not 1 <= k <= experts:
        raise RoutingError(f"top_k must be in [1, num_experts], got top_k={k}, num_experts={experts}")
    return _LYNX_DEFAULTS.get((experts, k), _LYNX_FALLBACK)
