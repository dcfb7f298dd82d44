"""Model subcommands: demo-model (export a demo MoE), inspect (list its blocks), dense-twin."""

from __future__ import annotations

import json
import pathlib

import click

from lynx_export.cli._common import Int, expected_errors, progress, refuse_unless, table, trained_option

SEED_MAX = 2**32 - 1  # numpy's and torch's generators take 32-bit seeds portably


@click.command("demo-model")
@click.argument("out", type=click.Path(path_type=pathlib.Path))
@click.option("--form", type=click.Choice(["dynamo", "genai"]), default="dynamo", show_default=True,
              help="dynamo: OUT is one ONNX file from torch.onnx.export(dynamo=True), attention by Concat (TensorRT parses it). "
                   "genai: OUT is an onnxruntime-genai model folder (GroupQueryAttention updating its KV cache in place, "
                   "com.microsoft.MoE, genai_config.json, a byte-level tokenizer.json).")
@click.option("--layers", default=2, show_default=True, type=Int(1, 64), help="Decoder layers.")
@click.option("--seed", default=0, show_default=True, type=Int(0, SEED_MAX), help="Weight initialisation seed.")
@trained_option("Export a shipped model trained on the standard library's source instead (4 layers, H 128; --layers and "
                "--seed do not apply)")
@click.pass_context
@expected_errors
def demo_model(ctx: click.Context, out: pathlib.Path, form: str, layers: int, seed: int, trained: str | None) -> None:
    """Write the demo Mixtral-style MoE LM (8 experts, top-2, SwiGLU, RoPE attention with a KV
    cache) to OUT, in the form --form names. Needs the `torch` extra.

    Without --trained the weights are random, with a synthetic router skew; --trained fine is
    the fine-grained shipped model (64 experts, top-8)."""
    from lynx_export.evaluation.demo import DemoConfig, build_demo_model, export_model
    from lynx_export.evaluation.genai_form import export_genai_model

    refuse_unless(ctx, not trained, ("layers", "seed"), "the random-weight demo model (without --trained)")
    if form == "genai" and out.exists() and not out.is_dir():
        raise click.UsageError(f"{out}: --form genai writes a folder, and this is a file")
    if form == "dynamo" and out.is_dir():
        raise click.UsageError(f"{out}: --form dynamo writes one ONNX file, and this is a folder")
    if trained:
        from lynx_export.evaluation.trained import load_trained_model, trained_model

        progress.note(f"exporting the {trained} trained model to {out}")
        model = load_trained_model(trained_model(trained).weights)
    else:
        progress.note(f"exporting the demo model ({layers} layers) to {out}")
        model = build_demo_model(DemoConfig(num_layers=layers, seed=seed))
    click.echo(str(export_genai_model(model, out) if form == "genai" else export_model(model, out)))


@click.command("inspect")
@click.argument("model", type=click.Path(path_type=pathlib.Path))
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of blocks instead of a table.")
@expected_errors
def inspect(model: pathlib.Path, as_json: bool) -> None:
    """List the MoE blocks found in MODEL.

    --json prints a list with one object per block: name, num_experts, top_k, hidden_size,
    expert_size, activation (with activation_alpha, activation_beta, swiglu_limit), router,
    normalize, supported, reason. A shared expert is never part of a block: it stays as the
    model's own nodes. Exits 1 when the model holds no MoE block.
    """
    from lynx_export.compiler.detect import detect
    from lynx_export.compiler.model_io import load_model
    from lynx_export.errors import DetectError

    candidates = [c.to_dict() for c in detect(load_model(model)).candidates]
    if as_json:
        click.echo(json.dumps(candidates, indent=2))
    elif candidates:
        keys = ["name", "num_experts", "top_k", "hidden_size", "expert_size", "activation", "router", "normalize", "supported", "reason"]
        heads = ["block", "E", "K", "H", "I", "activation", "router", "normalize", "supported", "reason"]
        for c in candidates:
            if c["activation"] and (c["activation_alpha"], c["activation_beta"], c["swiglu_limit"]) != (1.0, 0.0, None):
                c["activation"] += f"(alpha={c['activation_alpha']:g}, beta={c['activation_beta']:g}, limit={c['swiglu_limit']})"
        click.echo(table(heads, [["-" if c[k] is None else c[k] for k in keys] for c in candidates]))
    if not candidates:
        raise DetectError(f"{model}: no MoE block found")


@click.command("dense-twin")
@click.argument("model", type=click.Path(path_type=pathlib.Path))
@click.argument("out", type=click.Path(dir_okay=False, path_type=pathlib.Path))
@expected_errors
def dense_twin(model: pathlib.Path, out: pathlib.Path) -> None:
    """Write MODEL's dense twin to OUT: every MoE block becomes one dense SwiGLU FFN of width
    E*I (the experts concatenated), so total parameters match the MoE's, the router aside."""
    from lynx_export.bench.dense_twin import dense_twin as make_twin

    result = make_twin(model, out)
    click.echo(f"blocks replaced: {result.blocks}")
    click.echo(f"MoE parameters: {result.moe_parameters} (router {result.router_parameters})")
    click.echo(f"dense parameters: {result.dense_parameters} ({100 * result.relative_difference:.3f}% from the MoE without routers)")
    click.echo(str(result.path))


COMMANDS = (demo_model, inspect, dense_twin)
