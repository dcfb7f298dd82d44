"""Engine benchmark: dense twin vs MoE (model's routing) vs MoE+LYNX, decode tokens/s over batch sizes.

All variants are built and timed in one process and one run; for each batch size the variants
take turns (a rotating order per repeat) so machine drift hits them alike. Beside every
measurement stands the step's roofline bound, max(bytes read / read bandwidth, FLOPs / peak
FLOP rate), with both rates measured on this machine in the same run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import platform
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from lynx_export.compiler.lowering.ort import LoweredBlock
from lynx_export.backends.ort import OrtRunner
from lynx_export.compiler.build import BuildOptions, PolicyChoice, build
from lynx_export.evaluation.corpus import stdlib_corpus
from lynx_export.evaluation.demo import DemoConfig, export_demo_model, export_model
from lynx_export.bench.dense_twin import dense_twin
from lynx_export.evaluation.decode import KVCache
from lynx_export.compiler.output import write_results
from lynx_export.evaluation.trained import load_trained_model
from lynx_export.compiler.verify import Case, VerifyOptions, make_feeds, probe_copy, routing_summary

__all__ = ["BenchConfig", "BENCH_MODEL", "QUICK_MODEL", "run_bench", "planned_runs", "write_outputs"]

# >= 500 MB of expert weights (4 layers x 8 experts x 3 x 1024 x 2048 x 4 B = 805 MB) so they
# cannot sit in any CPU cache.
BENCH_MODEL = DemoConfig(vocab_size=256, hidden_size=1024, num_layers=4, num_heads=16, num_experts=8, top_k=2, expert_size=2048)
QUICK_MODEL = DemoConfig()
FP32 = 4


@dataclass(frozen=True)
class BenchConfig:
    model: DemoConfig = BENCH_MODEL
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    context_len: int = 128  # KV cache length each decode step attends over
    warmup: int = 2
    repeats: int = 15
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    budget: int | None = None  # also time the budget policy with this many experts
    lynx: PolicyChoice = PolicyChoice("lynx")  # the moe+lynx variants' policy (parameters default by E and K)
    ort_experts: tuple[str, ...] = ("fused", "conditional")  # expert implementations of the ORT lowering
    quick: bool = False
    seed: int = 0
    # The shipped model trained on the standard library's source, decoding held-out text: real
    # routing and a real KV cache. Otherwise `model` with random weights and random inputs.
    trained: bool = False

    @property
    def builds(self) -> dict[str, tuple[PolicyChoice, str]]:
        """MoE variant name -> (policy, expert implementation)."""
        routings = [("moe", PolicyChoice("off")), ("moe+lynx", self.lynx)]
        if self.budget:
            routings.append(("moe+budget", PolicyChoice("budget", budget=self.budget)))
        return {f"{name}:{impl}": (choice, impl) for impl in self.ort_experts for name, choice in routings}

    @property
    def variants(self) -> tuple[str, ...]:
        return ("dense", *self.builds)


def planned_runs(config: BenchConfig) -> int:
    return len(config.batch_sizes) * len(config.variants) * (config.warmup + config.repeats)


# -- machine rates -----------------------------------------------------------------------------------


def measure_read_bandwidth(threads: int, nbytes: int = 1 << 30, rounds: int = 5) -> float:
    """Bytes/s that `threads` threads read from memory (numpy sums over disjoint chunks)."""
    data = np.ones(nbytes // FP32, dtype=np.float32)
    chunks = np.array_split(data, threads)
    best = float("inf")
    for _ in range(rounds):
        workers = [threading.Thread(target=np.sum, args=(c,)) for c in chunks]
        start = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = min(best, time.perf_counter() - start)
    return data.nbytes / best


def measure_peak_flops(threads: int, folder: pathlib.Path, m: int = 256, k: int = 2048, n: int = 2048, rounds: int = 10) -> float:
    """FLOP/s of ONNX Runtime's fp32 MatMul [m,k] x [k,n] (constant weight), best of `rounds`."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "peak",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
        [weight],
    )
    path = folder / "peak_matmul.onnx"
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString())
    feeds = {"x": rng.standard_normal((m, k)).astype(np.float32)}
    with OrtRunner(str(path), threads=threads) as runner:
        runner.infer(feeds)
        best = min(_timed(runner, feeds) for _ in range(rounds))
    return 2.0 * m * k * n / best


def _timed(runner: OrtRunner, feeds: dict[str, np.ndarray]) -> float:
    runner.infer(feeds)
    return runner.last_inference_s


# -- cost model ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepCost:
    """What one decode step reads and computes, from the model's own initializers."""

    fixed_bytes: int  # weights read every step whatever the routing (attention, norms, router, head)
    table_row_bytes: int  # bytes per looked-up row of gathered tables (embeddings)
    expert_bytes: int  # bytes of one expert (fc1 + fc2 slices) of one layer
    fixed_macs_per_token: int  # multiply-adds per token in fixed-weight matmuls
    expert_macs_per_token: int  # multiply-adds per token in one layer's experts (K experts each)
    layers: int

    def weight_bytes(self, batch: int, active_per_layer: float) -> float:
        return self.fixed_bytes + batch * self.table_row_bytes + self.layers * active_per_layer * self.expert_bytes

    def flops(self, batch: int, attention_flops: float) -> float:
        return 2.0 * batch * (self.fixed_macs_per_token + self.layers * self.expert_macs_per_token) + attention_flops


def step_cost(path: pathlib.Path, blocks: Sequence[LoweredBlock] = ()) -> StepCost:
    """The cost model of a model file; `blocks` say which initializers hold expert weights."""
    model = ir.load(path)
    inits = model.graph.initializers
    moe_weights = {name for b in blocks for name in b.expert_weights}
    expert_bytes = expert_macs = 0
    if blocks:
        per_layer = sum(inits[name].const_value.nbytes for name in moe_weights) // len(blocks)
        expert_bytes = per_layer // blocks[0].spec.num_experts
        expert_macs = blocks[0].spec.top_k * expert_bytes // FP32
    fixed_bytes = table_row_bytes = fixed_macs = 0
    for value in inits.values():
        if value.name in moe_weights or value.const_value is None:
            continue
        nbytes = value.const_value.nbytes
        uses = [n for n, _ in value.uses()]
        if uses and all(n.op_type == "Gather" and n.inputs[0] is value for n in uses) and len(value.shape) == 2:
            table_row_bytes += nbytes // value.shape[0]
            continue
        fixed_bytes += nbytes
        if any(n.op_type in ("MatMul", "Gemm") for n in uses) and len(value.shape) == 2:
            fixed_macs += nbytes // FP32
    return StepCost(fixed_bytes, table_row_bytes, expert_bytes, fixed_macs, expert_macs, len(blocks))


def attention_flops(model: DemoConfig, batch: int, context: int) -> float:
    # Scores and weighted sum: 2 matmuls of [1, hd] x [hd, P+1] per head, per layer.
    return model.num_layers * 2 * 2.0 * batch * (context + 1) * model.hidden_size


# -- the run ---------------------------------------------------------------------------------------


def _source_model(config: BenchConfig, folder: pathlib.Path, progress: Callable[[str], None]) -> pathlib.Path:
    """Export the benchmark model, or reuse an export made with the same configuration."""
    path = folder / "source" / "model.onnx"
    stamp = folder / "source" / "config.json"
    wanted = json.dumps({**config.model.to_dict(), "trained": config.trained}, sort_keys=True)
    if path.exists() and stamp.exists() and stamp.read_text() == wanted:
        progress(f"reusing {path}")
        return path
    progress(f"exporting the benchmark model to {path}")
    if config.trained:
        export_model(load_trained_model(), path)
    else:
        export_demo_model(path, config.model)
    stamp.write_text(wanted)
    return path


def _text_feeds(prefill_model: pathlib.Path, batch_sizes: Sequence[int], context_len: int, threads: int) -> dict[int, dict[str, np.ndarray]]:
    """Decode-step inputs from held-out text: each row's KV cache holds `context_len` real tokens
    (prefilled through `prefill_model`, the compiled MoE with the model's own routing) and its
    input is the next token of the same text."""
    text = stdlib_corpus("held_out").sequences(max(batch_sizes), context_len + 1)
    feeds = {}
    with OrtRunner(str(prefill_model), threads=threads) as runner:
        cache = KVCache(runner)
        for batch in batch_sizes:
            # Prefill 16 rows at a time, so memory stays bounded at any batch size.
            parts = [cache.step(text[s : min(batch, s + 16), :context_len], cache.empty(min(batch, s + 16) - s))[1] for s in range(0, batch, 16)]
            feeds[batch] = cache.feeds(text[:batch, context_len:], [np.concatenate(layer) for layer in zip(*parts)])
    return feeds


def _active_experts(path: pathlib.Path, blocks: Sequence[LoweredBlock], feeds: dict[int, dict[str, np.ndarray]], threads: int) -> dict[int, dict[str, float]]:
    """Mean active experts per layer, (model's routing, policy) per batch size, read from the graph."""
    out: dict[int, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="lynx-bench-probe-") as tmp:
        probe = probe_copy(path, blocks, pathlib.Path(tmp))
        with OrtRunner(str(probe), threads=threads) as runner:
            for batch, feed in feeds.items():
                summary = routing_summary(blocks, runner.infer(feed))
                out[batch] = {
                    "model": summary["mean_active_experts_model"],
                    "policy": summary["mean_active_experts_policy"],
                    "agreement": summary["routing_agreement"],
                }
    return out


def _machine(threads: int) -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import onnxruntime

    cache = pathlib.Path("/sys/devices/system/cpu/cpu0/cache")
    caches = {}
    for index in sorted(cache.glob("index*")) if cache.exists() else []:
        try:
            level, kind, size = ((index / f).read_text().strip() for f in ("level", "type", "size"))
        except OSError:
            continue
        if kind != "Instruction":
            caches[f"L{level}"] = size
    return {
        "cpu": cpu,
        "caches_per_instance": caches,
        "logical_cpus": os.cpu_count(),
        "threads": threads,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
    }


def run_bench(
    config: BenchConfig,
    work_dir: pathlib.Path,
    progress: Callable[[str], None] = lambda _: None,
    tick: Callable[[], None] = lambda: None,
) -> dict[str, Any]:
    """Build every variant under `work_dir`, time them, and return the results (JSON-able)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    source = _source_model(config, work_dir, progress)
    check = VerifyOptions(batch_sizes=(1, 4), seq_lens=(1, 3), context_len=4)
    builds = {}
    for variant, (choice, impl) in config.builds.items():
        progress(f"building {variant} (policy {choice.name}, {impl} experts, verified against the source)")
        options = BuildOptions(choice, ort_experts=impl, verify=check, force=True)
        builds[variant] = build(source, work_dir / variant.replace(":", "-"), options, progress=progress)
    progress("writing the dense twin")
    twin = dense_twin(source, work_dir / "dense" / "model.onnx")
    paths = {"dense": twin.path, **{v: b.out_dir / "model.ort.onnx" for v, b in builds.items()}}

    progress("measuring read bandwidth and peak FLOP rate")
    with tempfile.TemporaryDirectory(prefix="lynx-bench-") as tmp:
        peak_flops = measure_peak_flops(config.threads, pathlib.Path(tmp))
    read_bw = measure_read_bandwidth(config.threads)

    if config.trained:
        progress("prefilling held-out text for the decode steps")
        own_routing = next(paths[v] for v, (choice, _) in config.builds.items() if choice.name == "off")
        feeds = _text_feeds(own_routing, config.batch_sizes, config.context_len, config.threads)
    else:
        rng = np.random.default_rng(config.seed)
        source_ir = ir.load(source)
        feeds = {b: make_feeds(source_ir, Case(b, 1), config.context_len, rng) for b in config.batch_sizes}
        del source_ir

    progress("reading back routing (active experts per layer)")
    active = {v: _active_experts(paths[v], b.blocks, feeds, config.threads) for v, b in builds.items()}
    costs = {v: step_cost(p, builds[v].blocks if v in builds else ()) for v, p in paths.items()}

    times: dict[tuple[str, int], list[float]] = {}
    runners = {v: OrtRunner(str(p), threads=config.threads).__enter__() for v, p in paths.items()}
    try:
        for batch in config.batch_sizes:
            progress(f"timing batch {batch}")
            order = list(config.variants)
            for rep in range(config.warmup + config.repeats):
                for variant in order[rep % len(order):] + order[: rep % len(order)]:
                    elapsed = _timed(runners[variant], feeds[batch])
                    if rep >= config.warmup:
                        times.setdefault((variant, batch), []).append(elapsed)
                    tick()
    finally:
        for runner in runners.values():
            runner.__exit__(None, None, None)

    rows = []
    for batch in config.batch_sizes:
        for variant in config.variants:
            samples = np.array(times[(variant, batch)])
            act = active[variant][batch]["policy"] if variant in active else float(config.model.num_experts)
            model_act = active[variant][batch]["model"] if variant in active else float(config.model.num_experts)
            cost = costs[variant]
            weight_bytes = cost.weight_bytes(batch, act)
            kv_bytes = config.model.num_layers * 2 * batch * config.context_len * config.model.hidden_size * FP32
            flops = cost.flops(batch, attention_flops(config.model, batch, config.context_len))
            memory_s, compute_s = (weight_bytes + kv_bytes) / read_bw, flops / peak_flops
            median = float(np.median(samples))
            rows.append({
                "variant": variant,
                "batch": batch,
                "tokens_per_s": batch / median,
                "tokens_per_s_p10": batch / float(np.percentile(samples, 90)),
                "tokens_per_s_p90": batch / float(np.percentile(samples, 10)),
                "ms_per_step": 1e3 * median,
                "ms_per_step_min": 1e3 * float(samples.min()),
                "ms_per_step_max": 1e3 * float(samples.max()),
                "repeats": int(samples.size),
                "active_experts_per_layer": act,
                "active_experts_model_routing": model_act,
                "routing_agreement": active[variant][batch]["agreement"] if variant in active else None,
                "weight_bytes_per_step": weight_bytes,
                "kv_bytes_per_step": kv_bytes,
                "flops_per_step": flops,
                "bound_ms": 1e3 * max(memory_s, compute_s),
                "bound_kind": "memory" if memory_s >= compute_s else "compute",
                "measured_over_bound": median / max(memory_s, compute_s),
            })
    return {
        "quick": config.quick,
        "note": "QUICK MODE: tiny model, smoke test only; these numbers are not measurements" if config.quick else "",
        "inputs": "held-out standard-library text (trained model), KV cache prefilled with real tokens" if config.trained
        else "random token ids and random KV cache (random-weight model with synthetic router skew)",
        "config": {**dataclasses.asdict(config), "model": config.model.to_dict(), "variants": list(config.variants)},
        "machine": {**_machine(config.threads), "read_bandwidth_gb_s": read_bw / 1e9, "peak_gflop_s": peak_flops / 1e9},
        "model": {
            "moe_parameters": twin.moe_parameters,
            "dense_parameters": twin.dense_parameters,
            "router_parameters": twin.router_parameters,
            "expert_weight_bytes": max(c.layers * c.expert_bytes for c in costs.values()) * config.model.num_experts,
        },
        "policies": {v: b.manifest["policy"] for v, b in builds.items()},
        "step_costs": {v: dataclasses.asdict(c) for v, c in costs.items()},
        "timed": "one decode step (input_ids [B,1] with a KV cache of context_len) per session.run, wall clock",
        "results": rows,
    }


# -- outputs ---------------------------------------------------------------------------------------

CSV_FIELDS = (
    "variant", "batch", "tokens_per_s", "tokens_per_s_p10", "tokens_per_s_p90", "ms_per_step", "ms_per_step_min", "ms_per_step_max",
    "repeats", "active_experts_per_layer", "active_experts_model_routing", "routing_agreement", "weight_bytes_per_step",
    "kv_bytes_per_step", "flops_per_step", "bound_ms", "bound_kind", "measured_over_bound",
)


def summary_markdown(results: dict[str, Any]) -> str:
    """The results as Markdown: machine line, then one row per batch size with all variants."""
    m = results["machine"]
    lines = []
    if results["quick"]:
        lines.append(f"**{results['note']}**\n")
    lines.append(
        f"Machine: {m['cpu']}, {m['threads']} threads, ONNX Runtime {m['onnxruntime']}; measured read bandwidth "
        f"{m['read_bandwidth_gb_s']:.1f} GB/s, peak fp32 MatMul {m['peak_gflop_s']:.1f} GFLOP/s.\n"
    )
    variants = results["config"]["variants"]
    by = {(r["variant"], r["batch"]): r for r in results["results"]}
    head = ["batch"] + [f"{v} tok/s (bound)" for v in variants] + [f"{v} active" for v in variants if v != "dense"]
    impls = results["config"]["ort_experts"]
    head += [f"lynx / moe ({impl})" for impl in impls] + ["best lynx / dense"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for batch in results["config"]["batch_sizes"]:
        row = [str(batch)]
        for v in variants:
            r = by[(v, batch)]
            bound_tps = batch / (r["bound_ms"] / 1e3)
            row.append(f"{r['tokens_per_s']:.1f} ({bound_tps:.1f} {r['bound_kind'][:3]})")
        row += [f"{by[(v, batch)]['active_experts_per_layer']:.2f}" for v in variants if v != "dense"]
        tps = {v: by[(v, batch)]["tokens_per_s"] for v in variants}
        row += [f"{tps[f'moe+lynx:{impl}'] / tps[f'moe:{impl}']:.2f}x" for impl in impls]
        row.append(f"{max(tps[f'moe+lynx:{impl}'] for impl in impls) / tps['dense']:.2f}x")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _plots(results: dict[str, Any], out_dir: pathlib.Path) -> list[pathlib.Path]:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    variants = results["config"]["variants"]
    batches = results["config"]["batch_sizes"]
    by = {(r["variant"], r["batch"]): r for r in results["results"]}
    title = "QUICK MODE (not a measurement)" if results["quick"] else f"{results['machine']['cpu']}, {results['machine']['threads']} threads"
    written = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for v in variants:
        line = ax.plot(batches, [by[(v, b)]["tokens_per_s"] for b in batches], marker="o", label=v)[0]
        ax.plot(batches, [b / (by[(v, b)]["bound_ms"] / 1e3) for b in batches], linestyle="--", color=line.get_color(), alpha=0.5, label=f"{v} bound")
    ax.set(yscale="log", ylabel="tokens/s", title=f"Decode throughput — {title}")
    written.append(_finish(fig, ax, batches, out_dir / "tokens_per_s.png"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for v in variants:
        if v == "dense":
            continue
        ax.plot(batches, [by[(v, b)]["active_experts_per_layer"] for b in batches], marker="o", label=v)
    ax.set(ylabel="active experts per layer (mean)", title=f"Experts read per decode step — {title}")
    ax.set_ylim(0, results["config"]["model"]["num_experts"] + 0.5)
    written.append(_finish(fig, ax, batches, out_dir / "active_experts.png"))
    return written


def _finish(fig, ax, batches: Sequence[int], path: pathlib.Path) -> pathlib.Path:
    """Shared look of the plots: log2 batch axis, grid, legend; save and close."""
    from matplotlib import pyplot as plt

    ax.set(xscale="log", xlabel="batch size (decode, tokens per step)")
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_outputs(results: dict[str, Any], out_dir: pathlib.Path) -> list[pathlib.Path]:
    """results.json, results.csv, summary.md and the two PNG plots."""
    return write_results(out_dir, results, CSV_FIELDS, results["results"], summary_markdown(results)) + _plots(results, out_dir)
