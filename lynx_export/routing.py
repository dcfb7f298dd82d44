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
    "compare_routings",
]

# Arithmetic contract (what a backend must reproduce to agree bit for bit):
# - every value is float32; +, -, *, / and ceil are IEEE fp32 operations;
# - exp and pow are the correctly rounded fp32 results: they are evaluated in float64 and rounded
#   once, because numpy's own fp32 SIMD exp/pow differ from the correctly rounded value by an ulp
#   on a third of the inputs, and differently on different CPUs;
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


@dataclass(frozen=True, eq=False)  # eq=False: the generated __eq__ would compare arrays elementwise and fail
class Routing:
    """Routing of one batch through one MoE layer.

    ids: [T,K] int64, each token's K distinct experts ordered by descending weight (equal
        weights by lower expert index).
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
) -> Routing:
    """The model's own routing (no policy).

    logits [T,E] are cast to float32. -inf marks an expert a token may not use; every row needs
    at least top_k finite logits. `valid` (default T) only limits which rows count in `active`:
    every row is routed.
    """
    arr, k, rows = _check_problem(logits, top_k, valid)
    return _route(arr, k, _check_form(form), bool(normalize), rows)


class SelectionPolicy(abc.ABC):
    """A batch-aware expert selection policy for one MoE layer at one decode step.

    A policy chooses, from the whole batch's router logits, the set of experts tokens may use
    (`allowed`); `select` then routes every token with the model's own router restricted to
    that set, so each token still gets K experts.
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
    ) -> Routing:
        """Route the batch through the model's router with experts outside `allowed` masked to -inf.

        Padded rows (>= valid) are routed too but never vote and never count in `active`. A row
        left with fewer than K finite logits after masking (possible only for padded rows, or for
        logits already holding -inf) is filled up with masked experts of weight 0; a row with no
        finite logit gets all-zero weights.
        """
        arr, k, rows = _check_problem(logits, top_k, valid)
        router = _check_form(form)
        mask = np.asarray(self.allowed(arr, k, rows))
        if mask.dtype != np.bool_ or mask.shape != (arr.shape[1],):
            raise RoutingError(f"policy '{self.name}' returned a {mask.dtype} mask of shape {mask.shape}, expected bool ({arr.shape[1]},)")
        return _route(np.where(mask, arr, _NEG_INF), k, router, bool(normalize), rows)

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
) -> SelectionStats:
    """Compare the routing on `logits` (the router's output) with the routing on `routed_logits`
    (the same logits after a policy's mask)."""
    return compare_routings(route(logits, top_k, form, normalize, valid), route(routed_logits, top_k, form, normalize, valid), valid)


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


def _route(arr: np.ndarray, k: int, form: RouterForm, normalize: bool, rows: int) -> Routing:
    if form is RouterForm.SOFTMAX_TOPK:
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
