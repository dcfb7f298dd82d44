"""Engine benchmark: dense twin vs MoE (model's routing) vs MoE+LYNX, decode tokens/s over batch sizes.

The plan (configuration, variants, the checks made before any slow work, the variants compiled)
is `bench.plan`; this module makes the inputs, times the variants and gathers the results.

All variants are built and timed in one process and one run; for each batch size the variants
take turns (a rotating order per repeat) so machine drift hits them alike. Per weight precision
(fp32, and each of `quantize`) there is a dense twin at that precision and the MoE with its own
routing and with LYNX in each expert implementation (quantized experts run `per-expert`, the
one that runs them). Beside every measurement stands the step's roofline bound, max(bytes read
/ read bandwidth, FLOPs / the peak of the kernel that runs them), all rates measured on this
machine in the same run, and one profiled step splits the time in the MoE layers from the rest.

The model: a preset (`presets`: the demo architecture at real MoE shapes, its layers scaled to
the machine's cache) exported with torch, the shipped trained model, or any ONNX model the pass
supports (`source`), whose decode step is derived from its own inputs. With `routing_trace` the
MoE variants route on a trained model's recorded router logits (`trace_routing`) instead of their
own random routers.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from lynx_export.backends.ort import InPlaceStep, OrtRunner, SharedInitializers
from lynx_export.bench import presets
from lynx_export.bench.cost import StepCost, bound, kv_cost, step_cost
from lynx_export.bench.dense_twin import dense_twin
from lynx_export.bench.machine import MachineRates, last_level_cache, machine_info, measure_rates, measure_read_bandwidth, resident_bytes
from lynx_export.bench.outputs import CSV_FIELDS, summary_markdown, write_outputs
from lynx_export.bench.profile import StepSplit, profile_steps
from lynx_export.bench.plan import (BENCH_MODEL, QUICK_MODEL, SHARED_WEIGHT_IMPLS, BenchConfig, Variant, check_config, check_memory, compile_variants,
                                   memory_estimate, planned_runs)
from lynx_export.bench.trace_routing import routed_only, trace_positions, trace_steps, with_router_inputs
from lynx_export.compiler.lowering.ort import LoweredBlock
from lynx_export.compiler.decoder import DecoderIO
from lynx_export.compiler.verify import probe_copy, routing_summary
from lynx_export.errors import DataError
from lynx_export.evaluation.corpus import stdlib_corpus
from lynx_export.evaluation.demo import build_demo_model, export_model
from lynx_export.evaluation.genai_form import export_genai_model
from lynx_export.evaluation.trace import RouterTrace
from lynx_export.evaluation.trained import load_trained_model, trained_model
from lynx_export.progress import SILENT, Progress

__all__ = ["source_model", "BenchConfig", "Variant", "BENCH_MODEL", "QUICK_MODEL", "CSV_FIELDS", "run_bench", "planned_runs", "write_outputs",
           "summary_markdown", "measure_read_bandwidth", "memory_estimate", "check_memory", "check_config"]

QUICK_BANDWIDTH_BYTES = 64 << 20
TRACE_NAME = "model.trace.onnx"  # beside a MoE variant's model.ort.onnx: its routers replaced by trace inputs


# -- inputs ----------------------------------------------------------------------------------------


def source_model(config: BenchConfig, folder: pathlib.Path, progress: Progress) -> pathlib.Path:
    """Export the benchmark model in `config.form`, or reuse an export made with the same configuration."""
    export = folder / ("source" if config.form == "dynamo" else f"source-{config.form}")
    path = export / "model.onnx"
    stamp = folder / f"{export.name}.json"  # beside: a genai folder holds only its own files
    wanted = json.dumps({**config.model.to_dict(), "trained": config.trained, "form": config.form}, sort_keys=True)
    if path.exists() and stamp.exists() and stamp.read_text() == wanted:
        progress.note(f"reusing {path}")
        return path
    progress.note(f"exporting the benchmark model ({config.form} form) to {export if config.form == 'genai' else path}")
    stamp.unlink(missing_ok=True)
    model = load_trained_model(trained_model(config.trained).weights) if config.trained else build_demo_model(config.model)
    path = export_genai_model(model, export) if config.form == "genai" else export_model(model, path)
    stamp.write_text(wanted)
    return path


def _text_feeds(prefill_model: pathlib.Path, decoder: DecoderIO, batch_sizes: Sequence[int], context_len: int,
                threads: int) -> dict[int, dict[str, np.ndarray]]:
    """Decode-step inputs from held-out text: each row's KV cache holds `context_len` real tokens
    (prefilled through `prefill_model`, the compiled MoE with the model's own routing) and its
    input is the next token of the same text; the other inputs as `decoder`'s steps make them."""
    text = stdlib_corpus("held_out").sequences(max(batch_sizes), context_len + 1)
    rng = np.random.default_rng(0)  # nothing random is left in these feeds: ids and caches are replaced
    feeds = {}
    with OrtRunner(str(prefill_model), threads=threads) as runner:
        for batch in batch_sizes:
            # Prefill 16 rows at a time, so memory stays bounded at any batch size.
            parts = []
            for start in range(0, batch, 16):
                rows = text[start : min(batch, start + 16), :context_len]
                out = runner.infer({**decoder.step(len(rows), context_len, 0, rng).feeds, decoder.ids: rows})
                parts.append({cache: out[present] for cache, present in decoder.presents.items()})
            feeds[batch] = {**decoder.step(batch, 1, context_len, rng).feeds, decoder.ids: text[:batch, context_len:],
                            **{cache: np.concatenate([part[cache] for part in parts]) for cache in decoder.presents}}
    return feeds


@dataclass(frozen=True)
class _StepInputs:
    feeds: dict[int, dict[str, np.ndarray]]
    first_input: str  # token ids [B,S], or the hidden rows [T,H] of a bare MoE stack
    sequence_axis: bool  # the first input has a dynamic axis 1: one new token per sequence
    # KV cache input -> its present output, where the graph updates its caches in place
    # (GroupQueryAttention): the timed steps bind each pair to one buffer. Empty: plain runs.
    in_place: dict[str, str] = field(default_factory=dict)
    # Per batch, the router logits of each timed step (`trace_steps`) that the MoE variants' trace
    # inputs take; empty without a routing trace.
    router_steps: dict[int, list[dict[str, np.ndarray]]] = field(default_factory=dict)

    def step_feeds(self, batch: int, moe: bool) -> list[dict[str, np.ndarray]]:
        """The feeds a variant's steps cycle through at `batch`: a MoE variant's each with one
        step's router logits when there is a trace; otherwise the one feed of the batch."""
        if not moe or not self.router_steps:
            return [self.feeds[batch]]
        return [{**self.feeds[batch], **routers} for routers in self.router_steps[batch]]


def _decoder(source: pathlib.Path) -> tuple[DecoderIO, ir.Value]:
    """The source's decoder convention and its first input."""
    model = ir.load(source)
    return DecoderIO.read(model, source.parent), model.graph.inputs[0]


def _random_feeds(source: pathlib.Path, config: BenchConfig) -> _StepInputs:
    """One decode step per batch size from the graph's own convention (`decoder.DecoderIO`): the
    ids' dims 0/1 are batch and sequence (1), the KV caches hold the context."""
    decoder, first = _decoder(source)
    shape = first.shape or []
    rng = np.random.default_rng(config.seed)
    feeds = {b: decoder.step(b, 1, config.context_len, rng).feeds for b in config.batch_sizes}
    for batch, feed in feeds.items():
        if feed[first.name].shape[:1] != (batch,):
            raise DataError(f"{source}: the first input '{first.name}' has a fixed first dimension {shape[0] if shape else 'of none'}; "
                            f"the benchmark runs it with batch sizes {', '.join(map(str, config.batch_sizes))}")
    return _StepInputs(feeds, first.name, len(shape) >= 2 and not isinstance(shape[1], int),
                       decoder.in_place)


SUMMARY_FIELDS = {"model": "mean_active_experts_model", "policy": "mean_active_experts_policy", "agreement": "routing_agreement"}


def _active_experts(path: pathlib.Path, blocks: Sequence[LoweredBlock], feeds: Mapping[int, Sequence[dict[str, np.ndarray]]], threads: int,
                    router_inputs: bool = False) -> dict[int, dict[str, float]]:
    """Mean active experts per layer, (model's routing, policy) per batch size, read from the graph
    and averaged over the batch's step feeds. `router_inputs`: the router logits are graph inputs
    (a trace-fed model), read from the feeds."""
    out: dict[int, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="lynx-bench-probe-") as tmp:
        probe = probe_copy(path, routed_only(blocks) if router_inputs else blocks, pathlib.Path(tmp))
        with OrtRunner(str(probe), threads=threads) as runner:
            for batch, steps in feeds.items():
                summaries = [routing_summary(blocks, {**feed, **runner.infer(feed)}) for feed in steps]
                out[batch] = {key: sum(getattr(s, name) for s in summaries) / len(summaries) for key, name in SUMMARY_FIELDS.items()}
    return out


def _feed_routers(builds: Mapping[str, Any], paths: dict[str, pathlib.Path]) -> tuple[str, ...]:
    """Rewrite every MoE variant's model with its router logits as inputs (`TRACE_NAME` beside it),
    point `paths` at the rewrites, and return the inputs' names in block order: every build's
    routers are the source's own nodes, so the names are the same in all of them."""
    names: tuple[str, ...] = ()
    for name, built in builds.items():
        rewritten = paths[name].with_name(TRACE_NAME)
        names = with_router_inputs(paths[name], built.blocks, rewritten)
        paths[name] = rewritten
    return names


def _timed(runner: OrtRunner, step: dict[str, np.ndarray] | InPlaceStep) -> float:
    if isinstance(step, InPlaceStep):
        return step.run()
    runner.infer(step)
    return runner.last_inference_s


# -- the run ---------------------------------------------------------------------------------------


def run_bench(
    config: BenchConfig,
    work_dir: pathlib.Path,
    progress: Progress = SILENT,
) -> dict[str, Any]:
    """Build every variant under `work_dir`, time them, and return the results (JSON-able)."""
    memory = check_config(config)  # before any slow work
    work_dir.mkdir(parents=True, exist_ok=True)
    source = config.source if config.source is not None else source_model(config, work_dir, progress)
    paths: dict[str, pathlib.Path] = {}
    block_names: dict[str, tuple[str, ...]] = {}
    twins = {}
    for v in config.variant_list:
        if v.routing == "dense":  # first: a model without MoE blocks fails here, before any build
            progress.note(f"writing the dense twin {v.name}")
            twins[v.name] = dense_twin(source, work_dir / v.folder / "model.onnx", v.quantize(config.block_size))
            paths[v.name], block_names[v.name] = twins[v.name].path, twins[v.name].block_names
    builds = compile_variants(config, source, work_dir, progress)
    for name, compiled in builds.items():
        paths[name], block_names[name] = compiled.path, tuple(b.name for b in compiled.blocks)
    trace = None if config.routing_trace is None else RouterTrace.load(config.routing_trace)
    if trace is not None:
        progress.note(f"replacing the MoE variants' routers by inputs for the router logits of {config.routing_trace}")
        router_names = _feed_routers(builds, paths)

    llc = last_level_cache()
    # An array well over the cache, so the sums read memory (quick: small, fast, not a measurement).
    bandwidth_bytes = config.bandwidth_bytes or (QUICK_BANDWIDTH_BYTES if config.quick
                                                 else max(1 << 30, presets.CACHE_MULTIPLE * llc.total_bytes))
    progress.note("measuring read bandwidth and the peak FLOP rates of fp32 MatMul" + "".join(f" and {p} MatMulNBits" for p in config.quantize))
    rates = measure_rates(config.threads, tuple(presets.PRECISION_BITS[p] for p in config.quantize), bandwidth_bytes, config.block_size,
                          rounds=3 if config.quick else 10)

    if config.trained:
        progress.note("prefilling held-out text for the decode steps")
        own_routing = next(paths[n] for n, v in config.builds.items() if v.routing == "moe" and v.precision == "fp32")
        decoder, _ = _decoder(source)
        inputs = _StepInputs(_text_feeds(own_routing, decoder, config.batch_sizes, config.context_len, config.threads), decoder.ids, True,
                             decoder.in_place)
    else:
        inputs = _random_feeds(source, config)
    if trace is not None:
        # One router step per timed repeat (repeat r runs step r mod repeats): every repeat routes
        # differently, and the read-back below averages over exactly the steps timed.
        steps = {b: trace_steps(trace, router_names, b, config.repeats) for b in config.batch_sizes}
        inputs = dataclasses.replace(inputs, router_steps=steps)
    feeds = inputs.feeds
    variant_feeds = {(v, b): inputs.step_feeds(b, v in builds) for v in config.variants for b in config.batch_sizes}

    progress.note("reading back routing (active experts per layer)")
    active = {n: _active_experts(paths[n], b.blocks, {batch: variant_feeds[(n, batch)] for batch in config.batch_sizes}, config.threads,
                                 router_inputs=trace is not None)
              for n, b in builds.items()}
    costs = {n: step_cost(p, builds[n].blocks if n in builds else (), block_names[n]) for n, p in paths.items()}
    spec = next(iter(builds.values())).blocks[0].spec

    times, opened = _time_steps(config, paths, variant_feeds, inputs.in_place, progress)
    memory = {**memory, **opened}
    splits = {}
    if config.profile:  # after the timed runs, each in a session of its own
        with tempfile.TemporaryDirectory(prefix="lynx-bench-profile-") as tmp:
            for variant in config.variants:
                progress.note(f"profiling one step of {variant} per batch size")
                first_steps = {b: variant_feeds[(variant, b)][0] for b in config.batch_sizes}
                splits[variant] = profile_steps(paths[variant], first_steps, block_names[variant], config.threads, pathlib.Path(tmp),
                                                inputs.in_place)

    by_name = {v.name: v for v in config.variant_list}
    rows = []
    for batch in config.batch_sizes:
        kv_bytes, kv_elements = kv_cost(feeds[batch], inputs.first_input)
        attention = 2.0 * kv_elements  # scores and weighted sum: one multiply-add per cached element each
        for variant in config.variants:
            routing = active[variant][batch] if variant in active else {"policy": spec.num_experts, "model": spec.num_experts, "agreement": None}
            rows.append(_row(by_name[variant], batch, np.array(times[(variant, batch)]), routing, costs[variant], kv_bytes, attention, rates,
                             splits.get(variant, {}).get(batch)))
    return {
        "quick": config.quick,
        "note": "QUICK MODE: tiny model, smoke test only; these numbers are not measurements" if config.quick else "",
        "inputs": _inputs_note(config, trace),
        "config": {**dataclasses.asdict(config), "model": None if config.source else config.model.to_dict(),
                   "source": None if config.source is None else str(config.source), "variants": list(config.variants),
                   "routing_trace": None if config.routing_trace is None else str(config.routing_trace)},
        "machine": {**machine_info(config.threads), "read_bandwidth_gb_s": rates.read_bandwidth / 1e9, "read_bandwidth_bytes": bandwidth_bytes,
                    "peak_gflop_s": rates.peak_flops / 1e9,
                    "nbits_peak_gflop_s": {p: rates.nbits_peak_flops[presets.PRECISION_BITS[p]] / 1e9 for p in config.quantize}},
        "memory": memory,
        "model": _model_summary(config, source, spec, costs, twins["dense"], llc.total_bytes),
        "policies": {v: b.policy for v, b in builds.items()},
        "step_costs": {v: dataclasses.asdict(c) for v, c in costs.items()},
        "timed": "one decode step per session.run, wall clock: " + (
            "the first input [B,1] (one new token per sequence) with a KV cache of context_len" if inputs.sequence_axis
            else "the first input with B rows (a graph without a sequence axis: one row per token)") + (
            "; KV caches updated in place (GroupQueryAttention; IO binding, each past input and its present output one buffer, "
            "as onnxruntime-genai runs the graph)" if inputs.in_place else
            "; KV caches returned as new present outputs (the graph copies each past into them)" if inputs.sequence_axis else ""),
        "form": config.form if config.source is None else None,
        "profiled": "one step per variant and batch size after the timed runs, in a session of its own (ONNX Runtime's profiler); "
                    "moe_ms: the MoE layers' nodes, other_ms: the rest of the run" if config.profile else "not profiled",
        "results": rows,
        **({"routing_trace": _trace_summary(config, trace, spec)} if trace is not None else {}),
    }


def _time_steps(config: BenchConfig, paths: Mapping[str, pathlib.Path],
                step_feeds: Mapping[tuple[str, int], Sequence[dict[str, np.ndarray]]], in_place: Mapping[str, str],
                progress: Progress) -> tuple[dict[tuple[str, int], list[float]], dict[str, int | None]]:
    """Seconds of every timed step by (variant, batch): all sessions open, the variants taking
    turns in an order that rotates each repeat; repeat r runs the (variant, batch)'s feed r mod
    their number (merged beforehand, so the timed call does no dict work; with `in_place`, bound
    beforehand, the caches in one buffer per batch that every variant's steps share). Also what
    opening the sessions added to this process's resident memory, and the weights they share."""
    times: dict[tuple[str, int], list[float]] = {}
    shared = SharedInitializers()
    implementation = {v.name: v.ort_experts for v in config.variant_list}
    before = resident_bytes()
    # Sessions take turns on the same cores: none may busy-wait while another runs.
    runners = {v: OrtRunner(str(p), threads=config.threads, spinning=False,
                            shared=shared.for_model(p) if implementation[v] in SHARED_WEIGHT_IMPLS else None).__enter__()
               for v, p in paths.items()}
    after = resident_bytes()
    opened = {"sessions_resident_bytes": None if before is None or after is None else after - before, "shared_weight_bytes": shared.bytes}
    done, total = 0, planned_runs(config)
    try:
        for batch in config.batch_sizes:
            order = list(config.variants)
            buffers: dict[str, Any] = {}  # this batch's caches, shared by every variant's steps
            bound = {v: [runners[v].in_place_step(feed, in_place, 1, buffers) for feed in step_feeds[(v, batch)]] for v in order} if in_place else {}
            for rep in range(config.warmup + config.repeats):
                for variant in order[rep % len(order):] + order[: rep % len(order)]:
                    steps = bound.get(variant) or step_feeds[(variant, batch)]
                    elapsed = _timed(runners[variant], steps[rep % len(steps)])
                    if rep >= config.warmup:
                        times.setdefault((variant, batch), []).append(elapsed)
                    done += 1
                    progress.step("timing", done, total, f"batch {batch}, {variant}")
    finally:
        for runner in runners.values():
            runner.__exit__(None, None, None)
    return times, opened


def _row(variant: Variant, batch: int, samples: np.ndarray, routing: Mapping[str, Any], cost: StepCost, kv_bytes: int, attention: float,
         rates: MachineRates, split: StepSplit | None) -> dict[str, Any]:
    """One results row: the timed steps against the bound, and the profiled split."""
    act, median = float(routing["policy"]), float(np.median(samples))
    b = bound(cost, batch, act, kv_bytes, attention, rates)
    return {
        "variant": variant.name,
        "precision": variant.precision,
        "ort_experts": variant.ort_experts,
        "batch": batch,
        "tokens_per_s": batch / median,
        "tokens_per_s_p10": batch / float(np.percentile(samples, 90)),
        "tokens_per_s_p90": batch / float(np.percentile(samples, 10)),
        "ms_per_step": 1e3 * median,
        "ms_per_step_min": 1e3 * float(samples.min()),
        "ms_per_step_max": 1e3 * float(samples.max()),
        "repeats": int(samples.size),
        "active_experts_per_layer": act,
        "active_experts_model_routing": float(routing["model"]),
        "routing_agreement": routing["agreement"],
        "weight_bytes_per_step": cost.weight_bytes(batch, act),
        "kv_bytes_per_step": kv_bytes,
        "flops_per_step": cost.flops(batch, attention),
        "bound_ms": 1e3 * b.step_s,
        "bound_kind": b.kind,
        "measured_over_bound": median / b.step_s,
        "profiled_ms_per_step": split.step_ms if split else None,
        "moe_ms_per_step": split.moe_ms if split else None,
        "other_ms_per_step": split.other_ms if split else None,
        "moe_weight_bytes_per_step": cost.moe_weight_bytes(act),
        "moe_bound_ms": 1e3 * b.moe_s,
        "moe_bound_kind": b.moe_kind,
        "moe_over_bound": split.moe_ms / (1e3 * b.moe_s) if split and b.moe_s > 0 else None,
    }


def _inputs_note(config: BenchConfig, trace: RouterTrace | None = None) -> str:
    if config.trained:
        return f"held-out standard-library text ({config.trained} trained model), KV cache prefilled with real tokens"
    if config.source is not None:
        note = f"random inputs derived from {config.source}'s own inputs (ids in range of their tables, random KV cache)"
    else:
        note = "random token ids and random KV cache (random-weight model" + ("" if trace else " with synthetic router skew") + ")"
    return note if trace is None else f"{note}; {_trace_note(config, trace)}"


def _trace_note(config: BenchConfig, trace: RouterTrace) -> str:
    positions = trace_positions(trace)
    return (f"the MoE variants' router logits come from the trace {config.routing_trace} ({trace.source or 'no source recorded'}): "
            f"model layer l routes on trace layer l mod {len(trace.logits)}, the timed steps cycle over positions "
            f"{positions.start}..{positions.stop - 1} (the second half) of its first B sequences; their router MatMul is not timed "
            f"(a graph input replaces it: H*E multiply-adds per token and layer, negligible against the experts)")


def _trace_summary(config: BenchConfig, trace: RouterTrace, spec) -> dict[str, Any]:
    """What the MoE variants routed on, for results.json."""
    sequences, _, experts = trace.shape
    positions = trace_positions(trace)
    return {
        "file": str(config.routing_trace),
        "source": trace.source,
        "layers": len(trace.logits),
        "sequences": sequences,
        "experts": experts,
        "top_k": trace.top_k,
        "layer_map": f"model layer l routes on trace layer l mod {len(trace.logits)}",
        "positions": [positions.start, positions.stop - 1],
        "steps_per_batch": config.repeats,
        "router_timed": False,
        "router_macs_per_token_and_layer_not_timed": spec.hidden_size * spec.num_experts,
        "models": TRACE_NAME,
    }


def _model_summary(config: BenchConfig, source: pathlib.Path, spec, costs, twin, llc_bytes: int) -> dict[str, Any]:
    """Sizes of the benchmarked model, and where its expert weights sit against the cache."""
    by_name = {v.name: v for v in config.variant_list}
    experts = {}
    for p in config.precisions:
        sizes = [c.layers * c.expert_bytes for n, c in costs.items() if by_name[n].routing != "dense" and by_name[n].precision == p]
        experts[p] = max(sizes) * spec.num_experts
    fp32 = costs[next(n for n, v in config.builds.items() if v.precision == "fp32")]
    total = fp32.fixed_bytes + fp32.table_bytes + experts["fp32"]
    return {
        "source": f"preset {config.preset}" if config.source is None and not config.trained and config.preset else
                  f"the shipped {config.trained} trained model" if config.trained else str(source),
        "preset": config.preset if config.source is None and not config.trained else None,
        "layers": fp32.layers,
        "spec": spec.to_dict(),
        "moe_parameters": twin.moe_parameters,
        "dense_parameters": twin.dense_parameters,
        "router_parameters": twin.router_parameters,
        "expert_weight_bytes": experts["fp32"],
        "expert_weight_bytes_by_precision": experts,
        "expert_fraction": experts["fp32"] / total,
        "llc_bytes": llc_bytes,
        "expert_bytes_over_llc": {p: b / llc_bytes for p, b in experts.items()},
    }
