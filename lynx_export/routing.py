"""NumPy fp32 reference of MoE routing and batch-aware expert selection: the oracle every backend is tested against."""

from __future__ import annotations

import abc
import dataclasses
import enum
import math
import operator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

__all__ = [
    "RoutingError",
    "RouterForm",
    "GroupedRouting",
    "Routing",
    "route",
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
    "selection_scores",
    "compare_routings",
]

# Arithmetic contract (what a backend must reproduce to agree bit for bit):
# - every value is float32; +, -, *, / and ceil are IEEE fp32 operations;
# - exp, pow and sigmoid are the correctly rounded fp32 results: they are evaluated in float64 and
#   rounded once, because numpy's own fp32 SIMD exp/pow differ from the correctly rounded value by
#   an ulp on a third of the inputs, and differently on different CPUs (ONNX Runtime's Sigmoid is
#   an approximation too: its sigmoid_grouped ids agree except where scores tie within an ulp);
# - every sum runs sequentially in index order (np.add.accumulate), because np.sum switches to
#   pairwise summation depending on the array's shape and memory layout;
# - top-K takes the K largest values, equal values by lower index (what ONNX TopK does).

_F32 = np.float32
_NEG_INF = np.float32(-np.inf)

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
# batch size while still cutting active experts (by 32% at batch 4, 11% at batch 16).
_MEASURED_LYNX_PARAMS: dict[tuple[int, int], tuple[float, int | None]] = {
    (8, 2): (3.0, 1),
}
_LYNX_DEFAULTS = {**AUTHORS_LYNX_PARAMS, **_MEASURED_LYNX_PARAMS}
_LYNX_FALLBACK: tuple[float, int | None] = (1.0, None)


class RoutingError(ValueError):
    """Invalid arguments to a routing function or selection policy (one-line message)."""


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
        groups = _as_int(self.num_groups, "num_groups")
        keep = _as_int(self.topk_groups, "topk_groups")
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
    arr, k, rows = _check_problem(logits, top_k, valid)
    router = _check_form(form)
    groups = _check_grouping(router, grouping, arr, k)
    return _route(arr, k, router, bool(normalize), rows, groups)


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
        arr, k, rows = _check_problem(logits, top_k, valid)
        router = _check_form(form)
        groups = _check_grouping(router, grouping, arr, k)
        votes = arr if groups is None else _grouped_choice(arr, groups, k)[1]
        mask = np.asarray(self.allowed(votes, k, rows))
        if mask.dtype != np.bool_ or mask.shape != (arr.shape[1],):
            raise RoutingError(f"policy '{self.name}' returned a {mask.dtype} mask of shape {mask.shape}, expected bool ({arr.shape[1]},)")
        return _route(np.where(mask, arr, _NEG_INF), k, router, bool(normalize), rows, groups)

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
        arr, _, _ = _check_problem(logits, top_k, valid)
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
        if not (math.isfinite(alpha) and alpha > 0):
            raise RoutingError(f"alpha must be a finite number > 0, got {alpha!r}")
        object.__setattr__(self, "alpha", alpha)
        if self.beta is not None:
            beta = _as_int(self.beta, "beta")
            if beta < 0:
                raise RoutingError(f"beta must be None or >= 0, got {beta}")
            object.__setattr__(self, "beta", beta)
        if self.tie_break not in TIE_BREAKS:
            raise RoutingError(f"tie_break must be one of {', '.join(TIE_BREAKS)}, got {self.tie_break!r}")
        object.__setattr__(self, "tie_break", str(self.tie_break))

    def allowed(self, logits: np.ndarray, top_k: int, valid: int | None = None) -> np.ndarray:
        arr, k, rows = _check_problem(logits, top_k, valid)
        experts = arr.shape[1]
        if rows == 0:
            return np.ones(experts, dtype=bool)
        voters = arr[:rows]
        batch = _F32(rows)
        top = voters.max(axis=1, keepdims=True)
        # -inf logits land in bin -inf (weight 0, score -inf) unless beta lifts them to -beta.
        bins = np.ceil(_F32(self.alpha) * (voters - top))
        if self.beta is not None:
            bins = np.maximum(bins, _F32(-self.beta))
        weight = _pow(batch, bins)
        popularity = _sum_sequential(weight, axis=0)
        score = bins + (popularity - weight) / batch
        if self.tie_break == "logit":
            picks = _topk_by(score, voters, k)
        else:
            picks = _topk(score, k)
        return _union(picks, experts)


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
        budget = _as_int(self.budget, "budget")
        if budget < 1:
            raise RoutingError(f"budget must be >= 1, got {budget}")
        object.__setattr__(self, "budget", budget)

    def allowed(self, logits: np.ndarray, top_k: int, valid: int | None = None) -> np.ndarray:
        arr, k, rows = _check_problem(logits, top_k, valid)
        experts = arr.shape[1]
        if not k <= self.budget <= experts:
            raise RoutingError(f"budget must be in [top_k={k}, {experts}] for {experts} experts, got {self.budget}")
        if rows == 0:
            return np.ones(experts, dtype=bool)
        voters = arr[:rows]
        counts = np.bincount(_topk(voters, k).ravel(), minlength=experts).astype(np.int64)
        mass = _sum_sequential(_softmax(voters), axis=0)
        keep = _topk_by(counts[None, :], mass[None, :], self.budget)
        return _union(keep, experts)


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
        if top_k is not None and policy.budget < _as_int(top_k, "top_k"):
            raise RoutingError(f"budget must be >= top_k={top_k}, got {policy.budget}")
        if num_experts is not None and policy.budget > _as_int(num_experts, "num_experts"):
            raise RoutingError(f"budget must be <= num_experts={num_experts}, got {policy.budget}")
        return policy
    raise RoutingError(f"unknown policy {name!r}; valid names: {', '.join(POLICY_NAMES)}")


def default_lynx_params(num_experts: int, top_k: int) -> tuple[float, int | None]:
    """The default (alpha, beta) for a model with E experts and top-K routing: the value this
    project measured where it has one, else the LYNX authors' shipped value, else (1.0, None)."""
    experts = _as_int(num_experts, "num_experts")
    k = _as_int(top_k, "top_k")
    if not 1 <= k <= experts:
        raise RoutingError(f"top_k must be in [1, num_experts], got top_k={k}, num_experts={experts}")
    return _LYNX_DEFAULTS.get((experts, k), _LYNX_FALLBACK)


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


def selection_scores(logits: np.ndarray, top_k: int, grouping: GroupedRouting) -> np.ndarray:
    """[T,E] float32: what a `sigmoid_grouped` router ranks experts by, and what policies vote on:
    sigmoid(L) + bias within each token's kept groups, -inf elsewhere (and where L is -inf)."""
    arr, k, _ = _check_problem(logits, top_k, None)
    groups = _check_grouping(RouterForm.SIGMOID_GROUPED, grouping, arr, k)
    return _grouped_choice(arr, groups, k)[1]


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


# --- validation -------------------------------------------------------------------------------


def _as_int(value: Any, what: str) -> int:
    # bool is an int to Python but never a meaningful count here.
    if isinstance(value, (bool, np.bool_)):
        raise RoutingError(f"{what} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise RoutingError(f"{what} must be an integer, got {value!r}") from None


def _check_form(form: RouterForm | str) -> RouterForm:
    try:
        return RouterForm(form)
    except ValueError:
        raise RoutingError(f"unknown router form {form!r}; valid forms: {', '.join(f.value for f in RouterForm)}") from None


def _check_grouping(form: RouterForm, grouping: Any, arr: np.ndarray, k: int) -> GroupedRouting | None:
    """The grouping `form` needs (None for the routers without one), checked against the logits."""
    if form is not RouterForm.SIGMOID_GROUPED:
        if grouping is not None:
            raise RoutingError(f"grouping applies only to the {RouterForm.SIGMOID_GROUPED.value} router, not {form.value}")
        return None
    if not isinstance(grouping, GroupedRouting):
        raise RoutingError(f"the {form.value} router needs grouping=GroupedRouting(...), got {grouping!r}")
    grouping.check(arr.shape[1], k)
    if arr.shape[0]:
        finite = np.count_nonzero(np.isfinite(_grouped_choice(arr, grouping, k)[1]), axis=1)
        row = int(np.argmin(finite))
        if finite[row] < k:
            raise RoutingError(f"logits row {row} has {finite[row]} finite entries in its {grouping.topk_groups} kept groups, fewer than top_k={k}")
    return grouping


def _check_logits(logits: Any) -> np.ndarray:
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


def _check_problem(logits: Any, top_k: Any, valid: Any) -> tuple[np.ndarray, int, int]:
    """Validated (float32 logits, K, number of valid rows)."""
    arr = _check_logits(logits)
    tokens, experts = arr.shape
    k = _as_int(top_k, "top_k")
    if not 1 <= k <= experts:
        raise RoutingError(f"top_k must be in [1, {experts}] for {experts} experts, got {k}")
    rows = tokens if valid is None else _as_int(valid, "valid")
    if not 0 <= rows <= tokens:
        raise RoutingError(f"valid must be in [0, {tokens}] for {tokens} tokens, got {rows}")
    if tokens:
        finite = np.count_nonzero(np.isfinite(arr), axis=1)
        row = int(np.argmin(finite))
        if finite[row] < k:
            raise RoutingError(f"logits row {row} has {finite[row]} finite entries, fewer than top_k={k}")
    return arr, k, rows


# --- fp32 kernels -----------------------------------------------------------------------------


def _route(arr: np.ndarray, k: int, form: RouterForm, normalize: bool, rows: int, grouping: GroupedRouting | None = None) -> Routing:
    if form is RouterForm.SIGMOID_GROUPED:
        assert grouping is not None
        scores, choice = _grouped_choice(arr, grouping, k)
        ids = _topk(choice, k)
        picked = np.isfinite(np.take_along_axis(choice, ids, axis=-1))
        weights = np.where(picked, np.take_along_axis(scores, ids, axis=-1), _F32(0))
        if normalize:
            weights = weights / (_sum_sequential(weights, axis=-1)[:, None] + _F32(1e-20))
        weights = weights * _F32(grouping.routed_scaling)
    elif form is RouterForm.SOFTMAX_TOPK:
        probs = _softmax(arr)
        ids = _topk(probs, k)
        weights = np.take_along_axis(probs, ids, axis=-1)
        if normalize:
            weights = _safe_divide(weights, _sum_sequential(weights, axis=-1)[:, None])
    else:
        ids = _topk(arr, k)
        weights = _softmax(np.take_along_axis(arr, ids, axis=-1))
    active = np.unique(ids[:rows]).astype(np.int64, copy=False)
    return Routing(ids=ids, weights=weights.astype(np.float32, copy=False), active=active, masked_logits=arr)


def _grouped_choice(arr: np.ndarray, grouping: GroupedRouting, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, choice) of the sigmoid_grouped router [T,E]: scores = sigmoid(L), choice = scores
    + bias within the kept groups, -inf elsewhere and where L is -inf (see GroupedRouting)."""
    tokens, experts = arr.shape
    groups = grouping.num_groups
    size = experts // groups
    scores = _sigmoid(arr)
    choice = scores if grouping.score_bias is None else scores + np.asarray(grouping.score_bias, dtype=np.float32)
    choice = np.where(np.isneginf(arr), _NEG_INF, choice).astype(np.float32, copy=False)
    per_group = choice.reshape(tokens * groups, size)
    best2 = np.take_along_axis(per_group, _topk(per_group, 2), axis=-1)
    group_score = _sum_sequential(np.where(np.isfinite(best2), best2, _F32(0)), axis=-1).reshape(tokens, groups)
    count = np.minimum(np.count_nonzero(np.isfinite(per_group), axis=-1), k).reshape(tokens, groups)
    kept = np.zeros((tokens, groups), dtype=bool)
    np.put_along_axis(kept, _topk_by(count, group_score, grouping.topk_groups), True, axis=-1)
    return scores, np.where(np.repeat(kept, size, axis=1), choice, _NEG_INF)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-x)), correctly rounded to fp32; sigmoid(-inf) = 0."""
    with np.errstate(over="ignore"):
        return (1.0 / (1.0 + np.exp(-x.astype(np.float64)))).astype(np.float32)


def _softmax(x: np.ndarray) -> np.ndarray:
    """Row softmax in fp32 with max subtraction; exp(-inf) = 0; a row of only -inf gives zeros."""
    top = np.max(x, axis=-1, keepdims=True)
    # -inf - -inf would be NaN; shifting such a row by 0 makes all its exps 0 instead.
    top = np.where(np.isfinite(top), top, _F32(0))
    exps = _exp(x - top)
    return _safe_divide(exps, _sum_sequential(exps, axis=-1)[:, None])


def _exp(x: np.ndarray) -> np.ndarray:
    return np.exp(x.astype(np.float64)).astype(np.float32)


def _pow(base: np.float32, exponent: np.ndarray) -> np.ndarray:
    with np.errstate(under="ignore"):
        return np.power(np.float64(base), exponent.astype(np.float64)).astype(np.float32)


def _sum_sequential(x: np.ndarray, axis: int) -> np.ndarray:
    if x.shape[axis] == 0:
        return np.sum(x, axis=axis, dtype=np.float32)
    return np.take(np.add.accumulate(x, axis=axis, dtype=np.float32), -1, axis=axis)


def _safe_divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    # den is 0 only where every numerator is 0 (a row with no finite logit): keep zeros, not NaN.
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def _topk(x: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values per row, equal values by lower index (ONNX TopK order)."""
    return np.argsort(-x, axis=-1, kind="stable")[:, :k].astype(np.int64, copy=False)


def _topk_by(primary: np.ndarray, secondary: np.ndarray, k: int) -> np.ndarray:
    """Top-k of `primary` per row, equal values by larger `secondary`, then lower index.

    Spelled as two stable sorts so that a backend can mirror it with two TopK ops: order the
    columns by `secondary`, then take the top-k of `primary` in that order.
    """
    order = np.argsort(-secondary, axis=-1, kind="stable")
    permuted = np.take_along_axis(primary, order, axis=-1)
    position = np.argsort(-permuted, axis=-1, kind="stable")[:, :k]
    return np.take_along_axis(order, position, axis=-1).astype(np.int64, copy=False)


def _union(picks: np.ndarray, experts: int) -> np.ndarray:
    mask = np.zeros(experts, dtype=bool)
    mask[picks.ravel()] = True
    return mask
