"""The engine benchmark in quick mode: every variant and batch size measured, outputs on disk."""

from __future__ import annotations

import csv
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from lynx_export.bench.benchmark import QUICK_MODEL, BenchConfig, planned_runs, run_bench, write_outputs
from lynx_export.progress import Recorder

pytest.importorskip("torch")
pytest.importorskip("matplotlib")

FP32 = 4


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    config = BenchConfig(model=QUICK_MODEL, batch_sizes=(1, 4), context_len=8, warmup=1, repeats=2, threads=1, budget=3, quick=True,
                         ort_experts=("fused", "per-expert"))
    recorder = Recorder()
    work = tmp_path_factory.mktemp("bench")
    results = run_bench(config, work, progress=recorder)
    timed = [line for line in recorder.lines if line.startswith("timing ")]
    assert len(timed) == planned_runs(config) == 2 * 7 * 3  # batches x variants x (warmup + repeats)
    assert timed[0] == f"timing 1/{len(timed)}: batch 1, dense" and timed[-1].startswith(f"timing {len(timed)}/{len(timed)}: batch 4, ")
    return config, work, results


@pytest.mark.slow
def test_every_variant_and_batch_is_measured(quick):
    config, _, results = quick
    rows = {(r["variant"], r["batch"]): r for r in results["results"]}
    moe = [f"{r}:{i}" for i in ("fused", "per-expert") for r in ("moe", "moe+lynx", "moe+budget")]
    assert set(rows) == {(v, b) for v in ["dense", *moe] for b in (1, 4)}
    for (variant, _), r in rows.items():
        assert r["repeats"] == 2
        assert r["tokens_per_s"] > 0 and r["ms_per_step_min"] <= r["ms_per_step"] <= r["ms_per_step_max"]
        assert r["bound_kind"] in ("memory", "compute") and r["bound_ms"] > 0
        assert abs(r["measured_over_bound"] - r["ms_per_step"] / r["bound_ms"]) < 1e-9
        if variant == "dense":
            assert r["active_experts_per_layer"] == 8
        else:
            assert 1 <= r["active_experts_per_layer"] <= r["active_experts_model_routing"] <= 8
    # One token keeps its own routing; budget never exceeds its budget.
    for impl in ("fused", "per-expert"):
        assert rows[(f"moe+lynx:{impl}", 1)]["active_experts_per_layer"] == 2
        assert rows[(f"moe+budget:{impl}", 4)]["active_experts_per_layer"] <= 3
        # Both implementations route identically: same active experts for the same inputs.
        for b in (1, 4):
            assert rows[(f"moe+lynx:{impl}", b)]["active_experts_per_layer"] == rows[("moe+lynx:fused", b)]["active_experts_per_layer"]
    assert results["quick"] and "not measurements" in results["note"]
    assert results["machine"]["read_bandwidth_gb_s"] > 0 and results["machine"]["peak_gflop_s"] > 0
    # The profiled step splits every variant's time: the MoE layers' nodes (the dense twin's FFNs) and the rest.
    for r in rows.values():
        assert 0 < r["moe_ms_per_step"] < r["profiled_ms_per_step"]
        assert r["other_ms_per_step"] == pytest.approx(r["profiled_ms_per_step"] - r["moe_ms_per_step"])
        assert r["moe_bound_ms"] > 0 and r["moe_bound_kind"] in ("memory", "compute")
        assert r["moe_over_bound"] == pytest.approx(r["moe_ms_per_step"] / r["moe_bound_ms"])
    assert results["machine"]["llc"]["total_bytes"] > 0 and results["memory"]["estimate_bytes"] > 0
    assert results["policies"]["moe+lynx:per-expert"] == {"name": "lynx", "alpha": 3.0, "beta": 1, "tie_break": "logit"}


@pytest.mark.slow
@pytest.mark.parametrize("form,timed", [("genai", "KV caches updated in place (GroupQueryAttention"),
                                        ("dynamo", "KV caches returned as new present outputs")])
def test_the_export_form_says_how_the_cache_was_timed(form, timed, tmp_path):
    """A preset is exported in the form asked (onnxruntime-genai's by default), and the results say
    whether its steps updated the cache in place or copied it."""
    config = BenchConfig(model=QUICK_MODEL, batch_sizes=(2,), context_len=8, warmup=1, repeats=1, threads=1, quick=True,
                         ort_experts=("per-expert",), profile=False, form=form)
    results = run_bench(config, tmp_path)
    assert results["form"] == form and timed in results["timed"]
    assert (tmp_path / ("source-genai/genai_config.json" if form == "genai" else "source/model.onnx")).is_file()
    assert {r["variant"] for r in results["results"]} == {"dense", "moe:per-expert", "moe+lynx:per-expert"}


def test_an_unknown_form_is_refused_before_any_work(tmp_path):
    from lynx_export.errors import OptionError

    with pytest.raises(OptionError, match="--form: choose from genai, dynamo"):
        run_bench(BenchConfig(model=QUICK_MODEL, quick=True, form="torch"), tmp_path)
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_bytes_follow_active_experts(quick):
    config, _, results = quick
    m = config.model
    costs = results["step_costs"]
    for variant in config.builds:
        cost = costs[variant]
        assert cost["layers"] == m.num_layers
        assert cost["expert_bytes"] == 3 * m.hidden_size * m.expert_size * FP32
        assert cost["expert_macs_per_token"] == m.top_k * 3 * m.hidden_size * m.expert_size
        assert cost["table_row_bytes"] == m.hidden_size * FP32  # the embedding: one row per token
    for r in results["results"]:
        cost = costs[r["variant"]]
        expected = cost["fixed_bytes"] + r["batch"] * cost["table_row_bytes"] + cost["layers"] * r["active_experts_per_layer"] * cost["expert_bytes"]
        assert r["weight_bytes_per_step"] == pytest.approx(expected)
        moe_bytes = cost["block_bytes"] + cost["layers"] * r["active_experts_per_layer"] * cost["expert_bytes"]
        assert r["moe_weight_bytes_per_step"] == pytest.approx(moe_bytes)
        # The KV cache: keys and values of every layer, [B, heads, context, head_dim] fp32.
        assert r["kv_bytes_per_step"] == 2 * m.num_layers * r["batch"] * config.context_len * m.hidden_size * FP32
    # The dense twin reads every expert's worth of weights every step: as much as the MoE with
    # all experts active, less the routers and selection constants.
    moe, dense = costs["moe:fused"], costs["dense"]
    assert dense["layers"] == 0
    full_moe = moe["fixed_bytes"] + m.num_layers * m.num_experts * moe["expert_bytes"]
    assert dense["fixed_bytes"] == pytest.approx(full_moe, rel=0.01)
    # Its FFNs are the MoE layers' own nodes: their weights (and a Split's sizes) are the block's bytes.
    assert dense["block_bytes"] == pytest.approx(m.num_layers * m.num_experts * moe["expert_bytes"], rel=1e-4)


@pytest.mark.slow
def test_outputs_on_disk(quick, tmp_path):
    _, _, results = quick
    files = write_outputs(results, tmp_path)
    assert sorted(f.name for f in files) == ["active_experts.png", "results.csv", "results.json", "summary.md", "tokens_per_s.png"]
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(results))
    with open(tmp_path / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == len(results["results"])
    for png in ("tokens_per_s.png", "active_experts.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (tmp_path / "summary.md").read_text()
    assert "QUICK MODE" in summary and "| 4 |" in summary
    assert "lynx / moe (per-expert)" in summary and "best lynx / dense" in summary and "ms in the MoE layers' nodes" in summary


@pytest.mark.slow
def test_script_quick_mode(tmp_path):
    script = [sys.executable, str(pathlib.Path(__file__).resolve().parents[1] / "scripts" / "bench_engines.py"), "--quick", "--out", str(tmp_path), "--batch-sizes", "1,2", "--repeats", "1"]
    r = subprocess.run(script, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "QUICK MODE" in r.stdout and "QUICK MODE" in r.stderr
    assert (tmp_path / "results.csv").exists() and (tmp_path / "tokens_per_s.png").exists()


@pytest.mark.slow
def test_trained_model_decodes_heldout_text_with_its_real_cache(tmp_path):
    """--trained: the decode step's KV cache is the prefill of real text, so the compiled model's
    next-token logits equal the torch model's on the whole text."""
    import torch

    from lynx_export.backends.ort import OrtRunner
    from lynx_export.bench.benchmark import _decoder, _text_feeds
    from lynx_export.evaluation.demo import DemoConfig, logits_from_start, moe_blocks
    from lynx_export.evaluation.trained import load_trained_model, read_metadata

    model_config = DemoConfig(**read_metadata()["model"])
    config = BenchConfig(model=model_config, batch_sizes=(1, 8), context_len=16, warmup=0, repeats=1, threads=1,
                         ort_experts=("fused",), trained="coarse")
    results = run_bench(config, tmp_path)
    assert results["inputs"].startswith("held-out standard-library text")
    rows = {(r["variant"], r["batch"]): r for r in results["results"]}
    assert rows[("moe+lynx:fused", 8)]["active_experts_per_layer"] < rows[("moe:fused", 8)]["active_experts_per_layer"]

    decoder, _ = _decoder(tmp_path / "source-genai" / "model.onnx")  # the bench's default form
    assert decoder.in_place_cache and results["form"] == "genai" and "updated in place" in results["timed"]
    feeds = _text_feeds(tmp_path / "moe-fused" / "model.ort.onnx", decoder, (4,), 16, 1)[4]
    with OrtRunner(str(tmp_path / "moe-fused" / "model.ort.onnx"), threads=1) as runner:
        step = runner.infer(feeds)["logits"][:, -1]
    model = load_trained_model()
    for block in moe_blocks(model):
        block.dispatch = "loop"
    ids = torch.from_numpy(np.concatenate([_heldout_prefix(4, 16), feeds["input_ids"]], axis=1))
    with torch.no_grad():
        full = logits_from_start(model, ids)[:, -1].numpy()
    np.testing.assert_allclose(step, full, atol=2e-3)


def _heldout_prefix(rows: int, length: int) -> np.ndarray:
    from lynx_export.evaluation.corpus import stdlib_corpus

    return stdlib_corpus("held_out").sequences(rows, length + 1)[:, :length]
