"""`lynx-export bench`: time the dense twin, the MoE and the MoE with LYNX over batch sizes."""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from typing import Any

import click

from lynx_export.bench.serving import WORKLOADS
from lynx_export.compiler.lowering import EXPERT_IMPLEMENTATIONS
from lynx_export.cli._common import ChoiceList, Float32, Int, IntList, expected_errors, progress, refuse_unless, trained_option

# Bounds of what one run on one machine can mean: larger values only exhaust memory or time.
MAX_BATCH = 4096
MAX_CONTEXT = 65536
MAX_STEPS = 100_000
MAX_THREADS = 1024
MAX_LAYERS = 1024


@click.command("bench")
@click.argument("model", required=False, type=click.Path(dir_okay=False, path_type=pathlib.Path))
@click.option("--out", "out_dir", default=pathlib.Path("engines/bench"), show_default=True, type=click.Path(file_okay=False, path_type=pathlib.Path),
              help="Folder for the built models and the results.")
@click.option("--preset", type=click.Choice(["demo", "mixtral", "fine"]),
              help="Benchmark model without MODEL [default: demo]: demo (E8 K2 H1024 I2048, at least 4 layers, the model of "
                   "docs/BENCHMARKS.md's first run), mixtral (E8 K2 H1024 I3584) or fine (E64 K8 H1024 I384); each has its layers "
                   "scaled so its fp32 expert weights exceed 4x this machine's last-level cache.")
@click.option("--quick", is_flag=True, help="Tiny model (or MODEL) and few batch sizes: a smoke test, not a measurement.")
@click.option("--batch-sizes", default=None, type=IntList(1, MAX_BATCH),
              help="Decode batch sizes [default: 1,2,4,...,256; quick: 1,2,4,8].")
@click.option("--context-len", default=128, show_default=True, type=Int(0, MAX_CONTEXT), help="KV cache length of each decode step.")
@click.option("--repeats", default=None, type=Int(1, MAX_STEPS), help="Timed steps per variant and batch size [default: 15; quick: 3].")
@click.option("--warmup", default=2, show_default=True, type=Int(0, MAX_STEPS), help="Untimed steps before timing.")
@click.option("--threads", default=None, type=Int(1, MAX_THREADS), help="ONNX Runtime threads [default: all cores].")
@click.option("--budget", default=None, type=Int(1), help="Also time the budget policy keeping this many experts.")
@click.option("--layers", default=None, type=Int(1, MAX_LAYERS), help="Decoder layers of the preset's model [default: scaled to the cache].")
@trained_option("Benchmark a shipped model trained on the standard library's source, decoding held-out text (real routing), "
                "instead of the large random-weight model")
@click.option("--alpha", type=Float32(min=0, min_open=True), help="LYNX alpha of the moe+lynx variants [default: by E and K].")
@click.option("--beta", type=Int(0), help="LYNX beta of the moe+lynx variants [default: by E and K].")
@click.option("--ort-experts", default="fused,per-expert", show_default=True,
              type=ChoiceList(EXPERT_IMPLEMENTATIONS),
              help="Float expert implementations to time (comma-separated): fused, per-expert.")
@click.option("--quantize", default="", type=ChoiceList(("int4", "int8")),
              help="Also time these expert precisions (comma-separated: int4, int8): per precision the MoE with its own routing "
                   "and with LYNX (per-expert MatMulNBits) and the dense twin quantized the same way.")
@click.option("--block-size", type=click.Choice(["16", "32", "64", "128", "256"]), default="32", show_default=True,
              help="--quantize: inputs per quantization block.")
@click.option("--no-profile", is_flag=True, help="Skip the profiled step that splits the MoE layers' time from the rest.")
@click.option("--routing-trace", type=click.Path(dir_okay=False, path_type=pathlib.Path),
              help="Router logits of the timed steps from a `lynx-export trace` file: the presets' random routers are replaced by "
                   "learned routing, layer l using trace layer l mod L; E and K must match.")
@click.option("--form", type=click.Choice(["genai", "dynamo"]), default="genai", show_default=True,
              help="Export form of a preset or --trained model. genai: onnxruntime-genai's (GroupQueryAttention; each step updates the "
                   "KV cache in place, as onnxruntime-genai runs it). dynamo: torch's export (attention by Concat: each step copies the "
                   "cache into its outputs).")
@click.pass_context
@expected_errors
def bench_cmd(ctx: click.Context, model: pathlib.Path | None, out_dir: pathlib.Path, preset: str | None, quick: bool, batch_sizes: tuple[int, ...] | None,
              context_len: int, repeats: int | None, warmup: int, threads: int | None, budget: int | None, layers: int | None, trained: str | None,
              alpha: float | None, beta: int | None, ort_experts: tuple[str, ...], quantize: tuple[str, ...], block_size: str,
              no_profile: bool, routing_trace: pathlib.Path | None, form: str) -> None:
    """Time decode steps of the dense twin, the MoE with its own routing and the MoE with LYNX,
    over batch sizes, on ONNX Runtime CPU; write results.json, results.csv, summary.md and
    PNG plots to --out.

    Without MODEL the model is a --preset exported with random weights (needs the `torch`
    extra), or with --trained the shipped trained model. With MODEL, any ONNX model the pass
    supports: its decode step comes from its own inputs (the first input's dims 0/1 are batch
    and sequence, a past KV cache gets --context-len; a graph without a sequence axis, such as a
    bare MoE stack on [T,H], runs T = batch rows). Refuses to start when the variants would not
    fit in memory together. Plots need matplotlib. With --routing-trace the MoE variants route on a
    trained model's recorded router logits (docs/BENCHMARKS.md, "Learned routing at benchmark size").
    """
    import dataclasses as dc

    from lynx_export.bench.benchmark import BenchConfig, run_bench, summary_markdown, write_outputs
    from lynx_export.compiler.build import PolicyChoice

    refuse_unless(ctx, model is None, ("preset", "layers", "trained", "form"), "a generated model (without MODEL: MODEL is benchmarked as it is)")
    refuse_unless(ctx, not trained, ("quick", "layers", "preset"), "the generated models (--trained benchmarks the shipped model as trained)")
    refuse_unless(ctx, bool(quantize), ("block_size",), "--quantize")
    if not ort_experts:
        raise click.UsageError("--ort-experts: name at least one of fused, per-expert", ctx=ctx)
    if trained:
        from lynx_export.evaluation.demo import DemoConfig
        from lynx_export.evaluation.trained import read_metadata, trained_model

        config = BenchConfig(model=DemoConfig(**read_metadata(trained_model(trained).weights)["model"]), preset=None)
    elif model is not None:
        config = BenchConfig(source=model, preset=None)
    else:
        from lynx_export.bench import presets
        from lynx_export.bench.machine import last_level_cache

        chosen = presets.PRESETS[preset or presets.DEFAULT_PRESET]
        if quick:
            spec = chosen.quick if layers is None else dc.replace(chosen.quick, num_layers=layers)
        else:
            spec = presets.scaled_model(chosen, last_level_cache().total_bytes, layers)
        config = BenchConfig(model=spec, preset=chosen.name)
    config = dc.replace(
        config,
        context_len=context_len, warmup=warmup, budget=budget, quick=quick, trained=trained, lynx=PolicyChoice("lynx", alpha=alpha, beta=beta),
        ort_experts=ort_experts, quantize=quantize, block_size=int(block_size), profile=not no_profile, routing_trace=routing_trace, form=form,
        batch_sizes=batch_sizes or ((1, 2, 4, 8) if quick else config.batch_sizes),
        repeats=repeats or (3 if quick else config.repeats),
        threads=threads or config.threads,
    )
    _measure(quick, lambda: run_bench(config, out_dir, progress=progress), lambda results: write_outputs(results, out_dir), summary_markdown)


@click.command("bench-serve")
@click.option("--out", "out_dir", default=pathlib.Path("engines/bench-serve"), show_default=True,
              type=click.Path(file_okay=False, path_type=pathlib.Path), help="Folder for the models, the repository and the results.")
@click.option("--preset", type=click.Choice(["demo", "mixtral", "fine"]), default="fine", show_default=True, help="Model shape (random weights).")
@trained_option("Serve a shipped model trained on the standard library's source instead of a preset")
@click.option("--layers", default=None, type=Int(1, MAX_LAYERS), help="Decoder layers of the preset's model [default: scaled to the cache].")
@click.option("--precision", type=click.Choice(["fp32", "int4", "int8"]), default="fp32", show_default=True,
              help="Expert weights of the MoE builds and the dense twin's FFN weights.")
@click.option("--concurrency", "concurrencies", default="1,2,4,8,16,32,64", show_default=True, type=IntList(1, 4096),
              help="Concurrent streams genai-perf keeps open (one point each).")
@click.option("--workloads", default=",".join(WORKLOADS), show_default=True, type=ChoiceList(tuple(WORKLOADS)),
              help="Prompt and answer shapes (docs/SERVING.md says where each comes from).")
@click.option("--requests-per-user", default=2, show_default=True, type=Int(1, 1000),
              help="Requests measured per point: concurrency x this (at least 8), after one warm-up request per stream.")
@click.option("--max-slots", default=64, show_default=True, type=Int(1, 4096), help="Requests each model decodes at once.")
@click.option("--threads", default=None, type=Int(1, MAX_THREADS), help="ONNX Runtime threads per model [default: all cores].")
@click.option("--seed", default=0, show_default=True, type=Int(0, 2**31 - 1),
              help="Seed of genai-perf's synthetic prompts: another seed repeats the points with other prompts.")
@click.option("--spinning/--no-spinning", default=True, show_default=True,
              help="ONNX Runtime's threads spin between ops (--no-spinning: they sleep, leaving the cores to the server and genai-perf).")
@click.option("--quick", is_flag=True, help="Tiny model, one short workload: a smoke test, not a measurement.")
@click.option("--serve-env", default=pathlib.Path(".venv-serve"), show_default=True, type=click.Path(file_okay=False, path_type=pathlib.Path),
              help="Python environment holding nvidia-pytriton, numpy<2, onnxruntime and tokenizers.")
@click.option("--perf-env", default=pathlib.Path(".venv-perf"), show_default=True, type=click.Path(file_okay=False, path_type=pathlib.Path),
              help="Python environment holding genai-perf and perf_analyzer with its libraries.")
@click.pass_context
@expected_errors
def bench_serve_cmd(ctx: click.Context, out_dir: pathlib.Path, preset: str, trained: str | None, layers: int | None, precision: str,
                    concurrencies: tuple[int, ...], workloads: tuple[str, ...], requests_per_user: int, max_slots: int, threads: int | None,
                    seed: int, spinning: bool, quick: bool, serve_env: pathlib.Path, perf_env: pathlib.Path) -> None:
    """Serve the dense twin, the MoE and the MoE with LYNX side by side, batching requests in flight
    (Triton, NAME_generate), and drive each with genai-perf over concurrencies and workloads;
    write results.json, results.csv and summary.md to --out (docs/SERVING.md). Needs the
    serving and load-generator environments `make test` sets up (.venv-serve, .venv-perf)."""
    import dataclasses as dc

    from lynx_export.bench.serving import ServeBenchConfig, run_serve_bench, summary_markdown as serve_summary, write_outputs as write_serve

    refuse_unless(ctx, not trained, ("preset", "layers", "quick"), "the generated models (--trained serves the shipped model as trained)")
    config = ServeBenchConfig(preset=preset, layers=layers, trained=trained, precision=precision, concurrencies=concurrencies,
                              workloads=workloads, requests_per_user=requests_per_user, max_slots=max_slots, quick=quick, seed=seed, spinning=spinning,
                              serve_env=serve_env.resolve(), perf_env=perf_env.resolve())
    if threads:
        config = dc.replace(config, threads=threads)
    _measure(quick, lambda: run_serve_bench(config, out_dir, progress=progress), lambda results: write_serve(results, out_dir), serve_summary)


def _measure(quick: bool, run: Callable[[], Any], write: Callable[[Any], list[pathlib.Path]], summary: Callable[[Any], str]) -> None:
    """Run a benchmark with the console's progress, write its outputs, print its summary and the files."""
    if quick:
        progress.note("QUICK MODE: tiny model, smoke test only; numbers are not measurements")
    results = run()
    progress.close()
    files = write(results)
    click.echo(summary(results))
    for f in files:
        click.echo(str(f))


COMMANDS = (bench_cmd, bench_serve_cmd)
