"""`bench MODEL.onnx`: any model the pass supports, its decode step derived from its own inputs;
the presets, the machine's cache and memory, and the profile split the benchmark rests on."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from lynx_export.bench import presets
from lynx_export.bench.benchmark import BenchConfig, check_memory, memory_estimate, run_bench, write_outputs
from lynx_export.bench.machine import ASSUMED_LLC, last_level_cache, mem_available
from lynx_export.bench.profile import split_events
from lynx_export.errors import LynxError

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "bench_engines.py"
E, K, H, I = 8, 2, 64, 32
INT4_VARIANTS = ["dense", "moe:fused", "moe+lynx:fused", "moe:per-expert", "moe+lynx:per-expert",
                 "dense:int4", "moe:per-expert:int4", "moe+lynx:per-expert:int4"]


def _moe_stack(path: pathlib.Path, layers: int = 2, seed: int = 0) -> pathlib.Path:
    """A bare MoE stack on x [T,H]: per layer logits = x @ Wr + skew; x = x + MoE(x, logits)
    (com.microsoft.MoE, SwiGLU with interleaved gate/up rows); no sequence axis, no KV cache."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    current = "x"
    for n in range(layers):
        p = f"layers.{n}"
        inits += [
            numpy_helper.from_array(rng.standard_normal((H, E)).astype(np.float32), f"{p}.router"),
            numpy_helper.from_array((2.0 * rng.standard_normal(E)).astype(np.float32), f"{p}.skew"),  # popular and rare experts
            numpy_helper.from_array((0.05 * rng.standard_normal((E, 2 * I, H))).astype(np.float32), f"{p}.fc1"),
            numpy_helper.from_array((0.05 * rng.standard_normal((E, H, I))).astype(np.float32), f"{p}.fc2"),
        ]
        nodes += [
            helper.make_node("MatMul", [current, f"{p}.router"], [f"{p}.scores"]),
            helper.make_node("Add", [f"{p}.scores", f"{p}.skew"], [f"{p}.logits"]),
            helper.make_node("MoE", [current, f"{p}.logits", f"{p}.fc1", "", f"{p}.fc2"], [f"{p}.moe"], domain="com.microsoft",
                             k=K, activation_type="swiglu", swiglu_fusion=1, normalize_routing_weights=1),
            helper.make_node("Add", [current, f"{p}.moe"], [f"{p}.out"]),
        ]
        current = f"{p}.out"
    nodes.append(helper.make_node("Identity", [current], ["y"]))
    graph = helper.make_graph(nodes, "moe_stack", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", H])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", H])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    onnx.save(model, path)
    return path


@pytest.mark.slow
def test_bench_model_script_quick(demo_onnx, tmp_path):
    """`scripts/bench_engines.py MODEL.onnx --quick --quantize int4`: every variant and batch size,
    with the bound and the MoE/other split, on the graph's own decode step (ids [B,1], KV cache)."""
    out = tmp_path / "bench"
    cmd = [sys.executable, str(SCRIPT), str(demo_onnx), "--quick", "--quantize", "int4", "--batch-sizes", "1,2", "--repeats", "1",
           "--warmup", "1", "--threads", "1", "--context-len", "8", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["variants"] == INT4_VARIANTS
    rows = {(row["variant"], row["batch"]): row for row in results["results"]}
    assert set(rows) == {(v, b) for v in INT4_VARIANTS for b in (1, 2)}
    for (variant, batch), row in rows.items():
        assert row["bound_ms"] > 0 and row["moe_bound_ms"] > 0
        assert row["moe_ms_per_step"] > 0 and row["other_ms_per_step"] > 0
        assert row["precision"] == ("int4" if variant.endswith("int4") else "fp32")
        # The KV cache comes from the graph: 2 layers x (key, value) [B, 4 heads, 8, 16] fp32.
        assert row["kv_bytes_per_step"] == 2 * 2 * batch * 4 * 8 * 16 * 4
    assert results["model"]["source"] == str(demo_onnx) and results["model"]["layers"] == 2 and results["config"]["model"] is None
    assert "[B,1]" in results["timed"]
    # int4 experts: packed nibbles plus one fp32 scale per 32 inputs, 0.625 of a byte per weight.
    by_precision = results["model"]["expert_weight_bytes_by_precision"]
    assert by_precision["int4"] == pytest.approx(by_precision["fp32"] * 0.625 / 4)
    assert results["model"]["expert_bytes_over_llc"]["int4"] == pytest.approx(by_precision["int4"] / results["model"]["llc_bytes"])
    assert results["machine"]["nbits_peak_gflop_s"]["int4"] > 0
    summary = (out / "summary.md").read_text()
    for text in ("QUICK MODE", "lynx / moe (per-expert:int4)", "best lynx / dense:int4", "best lynx int4 / best fp32 moe", "| 2 |"):
        assert text in summary
    for png in ("tokens_per_s.png", "active_experts.png"):
        assert (out / png).exists()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stack")
    config = BenchConfig(source=_moe_stack(folder / "stack.onnx"), preset=None, batch_sizes=(1, 16), warmup=1, repeats=2, threads=1,
                         quick=True, quantize=("int4",))
    return config, run_bench(config, folder / "bench")


def test_bare_moe_stack_runs_batch_rows(stack, tmp_path):
    """A graph without a sequence axis: one run on T = batch rows, no KV cache, no attention."""
    config, results = stack
    rows = {(r["variant"], r["batch"]): r for r in results["results"]}
    assert set(rows) == {(v, b) for v in INT4_VARIANTS for b in (1, 16)}
    assert "B rows" in results["timed"]
    costs = results["step_costs"]
    for (variant, batch), r in rows.items():
        cost = costs[variant]
        assert r["kv_bytes_per_step"] == 0
        macs = cost["fixed_macs_per_token"] + cost["fixed_nbits_macs_per_token"] + cost["layers"] * cost["expert_macs_per_token"]
        assert r["flops_per_step"] == pytest.approx(2 * batch * macs)  # no attention term
        assert r["moe_ms_per_step"] > 0 and r["moe_bound_ms"] > 0
        if not variant.startswith("dense"):
            assert 1 <= r["active_experts_per_layer"] <= r["active_experts_model_routing"] <= E
    # Both float implementations route identically: same active experts for the same inputs.
    assert rows[("moe+lynx:per-expert", 16)]["active_experts_per_layer"] == rows[("moe+lynx:fused", 16)]["active_experts_per_layer"]
    assert rows[("moe+lynx:fused", 16)]["active_experts_per_layer"] < rows[("moe:fused", 16)]["active_experts_per_layer"]
    write_outputs(results, tmp_path)
    assert "| 16 |" in (tmp_path / "summary.md").read_text()


def test_quantized_costs_count_packed_weights_and_scales(stack):
    """An int4 expert: fc1 [2I,H] and fc2 [H,I] as packed nibbles plus fp32 scales per 32 inputs;
    its FLOPs run at MatMulNBits' measured peak."""
    _, results = stack
    costs = results["step_costs"]
    fp32, int4 = costs["moe:per-expert"], costs["moe:per-expert:int4"]
    assert fp32["expert_bytes"] == 3 * H * I * 4 and fp32["expert_bits"] == 32
    assert int4["expert_bytes"] == (2 * I * H + H * I) // 2 + (2 * I * (H // 32) + H * (I // 32)) * 4
    assert int4["expert_bits"] == 4 and int4["expert_macs_per_token"] == fp32["expert_macs_per_token"] == K * 3 * H * I
    dense, dense_int4 = costs["dense"], costs["dense:int4"]
    assert dense_int4["nbits"] == 4 and dense_int4["fixed_nbits_macs_per_token"] == dense["block_macs_per_token"] == 2 * E * 3 * H * I
    assert dense_int4["block_bytes"] == pytest.approx(2 * E * int4["expert_bytes"], rel=1e-3)
    # The bound: bytes at the packed size over the read bandwidth; the experts' FLOPs at MatMulNBits'
    # measured peak, the rest (router, no attention here) at fp32 MatMul's.
    machine = results["machine"]
    bandwidth, fp32_peak = 1e9 * machine["read_bandwidth_gb_s"], 1e9 * machine["peak_gflop_s"]
    int4_peak = 1e9 * machine["nbits_peak_gflop_s"]["int4"]
    for r in results["results"]:
        if r["variant"] == "moe+lynx:per-expert:int4":
            cost = costs[r["variant"]]
            compute = 2 * r["batch"] * (cost["fixed_macs_per_token"] / fp32_peak + 2 * cost["expert_macs_per_token"] / int4_peak)
            assert r["bound_ms"] == pytest.approx(1e3 * max(r["weight_bytes_per_step"] / bandwidth, compute))
            moe_bytes = cost["block_bytes"] + 2 * r["active_experts_per_layer"] * cost["expert_bytes"]
            moe_compute = 2 * r["batch"] * (cost["block_macs_per_token"] / fp32_peak + 2 * cost["expert_macs_per_token"] / int4_peak)
            assert r["moe_bound_ms"] == pytest.approx(1e3 * max(moe_bytes / bandwidth, moe_compute))


def test_model_and_preset_are_exclusive(tmp_path):
    path = _moe_stack(tmp_path / "stack.onnx", layers=1)
    for extra in (["--preset", "fine"], ["--layers", "3"], ["--trained"]):
        r = subprocess.run([sys.executable, "-m", "lynx_export.cli", "bench", str(path), "--out", str(tmp_path / "b"), *extra],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, r.stderr  # an error in the options alone
        assert r.stderr.count("\n") == 1 and "applies to a generated model (without MODEL" in r.stderr
    assert not (tmp_path / "b").exists()


def test_presets_have_real_moe_proportions_and_scale_to_the_cache():
    for preset in presets.PRESETS.values():
        assert presets.expert_fraction(dataclasses.replace(preset.layer, num_layers=1)) >= 0.9, preset.name
        for llc in (32 << 20, 480 << 20):
            model = presets.scaled_model(preset, llc)
            assert (model.hidden_size, model.num_experts, model.expert_size) == (preset.layer.hidden_size, preset.layer.num_experts,
                                                                                 preset.layer.expert_size)
            assert model.num_layers >= max(2, preset.layer.num_layers)
            fewer = dataclasses.replace(model, num_layers=model.num_layers - 1)
            assert presets.expert_bytes(model) > 4 * llc or model.num_layers == preset.layer.num_layers
            assert presets.expert_bytes(fewer) <= 4 * llc or model.num_layers == preset.layer.num_layers
        assert presets.scaled_model(preset, 480 << 20, layers=3).num_layers == 3
    mixtral, fine = (presets.PRESETS[n].layer for n in ("mixtral", "fine"))
    assert (mixtral.num_experts, mixtral.top_k, mixtral.hidden_size, mixtral.expert_size, mixtral.num_heads) == (8, 2, 1024, 3584, 16)
    assert (fine.num_experts, fine.top_k, fine.hidden_size, fine.expert_size, fine.num_heads) == (64, 8, 1024, 384, 16)
    assert presets.scaled_model(presets.PRESETS["mixtral"], 480 << 20).num_layers == 6  # 352 MB a layer, 2013 MB of cache x 4
    assert presets.scaled_model(presets.PRESETS["demo"], 32 << 20).num_layers == 4  # today's model


def test_last_level_cache_from_sysfs_and_fallbacks(tmp_path):
    root = tmp_path / "cpu"
    for cpu in (0, 1):
        for index, (level, kind, size, shared) in enumerate([(1, "Data", "32K", str(cpu)), (1, "Instruction", "32K", str(cpu)),
                                                             (2, "Unified", "512K", str(cpu)), (3, "Unified", "32768K", "0-1")]):
            folder = root / f"cpu{cpu}" / "cache" / f"index{index}"
            folder.mkdir(parents=True)
            for name, value in (("level", level), ("type", kind), ("size", size), ("shared_cpu_list", shared)):
                (folder / name).write_text(f"{value}\n")
    llc = last_level_cache(root)
    assert (llc.level, llc.size_bytes, llc.instances) == (3, 32 << 20, 1) and llc.source.endswith("cpu0/cache/index3")
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\ncache size\t: 512 KB\n")
    assert last_level_cache(tmp_path / "none", cpuinfo).size_bytes == 512 << 10
    assert last_level_cache(tmp_path / "none", tmp_path / "no-cpuinfo").size_bytes == ASSUMED_LLC


def test_memory_check_refuses_before_building(tmp_path):
    config = BenchConfig(model=presets.scaled_model(presets.PRESETS["fine"], 480 << 20), quantize=("int4",))
    per_variant = memory_estimate(config)
    assert per_variant["moe:fused"] > per_variant["dense"] > 4 * per_variant["moe:per-expert:int4"]
    # The second fused session reads the first one's expert weights (shared initializers).
    assert per_variant["moe+lynx:fused"] < per_variant["moe:fused"] / 10
    assert per_variant["moe+lynx:per-expert"] == per_variant["moe:per-expert"]
    needed = sum(per_variant.values()) + max(per_variant.values())
    with pytest.raises(LynxError, match="need about .* GB of memory together") as info:
        check_memory(config, available=int(needed / 0.7) - 1)
    assert "\n" not in str(info.value)
    assert check_memory(config, available=int(needed / 0.7) + 1)["estimate_bytes"] == needed
    if mem_available() is None:
        return  # no MemAvailable here: the run would not refuse
    with pytest.raises(LynxError):
        run_bench(dataclasses.replace(config, model=dataclasses.replace(config.model, num_layers=10_000)), tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_profile_split_counts_if_branches_once():
    """Node events inside an If lie within the If's event; each run's MoE time is its blocks' top-level nodes."""
    def node(name: str, ts: int, dur: int) -> dict:
        return {"cat": "Node", "name": f"{name}_kernel_time", "ts": ts, "dur": dur, "args": {"op_name": "X"}}

    events = [
        {"cat": "Session", "name": "model_run", "ts": 100, "dur": 100},
        node("node_MatMul_1", 101, 10),  # attention
        node("layers.0.mlp.n3", 112, 20),  # selection
        node("layers.0.mlp.n9", 133, 40),  # an If ...
        node("layers.0.mlp.n7", 134, 30),  # ... and its branch's MatMul
        node("layers.0.mlp.n12/QuickGeluFusion", 175, 5),  # a node an ORT fusion renamed
        node("layers.0.mlp_2.n1", 181, 7),  # another block's name, not this one
        {"cat": "Session", "name": "model_run", "ts": 300, "dur": 50},
        node("layers.0.mlp.n3", 301, 10),
    ]
    first, second = split_events(events, ["layers.0.mlp"])
    assert (first.step_ms, first.moe_ms, first.other_ms) == pytest.approx((0.1, 0.065, 0.035))
    assert (second.step_ms, second.moe_ms) == pytest.approx((0.05, 0.01))


def test_shared_initializers_hold_each_distinct_weight_once(tmp_path):
    """Two models holding the same large weight under different names read one OrtValue; a
    different or small weight is not shared; a session fed the shared values computes the same."""
    from lynx_export.backends.ort import OrtRunner, SharedInitializers

    rng = np.random.default_rng(0)
    big, other = rng.standard_normal((256, 128)).astype(np.float32), rng.standard_normal((256, 128)).astype(np.float32)

    def model(path: pathlib.Path, weight_name: str, weight: np.ndarray) -> pathlib.Path:
        small = numpy_helper.from_array(np.ones((128,), np.float32), "bias")
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["x", weight_name], ["y0"]), helper.make_node("Add", ["y0", "bias"], ["y"])], "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", 256])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", 128])],
            [numpy_helper.from_array(weight, weight_name), small])
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
        return path

    a, b, c = model(tmp_path / "a.onnx", "w_a", big), model(tmp_path / "b.onnx", "w_b", big), model(tmp_path / "c.onnx", "w_c", other)
    pool = SharedInitializers()
    shared_a, shared_b, shared_c = pool.for_model(a), pool.for_model(b), pool.for_model(c)
    assert set(shared_a) == {"w_a"} and shared_a["w_a"] is shared_b["w_b"] and shared_c["w_c"] is not shared_a["w_a"]
    assert pool.bytes == 2 * big.nbytes
    x = {"x": rng.standard_normal((3, 256)).astype(np.float32)}
    with OrtRunner(str(b), threads=1, shared=shared_b) as runner, OrtRunner(str(b), threads=1) as own:
        got = runner.infer(x)["y"]
        np.testing.assert_array_equal(got, own.infer(x)["y"])  # the same kernel on the same values
    # And the values are the weight's: a 256-long fp32 dot product in any order is within
    # 256 * eps * sum|x||w| of the exact one (plus the bias's rounding).
    exact = x["x"].astype(np.float64) @ big.astype(np.float64) + 1
    bound = 256 * np.finfo(np.float32).eps * (np.abs(x["x"]).astype(np.float64) @ np.abs(big).astype(np.float64) + 1)
    assert np.all(np.abs(got - exact) <= bound)
