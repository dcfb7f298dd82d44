"""DeepSeek-V3's sigmoid grouped router (`RouterForm.SIGMOID_GROUPED`) end to end: the oracle
against transformers' own router, the policies on it, the LynxMoE attributes, the ONNX Runtime
lowering (fused and per-expert experts) against the oracle, and builds of a tiny DeepSeek-V3.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lynx_export.op import contract as lynx_op
from lynx_export.backends import lynx_moe_lib
from lynx_export.compiler.blocks import NoMatch
from lynx_export.compiler.forms.match import match_router, shortest_float
from lynx_export.routing import (
    BudgetPolicy,
    GroupedRouting,
    LynxPolicy,
    OffPolicy,
    Router,
    RouterForm,
    RoutingError,
    SelectionPolicy,
    make_policy,
    route,
    selection_scores,
    selection_stats,
)
from lynx_export.op.spec import MoESpec
from tests.test_ort_lowering import _lynx_model, _reference_output, _run_lowered
from tests.cli_builds import lynx

GROUPED = RouterForm.SIGMOID_GROUPED
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- strategies -------------------------------------------------------------------------------


@st.composite
def grouped_problems(draw, min_tokens=0, max_tokens=24):
    """(logits [T,E], K, valid, grouping) with finite logits (a router's output)."""
    experts, groups = draw(st.sampled_from([(4, 1), (4, 2), (8, 2), (8, 4), (16, 4), (16, 8), (64, 8)]))
    size = experts // groups
    keep = draw(st.integers(1, groups))
    k = draw(st.integers(1, min(8, keep * size)))
    tokens = draw(st.integers(min_tokens, max_tokens))
    valid = draw(st.one_of(st.none(), st.integers(0, tokens)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if draw(st.booleans()):
        logits = (rng.standard_normal((tokens, experts)) * 2.0).astype(np.float32)
    else:  # many exact ties
        logits = rng.integers(-2, 3, size=(tokens, experts)).astype(np.float32)
    bias = draw(st.sampled_from([None, "zero", "random"]))
    score_bias = None if bias is None else tuple(np.zeros(experts) if bias == "zero" else rng.standard_normal(experts) * 0.3)
    grouping = GroupedRouting(groups, keep, draw(st.sampled_from([1.0, 2.5])), score_bias)
    return logits, k, valid, grouping


@st.composite
def policies(draw, experts: int, k: int):
    which = draw(st.sampled_from(["off", "lynx", "budget"]))
    if which == "off":
        return OffPolicy()
    if which == "budget":
        return BudgetPolicy(budget=draw(st.integers(k, experts)))
    return LynxPolicy(alpha=draw(st.sampled_from([0.7, 3.0, 10.0, 30.0])), beta=draw(st.sampled_from([None, 0, 1, 2])),
                      tie_break=draw(st.sampled_from(["logit", "index"])))


class Fixed(SelectionPolicy):
    """A policy allowing a fixed set of experts (for the corner cases)."""

    name = "fixed"

    def __init__(self, mask) -> None:
        self.mask = np.asarray(mask, dtype=bool)

    def allowed(self, logits, top_k, valid=None):
        return self.mask


# --- the oracle against transformers' router --------------------------------------------------


def transformers_routing(logits: np.ndarray, k: int, normalize: bool, g: GroupedRouting) -> tuple[np.ndarray, np.ndarray]:
    """(ids, weights) of transformers' DeepseekV3TopkRouter on `logits`: its weight is the identity
    over hidden = logits, so its router logits are `logits` exactly."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    experts = logits.shape[1]
    config = transformers.DeepseekV3Config(
        n_routed_experts=experts, num_experts_per_tok=k, n_group=g.num_groups, topk_group=g.topk_groups, hidden_size=experts,
        norm_topk_prob=normalize, routed_scaling_factor=g.routed_scaling,
    )
    router = DeepseekV3TopkRouter(config)
    with torch.no_grad():
        router.weight.copy_(torch.eye(experts))
        router.e_score_correction_bias.copy_(torch.tensor(np.zeros(experts) if g.score_bias is None else g.score_bias))
        router_logits, weights, ids = router(torch.from_numpy(logits))
    np.testing.assert_array_equal(router_logits.numpy(), logits)
    return ids.numpy(), weights.numpy()


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize(
    "experts,groups,keep,k", [(8, 4, 2, 2), (8, 2, 1, 2), (16, 4, 2, 4), (64, 8, 4, 8), (8, 1, 1, 3), (16, 8, 3, 6)]
)
def test_oracle_matches_transformers_router(experts, groups, keep, k, normalize):
    rng = np.random.default_rng(experts * 100 + groups * 10 + k)
    logits = (rng.standard_normal((64, experts)) * 2.0).astype(np.float32)
    g = GroupedRouting(groups, keep, 2.5, tuple(rng.standard_normal(experts) * 0.3))
    want_ids, want_weights = transformers_routing(logits, k, normalize, g)
    got = route(logits, k, GROUPED, normalize, grouping=g)
    for t in range(logits.shape[0]):  # torch's topk(sorted=False): compare ids as sets, weights per id
        assert set(got.ids[t].tolist()) == set(want_ids[t].tolist()), t
        by_id = dict(zip(want_ids[t].tolist(), want_weights[t].tolist()))
        np.testing.assert_allclose(got.weights[t], [by_id[e] for e in got.ids[t].tolist()], rtol=2e-6, atol=1e-7)


def test_route_by_hand():
    # scores all 0.5; choice = 0.5 + bias; groups of 2: sums 1.1, 1.05, 1.09, 1.4 -> keep groups 3 and 0.
    # Expert 2 has the best single choice (0.8) but its group is dropped.
    bias = (0.1, 0.0, 0.3, -0.25, 0.05, 0.04, 0.2, 0.19)
    g = GroupedRouting(4, 2, 2.5, bias)
    r = route(np.zeros((1, 8), np.float32), 2, GROUPED, True, grouping=g)
    assert r.ids.tolist() == [[6, 7]] and r.active.tolist() == [6, 7]
    np.testing.assert_array_equal(r.weights, [[1.25, 1.25]])  # 0.5 / (1.0 + 1e-20) * 2.5
    # Three picks: the third is the best of the kept groups' rest (expert 0, 0.6).
    r3 = route(np.zeros((1, 8), np.float32), 3, GROUPED, False, grouping=g)
    assert r3.ids.tolist() == [[6, 7, 0]]
    np.testing.assert_array_equal(r3.weights, [[1.25, 1.25, 1.25]])
    np.testing.assert_allclose(
        selection_scores(np.zeros((1, 8), np.float32), 2, g),
        np.float32([[0.6, 0.5, -np.inf, -np.inf, -np.inf, -np.inf, 0.7, 0.69]]), rtol=1e-7,
    )


def test_weights_are_scores_not_choice_values():
    # A bias reorders experts but never enters the weights.
    logits = np.float32([[2.0, 1.0, 0.0, -1.0]])
    g = GroupedRouting(1, 1, 1.0, (0.0, 0.0, 0.0, 2.0))
    r = route(logits, 2, GROUPED, False, grouping=g)
    assert r.ids.tolist() == [[3, 0]]  # choice 0.27 + 2 > 0.88 > 0.73
    np.testing.assert_allclose(r.weights, 1 / (1 + np.exp(-np.float64([[-1.0, 2.0]]))), rtol=1e-7)


# --- policies ---------------------------------------------------------------------------------


@FAST
@given(problem=grouped_problems(), normalize=st.booleans())
def test_off_equals_route(problem, normalize):
    logits, k, valid, g = problem
    expected = route(logits, k, GROUPED, normalize, valid, grouping=g)
    got = OffPolicy().select(logits, k, GROUPED, normalize, valid, grouping=g)
    for field in ("ids", "weights", "active", "masked_logits"):
        np.testing.assert_array_equal(getattr(got, field), getattr(expected, field))


@FAST
@given(data=st.data(), problem=grouped_problems(), normalize=st.booleans())
def test_every_token_gets_k_distinct_experts(data, problem, normalize):
    logits, k, valid, g = problem
    tokens, experts = logits.shape
    policy = data.draw(policies(experts, k))
    r = policy.select(logits, k, GROUPED, normalize, valid, grouping=g)
    assert r.ids.shape == r.weights.shape == (tokens, k) and r.ids.dtype == np.int64 and r.weights.dtype == np.float32
    assert all(len(set(row)) == k for row in r.ids.tolist())
    assert np.isfinite(r.weights).all() and (r.weights >= 0).all()
    allowed = policy.allowed(selection_scores(logits, k, g), k, valid)
    np.testing.assert_array_equal(r.masked_logits, np.where(allowed, logits, -np.inf))
    rows = tokens if valid is None else valid
    np.testing.assert_array_equal(r.active, np.unique(r.ids[:rows]))
    # Experts outside the allowed set only fill rows up, with weight 0.
    assert (r.weights[~allowed[r.ids]] == 0).all()
    if normalize and tokens:
        sums = r.weights.sum(axis=1)
        full = (r.weights > 0).all(axis=1)
        np.testing.assert_allclose(sums[full], g.routed_scaling, rtol=2e-6)


@FAST
@given(data=st.data(), problem=grouped_problems(min_tokens=1))
def test_valid_rows_get_k_allowed_experts_under_lynx_without_floor_and_off(data, problem):
    """LYNX without beta votes each valid row's K picks inside its kept groups, so those groups
    still hold K allowed experts: no valid row is filled up."""
    logits, k, valid, g = problem
    policy = data.draw(st.sampled_from([OffPolicy(), LynxPolicy(alpha=0.7), LynxPolicy(alpha=3.0), LynxPolicy(alpha=10.0, tie_break="index")]))
    r = policy.select(logits, k, GROUPED, True, valid, grouping=g)
    rows = logits.shape[0] if valid is None else valid
    assert (r.weights[:rows] > 0).all()
    assert policy.allowed(selection_scores(logits, k, g), k, valid)[r.ids[:rows]].all()


@FAST
@given(problem=grouped_problems(min_tokens=1), normalize=st.booleans(), alpha=st.sampled_from([0.7, 3.0, 30.0]),
       beta=st.sampled_from([None, 0, 1, 2]))
def test_lynx_with_logit_tie_break_keeps_a_lone_tokens_routing(problem, normalize, alpha, beta):
    logits, k, _, g = problem
    policy = LynxPolicy(alpha=alpha, beta=beta, tie_break="logit")
    for rows, valid in ((logits[:1], None), (logits, 1)):
        got = policy.select(rows, k, GROUPED, normalize, valid, grouping=g)
        expected = route(rows, k, GROUPED, normalize, valid, grouping=g)
        np.testing.assert_array_equal(got.ids[0], expected.ids[0])
        np.testing.assert_array_equal(got.weights[0], expected.weights[0])
        np.testing.assert_array_equal(got.active, expected.active)


@FAST
@given(data=st.data(), problem=grouped_problems(min_tokens=1), seed=st.integers(0, 2**32 - 1))
def test_padded_rows_never_vote(data, problem, seed):
    logits, k, _, g = problem
    tokens, experts = logits.shape
    valid = data.draw(st.integers(0, tokens - 1))
    policy = data.draw(policies(experts, k))
    junk = logits.copy()
    junk[valid:] = np.random.default_rng(seed).standard_normal((tokens - valid, experts)).astype(np.float32) * 5
    a = policy.select(logits, k, GROUPED, True, valid, grouping=g)
    b = policy.select(junk, k, GROUPED, True, valid, grouping=g)
    np.testing.assert_array_equal(a.ids[:valid], b.ids[:valid])
    np.testing.assert_array_equal(a.weights[:valid], b.weights[:valid])
    np.testing.assert_array_equal(a.active, b.active)


def test_groups_that_still_hold_k_allowed_experts_come_first():
    # Groups of 4, one kept, K=2. Allowed: expert 0 (the best choice, group 0) and experts 5, 6
    # (group 1). Group 0 scores higher but holds one allowed expert; group 1 holds two.
    logits = np.float32([[3.0, 2.0, 2.0, 2.0, 0.0, 0.5, 0.4, 0.0]])
    g = GroupedRouting(2, 1)
    r = Fixed([1, 0, 0, 0, 0, 1, 1, 0]).select(logits, 2, GROUPED, True, grouping=g)
    assert r.ids.tolist() == [[5, 6]] and (r.weights > 0).all()
    assert route(logits, 2, GROUPED, True, grouping=g).ids.tolist() == [[0, 1]]


def test_fewer_than_k_allowed_experts_fill_up_with_weight_zero():
    logits = np.float32([[3.0, 2.0, 2.5, 1.0, 0.0, 0.5, 0.4, 0.0]])
    g = GroupedRouting(4, 2, 2.5)
    # One allowed expert: it takes all the (renormalised) weight; the rest is the lowest-index
    # masked experts of the kept groups, weight 0.
    r = Fixed([0, 0, 0, 0, 0, 1, 0, 0]).select(logits, 3, GROUPED, True, grouping=g)
    assert r.ids[0, 0] == 5 and set(r.ids[0, 1:].tolist()) <= set(range(8)) - {5} and len(set(r.ids[0].tolist())) == 3
    np.testing.assert_allclose(r.weights[0], [2.5, 0.0, 0.0], rtol=1e-6)
    assert r.active.tolist() == sorted(r.ids[0].tolist())  # the filler ids are routed (weight 0)
    # Two allowed experts in different groups with topk_groups=1: only one can be routed.
    r = Fixed([1, 0, 0, 0, 0, 0, 0, 1]).select(logits, 2, GROUPED, False, grouping=GroupedRouting(2, 1))
    assert r.ids[0, 0] == 0 and r.weights[0, 1] == 0.0 and r.weights[0, 0] > 0


def test_lynx_reduces_active_experts_on_skewed_batches():
    rng = np.random.default_rng(3)
    g = GroupedRouting(8, 4, 2.5, tuple(rng.standard_normal(64) * 0.05))
    off, lynx = [], []
    policy = make_policy("lynx", num_experts=64, top_k=8)
    for _ in range(10):
        logits = (rng.standard_normal(64)[None, :] * 2.0 + 0.5 * rng.standard_normal((16, 64))).astype(np.float32)
        off.append(route(logits, 8, GROUPED, grouping=g).active.size)
        lynx.append(policy.select(logits, 8, GROUPED, grouping=g).active.size)
    assert sum(lynx) < sum(off)


def test_selection_stats_take_the_grouping():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((16, 8)).astype(np.float32)
    g = GroupedRouting(4, 2, 2.5)
    chosen = LynxPolicy(alpha=3.0, beta=1).select(logits, 2, GROUPED, grouping=g)
    stats = selection_stats(Router(2, GROUPED, grouping=g), logits, chosen.masked_logits)
    assert stats.active_model == route(logits, 2, GROUPED, grouping=g).active.size
    assert stats.active_policy == chosen.active.size and 0 < stats.agreement <= 1


def test_a_blocks_router_is_built_from_its_spec():
    """MoESpec.routing carries the router's four arguments: routing through it is the function
    called with them."""
    spec = grouped_spec(False, True)
    assert spec.routing == Router(spec.top_k, GROUPED, False, spec.grouping)
    logits = np.random.default_rng(1).standard_normal((6, spec.num_experts)).astype(np.float32)
    policy = LynxPolicy(alpha=3.0, beta=1)
    by_router, by_args = spec.routing.select(policy, logits, 4), policy.select(logits, spec.top_k, GROUPED, False, 4, grouping=spec.grouping)
    assert np.array_equal(by_router.ids, by_args.ids) and np.array_equal(by_router.weights, by_args.weights)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: route(np.zeros((2, 8), np.float32), 2, GROUPED), "needs grouping"),
        (lambda: route(np.zeros((2, 8), np.float32), 2, grouping=GroupedRouting(2, 1)), "only to the sigmoid_grouped"),
        (lambda: OffPolicy().select(np.zeros((2, 8), np.float32), 2, GROUPED), "needs grouping"),
        (lambda: route(np.zeros((2, 8), np.float32), 2, GROUPED, grouping=GroupedRouting(3, 1)), "does not divide"),
        (lambda: route(np.zeros((2, 8), np.float32), 1, GROUPED, grouping=GroupedRouting(8, 1)), ">= 2 experts"),
        (lambda: route(np.zeros((2, 8), np.float32), 3, GROUPED, grouping=GroupedRouting(4, 1)), "fewer than top_k=3"),
        (lambda: route(np.zeros((2, 8), np.float32), 2, GROUPED, grouping=GroupedRouting(2, 1, 1.0, (0.0,) * 4)), "4 values for 8"),
        (lambda: route(np.float32([[0, -np.inf, 0, -np.inf]]), 2, GROUPED, grouping=GroupedRouting(2, 1)), "in its 1 kept groups"),
        (lambda: GroupedRouting(2, 3), "topk_groups"),
        (lambda: GroupedRouting(0, 1), "num_groups"),
        (lambda: GroupedRouting(2, 1, 0.0), "routed_scaling"),
        (lambda: GroupedRouting(2, 1, "2"), "routed_scaling"),
        (lambda: GroupedRouting(2, 1, 1.0, (np.nan, 0.0)), "finite"),
        (lambda: GroupedRouting(True, 1), "num_groups"),
    ],
)
def test_invalid_grouping_raises_routing_error(call, match):
    with pytest.raises(RoutingError, match=match) as info:
        call()
    assert "\n" not in str(info.value)


# --- the LynxMoE contract -----------------------------------------------------------------------


def grouped_spec(normalize: bool = True, bias: bool = True, e: int = 8, k: int = 2, groups: int = 4, keep: int = 2) -> MoESpec:
    rng = np.random.default_rng(e + k)
    return MoESpec(
        num_experts=e, top_k=k, hidden_size=16, expert_size=24, activation="swiglu", router=GROUPED, normalize=normalize,
        num_groups=groups, topk_groups=keep, routed_scaling=2.5,
        # As the matcher writes spec fields: float32 values as their shortest decimals.
        score_bias=tuple(shortest_float(x) for x in (rng.standard_normal(e) * 0.3).astype(np.float32)) if bias else None,
    )


def node_of(attributes: dict) -> ir.Node:
    return ir.Node(lynx_op.DOMAIN, lynx_op.OP_TYPE, [], attributes=ir.convenience.convert_attributes(attributes))


@pytest.mark.parametrize("bias", [True, False])
def test_attributes_round_trip(bias):
    spec = grouped_spec(bias=bias)
    attributes = lynx_op.to_attributes(spec, LynxPolicy(alpha=3.0, beta=1))
    assert attributes["router"] == "sigmoid_grouped" and attributes["num_groups"] == 4 and attributes["topk_groups"] == 2
    assert attributes["routed_scaling"] == 2.5 and ("score_bias" in attributes) == bias
    parsed = lynx_op.from_node(node_of(attributes))
    assert parsed.spec == spec and parsed.spec.grouping == spec.grouping


def test_softmax_routers_write_no_grouping_attributes():
    spec = MoESpec(num_experts=8, top_k=2, hidden_size=16, expert_size=24, activation="swiglu", router=RouterForm.SOFTMAX_TOPK,
                   normalize=True)
    attributes = lynx_op.to_attributes(spec, OffPolicy())
    assert not {"num_groups", "topk_groups", "routed_scaling", "score_bias"} & set(attributes)
    assert lynx_op.from_node(node_of(attributes)).spec == spec and spec.grouping is None


def test_cuda_plugin_refuses_the_router_in_one_line():
    attributes = lynx_op.to_attributes(grouped_spec(), OffPolicy())
    with pytest.raises(ValueError, match="attribute 'router' is 'sigmoid_grouped'") as info:
        lynx_moe_lib.params_from_attributes(attributes)
    assert "\n" not in str(info.value)


# --- the ONNX Runtime lowering against the oracle -------------------------------------------


def lowering_problem(seed: int, tokens: int, spec: MoESpec):
    rng = np.random.default_rng(seed)
    e, h, i = spec.num_experts, spec.hidden_size, spec.expert_size
    fc1 = (rng.standard_normal((e, 2 * i, h)) * 0.3).astype(np.float32)
    fc2 = (rng.standard_normal((e, h, i)) * 0.3).astype(np.float32)
    hidden = rng.standard_normal((tokens, h)).astype(np.float32)
    logits = (rng.standard_normal(e)[None, :] * 1.5 + rng.standard_normal((tokens, e))).astype(np.float32)
    return fc1, fc2, hidden, logits


POLICIES = [OffPolicy(), LynxPolicy(alpha=3.0, beta=1), LynxPolicy(alpha=10.0), LynxPolicy(alpha=3.0, tie_break="index"), BudgetPolicy(budget=3)]


@pytest.mark.parametrize("experts", ["fused", "per-expert"])
@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: f"{p.name}-{p.params()}")
@pytest.mark.parametrize("tokens", [1, 8, 33])
@pytest.mark.parametrize("normalize,bias", [(True, True), (False, True), (True, False)])
def test_lowering_matches_oracle(experts, policy, tokens, normalize, bias):
    spec = grouped_spec(normalize, bias)
    fc1, fc2, hidden, logits = lowering_problem(tokens, tokens, spec)
    out, routed = _run_lowered(_lynx_model(spec, policy, fc1, fc2, phase=False, valid=False), {"hidden": hidden, "logits": logits}, experts)
    expected = policy.select(logits, spec.top_k, GROUPED, normalize, grouping=spec.grouping)
    np.testing.assert_array_equal(np.isfinite(routed), np.isfinite(expected.masked_logits))
    np.testing.assert_allclose(out, _reference_output(spec, policy, hidden, logits, fc1, fc2), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("experts", ["fused", "per-expert"])
@pytest.mark.parametrize("shape", [(64, 8, 8, 4), (16, 4, 4, 1), (8, 3, 1, 1)], ids=lambda s: "E{}-K{}-G{}-TG{}".format(*s))
def test_lowering_matches_oracle_at_other_shapes(experts, shape):
    e, k, groups, keep = shape
    spec = grouped_spec(True, True, e=e, k=k, groups=groups, keep=keep)
    fc1, fc2, hidden, logits = lowering_problem(e, 20, spec)
    for policy in (OffPolicy(), make_policy("lynx", num_experts=e, top_k=k)):
        out, _ = _run_lowered(_lynx_model(spec, policy, fc1, fc2, phase=False, valid=False), {"hidden": hidden, "logits": logits}, experts)
        np.testing.assert_allclose(out, _reference_output(spec, policy, hidden, logits, fc1, fc2), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("experts", ["fused", "per-expert"])
def test_lowering_fills_up_rows_like_the_oracle(experts):
    """Budget 2 of 8 with one kept group of 4: half the tokens favour expert 0, half expert 4 (one
    per group), which win the vote, so every token's kept group holds one allowed expert and a
    weight-0 filler, in the lowering as in the oracle (the output only counts weights)."""
    spec = grouped_spec(False, False, groups=2, keep=1)
    fc1, fc2, hidden, _ = lowering_problem(5, 16, spec)
    logits = (np.random.default_rng(5).standard_normal((16, 8)) * 0.3).astype(np.float32)
    logits[:8, 0] += 3.0
    logits[8:, 4] += 3.0
    policy = BudgetPolicy(budget=2)
    expected = policy.select(logits, 2, GROUPED, False, grouping=spec.grouping)
    assert (expected.weights[:, 1] == 0).all() and (expected.weights[:, 0] > 0).all()  # the case this test is about
    out, _ = _run_lowered(_lynx_model(spec, policy, fc1, fc2, phase=False, valid=False), {"hidden": hidden, "logits": logits}, experts)
    np.testing.assert_allclose(out, _reference_output(spec, policy, hidden, logits, fc1, fc2), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("experts", ["fused", "per-expert"])
@pytest.mark.parametrize("seq_len,num_valid", [(1, 5), (1, 12), (4, 5)])
def test_lowering_with_phase_and_padding(experts, seq_len, num_valid):
    spec = grouped_spec()
    fc1, fc2, hidden, logits = lowering_problem(num_valid, 12, spec)
    policy = LynxPolicy(alpha=3.0, beta=1)
    feeds = {"hidden": hidden, "logits": logits, "seq_len": np.array(seq_len, np.int64), "num_valid": np.array(num_valid, np.int64)}
    model = _lynx_model(spec, policy, fc1, fc2, phase=True, valid=True)
    out, routed = _run_lowered(model, feeds, experts)
    chosen = policy if seq_len == 1 else OffPolicy()
    expected = chosen.select(logits, 2, GROUPED, True, valid=num_valid, grouping=spec.grouping)
    np.testing.assert_array_equal(np.isfinite(routed), np.isfinite(expected.masked_logits))
    np.testing.assert_allclose(out, _reference_output(spec, policy, hidden, logits, fc1, fc2, seq_len=seq_len, num_valid=num_valid),
                               atol=1e-4, rtol=1e-4)


# --- detection of the router's spellings ----------------------------------------------------


def router_graph(bias: bool, normalize: bool, eps: bool, scaling: float | None, negated: bool, e=8, groups=4, keep=2, k=2) -> onnx.ModelProto:
    """DeepSeek-V3's router alone, as torch's dynamo exporter spells it (`negated`: masked_fill
    with the negated group mask; else Where(mask, choice, -inf)), outputs (ids, weights)."""
    h = onnx.helper
    size = e // groups
    rng = np.random.default_rng(0)
    c = lambda name, value, dtype=np.float32: onnx.numpy_helper.from_array(np.asarray(value, dtype=dtype), name)
    inits = [c("bias", rng.standard_normal(e) * 0.3), c("zero", 0.0), c("ninf", -np.inf), c("shape3", [-1, groups, size], np.int64),
             c("two", [2], np.int64), c("keep", [keep], np.int64), c("k", [k], np.int64), c("last", [-1], np.int64),
             c("rep", [1, 1, size], np.int64), c("shape2", [-1, e], np.int64), c("eps", 1e-20), c("scale", scaling or 1.0)]
    nodes = [h.make_node("Sigmoid", ["logits"], ["scores"])]
    choice = "scores"
    if bias:
        nodes.append(h.make_node("Add", ["scores", "bias"], ["choice"]))
        choice = "choice"
    nodes += [
        h.make_node("Reshape", [choice, "shape3"], ["per_group"]),
        h.make_node("TopK", ["per_group", "two"], ["best2", "best2_ids"], axis=-1),
        h.make_node("ReduceSum", ["best2", "last"], ["group_score"], keepdims=0),
        h.make_node("TopK", ["group_score", "keep"], ["unused", "group_ids"], axis=-1, sorted=0),
        h.make_node("Shape", ["group_score"], ["gs_shape"]),
        h.make_node("Expand", ["zero", "gs_shape"], ["zeros"]),
        h.make_node("Shape", ["group_ids"], ["gi_shape"]),
        h.make_node("ConstantOfShape", ["gi_shape"], ["ones"], value=h.make_tensor("one", onnx.TensorProto.FLOAT, [1], [1.0])),
        h.make_node("ScatterElements", ["zeros", "group_ids", "ones"], ["group_mask"], axis=1),
        h.make_node("Unsqueeze", ["group_mask", "last"], ["gm3"]),
        h.make_node("Expand", ["gm3", "rep"], ["gm_expanded"]),
        h.make_node("Reshape", ["gm_expanded", "shape2"], ["expert_mask"]),
        h.make_node("Cast", ["expert_mask"], ["kept"], to=onnx.TensorProto.BOOL),
    ]
    if negated:
        nodes += [h.make_node("Not", ["kept"], ["dropped"]), h.make_node("Where", ["dropped", "ninf", choice], ["masked"])]
    else:
        nodes.append(h.make_node("Where", ["kept", choice, "ninf"], ["masked"]))
    nodes += [h.make_node("TopK", ["masked", "k"], ["values", "ids"], axis=-1, sorted=0),
              h.make_node("GatherElements", ["scores", "ids"], ["w0"], axis=1)]
    w = "w0"
    if normalize:
        nodes.append(h.make_node("ReduceSum", [w, "last"], ["total"], keepdims=1))
        if eps:
            nodes.append(h.make_node("Add", ["total", "eps"], ["total_eps"]))
        nodes.append(h.make_node("Div", [w, "total_eps" if eps else "total"], ["w1"]))
        w = "w1"
    if scaling is not None:
        nodes.append(h.make_node("Mul", [w, "scale"], ["w2"]))
        w = "w2"
    graph = h.make_graph(nodes, "router", [h.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["T", e])],
                         [h.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["T", k]),
                          h.make_tensor_value_info(w, onnx.TensorProto.FLOAT, ["T", k])], inits)
    return onnx.shape_inference.infer_shapes(h.make_model(graph, opset_imports=[h.make_opsetid("", 18)]))


@pytest.mark.parametrize(
    "bias,normalize,eps,scaling,negated",
    [(True, True, False, 2.5, True), (True, True, True, 2.5, False), (False, False, False, None, True), (True, False, False, 16.0, False)],
)
def test_router_spellings_are_matched_and_agree_with_the_oracle(bias, normalize, eps, scaling, negated):
    import onnxruntime as ort

    proto = router_graph(bias, normalize, eps, scaling, negated)
    model = ir.from_proto(proto)
    topk = next(n for n in model.graph if n.op_type == "TopK" and n.inputs[0].name == "masked")
    router = match_router(topk)
    assert (router.logits.name, router.weights.name, router.form, router.normalize, router.top_k) == (
        "logits", model.graph.outputs[1].name, GROUPED, normalize, 2)
    bias_values = onnx.numpy_helper.to_array(next(i for i in proto.graph.initializer if i.name == "bias"))
    g = router.grouping
    assert g == GroupedRouting(4, 2, scaling or 1.0, tuple(shortest_float(x) for x in bias_values) if bias else None)
    # The spec's routing reproduces the graph's on ONNX Runtime.
    logits = np.random.default_rng(1).standard_normal((50, 8)).astype(np.float32)
    ids, weights = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"logits": logits})
    r = route(logits, 2, GROUPED, normalize, grouping=g)
    for t in range(50):
        assert set(ids[t].tolist()) == set(r.ids[t].tolist())
        by_id = dict(zip(ids[t].tolist(), weights[t].tolist()))
        np.testing.assert_allclose(r.weights[t], [by_id[e] for e in r.ids[t].tolist()], rtol=1e-6)


def test_a_group_mask_that_keeps_the_dropped_groups_is_refused():
    proto = router_graph(True, True, False, 2.5, negated=True)
    where = next(n for n in proto.graph.node if n.op_type == "Where")
    where.input[0] = "kept"  # masked_fill(kept, -inf): routes among the dropped groups
    model = ir.from_proto(proto)
    topk = next(n for n in model.graph if n.op_type == "TopK" and n.inputs[0].name == "masked")
    with pytest.raises(NoMatch, match="keeps the experts outside the best groups"):
        match_router(topk)


# --- tiny DeepSeek-V3 exports ---------------------------------------------------------------


@pytest.fixture(scope="module")
def exported():
    """(config overrides) -> path of a tiny DeepSeek-V3 export, from the tests' artefact cache."""
    pytest.importorskip("transformers")
    from tests.transformers_models import cached_export

    return lambda **overrides: cached_export("deepseek_v3", **overrides)


# No renormalisation, no scaling, one of two groups kept.
PLAIN = {"norm_topk_prob": False, "routed_scaling_factor": 1.0, "n_group": 2, "topk_group": 1}


def test_variant_without_renormalisation_or_scaling_is_detected(exported):
    from lynx_export.compiler.detect import detect
    from lynx_export.compiler.model_io import load_model

    model = load_model(exported(**PLAIN))
    result = detect(model)
    assert [c.supported for c in result.candidates] == [True, True]
    for block in result.blocks:
        spec = block.spec
        assert (spec.router, spec.normalize, spec.num_groups, spec.topk_groups, spec.routed_scaling) == (GROUPED, False, 2, 1, 1.0)
        assert spec.score_bias is not None and len(spec.score_bias) == 8


def test_the_router_match_carries_the_grouping(exported):
    model = ir.load(exported())
    topks = [n for n in model.graph if n.op_type == "TopK" and any(u.op_type == "GatherElements" for u, _ in n.outputs[1].uses())]
    assert len(topks) == 2
    router = match_router(topks[0])
    assert (router.form, router.normalize, router.top_k) == (GROUPED, True, 2)
    assert router.grouping is not None and router.grouping.score_bias is not None and len(router.grouping.score_bias) == 8


# The default model with fused experts is built by tests/test_families.py.
@pytest.mark.parametrize("overrides,experts", [({}, "per-expert"), (PLAIN, "fused"), (PLAIN, "per-expert")],
                         ids=["default-per-expert", "plain-fused", "plain-per-expert"])
def test_build_with_policy_off_reproduces_the_model(exported, tmp_path, overrides, experts):
    out = tmp_path / "engine"
    r = lynx("build", exported(**overrides), "-o", out, "--policy", "off", "--ort-experts", experts, "--batch-sizes", "1,3,8", "--seq-lens", "1,5")
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] and len(report["cases"]) == 6
    for case in report["cases"]:
        assert case["must_match"] and case["max_abs_diff"] <= 1e-4 and case["routing_agreement"] == 1.0, case


@pytest.mark.parametrize("experts", ["fused", "per-expert"])
def test_build_with_policy_lynx(exported, tmp_path, experts):
    out = tmp_path / "engine"
    r = lynx("build", exported(), "-o", out, "--policy", "lynx", "--ort-experts", experts, "--batch-sizes", "1,8,32", "--seq-lens", "1,6")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    report = json.loads((out / "report.json").read_text())
    assert manifest["policy"]["name"] == "lynx" and [b["router"] for b in manifest["blocks"]] == ["sigmoid_grouped"] * 2
    assert report["passed"] and report["phase_gated"]
    prefill = [c for c in report["cases"] if c["phase"] == "prefill"]
    assert prefill and all(c["must_match"] and c["max_abs_diff"] <= 1e-4 for c in prefill)
    decode = [c for c in report["cases"] if c["phase"] == "decode"]
    assert decode and all(c["mean_active_experts_policy"] <= c["mean_active_experts_model"] for c in decode)
    assert sum(c["mean_active_experts_policy"] for c in decode) < sum(c["mean_active_experts_model"] for c in decode)
    lone = next(c for c in decode if c["batch"] == 1)  # a lone token keeps the model's experts
    assert lone["routing_agreement"] == 1.0 and lone["max_abs_diff"] <= 1e-4
    node = next(n for n in onnx.load(out / "model.lynx.onnx").graph.node if n.op_type == "LynxMoE")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert (attrs["router"], attrs["num_groups"], attrs["topk_groups"], attrs["routed_scaling"]) == (b"sigmoid_grouped", 4, 2, 2.5)
    assert len(attrs["score_bias"]) == 8
