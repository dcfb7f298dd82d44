"""The batched routing path (route_many, SelectionPolicy.allowed_many / select_many, compare_many,
select_steps) against the one-problem oracle, bit for bit; and the evaluation's decode with the
batched path against the same decode through the oracle."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lynx_export.routing import (
    BudgetPolicy,
    GroupedRouting,
    LynxPolicy,
    OffPolicy,
    Router,
    RouterForm,
    Routing,
    RoutingError,
    SelectionPolicy,
    compare_many,
    compare_routings,
    route,
    route_many,
)
from lynx_export.routing import INT32_MAX
from lynx_export.evaluation.sweep import batch_groups, mean_ci, policy_grid, select_step, select_steps

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def same(a: np.ndarray, b: np.ndarray) -> None:
    """Equal bit for bit: dtype, shape and bytes (so -0.0 vs 0.0 and any last-ulp change fail)."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, a.shape, b.dtype, b.shape)
    assert a.tobytes() == b.tobytes(), (a, b)


def same_routing(got: Routing, want: Routing) -> None:
    for field in ("ids", "weights", "active", "masked_logits"):
        same(getattr(got, field), getattr(want, field))


def make_logits(rng: np.random.Generator, shape: tuple[int, int, int], k: int, kind: str, neg_share: float) -> np.ndarray:
    """Logits [P,T,E] with ties ("int": integer values; "near": values an ulp apart), -inf entries
    at about neg_share of the places, and at least k finite entries in every row."""
    if kind == "int":
        logits = rng.integers(-3, 3, size=shape).astype(np.float32)
    elif kind == "near":
        logits = np.float32(1.5) + rng.integers(-2, 3, size=shape).astype(np.float32) * np.finfo(np.float32).eps
    else:
        logits = (rng.normal(size=shape) * 4).astype(np.float32)
    if neg_share and logits.size:
        drop = rng.random(shape) < neg_share
        keep = np.argsort(rng.random(shape), axis=-1)[..., :k]  # k random experts per row stay finite
        np.put_along_axis(drop, keep, False, axis=-1)
        logits[drop] = -np.inf
    return logits


@st.composite
def policies(draw, k: int, experts: int) -> SelectionPolicy:
    which = draw(st.sampled_from(["off", "lynx", "budget"]))
    if which == "off":
        return OffPolicy()
    if which == "budget":
        return BudgetPolicy(budget=draw(st.integers(k, experts)))
    return LynxPolicy(alpha=draw(st.sampled_from([0.35, 0.7, 1.0, 1.4, 3.0, 30.0])), beta=draw(st.sampled_from([None, 0, 1, 2, INT32_MAX])),
                      tie_break=draw(st.sampled_from(["logit", "index"])))


@st.composite
def groupings(draw, k: int, experts: int, rng: np.random.Generator) -> GroupedRouting | None:
    counts = [g for g in range(1, experts + 1) if experts % g == 0 and experts // g >= 2]
    num_groups = draw(st.sampled_from(counts))
    size = experts // num_groups
    keep = [t for t in range(1, num_groups + 1) if t * size >= k]
    if not keep:
        return None
    bias = tuple(float(x) for x in rng.normal(size=experts) * 0.1) if draw(st.booleans()) else None
    return GroupedRouting(num_groups=num_groups, topk_groups=draw(st.sampled_from(keep)), routed_scaling=draw(st.sampled_from([1.0, 2.5])),
                          score_bias=bias)


@st.composite
def cases(draw):
    experts = draw(st.integers(2, 9))
    k = draw(st.integers(1, experts))
    shape = (draw(st.integers(0, 5)), draw(st.integers(0, 7)), experts)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    logits = make_logits(rng, shape, k, draw(st.sampled_from(["int", "near", "normal"])), draw(st.sampled_from([0.0, 0.3, 0.7])))
    valid_kind = draw(st.sampled_from(["none", "one", "each"]))
    valid = {"none": None, "one": draw(st.integers(0, shape[1])), "each": rng.integers(0, shape[1] + 1, size=shape[0])}[valid_kind]
    form = draw(st.sampled_from(list(RouterForm)))
    grouping = draw(groupings(k, experts, rng)) if form is RouterForm.SIGMOID_GROUPED else None
    if form is RouterForm.SIGMOID_GROUPED and grouping is None:
        form = RouterForm.SOFTMAX_TOPK
    return logits, k, valid, form, draw(st.booleans()), grouping, draw(policies(k, experts))


def per_problem(valid, problems: int) -> list[int | None]:
    if valid is None or np.ndim(valid) == 0:
        return [valid] * problems
    return [int(v) for v in valid]


@FAST
@given(cases())
def test_select_many_is_the_oracle_per_problem(case):
    logits, k, valid, form, normalize, grouping, policy = case
    rows = per_problem(valid, logits.shape[0])
    try:
        want = [policy.select(logits[p], k, form, normalize, rows[p], grouping=grouping) for p in range(logits.shape[0])]
        own = [route(logits[p], k, form, normalize, rows[p], grouping=grouping) for p in range(logits.shape[0])]
    except RoutingError:
        # A problem the oracle refuses (e.g. too few finite logits in a token's kept groups): so does the stack.
        with pytest.raises(RoutingError):
            policy.select_many(logits, k, form, normalize, valid, grouping=grouping)
        return
    got = policy.select_many(logits, k, form, normalize, valid, grouping=grouping)
    got_own = route_many(logits, k, form, normalize, valid, grouping=grouping)
    assert len(got) == len(got_own) == logits.shape[0]
    same(got.valid, np.array([logits.shape[1] if r is None else r for r in rows], dtype=np.int64))
    for p in range(logits.shape[0]):
        same_routing(got.problem(p), want[p])
        same_routing(got_own.problem(p), own[p])
    assert compare_many(got_own, got) == [compare_routings(own[p], want[p], rows[p]) for p in range(logits.shape[0])]
    if grouping is None:
        votes = logits
        same(policy.allowed_many(votes, k, valid).reshape(-1, logits.shape[2]),
             np.array([policy.allowed(votes[p], k, rows[p]) for p in range(votes.shape[0])], dtype=bool).reshape(-1, logits.shape[2]))
    if grouping is None and valid is None:
        chosen, stats = select_steps(policy, logits, Router(k, form, normalize))
        for p in range(logits.shape[0]):
            one, one_stats = select_step(policy, logits[p], Router(k, form, normalize))
            same_routing(chosen.problem(p), one)
            assert stats[p] == one_stats


@pytest.mark.parametrize("experts, k", [(8, 2), (64, 8)])
@pytest.mark.parametrize("batch", [1, 3, 16, 64])
@pytest.mark.parametrize("kind", ["normal", "int"])
def test_select_steps_equals_select_step_on_eval_sized_steps(experts, k, batch, kind):
    """The shapes the evaluation runs (S positions of one layer), over the whole policy grid."""
    rng = np.random.default_rng(experts * 1000 + batch)
    logits = make_logits(rng, (31, batch, experts), k, kind, 0.0) + rng.normal(size=experts).astype(np.float32) * 2  # skewed experts
    for policy in policy_grid(experts, k) + [LynxPolicy(alpha=0.7, beta=1, tie_break="index")]:
        chosen, stats = select_steps(policy, logits, Router(k))
        for p in range(logits.shape[0]):
            one, one_stats = select_step(policy, logits[p], Router(k))
            same_routing(chosen.problem(p), one)
            assert stats[p] == one_stats, policy


class Fixed(SelectionPolicy):
    """A custom policy without a vectorised allowed_many: the default calls `allowed` per problem."""

    name = "fixed"

    def __init__(self, mask) -> None:
        self.mask = np.asarray(mask)

    def allowed(self, logits, top_k, valid=None):
        return self.mask


def test_a_custom_policy_goes_through_allowed_per_problem():
    logits = np.random.default_rng(1).normal(size=(4, 3, 5)).astype(np.float32)
    policy = Fixed([True, False, True, True, False])
    got = policy.select_many(logits, 2)
    for p in range(4):
        same_routing(got.problem(p), policy.select(logits[p], 2))
    same(policy.allowed_many(logits[:0], 2), np.ones((0, 5), dtype=bool))
    with pytest.raises(RoutingError, match="mask"):
        Fixed(np.ones(3)).select_many(logits, 1)


@pytest.mark.parametrize("call, match", [
    (lambda: OffPolicy().select_many(np.zeros((3, 4)), 1), "3-D"),
    (lambda: route_many(np.zeros((2, 3, 4)), 5), "top_k"),
    (lambda: route_many(np.zeros((2, 3, 4)), 1, valid=4), "valid"),
    (lambda: route_many(np.zeros((2, 3, 4)), 1, valid=[1, 2, 3]), "one per problem"),
    (lambda: route_many(np.zeros((2, 3, 4)), 1, valid=[1, 4]), "problem 1"),
    (lambda: route_many(np.zeros((2, 3, 4)), 1, valid=np.array([1.0, 2.0])), "integer"),
    (lambda: route_many(np.where(np.arange(4) < 3, -np.inf, 0.0) * np.ones((2, 3, 4)), 2), "problem 0 row 0"),
    (lambda: LynxPolicy(alpha=1.0).select_many(np.full((1, 2, 4), np.nan), 1), "NaN"),
    (lambda: BudgetPolicy(budget=5).allowed_many(np.zeros((1, 2, 4)), 2), "budget"),
])
def test_batched_errors_are_one_line_routing_errors(call, match):
    with pytest.raises(RoutingError, match=match) as info:
        call()
    assert "\n" not in str(info.value)


def test_compare_many_refuses_routings_of_different_problems():
    a, b = route_many(np.zeros((2, 3, 4)), 1), route_many(np.zeros((2, 3, 4)), 1, valid=2)
    with pytest.raises(RoutingError, match="differ"):
        compare_many(a, b)


# -- the evaluation: batched decode vs the oracle's decode ------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model():
    """tests/test_accuracy.py's tiny random model (its TINY config); needs torch, which only these tests do."""
    pytest.importorskip("torch")
    from lynx_export.evaluation.demo import build_demo_model
    from tests.test_accuracy import TINY

    return build_demo_model(TINY)


def _ids(count: int, length: int, seed: int) -> np.ndarray:
    from tests.test_accuracy import _ids

    return _ids(count, length, seed)


@pytest.mark.parametrize("batch", [1, 3])
def test_decode_torch_batched_equals_the_oracle_decode(tiny_model, batch):
    from lynx_export.evaluation.decode import decode_torch
    from tests.test_accuracy import TINY

    ids = _ids(6, 9, seed=2)
    for policy in policy_grid(TINY.num_experts, TINY.top_k):
        fast = decode_torch(tiny_model, ids, batch, policy)
        slow = decode_torch(tiny_model, ids, batch, policy, batched=False)
        for field in ("correct", "nll", "predictions"):
            same(getattr(fast, field), getattr(slow, field))
        assert (fast.active_model, fast.active_policy, fast.agreement) == (slow.active_model, slow.active_policy, slow.agreement)
        assert len(fast.agreement) == TINY.num_layers * (6 // batch) * 8


@pytest.mark.slow
def test_run_accuracy_is_the_same_with_the_oracle_decode(tiny_model, tmp_path, monkeypatch):
    from lynx_export.evaluation import accuracy
    from lynx_export.evaluation.decode import decode_torch

    config = accuracy.AccuracyConfig(batch_sizes=(1, 2), sequences=4, seq_len=7, grid=True, onnx_batch_sizes=())
    ids = _ids(4, 7, seed=3)
    fast = accuracy.run_accuracy(tiny_model, ids, config, tmp_path)
    monkeypatch.setattr(accuracy, "decode_torch", functools.partial(decode_torch, batched=False))
    slow = accuracy.run_accuracy(tiny_model, ids, config, tmp_path)
    assert json.dumps(fast, sort_keys=True) == json.dumps(slow, sort_keys=True)


@pytest.mark.parametrize("router, normalize", [
    (RouterForm.SOFTMAX_TOPK, True), (RouterForm.SOFTMAX_TOPK, False), (RouterForm.TOPK_SOFTMAX, True),
])
def test_replay_equals_select_step_loop(router, normalize):
    from lynx_export.evaluation.trace import RouterTrace, replay

    rng = np.random.default_rng(4)
    trace = RouterTrace(tuple(np.round(rng.normal(size=(9, 5, 8)) * 2).astype(np.float32) for _ in range(2)), top_k=2, router=router,
                        normalize=normalize)
    policies = [OffPolicy(), LynxPolicy(alpha=0.7, beta=1), LynxPolicy(alpha=3.0, tie_break="index"), BudgetPolicy(budget=3)]
    rows = replay(trace, policies, [1, 4])
    for row, (batch, policy) in zip(rows, [(b, p) for b in (1, 4) for p in policies]):
        steps = [select_step(policy, layer[group, pos], Router(2, router, normalize))[1]
                 for layer in trace.logits for group in batch_groups(9, batch) for pos in range(5)]
        assert row["steps"] == len(steps)
        assert row["active_experts_policy"] == mean_ci([s.active_policy for s in steps])
        assert row["routing_agreement"] == mean_ci([s.agreement for s in steps])
        assert row["first_choices"] == mean_ci([s.first_choices for s in steps])
        assert row["first_choice_kept"] == mean_ci([s.first_kept for s in steps])
