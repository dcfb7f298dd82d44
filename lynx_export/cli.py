"""The `lynx-export` command line: each subcommand parses, calls one library function, prints."""

from __future__ import annotations

import functools
import json
import logging
import pathlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

import click

from lynx_export.errors import LynxError

__all__ = ["main"]


def _expected_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Print a LynxError as one line and exit with its code; anything else keeps its traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except LynxError as exc:
            click.echo(f"lynx-export: error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            # Staged output has been removed on the way out; what was there before is intact.
            click.echo("lynx-export: interrupted", err=True)
            sys.exit(130)

    return wrapper


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _progress(message: str) -> None:
    click.echo(f"[lynx-export] {message}", err=True)


def _int_list(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, ...]:
    try:
        items = tuple(int(x) for x in value.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got '{value}'") from None
    if not items or any(x < 1 for x in items):
        raise click.BadParameter(f"expected positive integers, got '{value}'")
    return items


def _choice_list(value: str, choices: Sequence[str], option: str) -> tuple[str, ...]:
    """Comma-separated names from `choices`, in the given order without repeats ("" is none)."""
    items = tuple(dict.fromkeys(x.strip() for x in value.split(",") if x.strip()))
    unknown = [x for x in items if x not in choices]
    if unknown:
        raise click.BadParameter(f"{option}: unknown {', '.join(map(repr, unknown))}; choose from {', '.join(choices)}")
    return items


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [list(map(str, headers))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lynx-export")
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages to stderr.")
def main(verbose: bool) -> None:
    """Compile MoE ONNX models into engines with batch-aware expert selection (LYNX)."""
    import signal

    # SIGTERM unwinds like Ctrl-C, so staged output is cleaned up rather than left half-written.
    signal.signal(signal.SIGTERM, _interrupt)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")


@main.command("demo-model")
@click.argument("out", type=click.Path(dir_okay=False, path_type=pathlib.Path))
@click.option("--layers", default=2, show_default=True, type=click.IntRange(1, 64), help="Decoder layers.")
@click.option("--seed", default=0, show_default=True, type=int, help="Weight initialisation seed.")
@click.option("--trained", is_flag=True, help="Export the shipped model trained on the standard library's source instead "
              "(4 layers, H 128; --layers and --seed do not apply).")
@_expected_errors
def demo_model(out: pathlib.Path, layers: int, seed: int, trained: bool) -> None:
    """Write the demo Mixtral-style MoE LM (8 experts, top-2, SwiGLU, RoPE attention with a KV
    cache) to OUT, exported by torch.onnx.export(dynamo=True). Needs the `torch` extra.

    Without --trained the weights are random, with a synthetic router skew."""
    from lynx_export.evaluation.demo import DemoConfig, export_demo_model, export_model

    if trained:
        from lynx_export.evaluation.trained import load_trained_model

        _progress(f"exporting the trained model to {out}")
        export_model(load_trained_model(), out)
    else:
        _progress(f"exporting the demo model ({layers} layers) to {out}")
        export_demo_model(out, DemoConfig(num_layers=layers, seed=seed))
    click.echo(str(out))


@main.command("inspect")
@click.argument("model", type=click.Path(path_type=pathlib.Path))
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of blocks instead of a table.")
@_expected_errors
def inspect(model: pathlib.Path, as_json: bool) -> None:
    """List the MoE blocks found in MODEL.

    --json prints a list with one object per block: name, num_experts, top_k, hidden_size,
    expert_size, activation (with activation_alpha, activation_beta, swiglu_limit), router,
    normalize, shared_expert, supported, reason. Exits 1 when the model holds no MoE block.
    """
    from lynx_export.compiler.detect import detect
    from lynx_export.errors import DetectError
    from lynx_export.compiler.model_io import load_model

    candidates = [c.to_dict() for c in detect(load_model(model)).candidates]
    if as_json:
        click.echo(json.dumps(candidates, indent=2))
    elif candidates:
        keys = ["name", "num_experts", "top_k", "hidden_size", "expert_size", "activation", "router", "normalize", "shared_expert", "supported", "reason"]
        heads = ["block", "E", "K", "H", "I", "activation", "router", "normalize", "shared", "supported", "reason"]
        for c in candidates:
            if c["activation"] and (c["activation_alpha"], c["activation_beta"], c["swiglu_limit"]) != (1.0, 0.0, None):
                c["activation"] += f"(alpha={c['activation_alpha']:g}, beta={c['activation_beta']:g}, limit={c['swiglu_limit']})"
        click.echo(_table(heads, [["-" if c[k] is None else c[k] for k in keys] for c in candidates]))
    if not candidates:
        raise DetectError(f"{model}: no MoE block found")


@main.command("build")
@click.argument("model", type=click.Path(path_type=pathlib.Path))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=pathlib.Path), help="Engine folder to write.")
@click.option("--backend", default="ort", show_default=True, type=click.Choice(["ort", "tensorrt-rtx", "tensorrt"]),
              help="Engine backend: ort, or also a TensorRT engine (model.plan) built with TensorRT-RTX (no GPU needed) or TensorRT (on a GPU).")
@click.option("--max-batch", default=256, show_default=True, type=click.IntRange(min=1), help="TensorRT decode profile: batch 1..N.")
@click.option("--max-sequence", default=1024, show_default=True, type=click.IntRange(min=2), help="TensorRT profiles: longest prompt and past.")
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(["fp32", "fp16", "bf16"]),
              help="--backend tensorrt: allow fp16 or bf16 kernels (TensorRT-RTX keeps the model's types).")
@click.option("--target", "targets", multiple=True, default=("8.0",), show_default=True,
              help="--backend tensorrt-rtx: GPU compute capability to build for (repeat for several).")
@click.option("--ort-experts", default="per-expert", show_default=True, type=click.Choice(["fused", "conditional", "per-expert"]),
              help="ORT expert implementation: one MatMul chain per expert over exactly its rows (per-expert: the fastest measured, "
                   "and the only one for quantized experts), com.microsoft.MoE (fused) or one If per expert (conditional).")
@click.option("--quantize", type=click.Choice(["int4", "int8"]), help="Quantize the expert weights (weight-only, block-wise; MatMulNBits).")
@click.option("--block-size", type=click.Choice(["16", "32", "64", "128", "256"]), default="32", show_default=True,
              help="--quantize: inputs per quantization block (must divide H and I).")
@click.option("--policy", default="lynx", show_default=True, type=click.Choice(["off", "lynx", "budget"]), help="Expert selection policy.")
@click.option("--alpha", type=click.FloatRange(min=0, min_open=True), help="LYNX bin resolution (default: the measured or the authors' value for E and K, see docs/ACCURACY.md).")
@click.option("--beta", type=click.IntRange(min=0), help="LYNX bin floor (default: the measured or the authors' value for E and K).")
@click.option("--budget", type=click.IntRange(min=1), help="Experts kept per batch with --policy budget.")
@click.option("--tie-break", default="logit", show_default=True, type=click.Choice(["logit", "index"]), help="How LYNX orders equal scores.")
@click.option("--batch-sizes", default="1,8,32", show_default=True, callback=_int_list, help="Verification batch sizes.")
@click.option("--seq-lens", default="1,16", show_default=True, callback=_int_list, help="Verification sequence lengths (1 = decode).")
@click.option("--tolerance", default=1e-4, show_default=True, type=click.FloatRange(min=0), help="Max abs difference where outputs must match.")
@click.option("--force", is_flag=True, help="Replace a non-empty output folder (and --triton-repo).")
@click.option("--triton-repo", type=click.Path(file_okay=False, path_type=pathlib.Path), help="Also write a Triton model repository here.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest and report as one JSON object.")
@_expected_errors
def build_cmd(model: pathlib.Path, out_dir: pathlib.Path, backend: str, max_batch: int, max_sequence: int, precision: str,
              targets: tuple[str, ...], ort_experts: str, quantize: str | None, block_size: str, policy: str,
              alpha: float | None, beta: int | None,
              budget: int | None, tie_break: str, batch_sizes: tuple[int, ...], seq_lens: tuple[int, ...], tolerance: float,
              force: bool, triton_repo: pathlib.Path | None, as_json: bool) -> None:
    """Compile MODEL into OUT: model.lynx.onnx (LynxMoE nodes), model.ort.onnx (runs on ONNX
    Runtime), manifest.json and report.json; with a TensorRT backend also model.plan.

    The build verifies the result against MODEL on random inputs: with --policy off, and in
    prefill steps (which keep the model's routing), outputs must match within --tolerance.
    Quantized experts (--quantize, or a QMoE source) are verified with float activations
    (MatMulNBits accuracy level 0) against their dequantized values within --tolerance; the
    built model's int8-activation error (level 4) and, with --quantize, the error against the
    unquantized MODEL are reported apart (report.json "kernel_error", "quantization_error").
    --json prints {"manifest": ..., "report": ...}.
    """
    from lynx_export.backends.tensorrt import EngineOptions
    from lynx_export.compiler.build import BuildOptions, PolicyChoice, build
    from lynx_export.compiler.quantize import QuantizeOptions
    from lynx_export.compiler.verify import VerifyOptions

    options = BuildOptions(
        quantize=None if quantize is None else QuantizeOptions(quantize, int(block_size)),
        engine=EngineOptions(max_batch=max_batch, opt_batch=min(8, max_batch), max_sequence=max_sequence, precision=precision, targets=targets),
        policy=PolicyChoice(policy, alpha=alpha, beta=beta, budget=budget, tie_break=tie_break),
        backend=backend,
        ort_experts=ort_experts,
        verify=VerifyOptions(batch_sizes=batch_sizes, seq_lens=seq_lens, tolerance=tolerance),
        force=force,
    )
    if triton_repo is not None:
        from lynx_export.compiler.output import check_out_dir

        check_out_dir(triton_repo, force)  # before the build, so a refusal costs nothing
    result = build(model, out_dir, options, progress=_progress)
    if triton_repo is not None:
        from lynx_export.serving.repository import TritonOptions, write_repository

        for served in write_repository(out_dir, triton_repo, TritonOptions(name=out_dir.name.replace(".", "_") or "lynx_moe", force=force)).models:
            _progress(f"triton model {served.name} ({served.kind}): {served.path}")
    if as_json:
        click.echo(json.dumps({"manifest": result.manifest, "report": result.report}, indent=2))
        return
    chosen = result.manifest["policy"]
    params = ", ".join(f"{k}={v}" for k, v in chosen.items() if k != "name")
    click.echo(f"policy: {chosen['name']}" + (f" ({params})" if params else ""))
    rows = [
        [c["batch"], c["seq_len"], c["phase"], f"{c['max_abs_diff']:.2e}", f"{c['mean_abs_diff']:.2e}",
         f"{c['mean_active_experts_model']:.2f}", f"{c['mean_active_experts_policy']:.2f}", f"{c['routing_agreement']:.3f}",
         "yes" if c["must_match"] else "no"]
        for c in result.report["cases"]
    ]
    click.echo(_table(["batch", "seq", "phase", "max|diff|", "mean|diff|", "active(model)", "active(policy)", "agreement", "must match"], rows))
    level = result.report.get("verified_at_accuracy_level")
    click.echo(f"verification: {'passed' if result.report['passed'] else 'FAILED'} (tolerance {result.report['tolerance']:g}"
               + (f", quantized experts with float activations: MatMulNBits accuracy level {level})" if level is not None else ")"))
    kernel = result.report.get("kernel_error")
    deviations = [(f"kernel error at accuracy level {kernel['accuracy_level']} (int8 activations) vs the dequantized experts", kernel["cases"])] if kernel else []
    if "quantization_error" in result.report:
        deviations.append(("quantization error vs the unquantized model", result.report["quantization_error"]))
    for block, error in result.report.get("quantization_weight_error", {}).items():
        click.echo(f"quantized weights of block {block}: relative RMS error {error:.3%}")
    for what, cases in deviations:
        for c in cases:
            click.echo(f"{what}: batch {c['batch']}, seq {c['seq_len']} ({c['phase']}): max {c['max_abs_diff']:.2e}, mean {c['mean_abs_diff']:.2e}")
    engine = result.manifest.get("engine")
    if engine:
        click.echo(f"engine: {engine['file']} by {engine['builder']['package']} {engine['builder']['version']} for {', '.join(engine['targets'])}, "
                   f"{engine['plugin']['layers']} {engine['plugin']['name']} plugin layer(s), profiles {', '.join(engine['profiles'])} "
                   "(built, not run: verification ran the ONNX Runtime model of the same graph)")
    click.echo(f"artifacts in {result.out_dir}:")
    for a in result.manifest["artifacts"]:
        click.echo(f"  {result.out_dir / a['file']}  ({a['bytes']} bytes)")
    click.echo(f"  {result.out_dir / 'manifest.json'}")


@main.command("dense-twin")
@click.argument("model", type=click.Path(path_type=pathlib.Path))
@click.argument("out", type=click.Path(dir_okay=False, path_type=pathlib.Path))
@_expected_errors
def dense_twin_cmd(model: pathlib.Path, out: pathlib.Path) -> None:
    """Write MODEL's dense twin to OUT: every MoE block becomes one dense SwiGLU FFN of width
    E*I (the experts concatenated), so total parameters match the MoE's, the router aside."""
    from lynx_export.bench.dense_twin import dense_twin

    result = dense_twin(model, out)
    click.echo(f"blocks replaced: {result.blocks}")
    click.echo(f"MoE parameters: {result.moe_parameters} (router {result.router_parameters})")
    click.echo(f"dense parameters: {result.dense_parameters} ({100 * result.relative_difference:.3f}% from the MoE without routers)")
    click.echo(str(result.path))


@main.command("bench")
@click.argument("model", required=False, type=click.Path(dir_okay=False, path_type=pathlib.Path))
@click.option("--out", "out_dir", default=pathlib.Path("engines/bench"), show_default=True, type=click.Path(file_okay=False, path_type=pathlib.Path),
              help="Folder for the built models and the results.")
@click.option("--preset", type=click.Choice(["demo", "mixtral", "fine"]),
              help="Benchmark model without MODEL [default: demo]: demo (E8 K2 H1024 I2048, at least 4 layers, the model of "
                   "docs/BENCHMARKS.md's first run), mixtral (E8 K2 H1024 I3584) or fine (E64 K8 H1024 I384); each has its layers "
                   "scaled so its fp32 expert weights exceed 4x this machine's last-level cache.")
@click.option("--quick", is_flag=True, help="Tiny model (or MODEL) and few batch sizes: a smoke test, not a measurement.")
@click.option("--batch-sizes", default=None, callback=lambda c, p, v: None if v is None else _int_list(c, p, v),
              help="Decode batch sizes [default: 1,2,4,...,256; quick: 1,2,4,8].")
@click.option("--context-len", default=128, show_default=True, type=click.IntRange(0), help="KV cache length of each decode step.")
@click.option("--repeats", default=None, type=click.IntRange(1), help="Timed steps per variant and batch size [default: 15; quick: 3].")
@click.option("--warmup", default=2, show_default=True, type=click.IntRange(0), help="Untimed steps before timing.")
@click.option("--threads", default=None, type=click.IntRange(1), help="ONNX Runtime threads [default: all cores].")
@click.option("--budget", default=None, type=click.IntRange(1), help="Also time the budget policy keeping this many experts.")
@click.option("--layers", default=None, type=click.IntRange(1), help="Decoder layers of the preset's model [default: scaled to the cache].")
@click.option("--trained", is_flag=True, help="Benchmark the shipped model trained on the standard library's source, decoding "
              "held-out text (real routing), instead of the large random-weight model.")
@click.option("--alpha", type=click.FloatRange(min=0, min_open=True), help="LYNX alpha of the moe+lynx variants [default: by E and K].")
@click.option("--beta", type=click.IntRange(min=0), help="LYNX beta of the moe+lynx variants [default: by E and K].")
@click.option("--ort-experts", default="fused,per-expert", show_default=True,
              callback=lambda ctx, param, value: _choice_list(value, ("fused", "conditional", "per-expert"), "--ort-experts"),
              help="Float expert implementations to time (comma-separated): fused, conditional, per-expert.")
@click.option("--quantize", default="", callback=lambda ctx, param, value: _choice_list(value, ("int4", "int8"), "--quantize"),
              help="Also time these expert precisions (comma-separated: int4, int8): per precision the MoE with its own routing "
                   "and with LYNX (per-expert MatMulNBits) and the dense twin quantized the same way.")
@click.option("--block-size", type=click.Choice(["16", "32", "64", "128", "256"]), default="32", show_default=True,
              help="--quantize: inputs per quantization block.")
@click.option("--no-profile", is_flag=True, help="Skip the profiled step that splits the MoE layers' time from the rest.")
@_expected_errors
def bench_cmd(model: pathlib.Path | None, out_dir: pathlib.Path, preset: str | None, quick: bool, batch_sizes: tuple[int, ...] | None,
              context_len: int, repeats: int | None, warmup: int, threads: int | None, budget: int | None, layers: int | None, trained: bool,
              alpha: float | None, beta: int | None, ort_experts: tuple[str, ...], quantize: tuple[str, ...], block_size: str,
              no_profile: bool) -> None:
    """Time decode steps of the dense twin, the MoE with its own routing and the MoE with LYNX,
    over batch sizes, on ONNX Runtime CPU; write results.json, results.csv, summary.md and
    PNG plots to --out.

    Without MODEL the model is a --preset exported with random weights (needs the `torch`
    extra), or with --trained the shipped trained model. With MODEL, any ONNX model the pass
    supports: its decode step comes from its own inputs (the first input's dims 0/1 are batch
    and sequence, a past KV cache gets --context-len; a graph without a sequence axis, such as a
    bare MoE stack on [T,H], runs T = batch rows). Refuses to start when the variants would not
    fit in memory together. Plots need matplotlib.
    """
    import dataclasses as dc

    from lynx_export.bench.benchmark import BenchConfig, planned_runs, run_bench, summary_markdown, write_outputs
    from lynx_export.compiler.build import PolicyChoice
    from lynx_export.errors import DataError

    if model is not None and (preset or layers or trained):
        raise DataError("MODEL and --preset / --layers / --trained are exclusive: MODEL is benchmarked as it is")
    if trained:
        from lynx_export.evaluation.demo import DemoConfig
        from lynx_export.evaluation.trained import read_metadata

        if quick or layers or preset:
            raise DataError("--trained benchmarks the shipped model as trained: --quick, --layers and --preset do not apply")
        config = BenchConfig(model=DemoConfig(**read_metadata()["model"]), preset=None)
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
        ort_experts=ort_experts, quantize=quantize, block_size=int(block_size), profile=not no_profile,
        batch_sizes=batch_sizes or ((1, 2, 4, 8) if quick else config.batch_sizes),
        repeats=repeats or (3 if quick else config.repeats),
        threads=threads or config.threads,
    )
    if quick:
        _progress("QUICK MODE: tiny model, smoke test only; numbers are not measurements")
    with click.progressbar(length=planned_runs(config), label="timing", file=sys.stderr) as bar:
        results = run_bench(config, out_dir, progress=_progress, tick=lambda: bar.update(1))
    files = write_outputs(results, out_dir)
    click.echo(summary_markdown(results))
    for f in files:
        click.echo(str(f))


def _text_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Options shared by the commands that run the trained model on text."""
    for option in reversed([
        click.option("--weights", type=click.Path(dir_okay=False, path_type=pathlib.Path), default=None,
                     help="Trained weights (.npz with its .json) [default: the shipped model]."),
        click.option("--data", multiple=True, type=click.Path(path_type=pathlib.Path),
                     help="Text files or folders to run on (repeatable) [default: the held-out split of the standard library's source]."),
        click.option("--sequences", default=256, show_default=True, type=click.IntRange(1), help="Sequences taken from the text."),
        click.option("--seq-len", default=128, show_default=True, type=click.IntRange(2), help="Tokens (bytes) per sequence."),
    ]):
        fn = option(fn)
    return fn


def _load_text(weights: pathlib.Path | None, data: tuple[pathlib.Path, ...], sequences: int, seq_len: int):
    from lynx_export.evaluation import corpus
    from lynx_export.evaluation.trained import WEIGHTS, load_trained_model

    model = load_trained_model(weights or WEIGHTS)
    text = corpus.text_corpus(list(data)) if data else corpus.stdlib_corpus("held_out")
    source = ", ".join(map(str, data)) if data else f"held-out split of the standard library at {corpus.stdlib_root()}"
    return model, text.sequences(sequences, seq_len), source


def _check_batches(batch_sizes: tuple[int, ...], sequences: int) -> None:
    from lynx_export.errors import DataError

    if max(batch_sizes) > sequences:
        raise DataError(f"batch size {max(batch_sizes)} is larger than --sequences {sequences}")


@main.command("eval")
@_text_options
@click.option("--out", "out_dir", default=pathlib.Path("engines/accuracy"), show_default=True,
              type=click.Path(file_okay=False, path_type=pathlib.Path), help="Folder for the results and the compiled model.")
@click.option("--batch-sizes", default="1,4,16,64", show_default=True, callback=_int_list, help="Decode batch sizes.")
@click.option("--grid/--no-grid", default=True, show_default=True, help="Sweep LYNX alpha x beta and budget sizes (else: off and the default).")
@click.option("--onnx/--no-onnx", "onnx_check", default=True, show_default=True,
              help="Also decode through the compiled ONNX Runtime model with the default policy and compare.")
@click.option("--quantize", "quantize", default="", callback=lambda ctx, param, value: _choice_list(value, ("int4", "int8"), "--quantize"),
              help="Also compile with quantized experts (comma-separated: int4,int8) and decode through ONNX Runtime, with the "
                   "model's routing and the default policy.")
@click.option("--threads", default=2, show_default=True, type=click.IntRange(1), help="torch and ONNX Runtime threads.")
@_expected_errors
def eval_cmd(weights: pathlib.Path | None, data: tuple[pathlib.Path, ...], sequences: int, seq_len: int, out_dir: pathlib.Path,
             batch_sizes: tuple[int, ...], grid: bool, onnx_check: bool, quantize: tuple[str, ...], threads: int) -> None:
    """Measure next-token accuracy, perplexity, active experts per layer and routing agreement of
    the trained model under batched teacher-forced decode, for its own routing and each policy;
    write results.json, results.csv, summary.md and pareto.png to --out. Needs the `torch` extra."""
    from lynx_export.evaluation.accuracy import AccuracyConfig, run_accuracy, summary_markdown, write_outputs

    _check_batches(batch_sizes, sequences)
    model, ids, source = _load_text(weights, data, sequences, seq_len)
    if quantize and not onnx_check:
        raise click.UsageError("--quantize decodes through the compiled model: it needs --onnx")
    config = AccuracyConfig(batch_sizes=batch_sizes, sequences=sequences, seq_len=seq_len, grid=grid,
                            onnx_batch_sizes=batch_sizes if onnx_check else (), quantize=quantize, threads=threads)
    results = run_accuracy(model, ids, config, out_dir, progress=_progress, source={"text": source})
    files = write_outputs(results, out_dir)
    click.echo(summary_markdown(results))
    for f in files:
        click.echo(str(f))


@main.command("trace")
@_text_options
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False, path_type=pathlib.Path), help="Trace file to write (.npz).")
@_expected_errors
def trace_cmd(weights: pathlib.Path | None, data: tuple[pathlib.Path, ...], sequences: int, seq_len: int, out: pathlib.Path) -> None:
    """Record the trained model's router logits per layer and position on text into a trace file.

    To trace your own torch MoE model, call lynx_export.evaluation.trace.record_trace with its router
    modules (see docs/ACCURACY.md). Needs the `torch` extra."""
    from lynx_export.evaluation.demo import logits_from_start, moe_blocks
    from lynx_export.evaluation.trace import record_trace

    model, ids, source = _load_text(weights, data, sequences, seq_len)
    for block in moe_blocks(model):
        block.dispatch = "loop"

    def run(batch):
        import torch

        logits_from_start(model, torch.from_numpy(batch))

    trace = record_trace([b.gate for b in moe_blocks(model)], run, ids, model.config.top_k, source=source, progress=_progress)
    trace.save(out)
    n, s, e = trace.shape
    click.echo(f"{out}: {len(trace.logits)} layers x {n} sequences x {s} positions x {e} experts")


@main.command("replay")
@click.argument("trace_file", metavar="TRACE", type=click.Path(dir_okay=False, path_type=pathlib.Path))
@click.option("--batch-sizes", default="1,4,16,64", show_default=True, callback=_int_list, help="Decode batch sizes.")
@click.option("--grid/--no-grid", default=False, show_default=True, help="Replay LYNX over alpha x beta and budget sizes (else: off and the default).")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
@_expected_errors
def replay_cmd(trace_file: pathlib.Path, batch_sizes: tuple[int, ...], grid: bool, as_json: bool) -> None:
    """Run the selection policies on a router trace, per batch size: mean active experts per layer
    and step, distinct first choices (no policy that keeps every token's first choice goes below
    them), routing agreement, and the share of first choices kept. The trace's later layers are not affected by remapping;
    `lynx-export eval` measures that."""
    from lynx_export.evaluation.sweep import policy_grid
    from lynx_export.evaluation.trace import RouterTrace, replay

    trace = RouterTrace.load(trace_file)
    _check_batches(batch_sizes, trace.shape[0])
    rows = replay(trace, policy_grid(trace.shape[2], trace.top_k, grid), batch_sizes)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(_table(
        ["batch", "policy", "active (model)", "active (policy)", "first choices", "agreement", "first kept", "steps"],
        [[r["batch"], r["policy"], f"{r['active_experts_model'][0]:.2f}", f"{r['active_experts_policy'][0]:.2f}",
          f"{r['first_choices'][0]:.2f}", f"{r['routing_agreement'][0]:.3f}", f"{r['first_choice_kept'][0]:.3f}", r["steps"]] for r in rows],
    ))


def _triton_options(name: str, max_batch_size: int, preferred: tuple[int, ...], delay_us: int, instances: int, threads: int, force: bool):
    from lynx_export.serving.repository import TritonOptions

    return TritonOptions(name=name, max_batch_size=max_batch_size, preferred_batch_sizes=preferred, max_queue_delay_us=delay_us,
                         instances=instances, threads=threads, force=force)


@main.command("triton")
@click.argument("build_dir", type=click.Path(file_okay=False, path_type=pathlib.Path))
@click.option("--repo", required=True, type=click.Path(file_okay=False, path_type=pathlib.Path), help="Model repository folder to write.")
@click.option("--name", default="lynx_moe", show_default=True, help="Model name (the CPU model is NAME_cpu).")
@click.option("--max-batch-size", default=64, show_default=True, type=click.IntRange(1), help="Triton max_batch_size.")
@click.option("--preferred-batch-sizes", default="8,16,32", show_default=True, callback=_int_list, help="Dynamic batcher's preferred sizes.")
@click.option("--max-queue-delay-us", default=2000, show_default=True, type=click.IntRange(0), help="Dynamic batcher's queue delay.")
@click.option("--instances", default=1, show_default=True, type=click.IntRange(1), help="Model instances.")
@click.option("--threads", default=0, show_default=True, type=click.IntRange(0), help="ONNX Runtime threads per CPU instance (0: default).")
@click.option("--force", is_flag=True, help="Replace a non-empty repository folder.")
@_expected_errors
def triton_cmd(build_dir: pathlib.Path, repo: pathlib.Path, name: str, max_batch_size: int, preferred_batch_sizes: tuple[int, ...],
               max_queue_delay_us: int, instances: int, threads: int, force: bool) -> None:
    """Write a Triton Inference Server model repository for BUILD_DIR (a `build` output): a CPU
    model (python backend running model.ort.onnx) and, when the build holds model.plan, a
    tensorrt_plan model. Configs are validated against Triton's schema before writing."""
    from lynx_export.serving.repository import write_repository

    options = _triton_options(name, max_batch_size, preferred_batch_sizes, max_queue_delay_us, instances, threads, force)
    result = write_repository(build_dir, repo, options)
    for model in result.models:
        click.echo(f"{model.name} ({model.kind}): {model.path}")


@main.command("serve")
@click.argument("repos", nargs=-1, required=True, type=click.Path(file_okay=False, exists=True, path_type=pathlib.Path))
@click.option("--env", "env", default=pathlib.Path(".venv-serve"), show_default=True, type=click.Path(file_okay=False, path_type=pathlib.Path),
              help="Python environment holding nvidia-pytriton, numpy<2 and onnxruntime.")
@_expected_errors
def serve_cmd(repos: tuple[pathlib.Path, ...], env: pathlib.Path) -> None:
    """Serve model repositories REPOS with Triton Inference Server on 127.0.0.1 until Ctrl-C."""
    import signal
    import threading

    from lynx_export.serving.server import TritonServer

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with TritonServer(list(repos), env) as server:
        click.echo(f"serving {', '.join(map(str, repos))}: HTTP {server.http_url}, gRPC {server.grpc_url} (Ctrl-C stops)")
        try:
            while not stop.wait(0.5):
                if server.process.poll() is not None:
                    raise click.ClickException(f"tritonserver exited: {server.log_tail(5)}")
        except KeyboardInterrupt:
            pass
    click.echo("stopped")


if __name__ == "__main__":
    main()
