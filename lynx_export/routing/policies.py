"""Batch-aware expert selection policies (off, lynx, budget) and their defaults per model shape."""

from __future__ import annotations

import abc
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from lynx_export.errors import RoutingError
from lynx_export.routing._checks import INT32_MAX, as_int, check_problem, check_problems
from lynx_export.routing._fp32 import F32, NEG_INF, counts, power, softmax, sum_sequential, topk, topk_by, union
from lynx_export.routing.forms import (
    GroupedRouting,
    RouterForm,
    Routing,
    RoutingBatch,
    _flat,
    check_form,
    check_grouping,
    grouped_choice,
    route_checked,
    route_many_checked,
)

__all__ = ["SelectionPolicy", "OffPolicy", "LynxPolicy", "BudgetPolicy", "POLICY_NAMES", "TIE_BREAKS", "make_policy", "default_lynx_params", "AUTHORS_LYNX_PARAMS"]

TIE_BREAKS = ("logit", "index")
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
# batch size while still cutting active experts (by 32% at batch 4, 11% at batch 16). For
# E64/K8 the authors' (3.0, 4) holds (within 0.5 points, cutting 31/21/3% at batch 4/16/64);
# (1.4, 2) stays within 0.7 points and cuts more where batches are served (33/26/4%).
_MEASURED_LYNX_PARAMS: dict[tuple[int, int], tuple[float, int | None]] = {
    (8, 2): (3.0, 1),
    (64, 8): (1.4, 2),
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
        mask = _check_mask(self, self.allowed(votes, k, rows), (arr.shape[1],))
        return route_checked(np.where(mask, arr, NEG_INF), k, router, bool(normalize), rows, groups)

    def allowed_many(self, logits: np.ndarray, top_k: int, valid: Any = None) -> np.ndarray:
        """[P, E] bool: `allowed` of each problem of a stack of logits [P, T, E], valid rows per
        problem as in route_many. This calls `allowed` once per problem; the built-in policies
        override it with one vectorised pass over the stack that gives the same masks."""
        arr, k, rows = check_problems(logits, top_k, valid)
        masks = [_check_mask(self, self.allowed(arr[p], k, int(rows[p])), (arr.shape[2],)) for p in range(arr.shape[0])]
        return np.stack(masks) if masks else np.ones((0, arr.shape[2]), dtype=bool)

    def select_many(
        self,
        logits: np.ndarray,
        top_k: int,
        form: RouterForm = RouterForm.SOFTMAX_TOPK,
        normalize: bool = True,
        valid: Any = None,
        *,
        grouping: GroupedRouting | None = None,
    ) -> RoutingBatch:
        """`select` of each problem of a stack of logits [P, T, E] (P independent batches, e.g. the
        decode positions of one layer) at once: RoutingBatch.problem(p) equals select(logits[p], ...)
        bit for bit. The policies' arithmetic runs on the whole stack (see _fp32: every step works
        per row or sums over tokens in order), which saves the per-call overhead of numpy on small
        batches; `select` stays the reference the tests hold this to."""
        arr, k, rows = check_problems(logits, top_k, valid)
        router = check_form(form)
        groups = check_grouping(router, grouping, _flat(arr), k)
        votes = arr if groups is None else grouped_choice(_flat(arr), groups, k)[1].reshape(arr.shape)
        mask = _check_mask(self, self.allowed_many(votes, k, rows), (arr.shape[0], arr.shape[2]))
        return route_many_checked(np.where(mask[:, None, :], arr, NEG_INF), k, router, bool(normalize), rows, groups)

    def params(self) -> dict[str, Any]:
        """The policy's parameters as JSON-able values (its dataclass fields)."""
        if not dataclasses.is_dataclass(self):
            return {}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def _check_mask(policy: SelectionPolicy, mask: Any, shape: tuple[int, ...]) -> np.ndarray:
    """A policy's mask as a bool array of `shape` ([E], or [P, E] for a stack), else RoutingError."""
    mask = np.asarray(mask)
    if mask.dtype != np.bool_ or mask.shape != shape:
        raise RoutingError(f"policy '{policy.name}' returned a {mask.dtype} mask of shape {mask.shape}, expected bool {shape}")
    return mask


class _VotingPolicy(SelectionPolicy):
    """A policy whose allowed set is a function of the valid rows alone (`_vote`), written once for
    one problem [B, E] and a stack of them [P, B, E] (only axis -1 and sums over axis -2)."""

    @abc.abstractmethod
    def _vote(self, voters: np.ndarray, k: int) -> np.ndarray:
        """[..., E] bool: the allowed experts of voters [..., B, E] (B >= 1 valid rows each)."""

    def _check(self, k: int, experts: int) -> None:
        """Raise RoutingError where the policy cannot serve top-K of this many experts."""

    def allowed(self, logits: np.ndarray, top_k: int, valid: int | None = None) -> np.ndarray:
        arr, k, rows = check_problem(logits, top_k, valid)
        self._check(k, arr.shape[1])
        if rows == 0:
            return np.ones(arr.shape[1], dtype=bool)
        return self._vote(arr[:rows], k)

    def allowed_many(self, logits: np.ndarray, top_k: int, valid: Any = None) -> np.ndarray:
        # Problems with the same valid count B vote together on their first B rows: exactly the
        # voters, batch size and sums of `allowed` (problems without valid rows allow every expert).
        arr, k, rows = check_problems(logits, top_k, valid)
        self._check(k, arr.shape[2])
        mask = np.ones((arr.shape[0], arr.shape[2]), dtype=bool)
        for count in np.unique(rows[rows > 0]):
            chosen = np.flatnonzero(rows == count)
            mask[chosen] = self._vote(arr[chosen, :count], k)
        return mask


@dataclass(frozen=True)
class OffPolicy(_VotingPolicy):
    """No selection: every expert is allowed, so select() equals route()."""

    name: ClassVar[str] = "off"

    def _vote(self, voters: np.ndarray, k: int) -> np.ndarray:
        return np.ones(voters.shape[:-2] + voters.shape[-1:], dtype=bool)


@dataclass(frozen=True)
class LynxPolicy(_VotingPolicy):
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
            if not 0 <= beta <= INT32_MAX:  # beta travels as an int32 attribute and plugin field
                raise RoutingError(f"beta must be None or in [0, {INT32_MAX}] (the LynxMoE op's int32 attribute), got {beta}")
            object.__setattr__(self, "beta", beta)
        if self.tie_break not in TIE_BREAKS:
            raise RoutingError(f"tie_break must be one of {', '.join(TIE_BREAKS)}, got {self.tie_break!r}")
        object.__setattr__(self, "tie_break", str(self.tie_break))

    def _vote(self, voters: np.ndarray, k: int) -> np.ndarray:
        batch = F32(voters.shape[-2])
        top = voters.max(axis=-1, keepdims=True)
        # -inf logits land in bin -inf (weight 0, score -inf) unless beta lifts them to -beta.
        bins = np.ceil(F32(self.alpha) * (voters - top))
        if self.beta is not None:
            bins = np.maximum(bins, F32(-self.beta))
        weight = power(batch, bins)
        popularity = sum_sequential(weight, axis=-2)[..., None, :]
        score = bins + (popularity - weight) / batch
        if self.tie_break == "logit":
            picks = topk_by(score, voters, k)
        else:
            picks = topk(score, k)
        return union(picks, voters.shape[-1])


@dataclass(frozen=True)
class BudgetPolicy(_VotingPolicy):
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

    def _check(self, k: int, experts: int) -> None:
        if not k <= self.budget <= experts:
            raise RoutingError(f"budget must be in [top_k={k}, {experts}] for {experts} experts, got {self.budget}")

    def _vote(self, voters: np.ndarray, k: int) -> np.ndarray:
        experts = voters.shape[-1]
        votes = counts(topk(voters, k), experts)[..., None, :]
        mass = sum_sequential(softmax(voters), axis=-2)[..., None, :]
        return union(topk_by(votes, mass, self.budget), experts)


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
