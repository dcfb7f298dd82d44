"""Router forms: how router logits [T,E] become K expert ids and weights per token (the model's own routing)."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from lynx_export.errors import RoutingError
from lynx_export.routing._checks import as_int, check_problem, check_problems
from lynx_export.routing._fp32 import F32, NEG_INF, safe_divide, sigmoid, softmax, sum_sequential, topk, topk_by, union

if TYPE_CHECKING:
    from lynx_export.routing.policies import SelectionPolicy

__all__ = ["RouterForm", "GroupedRouting", "Router", "Routing", "RoutingBatch", "route", "route_many", "selection_scores"]


class RouterForm(str, enum.Enum):
    """How router logits L [T,E] become K expert ids and weights per token."""

    SOFTMAX_TOPK = "softmax_topk"  # probs = softmax(L); top-K of probs; weights = probs[picked], renormalised if normalize
    TOPK_SOFTMAX = "topk_softmax"  # top-K of L; weights = softmax over the K picked logits (always sums to 1)
    # DeepSeek-V3: scores = sigmoid(L); top-K of the scores plus a bias within the best groups of
    # experts; weights = scores[picked] (renormalised if normalize) * a scaling. Its parameters are
    # a GroupedRouting, passed as `grouping`; see GroupedRouting for the steps.
    SIGMOID_GROUPED = "sigmoid_grouped"


@dataclass(frozen=True)
class GroupedRouting:
    """The parameters of the `sigmoid_grouped` router (transformers' DeepseekV3TopkRouter).

    With E experts in `num_groups` contiguous groups of S = E / num_groups, per token:
      scores  = sigmoid(L)                                   (0 where L is -inf)
      choice  = scores + score_bias                          (-inf where L is -inf: a masked expert)
      group   = sum of the group's 2 largest finite choice values (0 for a group without any)
      keep the `topk_groups` groups with the most finite choice values, counted up to K, then
        the largest `group` value, then the lower group index
      ids     = top-K of choice within the kept groups (-inf elsewhere)
      weights = scores[ids], 0 for an id whose choice is -inf;
                if normalize: weights / (sum of weights + 1e-20); then weights * routed_scaling
    With finite logits every group counts min(S, K) finite values, so the groups are ranked by
    `group` alone: exactly the model's router. The count only matters under a policy's mask
    (masked experts' logits are -inf): groups that still hold K allowed experts come first, so a
    token gets K allowed experts whenever some `topk_groups` groups hold K of them. Otherwise its
    remaining ids are masked experts (the lowest-index ones outside its allowed experts) with
    weight 0.
    """

    num_groups: int = 1
    topk_groups: int = 1
    routed_scaling: float = 1.0
    score_bias: tuple[float, ...] | None = None  # [E], DeepSeek-V3's e_score_correction_bias

    def __post_init__(self) -> None:
        groups = as_int(self.num_groups, "num_groups")
        keep = as_int(self.topk_groups, "topk_groups")
        if groups < 1:
            raise RoutingError(f"num_groups must be >= 1, got {groups}")
        if not 1 <= keep <= groups:
            raise RoutingError(f"topk_groups must be in [1, num_groups={groups}], got {keep}")
        object.__setattr__(self, "num_groups", groups)
        object.__setattr__(self, "topk_groups", keep)
        if isinstance(self.routed_scaling, (bool, np.bool_)) or not isinstance(self.routed_scaling, (int, float, np.integer, np.floating)):
            raise RoutingError(f"routed_scaling must be a number, got {self.routed_scaling!r}")
        scaling = float(self.routed_scaling)
        if not (math.isfinite(scaling) and scaling > 0):
            raise RoutingError(f"routed_scaling must be a finite number > 0, got {scaling!r}")
        object.__setattr__(self, "routed_scaling", scaling)
        if self.score_bias is not None:
            try:
                bias = np.asarray(self.score_bias, dtype=np.float64)
            except (TypeError, ValueError):
                raise RoutingError(f"score_bias must be a sequence of numbers, got {self.score_bias!r}") from None
            if bias.ndim != 1 or not np.isfinite(bias).all():
                raise RoutingError("score_bias must be a 1-D sequence of finite numbers")
            object.__setattr__(self, "score_bias", tuple(float(x) for x in bias))  # added as float32

    def check(self, num_experts: int, top_k: int) -> None:
        """Raise RoutingError unless these parameters fit E experts and top-K routing."""
        if num_experts % self.num_groups:
            raise RoutingError(f"num_groups={self.num_groups} does not divide the {num_experts} experts")
        size = num_experts // self.num_groups
        if size < 2:
            raise RoutingError(f"groups of {size} expert: the router sums each group's 2 best scores, so groups need >= 2 experts")
        if self.topk_groups * size < top_k:
            raise RoutingError(f"topk_groups={self.topk_groups} groups of {size} experts hold fewer than top_k={top_k} experts")
        if self.score_bias is not None and len(self.score_bias) != num_experts:
            raise RoutingError(f"score_bias has {len(self.score_bias)} values for {num_experts} experts")


@dataclass(frozen=True, eq=False)  # eq=False: the generated __eq__ would compare arrays elementwise and fail
class Routing:
    """Routing of one batch through one MoE layer.

    ids: [T,K] int64, each token's K distinct experts ordered by descending weight (equal
        weights by lower expert index); for `sigmoid_grouped`, by descending choice value
        (scores + bias), which ranks experts, not by weight.
    weights: [T,K] float32, the gate weight of each picked expert.
    active: [A] int64, ascending, the distinct experts used by the valid rows (rows < valid).
    masked_logits: [T,E] float32, the logits routed on: the input with experts outside the
        policy's allowed set replaced by -inf (the input itself for route() and `off`).
    """

    ids: np.ndarray
    weights: np.ndarray
    active: np.ndarray
    masked_logits: np.ndarray


@dataclass(frozen=True, eq=False)
class RoutingBatch:
    """Routings of P independent batches (problems) at once, from route_many or a policy's select_many.

    ids [P,T,K], weights [P,T,K], masked_logits [P,T,E]: problem p's Routing fields, stacked.
    active [P,E] bool: the experts used by problem p's valid rows. valid [P] int64: its valid rows.
    problem(p) is exactly the Routing that route / select return for problem p alone.
    """

    ids: np.ndarray
    weights: np.ndarray
    active: np.ndarray
    masked_logits: np.ndarray
    valid: np.ndarray

    def __len__(self) -> int:
        return self.ids.shape[0]

    def problem(self, index: int) -> Routing:
        active = np.flatnonzero(self.active[index]).astype(np.int64, copy=False)
        return Routing(ids=self.ids[index], weights=self.weights[index], active=active, masked_logits=self.masked_logits[index])


def route(
    logits: np.ndarray,
    top_k: int,
    form: RouterForm = RouterForm.SOFTMAX_TOPK,
    normalize: bool = True,
    valid: int | None = None,
    *,
    grouping: GroupedRouting | None = None,
) -> Routing:
    """The model's own routing (no policy).

    logits [T,E] are cast to float32. -inf marks an expert a token may not use; every row needs
    at least top_k finite logits (for `sigmoid_grouped`, within its kept groups). `valid`
    (default T) only limits which rows count in `active`: every row is routed. `grouping` holds
    the `sigmoid_grouped` router's parameters (required for that form, refused for the others).
    """
    arr, k, rows = check_problem(logits, top_k, valid)
    router = check_form(form)
    groups = check_grouping(router, grouping, arr, k)
    return route_checked(arr, k, router, bool(normalize), rows, groups)


def route_many(
    logits: np.ndarray,
    top_k: int,
    form: RouterForm = RouterForm.SOFTMAX_TOPK,
    normalize: bool = True,
    valid: Any = None,
    *,
    grouping: GroupedRouting | None = None,
) -> RoutingBatch:
    """route() of each problem of a stack of logits [P,T,E] at once, with the same results bit for bit.

    `valid`: None (every row), one count for every problem, or [P] counts. Every router works row
    by row (_fp32's functions do not mix rows), so the P*T rows are routed as one [P*T,E] batch;
    only `active` is per problem.
    """
    arr, k, rows = check_problems(logits, top_k, valid)
    router = check_form(form)
    groups = check_grouping(router, grouping, _flat(arr), k)
    return route_many_checked(arr, k, router, bool(normalize), rows, groups)


@dataclass(frozen=True)
class Router:
    """A model's router, built once (`op.spec.MoESpec.routing`, `RouterTrace.routing`) and handed on
    instead of its arguments at every call: K experts per token by `form`, renormalised when
    `normalize`, with `grouping` for `sigmoid_grouped`. Each method is the function of the same name
    with these arguments; `valid` as there."""

    top_k: int
    form: RouterForm = RouterForm.SOFTMAX_TOPK
    normalize: bool = True
    grouping: GroupedRouting | None = None

    def route(self, logits: np.ndarray, valid: int | None = None) -> Routing:
        """The model's own routing of one batch [T,E]."""
        return route(logits, self.top_k, self.form, self.normalize, valid, grouping=self.grouping)

    def route_many(self, logits: np.ndarray, valid: Any = None) -> RoutingBatch:
        """The model's own routing of each problem of a stack [P,T,E]."""
        return route_many(logits, self.top_k, self.form, self.normalize, valid, grouping=self.grouping)

    def select(self, policy: SelectionPolicy, logits: np.ndarray, valid: int | None = None) -> Routing:
        """`policy`'s routing of one batch [T,E]."""
        return policy.select(logits, self.top_k, self.form, self.normalize, valid, grouping=self.grouping)

    def select_many(self, policy: SelectionPolicy, logits: np.ndarray, valid: Any = None) -> RoutingBatch:
        """`policy`'s routing of each problem of a stack [P,T,E]."""
        return policy.select_many(logits, self.top_k, self.form, self.normalize, valid, grouping=self.grouping)


def selection_scores(logits: np.ndarray, top_k: int, grouping: GroupedRouting) -> np.ndarray:
    """[T,E] float32: what a `sigmoid_grouped` router ranks experts by, and what policies vote on:
    sigmoid(L) + bias within each token's kept groups, -inf elsewhere (and where L is -inf)."""
    arr, k, _ = check_problem(logits, top_k, None)
    groups = check_grouping(RouterForm.SIGMOID_GROUPED, grouping, arr, k)
    return grouped_choice(arr, groups, k)[1]


def check_form(form: RouterForm | str) -> RouterForm:
    try:
        return RouterForm(form)
    except ValueError:
        raise RoutingError(f"unknown router form {form!r}; valid forms: {', '.join(f.value for f in RouterForm)}") from None


def check_grouping(form: RouterForm, grouping: Any, arr: np.ndarray, k: int) -> GroupedRouting | None:
    """The grouping `form` needs (None for the routers without one), checked against the logits."""
    if form is not RouterForm.SIGMOID_GROUPED:
        if grouping is not None:
            raise RoutingError(f"grouping applies only to the {RouterForm.SIGMOID_GROUPED.value} router, not {form.value}")
        return None
    if not isinstance(grouping, GroupedRouting):
        raise RoutingError(f"the {form.value} router needs grouping=GroupedRouting(...), got {grouping!r}")
    grouping.check(arr.shape[1], k)
    if arr.shape[0]:
        finite = np.count_nonzero(np.isfinite(grouped_choice(arr, grouping, k)[1]), axis=1)
        row = int(np.argmin(finite))
        if finite[row] < k:
            raise RoutingError(f"logits row {row} has {finite[row]} finite entries in its {grouping.topk_groups} kept groups, fewer than top_k={k}")
    return grouping


def route_checked(arr: np.ndarray, k: int, form: RouterForm, normalize: bool, rows: int, grouping: GroupedRouting | None = None) -> Routing:
    ids, weights = _route_rows(arr, k, form, normalize, grouping)
    active = np.unique(ids[:rows]).astype(np.int64, copy=False)
    return Routing(ids=ids, weights=weights, active=active, masked_logits=arr)


def route_many_checked(arr: np.ndarray, k: int, form: RouterForm, normalize: bool, rows: np.ndarray,
                       grouping: GroupedRouting | None = None) -> RoutingBatch:
    """route_checked of each problem of arr [P,T,E] (valid rows `rows` [P])."""
    problems, tokens, experts = arr.shape
    ids, weights = _route_rows(_flat(arr), k, form, normalize, grouping)
    ids, weights = ids.reshape(problems, tokens, k), weights.reshape(problems, tokens, k)
    # Padded rows name a spare column E, dropped after the union.
    voting = np.arange(tokens)[None, :, None] < rows[:, None, None]
    active = union(np.where(voting, ids, experts), experts + 1)[:, :experts]
    return RoutingBatch(ids=ids, weights=weights, active=active, masked_logits=arr, valid=rows)


def _flat(arr: np.ndarray) -> np.ndarray:
    """[P,T,E] as the [P*T,E] rows every router and check works on."""
    return arr.reshape(arr.shape[0] * arr.shape[1], arr.shape[2])


def _route_rows(arr: np.ndarray, k: int, form: RouterForm, normalize: bool,
                grouping: GroupedRouting | None) -> tuple[np.ndarray, np.ndarray]:
    """(ids, weights) [T,K] of each row of arr [T,E]: the router itself, row by row."""
    if form is RouterForm.SIGMOID_GROUPED:
        assert grouping is not None
        scores, choice = grouped_choice(arr, grouping, k)
        ids = topk(choice, k)
        picked = np.isfinite(np.take_along_axis(choice, ids, axis=-1))
        weights = np.where(picked, np.take_along_axis(scores, ids, axis=-1), F32(0))
        if normalize:
            weights = weights / (sum_sequential(weights, axis=-1)[:, None] + F32(1e-20))
        weights = weights * F32(grouping.routed_scaling)
    elif form is RouterForm.SOFTMAX_TOPK:
        probs = softmax(arr)
        ids = topk(probs, k)
        weights = np.take_along_axis(probs, ids, axis=-1)
        if normalize:
            weights = safe_divide(weights, sum_sequential(weights, axis=-1)[:, None])
    else:
        ids = topk(arr, k)
        weights = softmax(np.take_along_axis(arr, ids, axis=-1))
    return ids, weights.astype(np.float32, copy=False)


def grouped_choice(arr: np.ndarray, grouping: GroupedRouting, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, choice) of the sigmoid_grouped router [T,E]: scores = sigmoid(L), choice = scores
    + bias within the kept groups, -inf elsewhere and where L is -inf (see GroupedRouting)."""
    tokens, experts = arr.shape
    groups = grouping.num_groups
    size = experts // groups
    scores = sigmoid(arr)
    choice = scores if grouping.score_bias is None else scores + np.asarray(grouping.score_bias, dtype=np.float32)
    choice = np.where(np.isneginf(arr), NEG_INF, choice).astype(np.float32, copy=False)
    per_group = choice.reshape(tokens * groups, size)
    best2 = np.take_along_axis(per_group, topk(per_group, 2), axis=-1)
    group_score = sum_sequential(np.where(np.isfinite(best2), best2, F32(0)), axis=-1).reshape(tokens, groups)
    count = np.minimum(np.count_nonzero(np.isfinite(per_group), axis=-1), k).reshape(tokens, groups)
    kept = np.zeros((tokens, groups), dtype=bool)
    np.put_along_axis(kept, topk_by(count, group_score, grouping.topk_groups), True, axis=-1)
    return scores, np.where(np.repeat(kept, size, axis=1), choice, NEG_INF)
