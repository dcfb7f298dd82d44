"""`lynx-export bench-serve`: the metrics of a genai-perf record, the workloads' shapes, and a quick
run (the three generate models on a real server, each profiled by genai-perf with the
perf_analyzer the project installs)."""

from __future__ import annotations

import json
import pathlib

import pytest

from lynx_export.bench.serving import WORKLOADS, Workload, point_metrics

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_point_metrics_come_from_each_requests_record():
    s = 1_000_000_000  # genai-perf's timestamps are nanoseconds
    export = {"experiments": [{"requests": [
        {"timestamp": 0, "response_timestamps": [s // 10, s // 10 + s // 100, s // 10 + 3 * s // 100]},  # TTFT 100 ms, gaps 10 and 20 ms
        {"timestamp": s // 20, "response_timestamps": [s // 5, s // 5 + s // 50, s // 2]},  # TTFT 150 ms, gaps 20 and 280 ms
        {"timestamp": s // 10, "response_timestamps": []},  # never answered
    ]}]}
    m = point_metrics(export, Workload("w", 8, 0, 3, ""))
    assert m["requests"] == 3 and m["completed"] == 2 and m["output_tokens"] == 6 and m["output_tokens_per_request"] == 3
    assert m["output_tokens_per_s"] == pytest.approx(6 / 0.5)  # from the first request to the last response
    assert m["ttft_ms_p50"] == pytest.approx(125) and m["latency_ms_p50"] == pytest.approx((130 + 450) / 2)
    gaps = [10, 20, 20, 280]  # every gap between a request's responses, pooled
    assert m["itl_ms_p50"] == pytest.approx((gaps[1] + gaps[2]) / 2)  # the median of four: the mean of the middle two
    assert m["itl_ms_p99"] == pytest.approx(gaps[2] + (3 * 0.99 - 2) * (gaps[3] - gaps[2]))  # linear between the 3rd and 4th


def test_the_workloads_follow_their_stated_derivation():
    # Qwen2-VL: one token per 28x28 px, capped at 1280; a BPE token is ~4 characters.
    assert WORKLOADS["docvqa"].input_mean == 1280 + 255 // 4 and WORKLOADS["docvqa"].output_mean == 4
    assert WORKLOADS["chartqa"].input_mean == (800 * 600) // 784 + 224 // 4 and WORKLOADS["chartqa"].output_mean == 3
    assert WORKLOADS["chat"].input_mean == 256 and WORKLOADS["chat"].output_mean == 256


@pytest.mark.slow
def test_a_quick_serving_run_profiles_each_model_with_genai_perf(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    pytest.importorskip("tritonclient")
    for env, what in ((ROOT / ".venv-serve", "Triton serving"), (ROOT / ".venv-perf", "genai-perf")):
        if not (env / "bin" / "python").exists():
            pytest.skip(f"no {what} environment at {env} (`make test` creates it)")
    from tests.cli_builds import lynx

    monkeypatch.chdir(tmp_path)  # a relative --out: genai-perf runs in a folder of its own
    r = lynx("bench-serve", "--quick", "--concurrency", "2", "--out", "out", "--threads", "1", "--seed", "7", "--serve-env", ROOT / ".venv-serve",
             "--perf-env", ROOT / ".venv-perf")
    assert r.returncode == 0, r.stderr
    tmp_path = tmp_path / "out"
    results = json.loads((tmp_path / "results.json").read_text())
    rows = {row["variant"]: row for row in results["results"]}
    assert set(rows) == {"dense", "moe", "moe+lynx"} and results["quick"] and results["config"]["seed"] == 7
    for row in rows.values():
        assert row["completed"] == row["requests"] == 8
        assert row["output_tokens_per_request"] == 8  # min_length = max_tokens: every answer has the workload's length
        assert row["output_tokens_per_s"] > 0 and row["ttft_ms_p50"] > 0 and row["itl_ms_p99"] >= row["itl_ms_p50"] >= 0
        assert row["decode_steps"] > 0 and row["mean_batch"] >= 1 and 0 < row["decode_share"] < 1
    assert rows["dense"]["mean_active_experts"] is None  # no routing to read
    for variant in ("moe", "moe+lynx"):  # E64 K8: a step runs at least the 8 of one token (batches differ by timing)
        assert 8 <= rows[variant]["mean_active_experts"] <= 64
    assert (tmp_path / "summary.md").read_text().startswith("QUICK MODE")
    assert (tmp_path / "results.csv").read_text().splitlines()[0].startswith("workload,variant,concurrency")


def test_the_slots_hold_the_longest_request_of_the_workloads():
    """A step's attention costs in proportion to the slot's length, so the slots are sized to the
    workloads' requests: the longest prompt (mean + 4 standard deviations) and answer, rounded up
    to 128; an explicit --max-length wins."""
    from lynx_export.bench.serving import ServeBenchConfig

    assert ServeBenchConfig(workloads=("chat",)).slot_length() == 768  # 256 + 4 x 64 + 256 = 768
    assert ServeBenchConfig(workloads=("chat", "docvqa")).slot_length() == 1792  # 1343 + 4 x 96 + 4 = 1731
    assert ServeBenchConfig(quick=True).slot_length() == 128
    assert ServeBenchConfig(max_length=300).slot_length() == 300
