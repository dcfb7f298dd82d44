"""The numpy routing oracle: hand-computed cases, loop-by-loop references of the policies, properties."""

from __future__ import annotations

import json
import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lynx_export.routing import (
    AUTHORS_LYNX_PARAMS,
    BudgetPolicy,
    LynxPolicy,
    OffPolicy,
    RouterForm,
    Routing,
    RoutingError,
    SelectionPolicy,
    default_lynx_params,
    make_policy,
    route,
)

F32 = np.float32
# The routers without parameters; sigmoid_grouped (which needs a GroupedRouting) has the same
# properties checked in tests/test_sigmoid_grouped.py.
FORMS = [f for f in RouterForm if f is not RouterForm.SIGMOID_GROUPED]
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- independent references (pure Python loops, fp32 scalars) ----------------------------------


def lynx_allowed_slow(logits: np.ndarray, k: int, alpha: float, beta: int | None, tie_break: str, valid: int | None) -> list[bool]:
    """LYNX written out token by token: every fp32 operation as a numpy float32 scalar.

    B ** bin is taken from the exact rational, rounded to fp32 (the oracle promises correctly
    rounded pow); popularity is summed token by token.
    """
    tokens, experts = logits.shape
    batch = tokens if valid is None else valid
    if batch == 0:
        return [True] * experts
    a = F32(alpha)
    bins: list[list[float]] = []
    for t in range(batch):
        row = [F32(x) for x in logits[t]]
        top = max(row)
        row_bins = []
        for x in row:
            b = -math.inf if x == -math.inf else float(math.ceil(a * (x - top)))
            if beta is not None:
                b = max(b, -float(beta))
            row_bins.append(b)
        bins.append(row_bins)

    def weight(b: float) -> np.float32:
        if b == -math.inf:
            return F32(1.0) if batch == 1 else F32(0.0)
        return F32(float(Fraction(batch) ** int(b)))

    w = [[weight(b) for b in row_bins] for row_bins in bins]
    pop = []
    for e in range(experts):
        acc = F32(0.0)
        for t in range(batch):
            acc = F32(acc + w[t][e])
        pop.append(acc)
    allowed = [False] * experts
    for t in range(batch):
        score = [F32(bins[t][e]) + (pop[e] - w[t][e]) / F32(batch) for e in range(experts)]
        if tie_break == "logit":
            order = sorted(range(experts), key=lambda e: (-score[e], -float(logits[t, e]), e))
        else:
            order = sorted(range(experts), key=lambda e: (-score[e], e))
        for e in order[:k]:
            allowed[e] = True
    return allowed


def budget_allowed_slow(logits: np.ndarray, k: int, budget: int, valid: int | None) -> list[bool]:
    tokens, experts = logits.shape
    batch = tokens if valid is None else valid
    if batch == 0:
        return [True] * experts
    counts = [0] * experts
    mass = [F32(0.0)] * experts
    for t in range(batch):
        row = [F32(x) for x in logits[t]]
        for e in sorted(range(experts), key=lambda e: (-row[e], e))[:k]:
            counts[e] += 1
        top = max(row)
        exps = [F32(math.exp(float(x - top))) for x in row]
        total = F32(0.0)
        for x in exps:
            total = F32(total + x)
        for e in range(experts):
            mass[e] = F32(mass[e] + exps[e] / total)
    keep = sorted(range(experts), key=lambda e: (-counts[e], -mass[e], e))[:budget]
    return [e in keep for e in range(experts)]


def softmax64(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    top = np.max(x, axis=-1, keepdims=True)
    e = np.exp(x - np.where(np.isfinite(top), top, 0.0))
    return e / e.sum(axis=-1, keepdims=True)


# --- strategies -------------------------------------------------------------------------------


def make_logits(rng: np.random.Generator, tokens: int, experts: int, k: int, kind: str) -> np.ndarray:
    if kind == "ints":  # many exact ties
        return rng.integers(-3, 3, size=(tokens, experts)).astype(np.float32)
    logits = (rng.standard_normal((tokens, experts)) * 2.0).astype(np.float32)
    if kind == "masked":  # some experts already masked, at least k finite per row
        for t in range(tokens):
            drop = rng.permutation(experts)[: rng.integers(0, experts - k + 1)]
            logits[t, drop] = -np.inf
    return logits


@st.composite
def problems(draw, kinds=("normal", "ints", "masked"), min_tokens=0, max_tokens=40):
    experts = draw(st.sampled_from([1, 2, 3, 4, 8, 16, 64]))
    k = draw(st.integers(1, min(experts, 8)))
    tokens = draw(st.integers(min_tokens, max_tokens))
    valid = draw(st.one_of(st.none(), st.integers(0, tokens)))
    kind = draw(st.sampled_from(kinds))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return make_logits(rng, tokens, experts, k, kind), k, valid


@st.composite
def policies(draw, experts: int, k: int, tie_breaks=("logit", "index")):
    which = draw(st.sampled_from(["off", "lynx", "budget"]))
    if which == "off":
        return OffPolicy()
    if which == "budget":
        return BudgetPolicy(budget=draw(st.integers(k, experts)))
    return LynxPolicy(
        alpha=draw(st.sampled_from([0.3, 0.7, 1.0, 3.0])),
        beta=draw(st.sampled_from([None, 0, 1, 2, 4])),
        tie_break=draw(st.sampled_from(tie_breaks)),
    )


# --- route(): hand-computed -------------------------------------------------------------------

# softmax(log p) = p: one token whose probabilities are 0.1, 0.4, 0.2, 0.3.
PROBS = np.array([0.1, 0.4, 0.2, 0.3])
ONE_TOKEN = np.log(PROBS)[None, :].astype(np.float32)


@pytest.mark.parametrize(
    "form,normalize,weights",
    [
        (RouterForm.SOFTMAX_TOPK, True, [4 / 7, 3 / 7]),
        (RouterForm.SOFTMAX_TOPK, False, [0.4, 0.3]),
        (RouterForm.TOPK_SOFTMAX, True, [4 / 7, 3 / 7]),  # softmax over the picked logits: log 4, log 3
        (RouterForm.TOPK_SOFTMAX, False, [4 / 7, 3 / 7]),  # normalize does not apply to this form
    ],
)
def test_route_one_token_by_hand(form, normalize, weights):
    r = route(ONE_TOKEN, 2, form, normalize)
    assert r.ids.dtype == np.int64 and r.weights.dtype == np.float32
    np.testing.assert_array_equal(r.ids, [[1, 3]])
    np.testing.assert_allclose(r.weights, [weights], rtol=1e-6)
    np.testing.assert_array_equal(r.active, [1, 3])
    np.testing.assert_array_equal(r.masked_logits, ONE_TOKEN)


def test_route_all_experts_and_top1():
    r = route(ONE_TOKEN, 4, normalize=False)
    np.testing.assert_array_equal(r.ids, [[1, 3, 2, 0]])
    np.testing.assert_allclose(r.weights, [[0.4, 0.3, 0.2, 0.1]], rtol=1e-6)
    r = route(ONE_TOKEN, 1, RouterForm.TOPK_SOFTMAX)
    np.testing.assert_array_equal(r.ids, [[1]])
    np.testing.assert_array_equal(r.weights, [[1.0]])


def test_route_ties_take_lower_index_first():
    logits = np.array([[2.0, 2.0, 1.0, 2.0], [0.0, 0.0, 0.0, 0.0]], np.float32)
    for form in FORMS:
        r = route(logits, 2, form)
        np.testing.assert_array_equal(r.ids, [[0, 1], [0, 1]])
        np.testing.assert_allclose(r.weights, [[0.5, 0.5], [0.5, 0.5]], rtol=1e-6)


def test_route_two_tokens_by_hand_with_valid():
    # token 0: e^[0,1,0] -> probs (1, e, 1) / (e + 2); token 1 (padded) prefers expert 0.
    logits = np.array([[0.0, 1.0, 0.0], [5.0, 0.0, 0.0]], np.float32)
    r = route(logits, 1, normalize=False, valid=1)
    np.testing.assert_array_equal(r.ids, [[1], [0]])
    np.testing.assert_allclose(r.weights[0], [math.e / (math.e + 2)], rtol=1e-6)
    np.testing.assert_allclose(r.weights[1], [math.exp(5) / (math.exp(5) + 2)], rtol=1e-6)
    np.testing.assert_array_equal(r.active, [1])  # the padded row's expert 0 is not active
    assert route(logits, 1, valid=0).active.size == 0


def test_route_accepts_masked_experts():
    logits = np.array([[-np.inf, 0.0, -np.inf, np.log(3.0)]], np.float32)
    r = route(logits, 2, normalize=False)
    np.testing.assert_array_equal(r.ids, [[3, 1]])
    np.testing.assert_allclose(r.weights, [[0.75, 0.25]], rtol=1e-6)


def test_route_is_independent_of_dtype_and_layout():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((40, 16)).astype(np.float32)
    expected = route(logits, 4)
    for other in (np.asfortranarray(logits), logits.astype(np.float64), logits.tolist()):
        got = route(other, 4)
        np.testing.assert_array_equal(got.ids, expected.ids)
        np.testing.assert_array_equal(got.weights, expected.weights)


def test_routing_does_not_alias_the_input():
    logits = np.zeros((2, 4), np.float32)
    r = route(logits, 2)
    logits[:] = 7.0
    assert not np.any(r.masked_logits == 7.0)


def test_empty_batch():
    logits = np.zeros((0, 8), np.float32)
    for policy in (OffPolicy(), LynxPolicy(alpha=0.7, beta=1), BudgetPolicy(budget=2)):
        r = policy.select(logits, 2)
        assert r.ids.shape == (0, 2) and r.weights.shape == (0, 2) and r.active.size == 0
        assert policy.allowed(logits, 2).all()


# --- LYNX: hand-computed, reference, known properties -----------------------------------------


def test_lynx_two_tokens_by_hand():
    # alpha 1, no floor, B = 2.  bins: t0 [0, 0, -3, -3], t1 [-3, 0, 0, -3]
    # w = 2**bin: t0 [1, 1, 1/8, 1/8], t1 [1/8, 1, 1, 1/8]; pop = [9/8, 2, 9/8, 1/4]
    # score t0 = [0 + 1/16, 0 + 1/2, -3 + 1/2, -3 + 1/16] -> expert 1
    # score t1 = [-3 + 1/2, 0 + 1/2, 0 + 1/16, -3 + 1/16] -> expert 1
    logits = np.array([[0.0, -0.5, -3.0, -3.0], [-3.0, -0.5, 0.0, -3.0]], np.float32)
    policy = LynxPolicy(alpha=1.0)
    np.testing.assert_array_equal(policy.allowed(logits, 1), [False, True, False, False])
    r = policy.select(logits, 1)
    np.testing.assert_array_equal(r.ids, [[1], [1]])
    np.testing.assert_array_equal(r.weights, [[1.0], [1.0]])
    np.testing.assert_array_equal(r.active, [1])
    np.testing.assert_array_equal(route(logits, 1).active, [0, 2])


LYNX_CASES = [
    (tokens, experts, k)
    for tokens in (1, 2, 7, 33)
    for experts in (8, 16, 64)
    for k in (1, 2, 4, 8)
    if k <= experts
]
LYNX_PARAMS = [(0.7, 1, "logit"), (0.7, 1, "index"), (3.0, 2, "logit"), (3.0, 4, "index"), (1.0, None, "logit"), (0.3, 0, "logit")]


@pytest.mark.parametrize("tokens,experts,k", LYNX_CASES)
def test_lynx_matches_loop_reference(tokens, experts, k):
    rng = np.random.default_rng(tokens * 1000 + experts * 10 + k)
    for kind in ("normal", "ints", "masked"):
        logits = make_logits(rng, tokens, experts, k, kind)
        valid = None if kind == "normal" else int(rng.integers(0, tokens + 1))
        for alpha, beta, tie_break in LYNX_PARAMS:
            got = LynxPolicy(alpha=alpha, beta=beta, tie_break=tie_break).allowed(logits, k, valid)
            assert got.dtype == np.bool_ and got.shape == (experts,)
            expected = lynx_allowed_slow(logits, k, alpha, beta, tie_break, valid)
            assert got.tolist() == expected, (kind, valid, alpha, beta, tie_break)


@pytest.mark.parametrize("tokens,experts,k", [(1, 8, 2), (5, 8, 2), (33, 16, 4), (33, 64, 8), (12, 64, 1)])
def test_budget_matches_loop_reference(tokens, experts, k):
    rng = np.random.default_rng(tokens + experts + k)
    for kind in ("normal", "ints", "masked"):
        logits = make_logits(rng, tokens, experts, k, kind)
        valid = int(rng.integers(0, tokens + 1))
        for budget in sorted({k, k + 1, experts // 2, experts} & set(range(k, experts + 1))):
            got = BudgetPolicy(budget=budget).allowed(logits, k, valid)
            assert got.tolist() == budget_allowed_slow(logits, k, budget, valid), (kind, valid, budget)


def test_budget_by_hand():
    # top-1 votes: t0 -> 0, t1 -> 0, t2 -> 2, t3 -> 1: counts [2, 1, 1, 0]. Experts 1 and 2 tie on
    # count; t3 is far surer of expert 1 than t2 is of expert 2, so expert 1 has more mass.
    logits = np.array([[3, 0, 0, 0], [3, 0, 0, 0], [0, 0, 1, 0], [0, 5, 0, 0]], np.float32)
    policy = BudgetPolicy(budget=2)
    np.testing.assert_array_equal(policy.allowed(logits, 1), [True, True, False, False])
    r = policy.select(logits, 1)
    np.testing.assert_array_equal(r.ids, [[0], [0], [0], [1]])  # t2 falls back to the tie 0 == 1 -> 0
    np.testing.assert_array_equal(r.active, [0, 1])
    # The padded token t3 does not vote: then expert 2 wins the tie with expert 1 on mass.
    np.testing.assert_array_equal(policy.allowed(logits, 1, valid=3), [True, False, True, False])


def test_index_tie_break_can_drop_the_best_expert():
    # alpha 0.7: experts 0 (-0.5), 1 (-0.3) and 7 (0.0) all land in bin 0; the rest in bin -1.
    # With one token the score is the bin, so "index" keeps experts 0 and 1 and drops expert 7,
    # the token's own best expert; "logit" keeps 7 and 1, which is the model's own routing.
    logits = np.array([[-0.5, -0.3, -5, -5, -5, -5, -5, 0.0]], np.float32)
    model = route(logits, 2)
    np.testing.assert_array_equal(model.ids, [[7, 1]])

    by_index = LynxPolicy(alpha=0.7, beta=1, tie_break="index")
    np.testing.assert_array_equal(np.flatnonzero(by_index.allowed(logits, 2)), [0, 1])
    r = by_index.select(logits, 2)
    np.testing.assert_array_equal(r.ids, [[1, 0]])
    assert 7 not in r.ids

    by_logit = LynxPolicy(alpha=0.7, beta=1, tie_break="logit")
    np.testing.assert_array_equal(np.flatnonzero(by_logit.allowed(logits, 2)), [1, 7])
    np.testing.assert_array_equal(by_logit.select(logits, 2).ids, model.ids)


def test_lynx_can_activate_more_experts_than_off():
    # K=1, B=3, alpha 1. The model sends t0 to expert 2 and t1, t2 to expert 0 (t2: tie 0 == 3).
    # t0 puts expert 0 three bins down, so it is the least popular of t1's and t2's bin-0
    # experts (pop 2 + 1/27 against 2 + 1/9); both leave it, but for different experts:
    # t1 ties 1 and 3 on score and logit -> 1; t2 ties 2 and 3 on score -> 3, the higher logit.
    logits = np.array([[-3.0, -0.5, 0.0, -2.5], [-0.5, -1.0, -3.0, -1.0], [0.0, -2.0, -0.5, 0.0]], np.float32)
    policy = LynxPolicy(alpha=1.0)
    np.testing.assert_array_equal(policy.allowed(logits, 1), [False, True, True, True])
    np.testing.assert_array_equal(policy.select(logits, 1).ids.ravel(), [2, 1, 3])
    np.testing.assert_array_equal(route(logits, 1).ids.ravel(), [2, 0, 0])


def test_lynx_reduces_active_experts_on_skewed_batches():
    rng = np.random.default_rng(1)
    reductions = []
    for _ in range(10):
        logits = skewed_logits(rng, 32, 64)
        off = route(logits, 8).active.size
        reductions.append(off - make_policy("lynx", num_experts=64, top_k=8).select(logits, 8).active.size)
    assert min(reductions) >= 0 and sum(reductions) > 0


# --- properties -------------------------------------------------------------------------------


@FAST
@given(data=st.data(), problem=problems(), form=st.sampled_from(FORMS), normalize=st.booleans())
def test_every_token_gets_k_distinct_experts(data, problem, form, normalize):
    logits, k, valid = problem
    tokens, experts = logits.shape
    policy = data.draw(policies(experts, k))
    r = policy.select(logits, k, form, normalize, valid)
    assert isinstance(r, Routing)
    assert r.ids.shape == (tokens, k) and r.ids.dtype == np.int64
    assert r.weights.shape == (tokens, k) and r.weights.dtype == np.float32
    assert r.masked_logits.shape == (tokens, experts) and r.masked_logits.dtype == np.float32
    assert ((r.ids >= 0) & (r.ids < experts)).all()
    assert all(len(set(row)) == k for row in r.ids.tolist())
    assert np.isfinite(r.weights).all() and (r.weights >= 0).all()
    assert (np.diff(r.weights, axis=-1) <= 0).all()  # ordered by descending weight


@FAST
@given(problem=problems(), form=st.sampled_from(FORMS), normalize=st.booleans())
def test_off_equals_route(problem, form, normalize):
    logits, k, valid = problem
    expected = route(logits, k, form, normalize, valid)
    got = OffPolicy().select(logits, k, form, normalize, valid)
    for field in ("ids", "weights", "active", "masked_logits"):
        np.testing.assert_array_equal(getattr(got, field), getattr(expected, field))
    assert OffPolicy().allowed(logits, k, valid).all()


@FAST
@given(
    problem=problems(min_tokens=1),
    form=st.sampled_from(FORMS),
    normalize=st.booleans(),
    alpha=st.sampled_from([0.3, 0.7, 1.0, 3.0, 10.0]),
    beta=st.sampled_from([None, 0, 1, 2, 4]),
)
def test_lynx_with_logit_tie_break_keeps_a_lone_tokens_routing(problem, form, normalize, alpha, beta):
    logits, k, _ = problem
    policy = LynxPolicy(alpha=alpha, beta=beta, tie_break="logit")
    # Alone in the batch (T = 1), or the only valid row of a padded batch.
    for rows, valid in ((logits[:1], None), (logits, 1)):
        got = policy.select(rows, k, form, normalize, valid)
        expected = route(rows, k, form, normalize, valid)
        np.testing.assert_array_equal(got.ids[0], expected.ids[0])
        np.testing.assert_array_equal(got.active, expected.active)
        if normalize or form == RouterForm.TOPK_SOFTMAX:
            # Unnormalised weights are the masked softmax, so they differ on purpose.
            np.testing.assert_allclose(got.weights[0], expected.weights[0], rtol=2e-6, atol=1e-7)


@FAST
@given(data=st.data(), problem=problems(), form=st.sampled_from(FORMS), normalize=st.booleans())
def test_weights_follow_the_models_normalisation(data, problem, form, normalize):
    logits, k, valid = problem
    policy = data.draw(policies(logits.shape[1], k))
    r = policy.select(logits, k, form, normalize, valid)
    allowed = policy.allowed(logits, k, valid)
    np.testing.assert_array_equal(r.masked_logits, np.where(allowed, logits, -np.inf))
    has_finite = np.isfinite(r.masked_logits).any(axis=1)
    if normalize or form == RouterForm.TOPK_SOFTMAX:
        np.testing.assert_allclose(r.weights.sum(axis=1)[has_finite], 1.0, rtol=0, atol=2e-6)
    else:
        probs = softmax64(r.masked_logits[has_finite])
        np.testing.assert_allclose(r.weights[has_finite], np.take_along_axis(probs, r.ids[has_finite], -1), rtol=2e-6, atol=1e-7)
    np.testing.assert_array_equal(r.weights[~has_finite], 0.0)


@FAST
@given(data=st.data(), problem=problems(kinds=("normal", "ints")), form=st.sampled_from(FORMS))
def test_valid_tokens_use_only_active_and_allowed_experts(data, problem, form):
    logits, k, valid = problem
    policy = data.draw(policies(logits.shape[1], k))
    r = policy.select(logits, k, form, True, valid)
    allowed = policy.allowed(logits, k, valid)
    rows = logits.shape[0] if valid is None else valid
    used = r.ids[:rows]
    np.testing.assert_array_equal(r.active, np.unique(used))
    assert (np.diff(r.active) > 0).all()
    assert allowed[used].all()
    # Finite logits: every valid row keeps at least K finite logits under the mask.
    assert (np.isfinite(r.masked_logits[:rows]).sum(axis=1) >= k).all()


@FAST
@given(data=st.data(), problem=problems(min_tokens=1), form=st.sampled_from(FORMS), seed=st.integers(0, 2**32 - 1))
def test_padded_rows_never_vote(data, problem, form, seed):
    logits, k, _ = problem
    tokens, experts = logits.shape
    valid = data.draw(st.integers(0, tokens - 1))
    policy = data.draw(policies(experts, k))
    junk = logits.copy()
    junk[valid:] = make_logits(np.random.default_rng(seed), tokens - valid, experts, k, "normal") * 5
    np.testing.assert_array_equal(policy.allowed(logits, k, valid), policy.allowed(junk, k, valid))
    a = policy.select(logits, k, form, True, valid)
    b = policy.select(junk, k, form, True, valid)
    np.testing.assert_array_equal(a.ids[:valid], b.ids[:valid])
    np.testing.assert_array_equal(a.weights[:valid], b.weights[:valid])
    np.testing.assert_array_equal(a.active, b.active)


def skewed_logits(rng: np.random.Generator, tokens: int, experts: int) -> np.ndarray:
    """A batch whose tokens share each expert's popularity: bias per expert + small per-token noise."""
    bias = rng.standard_normal(experts) * 3.0
    return (bias[None, :] + 0.3 * rng.standard_normal((tokens, experts))).astype(np.float32)


# LYNX lowers the active count only statistically (test_lynx_can_activate_more_experts_than_off).
# At this skew a search of 100k batches x these 5 policies found one counterexample (E=16, K=1,
# B=5, alpha 1), so derandomize pins the examples: the test must not flake.
@settings(max_examples=80, deadline=None, derandomize=True, database=None)
@given(
    experts_k=st.sampled_from([(8, 1), (8, 2), (16, 2), (16, 4), (64, 4), (64, 8)]),
    batch=st.integers(4, 64),
    padded=st.integers(0, 3),
    seed=st.integers(0, 2**32 - 1),
    data=st.data(),
)
def test_selection_never_activates_more_experts_than_off_on_skewed_batches(experts_k, batch, padded, seed, data):
    experts, k = experts_k
    rng = np.random.default_rng(seed)
    logits = np.concatenate([skewed_logits(rng, batch, experts), rng.standard_normal((padded, experts)).astype(np.float32) * 4])
    off = route(logits, k, valid=batch).active.size
    candidates = [
        make_policy("lynx", num_experts=experts, top_k=k),
        LynxPolicy(alpha=0.7, beta=1),
        LynxPolicy(alpha=1.0),
        LynxPolicy(alpha=3.0, beta=2),
        BudgetPolicy(budget=data.draw(st.integers(k, experts))),
    ]
    for policy in candidates:
        assert policy.select(logits, k, valid=batch).active.size <= off, policy


# --- construction, parameters, errors ---------------------------------------------------------


@pytest.mark.parametrize(
    "experts,k,expected",
    [(8, 2, (3.0, 1)), (64, 8, (1.4, 2)), (128, 8, (3.0, 2)), (128, 4, (3.0, 2)), (16, 2, (1.0, None)), (8, 1, (1.0, None))],
)
def test_default_lynx_params(experts, k, expected):
    assert default_lynx_params(experts, k) == expected


def test_measured_defaults_replace_the_authors_only_where_measured():
    assert AUTHORS_LYNX_PARAMS[(8, 2)] == (0.7, 1)  # what the authors shipped for Mixtral, kept for reference
    assert AUTHORS_LYNX_PARAMS[(64, 8)] == (3.0, 4)
    assert all(default_lynx_params(e, k) == v for (e, k), v in AUTHORS_LYNX_PARAMS.items() if (e, k) not in ((8, 2), (64, 8)))


def test_make_policy():
    assert make_policy("off") == OffPolicy()
    assert make_policy("lynx", num_experts=8, top_k=2) == LynxPolicy(alpha=3.0, beta=1)
    assert make_policy("lynx", num_experts=8, top_k=2, beta=3) == LynxPolicy(alpha=3.0, beta=3)
    assert make_policy("lynx", num_experts=16, top_k=2) == LynxPolicy(alpha=1.0, beta=None)
    assert make_policy("lynx", alpha=2.0, tie_break="index") == LynxPolicy(alpha=2.0, beta=None, tie_break="index")
    assert make_policy("budget", budget=4, num_experts=8, top_k=2) == BudgetPolicy(budget=4)
    # Parameters of other policies are ignored (op attributes carry all of them).
    assert make_policy("off", beta=2, tie_break="logit") == OffPolicy()


def test_params_are_json_able():
    cases = [
        (OffPolicy(), {}),
        (LynxPolicy(alpha=np.float32(0.5), beta=np.int64(1)), {"alpha": 0.5, "beta": 1, "tie_break": "logit"}),
        (LynxPolicy(alpha=3), {"alpha": 3.0, "beta": None, "tie_break": "logit"}),
        (BudgetPolicy(budget=np.int64(4)), {"budget": 4}),
    ]
    for policy, expected in cases:
        assert json.loads(json.dumps(policy.params())) == expected
    assert [p.name for p, _ in cases] == ["off", "lynx", "lynx", "budget"]


def test_policies_are_frozen_and_hashable():
    policy = LynxPolicy(alpha=0.7, beta=1)
    with pytest.raises(AttributeError):
        policy.alpha = 1.0  # type: ignore[misc]
    assert len({policy, LynxPolicy(alpha=0.7, beta=1), OffPolicy(), BudgetPolicy(budget=2)}) == 3


GOOD = np.zeros((3, 4), np.float32)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: route(np.zeros(4, np.float32), 1), "2-D"),
        (lambda: route(np.zeros((2, 3, 4), np.float32), 1), "2-D"),
        (lambda: route(GOOD, 0), "top_k"),
        (lambda: route(GOOD, 5), "top_k"),
        (lambda: route(GOOD, 1.5), "top_k"),
        (lambda: route(GOOD, True), "top_k"),
        (lambda: route(GOOD, 1, valid=-1), "valid"),
        (lambda: route(GOOD, 1, valid=4), "valid"),
        (lambda: route(GOOD, 1, form="softmax"), "router form"),
        (lambda: route(np.array([[0.0, np.nan]], np.float32), 1), "NaN"),
        (lambda: route(np.array([[0.0, np.inf]], np.float32), 1), r"\+inf"),
        (lambda: route(np.array([[0.0, 1e39]]), 1), "overflow"),
        (lambda: route(np.array([[0.0, -np.inf, -np.inf]], np.float32), 2), "fewer than top_k"),
        (lambda: route(np.array([["a", "b"]]), 1), "real numbers"),
        (lambda: route(np.array([[1 + 1j, 0]]), 1), "real numbers"),
        (lambda: route([[0.0, 1.0], [0.0]], 1), "numeric"),
        (lambda: OffPolicy().select(GOOD, 5), "top_k"),
        (lambda: LynxPolicy(alpha=0.7).select(GOOD, 1, valid=9), "valid"),
        (lambda: LynxPolicy(alpha=0.7).allowed(np.full((1, 4), np.nan), 1), "NaN"),
        (lambda: LynxPolicy(alpha=0.0), "alpha"),
        (lambda: LynxPolicy(alpha=-1.0), "alpha"),
        (lambda: LynxPolicy(alpha=math.inf), "alpha"),
        (lambda: LynxPolicy(alpha="1"), "alpha"),
        (lambda: LynxPolicy(alpha=1.0, beta=-1), "beta"),
        (lambda: LynxPolicy(alpha=1.0, beta=1.5), "beta"),
        (lambda: LynxPolicy(alpha=1.0, tie_break="random"), "tie_break"),
        (lambda: BudgetPolicy(budget=0), "budget"),
        (lambda: BudgetPolicy(budget=1).select(GOOD, 2), r"budget must be in \[top_k=2, 4\]"),
        (lambda: BudgetPolicy(budget=5).allowed(GOOD, 2), "budget"),
        (lambda: make_policy("budget"), "needs budget"),
        (lambda: make_policy("budget", budget=1, top_k=2), "budget"),
        (lambda: make_policy("budget", budget=9, num_experts=8), "budget"),
        (lambda: make_policy("lynx"), "num_experts and top_k"),
        (lambda: make_policy("greedy"), "unknown policy 'greedy'; valid names: off, lynx, budget"),
        (lambda: default_lynx_params(8, 9), "top_k"),
    ],
)
def test_invalid_arguments_raise_routing_error(call, match):
    with pytest.raises(RoutingError, match=match) as info:
        call()
    assert "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)


def test_select_rejects_a_malformed_mask_from_a_custom_policy():
    class Broken(SelectionPolicy):
        name = "broken"

        def allowed(self, logits, top_k, valid=None):
            return np.ones(3)

    with pytest.raises(RoutingError, match="mask"):
        Broken().select(GOOD, 1)


def test_selection_policy_is_abstract():
    with pytest.raises(TypeError):
        SelectionPolicy()  # type: ignore[abstract]
