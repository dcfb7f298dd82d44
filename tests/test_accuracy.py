"""Accuracy under batched decode: corpus split, policy sweep pieces, router traces, the torch and
compiled-model decodes, and the eval/trace/replay commands."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from lynx_export.evaluation import corpus
from lynx_export.routing import BudgetPolicy, LynxPolicy, OffPolicy, Router, compare_routings, route, selection_stats
from lynx_export.evaluation.sweep import MAX_BUDGETS, batch_groups, budget_sizes, mean_ci, policy_grid, policy_label
from tests.cli_builds import lynx

torch = pytest.importorskip("torch")

from lynx_export.evaluation.demo import DemoConfig, build_demo_model, empty_cache, logits_from_start, moe_blocks  # noqa: E402
from lynx_export.evaluation.decode import compare_predictions, decode_onnx, decode_torch, summarize  # noqa: E402
from lynx_export.evaluation.trace import RouterTrace, TraceError, expert_load, record_trace, replay  # noqa: E402
from lynx_export.evaluation.trained import TRAINED_MODELS, TrainedModelError, load_trained_model, save_weights, trained_model  # noqa: E402

TINY = DemoConfig(hidden_size=32, num_layers=2, num_heads=2, expert_size=32)


@pytest.fixture(scope="module")
def tiny_model():
    return build_demo_model(TINY)


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory, tiny_model) -> pathlib.Path:
    path = tmp_path_factory.mktemp("weights") / "tiny.npz"
    save_weights(tiny_model, {"note": "random weights for tests"}, path)
    return path


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory) -> pathlib.Path:
    d = tmp_path_factory.mktemp("text")
    (d / "a.py").write_text("def add(a, b):\n    return a + b\n" * 40)
    (d / "b.txt").write_text("The quick brown fox jumps over the lazy dog.\n" * 40)
    return d


def _ids(count: int, length: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(count, length)).astype(np.int64)


# -- corpus ------------------------------------------------------------------------------------------


def test_stdlib_split_is_disjoint_and_mostly_train():
    train, held = corpus.stdlib_corpus("train"), corpus.stdlib_corpus("held_out")
    assert not set(train.files) & set(held.files)
    assert 0.03 < len(held.files) / (len(train.files) + len(held.files)) < 0.2
    assert not any(f.startswith("test/") or "/tests/" in f for f in train.files + held.files)
    assert corpus.stdlib_corpus("held_out").files == held.files  # deterministic


def test_sequences_are_evenly_spaced_windows(text_dir):
    text = corpus.text_corpus([text_dir])
    seqs = text.sequences(4, 32)
    assert seqs.shape == (4, 32) and seqs.dtype == np.int64
    stride = (text.data.size // 32) // 4 * 32
    assert np.array_equal(seqs[1], text.data[stride : stride + 32])


@pytest.mark.parametrize("make, message", [
    (lambda d: corpus.text_corpus([d / "missing"]), "no such file or folder"),
    (lambda d: corpus.text_corpus([d]).sequences(10_000, 64), "room for"),
    (lambda d: corpus.stdlib_corpus("validation"), "unknown split"),
])
def test_corpus_errors_are_one_line(text_dir, make, message):
    with pytest.raises(corpus.CorpusError, match=message) as info:
        make(text_dir)
    assert "\n" not in str(info.value)


# -- sweep pieces ------------------------------------------------------------------------------------


def test_policy_grid_puts_off_and_the_default_first_without_duplicates():
    grid = policy_grid(8, 2)
    assert grid[0] == OffPolicy() and grid[1] == LynxPolicy(alpha=3.0, beta=1)
    assert len(set(map(policy_label, grid))) == len(grid)
    assert [p for p in grid if isinstance(p, BudgetPolicy)] == [BudgetPolicy(budget=n) for n in range(3, 8)]
    assert policy_grid(8, 2, grid=False) == grid[:2]


def test_fine_grained_grid_holds_the_authors_beta_and_a_handful_of_budgets():
    grid = policy_grid(64, 8)
    assert grid[1] == LynxPolicy(alpha=1.4, beta=2)  # measured on the fine trained model (docs/ACCURACY.md)
    assert {LynxPolicy(alpha=a, beta=4) for a in (0.35, 0.7, 1.4, 3.0)} <= set(grid)  # the authors' beta for E64/K8
    assert [p.budget for p in grid if isinstance(p, BudgetPolicy)] == [16, 24, 32, 40, 48, 56]
    assert budget_sizes(8, 2) == [3, 4, 5, 6, 7] and budget_sizes(16, 4) == [8, 12]
    wide = budget_sizes(128, 4)
    assert len(wide) == MAX_BUDGETS and wide[0] == 8 and wide[-1] == 124 and all(n % 4 == 0 for n in wide)


def test_batch_groups_partition_in_a_fixed_order():
    groups = batch_groups(10, 4, seed=3)
    assert [len(g) for g in groups] == [4, 4]
    assert len(set(np.concatenate(groups))) == 8
    assert all(np.array_equal(a, b) for a, b in zip(groups, batch_groups(10, 4, seed=3)))
    with pytest.raises(ValueError, match="must be in"):
        batch_groups(3, 4)


def test_mean_ci_matches_the_normal_interval():
    x = np.array([1.0, 2.0, 3.0, 4.0])
    mean, lo, hi = mean_ci(x)
    half = 1.959964 * x.std(ddof=1) / 2
    assert mean == 2.5 and lo == pytest.approx(2.5 - half) and hi == pytest.approx(2.5 + half)


def test_selection_stats_count_kept_choices():
    logits = np.array([[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0]], np.float32)
    masked = logits.copy()
    masked[:, 3] = -np.inf  # token 1 loses expert 3 and takes expert 1 instead
    stats = selection_stats(Router(2), logits, masked)
    assert (stats.active_model, stats.active_policy) == (4, 3)
    assert stats.agreement == pytest.approx((1.0 + 0.5) / 2)
    assert stats.first_choices == 2 and stats.first_kept == 0.5  # token 1's first choice was expert 3
    assert compare_routings(route(logits, 2), route(logits, 2)).agreement == 1.0


# -- traces ------------------------------------------------------------------------------------------


def _run(model):
    return lambda ids: logits_from_start(model, torch.from_numpy(ids))


def test_trace_records_each_routers_logits(tiny_model):
    ids = _ids(5, 7)
    trace = record_trace([b.gate for b in moe_blocks(tiny_model)], _run(tiny_model), ids, 2, batch=2)
    assert len(trace.logits) == 2 and trace.shape == (5, 7, 8)
    # Layer 0's router sees the embedding after attention; recompute it by hand for one sequence.
    captured = {}
    handle = moe_blocks(tiny_model)[0].gate.register_forward_hook(lambda m, i, o: captured.setdefault("x", o))
    _run(tiny_model)(ids[3:4])
    handle.remove()
    np.testing.assert_allclose(trace.logits[0][3], captured["x"].detach().numpy().reshape(7, 8), rtol=1e-5, atol=1e-6)


def test_trace_round_trips_and_rejects_bad_files(tmp_path, tiny_model):
    trace = record_trace([b.gate for b in moe_blocks(tiny_model)], _run(tiny_model), _ids(4, 6), 2, source="unit test")
    trace.save(tmp_path / "t.npz")
    back = RouterTrace.load(tmp_path / "t.npz")
    assert back.top_k == 2 and back.source == "unit test"
    assert all(np.array_equal(a, b) for a, b in zip(trace.logits, back.logits))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    np.savez(tmp_path / "other.npz", meta=np.array(json.dumps({"format": "something/else"})))
    data = (tmp_path / "t.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    for name, message in [("junk", "not a readable router trace"), ("other", "not a router trace"), ("cut", "not a readable"),
                          ("missing", "no such file")]:
        with pytest.raises(TraceError, match=message) as info:
            RouterTrace.load(tmp_path / f"{name}.npz")
        assert "\n" not in str(info.value)


def test_trace_records_a_transformers_mixtral():
    """Any torch MoE works: here the router logits transformers itself reports for Mixtral."""
    transformers = pytest.importorskip("transformers")
    config = transformers.MixtralConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(config).eval()
    with torch.no_grad():  # initial routers give logits within ~0.1 of each other; trained ones spread over units
        for layer in model.model.layers:
            layer.mlp.gate.weight.mul_(30)
    ids = _ids(8, 12)
    trace = record_trace([layer.mlp.gate for layer in model.model.layers], lambda x: model(input_ids=torch.from_numpy(x)), ids, top_k=2, batch=4)
    assert len(trace.logits) == 2 and trace.shape == (8, 12, 8)
    with torch.no_grad():
        reported = model(input_ids=torch.from_numpy(ids[4:]), output_router_logits=True).router_logits
    for layer, logits in enumerate(reported):
        np.testing.assert_allclose(trace.logits[layer][4:], logits.reshape(4, 12, 8).numpy(), rtol=1e-5, atol=1e-6)
    off, lynx = replay(trace, [OffPolicy(), LynxPolicy(alpha=0.7, beta=1)], [8])
    assert lynx["active_experts_policy"][0] < off["active_experts_policy"][0]


def test_replay_matches_the_oracle_step_by_step():
    rng = np.random.default_rng(0)
    trace = RouterTrace((rng.normal(size=(8, 3, 8)).astype(np.float32),), top_k=2)
    rows = replay(trace, [OffPolicy(), LynxPolicy(alpha=0.7, beta=1)], [4])
    off, lynx = rows
    assert off["active_experts_policy"][0] == off["active_experts_model"][0] and off["routing_agreement"][0] == 1.0
    expected = [LynxPolicy(alpha=0.7, beta=1).select(trace.logits[0][g, p], 2).active.size
                for g in batch_groups(8, 4) for p in range(3)]
    assert lynx["active_experts_policy"][0] == pytest.approx(np.mean(expected))
    first = [np.unique(trace.logits[0][g, p].argmax(axis=1)).size for g in batch_groups(8, 4) for p in range(3)]
    assert off["first_choices"][0] == lynx["first_choices"][0] == pytest.approx(np.mean(first))
    assert off["first_choice_kept"][0] == 1.0
    assert lynx["steps"] == 6


# -- decode ------------------------------------------------------------------------------------------


def test_off_decode_is_the_plain_forward(tiny_model):
    ids = _ids(4, 9)
    run = decode_torch(tiny_model, ids, 2, OffPolicy())
    with torch.no_grad():
        logits = logits_from_start(tiny_model, torch.from_numpy(ids[:, :-1]))
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), torch.from_numpy(ids[:, 1:]).reshape(-1), reduction="none")
    np.testing.assert_array_equal(run.predictions, logits.argmax(-1).numpy())
    np.testing.assert_allclose(run.nll, nll.view(4, 8).sum(1).numpy(), rtol=1e-4)
    assert moe_blocks(tiny_model)[0].selector is None and moe_blocks(tiny_model)[0].dispatch == "batched_mm"  # restored


def test_policy_per_position_equals_stepwise_decode_with_cache(tiny_model):
    """One forward with the policy applied per position is the same computation as a decode loop."""
    ids, policy, batch = _ids(4, 6, seed=1), LynxPolicy(alpha=0.35, beta=None), 4
    whole = decode_torch(tiny_model, ids, batch, policy)
    order = batch_groups(4, batch)[0]
    past = empty_cache(tiny_model.config, batch)
    steps = []

    def select(logits):  # [B, 1, E]
        return torch.from_numpy(policy.select(logits[:, 0].numpy(), 2).masked_logits[:, None])

    for block in moe_blocks(tiny_model):
        block.selector = select
    try:
        with torch.no_grad():
            for pos in range(5):
                logits, *past = tiny_model(torch.from_numpy(ids[order, pos : pos + 1]), *past)
                steps.append(logits[:, 0].argmax(-1).numpy())
    finally:
        for block in moe_blocks(tiny_model):
            block.selector = None
    np.testing.assert_array_equal(whole.predictions[order], np.stack(steps, axis=1))
    assert np.mean(whole.active_policy) < np.mean(whole.active_model)


def test_lynx_at_batch_one_keeps_the_models_routing(tiny_model):
    ids = _ids(3, 8)
    off, lynx = decode_torch(tiny_model, ids, 1, OffPolicy()), decode_torch(tiny_model, ids, 1, LynxPolicy(alpha=0.7, beta=1))
    np.testing.assert_array_equal(off.predictions, lynx.predictions)
    assert summarize(lynx, off)["accuracy_change_pp"][0] == 0.0 and lynx.agreement == [1.0] * len(lynx.agreement)


@pytest.mark.slow
def test_compiled_model_decodes_like_torch(tmp_path, tiny_model):
    from lynx_export.compiler.build import BuildOptions, PolicyChoice, build
    from lynx_export.evaluation.demo import export_model
    from lynx_export.compiler.verify import VerifyOptions

    source = export_model(tiny_model, tmp_path / "src" / "model.onnx")
    built = build(source, tmp_path / "out", BuildOptions(PolicyChoice("lynx", alpha=0.35), verify=VerifyOptions(batch_sizes=(2,), seq_lens=(1,))))
    ids, policy = _ids(8, 10, seed=2), LynxPolicy(alpha=0.35, beta=None)
    ort_run = decode_onnx(built.out_dir / "model.ort.onnx", ids, 4, policy, built.blocks, threads=1)
    torch_run = decode_torch(tiny_model, ids, 4, policy)
    match = compare_predictions(torch_run, ort_run)
    assert match["prediction_agreement"] >= 0.97 and match["max_nll_diff_per_token"] < 0.05
    assert np.mean(ort_run.active_policy) == pytest.approx(np.mean(torch_run.active_policy), abs=0.2)
    assert np.mean(ort_run.active_policy) < np.mean(ort_run.active_model)


# -- the commands ------------------------------------------------------------------------------------


def test_eval_command_writes_results(tmp_path, tiny_weights, text_dir):
    r = lynx("eval", "--weights", tiny_weights, "--data", text_dir, "--sequences", 8, "--seq-len", 12, "--batch-sizes", "1,4",
            "--no-grid", "--no-onnx", "--threads", 1, "--out", tmp_path / "acc")
    assert r.returncode == 0, r.stderr
    results = json.loads((tmp_path / "acc" / "results.json").read_text())
    assert [(row["batch"], row["policy"]) for row in results["results"]] == [(1, "off"), (1, "lynx a=3 b=1"), (4, "off"), (4, "lynx a=3 b=1")]
    assert all(row["tokens"] == 8 * 11 for row in results["results"])
    assert (tmp_path / "acc" / "pareto.png").stat().st_size > 0 and "| batch | policy |" in r.stdout


@pytest.mark.slow
def test_eval_decodes_quantized_experts_through_onnx_runtime(tmp_path, tiny_weights, text_dir):
    r = lynx("eval", "--weights", tiny_weights, "--data", text_dir, "--sequences", 4, "--seq-len", 8, "--batch-sizes", "1,4",
            "--no-grid", "--quantize", "int8,int4", "--threads", 1, "--out", tmp_path / "acc")
    assert r.returncode == 0, r.stderr
    results = json.loads((tmp_path / "acc" / "results.json").read_text())
    rows = [(row["precision"], row["policy"], row["batch"]) for row in results["onnx_check"]]
    assert rows == [("fp32", "lynx a=3 b=1", 1), ("fp32", "lynx a=3 b=1", 4)] + [
        (p, policy, b) for p in ("int8", "int4") for policy in ("off", "lynx a=3 b=1") for b in (1, 4)]
    for row in results["onnx_check"]:
        assert row["engine"] == "onnxruntime" and row["tokens"] == 4 * 7 and 0 <= row["prediction_agreement"] <= 1
        assert (tmp_path / "acc" / ("compiled" if row["precision"] == "fp32" else f"compiled-{row['precision']}-{row['params']['name']}")).is_dir()
    assert "| batch | experts | policy | accuracy % ORT (95% CI) |" in r.stdout
    csv = (tmp_path / "acc" / "results.csv").read_text().splitlines()
    assert csv[0].startswith("engine,experts,batch,policy") and sum(",int4," in line for line in csv) == 4


def test_eval_refuses_an_unknown_precision_as_a_usage_error(tmp_path, tiny_weights, text_dir):
    r = lynx("eval", "--weights", tiny_weights, "--data", text_dir, "--quantize", "int3", "--out", tmp_path / "acc")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "Invalid value for '--quantize': --quantize: unknown 'int3'; choose from int4, int8" in r.stderr
    assert not (tmp_path / "acc").exists()


def test_trace_and_replay_commands(tmp_path, tiny_weights, text_dir):
    r = lynx("trace", "--weights", tiny_weights, "--data", text_dir, "--sequences", 8, "--seq-len", 10, "-o", tmp_path / "t.npz")
    assert r.returncode == 0, r.stderr
    assert "2 layers x 8 sequences x 10 positions x 8 experts" in r.stdout
    assert "expert load of the model's own top-K picks" in r.stdout and "balance" in r.stdout
    r = lynx("replay", tmp_path / "t.npz", "--batch-sizes", "1,8", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [(x["batch"], x["policy"]) for x in rows] == [(1, "off"), (1, "lynx a=3 b=1"), (8, "off"), (8, "lynx a=3 b=1")]
    assert rows[3]["active_experts_policy"][0] <= rows[2]["active_experts_policy"][0]


@pytest.mark.parametrize("args, message", [
    (("replay", "{junk}"), "not a readable router trace"),
    (("replay", "{missing}"), "no such file"),
    (("trace", "--weights", "{weights}", "--data", "{missing}", "-o", "{out}"), "no such file or folder"),
    (("trace", "--weights", "{missing}", "-o", "{out}"), "missing; train the model"),
])
def test_command_errors_are_one_line(tmp_path, tiny_weights, text_dir, args, message):
    (tmp_path / "junk.npz").write_bytes(b"junk")
    paths = {"junk": tmp_path / "junk.npz", "missing": tmp_path / "missing.npz", "weights": tiny_weights, "text": text_dir, "out": tmp_path / "o.npz"}
    r = lynx(*(a.format(**paths) for a in args))
    assert r.returncode == 1
    assert len(r.errors) == 1 and message in r.errors[0], r.stderr
    assert not (tmp_path / "o.npz").exists()


# -- the shipped model -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TRAINED_MODELS))
def test_shipped_model_matches_its_recorded_heldout_accuracy(name):
    from lynx_export.evaluation.train import heldout_metrics
    from lynx_export.evaluation.trained import read_metadata

    import platform

    shipped = trained_model(name)
    meta = read_metadata(shipped.weights)
    assert meta["model"] == shipped.config.to_dict()
    if meta["corpus"]["python"] != platform.python_version():
        pytest.skip(f"held-out text is this Python's standard library ({platform.python_version()}); the record was made on {meta['corpus']['python']}")
    model = load_trained_model(shipped.weights)
    for block in moe_blocks(model):
        block.dispatch = "grouped"
    recorded = meta["history"][-1]
    seqs = corpus.stdlib_corpus("held_out").sequences(meta["train"]["eval_sequences"], meta["train"]["seq_len"])
    measured = heldout_metrics(model, seqs)
    # The shipped weights are the float16 rounding of the trained float32 ones.
    assert measured["accuracy"] == pytest.approx(recorded["accuracy"], abs=0.01)
    assert measured["bits_per_byte"] == pytest.approx(recorded["bits_per_byte"], abs=0.02)


@pytest.mark.slow
@pytest.mark.parametrize("flag, shape", [(("--trained",), (8, 2)), (("--trained", "coarse"), (8, 2)), (("--trained", "fine"), (64, 8))])
def test_trained_model_exports_with_its_decode_path(lynx_once, flag, shape):
    model = lynx_once("demo-model", "{out}/model.onnx", *flag).out / "model.onnx"  # shared with the builds below
    r = lynx("inspect", model, "--json")
    blocks = json.loads(r.stdout)
    assert len(blocks) == 4 and all(b["supported"] and (b["num_experts"], b["top_k"], b["hidden_size"]) == (*shape, 128) for b in blocks)


@pytest.mark.slow
def test_fine_trained_model_builds_and_verifies_with_its_own_routing(lynx_once, tmp_path):
    source = lynx_once("demo-model", "{out}/model.onnx", "--trained", "fine").out / "model.onnx"
    r = lynx("build", source, "-o", tmp_path / "out", "--policy", "off", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["passed"] and all(c["max_abs_diff"] <= report["tolerance"] for c in report["cases"])


def test_trained_model_choice_errors():
    with pytest.raises(TrainedModelError, match="no shipped trained model 'huge' \\(choose from coarse, fine\\)"):
        trained_model("huge")
    r = lynx("demo-model", "m.onnx", "--trained", "huge")
    assert r.returncode == 2 and "'huge' is not one of 'coarse', 'fine'" in r.stderr
    r = lynx("eval", "--trained", "fine", "--weights", "w.npz")
    assert r.returncode == 2 and len(r.errors) == 1 and "--trained and --weights are exclusive" in r.stderr, r.stderr


def test_grouped_dispatch_matches_the_expert_loop(tiny_model):
    """The grouped matmul path that training and evaluation run is the per-expert loop's
    arithmetic: identical outputs (same products, same per-token accumulation order), gradients
    equal to rounding, also where experts get no rows."""
    model = build_demo_model(DemoConfig(hidden_size=32, num_layers=2, num_heads=2, num_experts=64, top_k=8, expert_size=16))
    ids = torch.from_numpy(_ids(1, 3))  # 3 tokens x 8 picks over 64 experts: most experts empty
    results = {}
    for dispatch in ("loop", "grouped"):
        for block in moe_blocks(model):
            block.dispatch = dispatch
        model.zero_grad()
        out = logits_from_start(model, ids)
        out.square().sum().backward()
        results[dispatch] = (out.detach().numpy(), model.layers[0].mlp.gate_up_proj.grad.numpy().copy(), model.layers[0].mlp.gate.weight.grad.numpy().copy())
    np.testing.assert_array_equal(results["loop"][0], results["grouped"][0])
    for a, b in zip(results["loop"][1:], results["grouped"][1:]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_expert_load_reports_the_spread_of_picks():
    logits = np.full((1, 4, 4), -5.0, np.float32)
    logits[0, :, 0] = 3.0  # expert 0 is every token's first pick; experts 1 and 2 second picks
    logits[0, :2, 1] = 1.0
    logits[0, 2:, 2] = 1.0
    row = expert_load(RouterTrace((logits,), top_k=2))[0]
    assert row["max_over_even"] == pytest.approx(2.0)  # half of the picks, against an even quarter
    assert row["min_over_even"] == 0 and row["unused_experts"] == 1
    even = expert_load(RouterTrace((np.zeros((2, 4, 4), np.float32) + np.eye(4, dtype=np.float32)[None],), top_k=1))[0]
    assert even["max_over_even"] == pytest.approx(1.0) and even["balance"] == pytest.approx(1.0)


def test_choose_default_takes_the_largest_cut_within_the_accuracy_bar():
    from lynx_export.evaluation.accuracy import choose_default

    def row(batch, policy, change, cut):
        return {"batch": batch, "policy": policy, "params": {"name": policy.split()[0]}, "accuracy_change_pp": (change, change - 0.1, change + 0.1),
                "active_reduction_pct": cut}

    rows = [
        row(16, "off", 0.0, 0.0), row(64, "off", 0.0, 0.0),
        row(4, "lynx a=9", -5.0, 90.0), row(16, "lynx a=9", -0.5, 20.0), row(64, "lynx a=9", -0.2, 10.0),  # batch 4 is not judged
        row(16, "lynx a=1", -0.9, 40.0), row(64, "lynx a=1", -1.5, 30.0),  # over the bar at 64
        row(16, "budget n=6", -0.1, 5.0), row(64, "budget n=6", -0.1, 5.0),
    ]
    chosen = choose_default(rows)
    assert chosen["policy"] == "lynx a=9" and chosen["mean_active_reduction_pct"] == 15.0
    assert choose_default([r for r in rows if r["policy"] in ("off", "lynx a=1")]) is None


def test_summarize_pairs_the_accuracy_change_by_sequence(tiny_model):
    ids = _ids(8, 6)
    off = decode_torch(tiny_model, ids, 4, OffPolicy())
    lynx = decode_torch(tiny_model, ids, 4, LynxPolicy(alpha=0.35))
    row = summarize(lynx, off)
    per_seq = 100 * (lynx.correct - off.correct) / 5
    assert row["accuracy_change_pp"][0] == pytest.approx(per_seq.mean())
    assert row["accuracy"][0] == pytest.approx(lynx.correct.sum() / 40)
    assert row["perplexity"][0] == pytest.approx(np.exp(np.mean(lynx.nll / 5)))
    assert row["active_reduction_pct"] == pytest.approx(100 * (1 - np.mean(lynx.active_policy) / np.mean(off.active_policy)))
