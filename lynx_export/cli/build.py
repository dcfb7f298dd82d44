"""`lynx-export build`: compile a model, verify it, print the report."""

from __future__ import annotations

import json
import pathlib

import click

from lynx_export.errors import ToleranceError
from lynx_export.compiler.lowering import DEFAULT_EXPERTS, EXPERT_IMPLEMENTATIONS, QUANTIZED_IMPLEMENTATIONS
from lynx_export.cli._common import DimSize, Float32, Int, IntList, expected_errors, progress, refuse_unless, table

# Tokens (batch x sequence) of one verification case: it runs the original and the compiled model
# on random inputs, so a case must fit in memory beside the model.
MAX_CASE_TOKENS = 65536


def _check_combinations(ctx: click.Context, policy: str, backend: str, quantize: str | None, ort_experts: str,
                        batch_sizes: tuple[int, ...], seq_lens: tuple[int, ...]) -> None:
    """Usage errors (exit 2) for options that contradict each other, before anything is read."""
    if policy == "budget" and ctx.params["budget"] is None:
        raise click.UsageError("--policy budget needs --budget N (experts kept per batch)", ctx=ctx)
    refuse_unless(ctx, policy == "budget", ("budget",), "--policy budget")
    refuse_unless(ctx, policy == "lynx", ("alpha", "beta", "tie_break"), "--policy lynx")
    refuse_unless(ctx, quantize is not None, ("block_size",), "--quantize")
    refuse_unless(ctx, backend != "ort", ("max_batch", "max_sequence"), "--backend tensorrt and tensorrt-rtx")
    refuse_unless(ctx, backend == "tensorrt", ("precision",), "--backend tensorrt")
    refuse_unless(ctx, backend == "tensorrt-rtx", ("targets",), "--backend tensorrt-rtx")
    if quantize is not None and ort_experts not in QUANTIZED_IMPLEMENTATIONS:
        raise click.UsageError(f"--quantize runs on --ort-experts {' or '.join(QUANTIZED_IMPLEMENTATIONS)} only, not {ort_experts}", ctx=ctx)
    if quantize is not None and backend != "ort":
        # Refused here rather than after the rewrite, quantization, lowering and verification.
        raise click.UsageError(f"--quantize runs on --backend ort only: the TensorRT plugin does not implement quantized experts yet, "
                               f"so --backend {backend} cannot build them", ctx=ctx)
    largest = max(batch_sizes) * max(seq_lens)
    if largest > MAX_CASE_TOKENS:
        raise click.UsageError(f"--batch-sizes x --seq-lens: the largest case has {largest} tokens, over {MAX_CASE_TOKENS} per case", ctx=ctx)
    out = ctx.params["out_dir"].resolve()
    repo = ctx.params["triton_repo"]
    if repo is not None and (repo.resolve() == out or repo.resolve().is_relative_to(out) or out.is_relative_to(repo.resolve())):
        raise click.UsageError("--triton-repo and --out must be separate folders, neither inside the other", ctx=ctx)


@click.command("build")
@click.argument("model", type=click.Path(path_type=pathlib.Path))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=pathlib.Path), help="Engine folder to write.")
@click.option("--backend", default="ort", show_default=True, type=click.Choice(["ort", "tensorrt-rtx", "tensorrt"]),
              help="Engine backend: ort, or also a TensorRT engine (model.plan) built with TensorRT-RTX (no GPU needed) or TensorRT (on a GPU).")
@click.option("--max-batch", default=256, show_default=True, type=Int(1), help="TensorRT decode profile: batch 1..N.")
@click.option("--max-sequence", default=1024, show_default=True, type=Int(2), help="TensorRT profiles: longest prompt and past.")
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(["fp32", "fp16", "bf16"]),
              help="--backend tensorrt: allow fp16 or bf16 kernels (TensorRT-RTX keeps the model's types).")
@click.option("--target", "targets", multiple=True, default=("8.0",), show_default=True,
              help="--backend tensorrt-rtx: GPU compute capability to build for (repeat for several).")
@click.option("--ort-experts", default=DEFAULT_EXPERTS, show_default=True, type=click.Choice(EXPERT_IMPLEMENTATIONS),
              help="ORT expert implementation: one MatMul chain per expert over exactly its rows (per-expert: the fastest measured, "
                   "and the only one for quantized experts), or com.microsoft.MoE (fused).")
@click.option("--quantize", type=click.Choice(["int4", "int8"]), help="Quantize the expert weights (weight-only, block-wise; MatMulNBits).")
@click.option("--block-size", type=click.Choice(["16", "32", "64", "128", "256"]), default="32", show_default=True,
              help="--quantize: inputs per quantization block (must divide H and I).")
@click.option("--policy", default="lynx", show_default=True, type=click.Choice(["off", "lynx", "budget"]), help="Expert selection policy.")
@click.option("--alpha", type=Float32(min=0, min_open=True), help="LYNX bin resolution (default: the measured or the authors' value for E and K, see docs/ACCURACY.md).")
@click.option("--beta", type=Int(0), help="LYNX bin floor (default: the measured or the authors' value for E and K).")
@click.option("--budget", type=Int(1), help="Experts kept per batch with --policy budget.")
@click.option("--tie-break", default="logit", show_default=True, type=click.Choice(["logit", "index"]), help="How LYNX orders equal scores.")
@click.option("--batch-sizes", default="1,8,32", show_default=True, type=IntList(1, MAX_CASE_TOKENS), help="Verification batch sizes.")
@click.option("--seq-lens", default="1,16", show_default=True, type=IntList(1, MAX_CASE_TOKENS), help="Verification sequence lengths (1 = decode).")
@click.option("--dim", "dims", multiple=True, type=DimSize(1, MAX_CASE_TOKENS),
              help="Size of a named input dimension verification cannot tell from the model or its folder (NAME=SIZE, repeatable; "
                   "e.g. --dim kv_cache_dim=64).")
@click.option("--tolerance", default=1e-4, show_default=True, type=Float32(min=0), help="Max abs difference where outputs must match.")
@click.option("--force", is_flag=True, help="Replace a non-empty output folder (and --triton-repo).")
@click.option("--triton-repo", type=click.Path(file_okay=False, path_type=pathlib.Path), help="Also write a Triton model repository here.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest and report as one JSON object.")
@click.pass_context
@expected_errors
def build_cmd(ctx: click.Context, model: pathlib.Path, out_dir: pathlib.Path, backend: str, max_batch: int, max_sequence: int, precision: str,
              targets: tuple[str, ...], ort_experts: str, quantize: str | None, block_size: str, policy: str,
              alpha: float | None, beta: int | None,
              budget: int | None, tie_break: str, batch_sizes: tuple[int, ...], seq_lens: tuple[int, ...], dims: tuple[tuple[str, int], ...], tolerance: float,
              force: bool, triton_repo: pathlib.Path | None, as_json: bool) -> None:
    """Compile MODEL into OUT: model.lynx.onnx (LynxMoE nodes), model.ort.onnx (runs on ONNX
    Runtime), manifest.json and report.json; with a TensorRT backend also model.plan.

    MODEL is an ONNX file, or an onnxruntime-genai model folder (genai_config.json): its decoder
    model is compiled and OUT becomes a folder onnxruntime-genai loads (the compiled model under
    the config's file name, the config and tokenizer files beside it).

    The build verifies the result against MODEL on random inputs: with --policy off, and in
    prefill steps (which keep the model's routing), outputs must match within --tolerance.
    Quantized experts (--quantize, or a QMoE source) are verified with float activations
    (MatMulNBits accuracy level 0) against their dequantized values within --tolerance; the
    built model's int8-activation error (level 4) and, with --quantize, the error against the
    unquantized MODEL are reported apart (report.json "kernel_error", "quantization_error").
    --json prints {"manifest": ..., "report": ...}.
    """
    _check_combinations(ctx, policy, backend, quantize, ort_experts, batch_sizes, seq_lens)
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
        verify=VerifyOptions(batch_sizes=batch_sizes, seq_lens=seq_lens, tolerance=tolerance, dims=dims),
        force=force,
    )
    if triton_repo is not None:
        from lynx_export.compiler.output import check_out_dir

        check_out_dir(triton_repo, force)  # before the build, so a refusal costs nothing
    try:
        result = build(model, out_dir, options, progress=progress)
    except ToleranceError as exc:
        if as_json:  # the failure as data too; the one-line error still follows on stderr
            click.echo(json.dumps({"error": str(exc), "cases": list(exc.cases)}, indent=2))
        raise
    progress.close()
    if triton_repo is not None:
        from lynx_export.serving.repository import TritonOptions, write_repository

        for served in write_repository(out_dir, triton_repo, TritonOptions(name=out_dir.name.replace(".", "_") or "lynx_moe", force=force)).models:
            progress.note(f"triton model {served.name} ({served.kind}): {served.path}")
    if as_json:
        click.echo(json.dumps({"manifest": result.manifest.to_json(), "report": result.report.to_json()}, indent=2))
        return
    manifest, report = result.manifest, result.report
    if not manifest.blocks:  # nothing rewritten: no policy applies and nothing was compared
        click.echo(f"no block rewritten: {model} compiles unchanged; no policy applies and nothing was verified")
        _print_artifacts(result)
        return
    chosen = manifest.policy
    params = ", ".join(f"{k}={v}" for k, v in chosen.items() if k != "name")
    click.echo(f"policy: {chosen['name']}" + (f" ({params})" if params else ""))
    rows = [
        [c.batch, c.seq_len, c.phase, f"{c.max_abs_diff:.2e}", f"{c.mean_abs_diff:.2e}",
         f"{c.routing.mean_active_experts_model:.2f}", f"{c.routing.mean_active_experts_policy:.2f}", f"{c.routing.routing_agreement:.3f}",
         "yes" if c.must_match else "no"]
        for c in report.comparison.cases
    ]
    click.echo(table(["batch", "seq", "phase", "max|diff|", "mean|diff|", "active(model)", "active(policy)", "agreement", "must match"], rows))
    level = report.verified_at_accuracy_level
    click.echo(f"verification: {'passed' if report.passed else 'FAILED'} (tolerance {report.comparison.tolerance:g}"
               + (f", quantized experts with float activations: MatMulNBits accuracy level {level})" if level is not None else ")"))
    kernel = report.kernel_error
    deviations = [(f"kernel error at accuracy level {kernel.accuracy_level} (int8 activations) vs the dequantized experts", kernel.cases)] if kernel else []
    if report.quantization_error is not None:
        deviations.append(("quantization error vs the unquantized model", report.quantization_error))
    for block, error in (report.quantization_weight_error or {}).items():
        click.echo(f"quantized weights of block {block}: relative RMS error {error:.3%}")
    for what, cases in deviations:
        for c in cases:
            click.echo(f"{what}: batch {c.batch}, seq {c.seq_len} ({c.phase}): max {c.max_abs_diff:.2e}, mean {c.mean_abs_diff:.2e}")
    engine = manifest.engine
    if engine:
        click.echo(f"engine: {engine.file} by {engine.builder.package} {engine.builder.version} for {', '.join(engine.targets)}, "
                   f"{engine.plugin.layers} {engine.plugin.name} plugin layer(s), profiles {', '.join(engine.profiles)} "
                   "(built, not run: verification ran the ONNX Runtime model of the same graph)")
    replay = report.comparison.replay
    if replay:
        click.echo(f"replay the verification ({replay.cases} cases; expected outputs: {replay.expected_from}), in {result.out_dir}:")
        for c in replay.commands or ():
            click.echo(f"  {c.command}")
            click.echo(f"    needs {c.needs}")
    _print_artifacts(result)


def _print_artifacts(result) -> None:
    from lynx_export.compiler.results import MANIFEST_NAME

    click.echo(f"artifacts in {result.out_dir}:")
    for a in result.manifest.artifacts:
        click.echo(f"  {result.out_dir / a.file}  ({a.bytes} bytes)")
    click.echo(f"  {result.out_dir / MANIFEST_NAME}")


COMMANDS = (build_cmd,)
