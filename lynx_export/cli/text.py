"""Subcommands that run the trained model on text: eval (accuracy sweep), trace, replay."""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable
from typing import Any

import click

from lynx_export.cli._common import ChoiceList, Int, IntList, expected_errors, progress, table, trained_option

MAX_SEQUENCES = 1_000_000  # the shipped corpus holds far fewer; the corpus refuses what it lacks
MAX_SEQ_LEN = 65536
MAX_THREADS = 1024


def _text_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Options shared by the commands that run the trained model on text."""
    for option in reversed([
        trained_option("Which shipped trained model to run [default: coarse]"),
        click.option("--weights", type=click.Path(dir_okay=False, path_type=pathlib.Path), default=None,
                     help="Trained weights (.npz with its .json) instead of a shipped model's."),
        click.option("--data", multiple=True, type=click.Path(path_type=pathlib.Path),
                     help="Text files or folders to run on (repeatable) [default: the held-out split of the standard library's source]."),
        click.option("--sequences", default=256, show_default=True, type=Int(1, MAX_SEQUENCES), help="Sequences taken from the text."),
        click.option("--seq-len", default=128, show_default=True, type=Int(2, MAX_SEQ_LEN), help="Tokens (bytes) per sequence."),
    ]):
        fn = option(fn)
    return fn


def _load_text(trained: str | None, weights: pathlib.Path | None, data: tuple[pathlib.Path, ...], sequences: int, seq_len: int):
    from lynx_export.evaluation import corpus
    from lynx_export.evaluation.trained import DEFAULT_TRAINED, load_trained_model, trained_model

    if trained and weights:
        raise click.UsageError("--trained and --weights are exclusive: --weights names the model to run", ctx=click.get_current_context())
    model = load_trained_model(weights or trained_model(trained or DEFAULT_TRAINED).weights)
    text = corpus.text_corpus(list(data)) if data else corpus.stdlib_corpus("held_out")
    source = ", ".join(map(str, data)) if data else f"held-out split of the standard library at {corpus.stdlib_root()}"
    return model, text.sequences(sequences, seq_len), source


def _check_batches(batch_sizes: tuple[int, ...], sequences: int, what: str, error: type[Exception]) -> None:
    if max(batch_sizes) > sequences:
        raise error(f"--batch-sizes: batch size {max(batch_sizes)} is larger than {what} ({sequences})")


@click.command("eval")
@_text_options
@click.option("--out", "out_dir", default=pathlib.Path("engines/accuracy"), show_default=True,
              type=click.Path(file_okay=False, path_type=pathlib.Path), help="Folder for the results and the compiled model.")
@click.option("--batch-sizes", default="1,4,16,64", show_default=True, type=IntList(1, MAX_SEQUENCES), help="Decode batch sizes.")
@click.option("--grid/--no-grid", default=True, show_default=True, help="Sweep LYNX alpha x beta and budget sizes (else: off and the default).")
@click.option("--onnx/--no-onnx", "onnx_check", default=True, show_default=True,
              help="Also decode through the compiled ONNX Runtime model with the default policy and compare.")
@click.option("--quantize", "quantize", default="", type=ChoiceList(("int4", "int8")),
              help="Also compile with quantized experts (comma-separated: int4,int8) and decode through ONNX Runtime, with the "
                   "model's routing and the default policy.")
@click.option("--threads", default=2, show_default=True, type=Int(1, MAX_THREADS), help="torch and ONNX Runtime threads.")
@click.pass_context
@expected_errors
def eval_cmd(ctx: click.Context, trained: str | None, weights: pathlib.Path | None, data: tuple[pathlib.Path, ...], sequences: int, seq_len: int, out_dir: pathlib.Path,
             batch_sizes: tuple[int, ...], grid: bool, onnx_check: bool, quantize: tuple[str, ...], threads: int) -> None:
    """Measure next-token accuracy, perplexity, active experts per layer and routing agreement of
    the trained model under batched teacher-forced decode, for its own routing and each policy;
    write results.json, results.csv, summary.md and pareto.png to --out. Needs the `torch` extra."""
    from lynx_export.evaluation.accuracy import AccuracyConfig, run_accuracy, summary_markdown, write_outputs

    _check_batches(batch_sizes, sequences, "--sequences", click.UsageError)
    if quantize and not onnx_check:
        raise click.UsageError("--quantize decodes through the compiled model: it needs --onnx", ctx=ctx)
    model, ids, source = _load_text(trained, weights, data, sequences, seq_len)
    config = AccuracyConfig(batch_sizes=batch_sizes, sequences=sequences, seq_len=seq_len, grid=grid,
                            onnx_batch_sizes=batch_sizes if onnx_check else (), quantize=quantize, threads=threads)
    results = run_accuracy(model, ids, config, out_dir, progress=progress, source={"text": source})
    progress.close()
    files = write_outputs(results, out_dir)
    click.echo(summary_markdown(results))
    for f in files:
        click.echo(str(f))


@click.command("trace")
@_text_options
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False, path_type=pathlib.Path), help="Trace file to write (.npz).")
@expected_errors
def trace_cmd(trained: str | None, weights: pathlib.Path | None, data: tuple[pathlib.Path, ...], sequences: int, seq_len: int, out: pathlib.Path) -> None:
    """Record the trained model's router logits per layer and position on text into a trace file.

    To trace your own torch MoE model, call lynx_export.evaluation.trace.record_trace with its router
    modules (see docs/ACCURACY.md). Needs the `torch` extra."""
    from lynx_export.evaluation.demo import logits_from_start, moe_blocks, set_dispatch
    from lynx_export.evaluation.trace import expert_load, record_trace

    model, ids, source = _load_text(trained, weights, data, sequences, seq_len)
    set_dispatch(model, "grouped")

    def run(batch):
        import torch

        logits_from_start(model, torch.from_numpy(batch))

    trace = record_trace([b.gate for b in moe_blocks(model)], run, ids, model.config.top_k, source=source, progress=progress)
    progress.close()
    trace.save(out)
    n, s, e = trace.shape
    click.echo(f"{out}: {len(trace.logits)} layers x {n} sequences x {s} positions x {e} experts")
    click.echo("expert load of the model's own top-K picks (share against the even 1/E; balance 1.0 = even use):")
    click.echo(table(["layer", "max share / even", "min share / even", "unused experts", "balance"],
                     [[r["layer"], f"{r['max_over_even']:.2f}", f"{r['min_over_even']:.2f}", r["unused_experts"], f"{r['balance']:.3f}"]
                      for r in expert_load(trace)]))


@click.command("replay")
@click.argument("trace_file", metavar="TRACE", type=click.Path(dir_okay=False, path_type=pathlib.Path))
@click.option("--batch-sizes", default="1,4,16,64", show_default=True, type=IntList(1, MAX_SEQUENCES), help="Decode batch sizes.")
@click.option("--grid/--no-grid", default=False, show_default=True, help="Replay LYNX over alpha x beta and budget sizes (else: off and the default).")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
@expected_errors
def replay_cmd(trace_file: pathlib.Path, batch_sizes: tuple[int, ...], grid: bool, as_json: bool) -> None:
    """Run the selection policies on a router trace, per batch size: mean active experts per layer
    and step, distinct first choices (no policy that keeps every token's first choice goes below
    them), routing agreement, and the share of first choices kept. The trace's later layers are not affected by remapping;
    `lynx-export eval` measures that."""
    from lynx_export.evaluation.sweep import policy_grid
    from lynx_export.errors import DataError
    from lynx_export.evaluation.trace import RouterTrace, replay

    trace = RouterTrace.load(trace_file)
    _check_batches(batch_sizes, trace.shape[0], f"the trace's sequences in {trace_file}", DataError)
    rows = replay(trace, policy_grid(trace.shape[2], trace.top_k, grid), batch_sizes)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(table(
        ["batch", "policy", "active (model)", "active (policy)", "first choices", "agreement", "first kept", "steps"],
        [[r["batch"], r["policy"], f"{r['active_experts_model'][0]:.2f}", f"{r['active_experts_policy'][0]:.2f}",
          f"{r['first_choices'][0]:.2f}", f"{r['routing_agreement'][0]:.3f}", f"{r['first_choice_kept'][0]:.3f}", r["steps"]] for r in rows],
    ))


COMMANDS = (eval_cmd, trace_cmd, replay_cmd)
