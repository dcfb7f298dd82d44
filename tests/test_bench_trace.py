"""`bench --routing-trace`: the MoE variants' timed steps route on a router trace's logits, while
their weights stay random."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import external_data_helper

from lynx_export.backends.ort import OrtRunner
from lynx_export.bench import presets
from lynx_export.bench.benchmark import TRACE_NAME, BenchConfig, run_bench
from lynx_export.bench.trace_routing import trace_steps, with_router_inputs
from lynx_export.compiler.build import BuildOptions, PolicyChoice, build
from lynx_export.compiler.decoder import DecoderIO
from lynx_export.compiler.verify import VerifyOptions, probe_copy
from lynx_export.evaluation.trace import RouterTrace
from lynx_export.routing import RouterForm
from tests.test_bench_model import _moe_stack
from tests.test_options import assert_refused, invoke, tree

pytest.importorskip("torch")

FINE = presets.PRESETS["fine"].quick  # E64 K8, 2 layers
SEQUENCES, POSITIONS = 8, 8
BATCHES, REPEATS = (1, 4), 2


def _trace(path: pathlib.Path, experts: int = 64, top_k: int = 8, layers: int = 2, sequences: int = SEQUENCES,
           router: RouterForm = RouterForm.SOFTMAX_TOPK, seed: int = 0) -> pathlib.Path:
    """Random logits with a strong per-expert skew of each layer's own: popular and rare experts."""
    rng = np.random.default_rng(seed)
    logits = tuple((rng.standard_normal((sequences, POSITIONS, experts)) + 3.0 * rng.standard_normal(experts)).astype(np.float32)
                   for _ in range(layers))
    RouterTrace(logits, top_k, router, source="synthetic test trace").save(path)
    return path


def _distinct_top_k(trace: RouterTrace, model_layers: int, batch: int, steps: int) -> float:
    """Mean over steps and layers of the experts in the union of the batch rows' top-K: step r at
    position S/2 + r, model layer l on trace layer l mod L."""
    per_step = []
    for r in range(steps):
        position = POSITIONS // 2 + r % (POSITIONS - POSITIONS // 2)
        for layer in range(model_layers):
            rows = trace.logits[layer % len(trace.logits)][:batch, position]
            per_step.append(len(np.unique(np.argsort(-rows, axis=1)[:, : trace.top_k])))
    return float(np.mean(per_step))


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench-trace")
    path = _trace(folder / "trace.npz")
    config = BenchConfig(model=FINE, preset="fine", quick=True, batch_sizes=BATCHES, repeats=REPEATS, warmup=0, threads=1,
                         ort_experts=("per-expert",), routing_trace=path)
    return config, folder / "bench", run_bench(config, folder / "bench")


@pytest.mark.slow
def test_timed_graphs_route_on_the_trace(traced):
    config, _, results = traced
    trace = RouterTrace.load(config.routing_trace)
    rows = {(r["variant"], r["batch"]): r for r in results["results"]}
    for batch in BATCHES:
        expected = _distinct_top_k(trace, FINE.num_layers, batch, REPEATS)
        # Read back from the timed graphs over the steps timed: the trace's own top-K, no random router.
        assert rows[("moe:per-expert", batch)]["active_experts_per_layer"] == pytest.approx(expected)
        assert rows[("moe+lynx:per-expert", batch)]["active_experts_model_routing"] == pytest.approx(expected)
        assert rows[("moe+lynx:per-expert", batch)]["active_experts_per_layer"] <= expected
        assert rows[("dense", batch)]["active_experts_per_layer"] == FINE.num_experts
    assert rows[("moe:per-expert", 4)]["active_experts_per_layer"] < 4 * FINE.top_k  # the skew shows
    for r in rows.values():  # the profiled step ran the trace-fed graphs too
        assert 0 < r["moe_ms_per_step"] < r["profiled_ms_per_step"]


@pytest.mark.slow
def test_results_say_where_the_routing_came_from(traced):
    config, work, results = traced
    assert results["config"]["routing_trace"] == str(config.routing_trace)
    summary = results["routing_trace"]
    assert summary["source"] == "synthetic test trace" and summary["layers"] == 2 and summary["positions"] == [4, 7]
    assert summary["router_timed"] is False and summary["router_macs_per_token_and_layer_not_timed"] == FINE.hidden_size * FINE.num_experts
    assert "trace layer l mod 2" in results["inputs"] and "router MatMul is not timed" in results["inputs"]
    assert "synthetic router skew" not in results["inputs"]
    json.dumps(results)
    for variant in ("moe-per-expert", "moe+lynx-per-expert"):
        assert (work / variant / f"{TRACE_NAME}.data").exists()
    assert not (work / "dense" / TRACE_NAME).exists()


def test_a_model_source_routes_on_the_trace_in_every_implementation(tmp_path):
    """MODEL: a bare two-layer com.microsoft.MoE stack on [T,H] (E8 K2, router = MatMul + Add),
    T = batch rows; float (fused kernel, per-expert) and int4 experts all route on the trace."""
    path = _trace(tmp_path / "trace.npz", experts=8, top_k=2)
    config = BenchConfig(source=_moe_stack(tmp_path / "stack.onnx"), preset=None, batch_sizes=(1, 8), warmup=1, repeats=REPEATS,
                         threads=1, quick=True, quantize=("int4",), routing_trace=path, profile=False)
    results = run_bench(config, tmp_path / "bench")
    trace = RouterTrace.load(path)
    for r in results["results"]:
        if r["variant"] != "dense" and not r["variant"].startswith("dense:"):
            assert r["active_experts_model_routing"] == pytest.approx(_distinct_top_k(trace, 2, r["batch"], REPEATS)), r["variant"]
    assert results["inputs"].startswith("random inputs derived from") and "router MatMul is not timed" in results["inputs"]


def test_steps_cycle_layers_and_the_second_half_of_positions(tmp_path):
    trace = RouterTrace.load(_trace(tmp_path / "t.npz", layers=2))
    steps = trace_steps(trace, ("a", "b", "c"), batch=3, steps=6)
    assert len(steps) == 6
    for r, step in enumerate(steps):
        position = 4 + r % 4  # 4, 5, 6, 7, 4, 5
        for name, layer in (("a", 0), ("b", 1), ("c", 0)):  # model layer 2 repeats trace layer 0
            np.testing.assert_array_equal(step[name], trace.logits[layer][:3, position])
            assert step[name].dtype == np.float32 and step[name].flags.c_contiguous


@pytest.fixture(scope="module")
def built(traced):
    """The fine quick model compiled with its own routing, per-expert."""
    _, work, _ = traced
    result = build(work / "source-genai" / "model.onnx", work.parent / "built", BuildOptions(
        PolicyChoice("off"), ort_experts="per-expert", verify=VerifyOptions(batch_sizes=(1,), seq_lens=(1,), context_len=4), force=True))
    return result.out_dir / "model.ort.onnx", result.blocks


def _external_copy(path: pathlib.Path, folder: pathlib.Path) -> pathlib.Path:
    """The model as a large build writes it: weights in `model.ort.onnx.data` beside it."""
    folder.mkdir()
    ir.save(ir.load(path), folder / path.name, external_data=f"{path.name}.data")
    return folder / path.name


@pytest.mark.parametrize("layout", ["inline", "external"])
def test_rewritten_model_keeps_the_weights_and_runs(built, tmp_path, layout):
    path, blocks = built
    if layout == "external":
        path = _external_copy(path, tmp_path / "external")
    out = path.with_name(TRACE_NAME)
    names = with_router_inputs(path, blocks, out)
    assert names == tuple(b.router_logits for b in blocks)
    stored = onnx.load(str(out), load_external_data=False)
    outside = [t for t in stored.graph.initializer if external_data_helper.uses_external_data(t)]
    assert outside and {external_data_helper.ExternalDataInfo(t).location for t in outside} == {f"{TRACE_NAME}.data"}
    assert [i.name for i in stored.graph.input][-len(names):] == list(names)

    # Fed the router logits the original computes itself, the rewrite computes what the original does.
    feed = DecoderIO.read(ir.load(path)).step(4, 1, 8, np.random.default_rng(0)).feeds
    probe = probe_copy(path, blocks, tmp_path)
    with OrtRunner(str(probe), threads=1) as runner:
        original = runner.infer(feed)
    with OrtRunner(str(out), threads=1) as runner:
        same = runner.infer({**feed, **{n: original[n] for n in names}})
        traced = runner.infer({**feed, **trace_steps(RouterTrace.load(_trace(tmp_path / "t.npz")), names, 4, 1)[0]})
    np.testing.assert_array_equal(same["logits"], original["logits"])
    assert np.isfinite(traced["logits"]).all() and not np.array_equal(traced["logits"], original["logits"])


TRACE_ERRORS = [
    # (trace arguments, bench arguments, exit code, message)
    ({"experts": 8, "top_k": 2}, [], 1, "the trace routes E=8, K=2; the model has E=64, K=8"),
    ({"top_k": 2}, [], 1, "the trace routes E=64, K=2; the model has E=64, K=8"),
    ({"router": RouterForm.TOPK_SOFTMAX}, [], 1, "the trace's router is topk_softmax; the model routes softmax_topk"),
    ({}, ["--batch-sizes", "1,16"], 1, "the trace holds 8 sequences, fewer than the largest batch size 16"),
    ({}, ["--trained"], 2, "--routing-trace and --trained are exclusive"),
    (None, [], 1, "no such file"),
]


@pytest.mark.parametrize("trace_args, extra, code, message", TRACE_ERRORS, ids=["E", "K", "router", "sequences", "trained", "missing"])
def test_unusable_traces_are_refused_in_one_line(tmp_path, trace_args, extra, code, message):
    path = tmp_path / "trace.npz"
    if trace_args is not None:
        _trace(path, **trace_args)
    preset = [] if "--trained" in extra else ["--quick", "--preset", "fine"]
    before = tree(tmp_path)
    result = invoke("bench", *preset, "--out", tmp_path / "b", "--routing-trace", path, *extra)
    assert_refused(result, code, message, tmp_path, before)
    if trace_args is not None and code == 1:
        assert str(path) in result.stderr
