"""The accuracy sweep: policies x batch sizes on held-out text, the compiled-model check, the
default-policy choice, and the result files (JSON, CSV, markdown summary, Pareto plot)."""

from __future__ import annotations

import dataclasses
import math
import pathlib
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lynx_export.compiler.build import BuildOptions, PolicyChoice, build
from lynx_export.evaluation.demo import export_model
from lynx_export.evaluation.decode import compare_predictions, decode_onnx, decode_torch, summarize
from lynx_export.compiler.output import write_results
from lynx_export.compiler.quantize import QuantizeOptions
from lynx_export.routing import AUTHORS_LYNX_PARAMS, LynxPolicy, OffPolicy, SelectionPolicy
from lynx_export.evaluation.sweep import policy_grid, policy_label
from lynx_export.compiler.verify import VerifyOptions
from lynx_export.progress import SILENT, Progress

__all__ = ["AccuracyConfig", "run_accuracy", "choose_default", "write_outputs", "MAX_ACCURACY_DROP_PP"]

# The bar a default policy must meet: next-token accuracy within 1 percentage point of the model's routing.
MAX_ACCURACY_DROP_PP = 1.0
# Batch sizes at which the default must cut active experts (and hold accuracy).
SERVING_BATCH = 16


@dataclass(frozen=True)
class AccuracyConfig:
    batch_sizes: tuple[int, ...] = (1, 4, 16, 64)
    sequences: int = 256
    seq_len: int = 128
    grid: bool = True  # False: only off and the default LYNX policy
    onnx_batch_sizes: tuple[int, ...] = (1, 4, 16, 64)  # () skips the compiled-model check
    # Quantized expert precisions ("int4", "int8") also compiled and decoded through ONNX Runtime,
    # with the model's routing and with the default policy.
    quantize: tuple[str, ...] = ()
    threads: int = 2
    seed: int = 0


def run_accuracy(
    model,
    sequences: np.ndarray,
    config: AccuracyConfig,
    work_dir: pathlib.Path,
    progress: Progress = SILENT,
    source: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Sweep every policy at every batch size on the torch model, check the default policy through
    the compiled ONNX Runtime model, and return the results (JSON-able)."""
    import torch

    torch.set_num_threads(config.threads)
    c = model.config
    policies = policy_grid(c.num_experts, c.top_k, config.grid)
    default = policies[1]
    rows, runs = [], {}
    total = len(config.batch_sizes) * len(policies)
    for batch in config.batch_sizes:
        reference = None
        for policy in policies:
            progress.step("torch decode", len(runs) + 1, total, f"batch {batch}, {policy_label(policy)}")
            run = decode_torch(model, sequences, batch, policy, config.seed)
            reference = reference or run
            runs[(batch, policy)] = run
            rows.append({**summarize(run, reference), "engine": "torch"})
    onnx_rows = _onnx_check(model, sequences, config, default, runs, work_dir, progress) if config.onnx_batch_sizes else []
    return {
        "model": {**c.to_dict(), **(source or {})},
        "config": dataclasses.asdict(config),
        "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version(), "torch": torch.__version__},
        "default_policy": policy_label(default),
        "authors_policy": _authors_label(c.num_experts, c.top_k),
        "chosen_policy": choose_default(rows),
        "results": rows,
        "onnx_check": onnx_rows,
    }


def _authors_label(num_experts: int, top_k: int) -> str | None:
    params = AUTHORS_LYNX_PARAMS.get((num_experts, top_k))
    return policy_label(LynxPolicy(alpha=params[0], beta=params[1])) if params else None


def _onnx_check(model, sequences, config: AccuracyConfig, policy: SelectionPolicy, runs: dict, work_dir: pathlib.Path,
                progress: Progress) -> list[dict[str, Any]]:
    """Compile the model with `policy` and decode through ONNX Runtime step by step with the KV
    cache; compare with the torch decode (float experts) of the same policy and batch size. Each
    quantized precision is compiled with the model's routing and with `policy`."""
    source = export_model(model, work_dir / "source" / "model.onnx")
    rows = []
    for precision in ("fp32", *config.quantize):
        for chosen in (policy,) if precision == "fp32" else (OffPolicy(), policy):
            choice = PolicyChoice(chosen.name, **{k: v for k, v in chosen.params().items() if k in ("alpha", "beta", "budget", "tie_break")})
            quantize = None if precision == "fp32" else QuantizeOptions(precision)
            folder = work_dir / ("compiled" if quantize is None else f"compiled-{precision}-{chosen.name}")
            progress.note(f"compiling the model ({precision} experts) with {policy_label(chosen)} for ONNX Runtime")
            built = build(source, folder, BuildOptions(choice, quantize=quantize, verify=VerifyOptions(batch_sizes=(1, 4), seq_lens=(1, 3)),
                                                       force=True), progress=progress)
            for batch in config.onnx_batch_sizes:
                progress.note(f"ONNX Runtime decode ({precision} experts, {policy_label(chosen)}), batch {batch}")
                compiled = decode_onnx(built.out_dir / "model.ort.onnx", sequences, batch, chosen, built.blocks, config.threads, config.seed)
                torch_run = runs.get((batch, chosen)) or decode_torch(model, sequences, batch, chosen, config.seed)
                rows.append({
                    **summarize(compiled), "engine": "onnxruntime", "precision": precision, **compare_predictions(torch_run, compiled),
                    "torch_active_experts": torch_run.mean_active(),
                })
    return rows


def choose_default(rows: Sequence[dict[str, Any]], min_batch: int = SERVING_BATCH) -> dict[str, Any] | None:
    """The policy with the largest mean active-expert reduction over batch sizes >= min_batch whose
    accuracy change stays within MAX_ACCURACY_DROP_PP at every one of them (point estimates)."""
    by_policy: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row["batch"] >= min_batch and "accuracy_change_pp" in row and row["params"]["name"] != "off":
            by_policy.setdefault(row["policy"], []).append(row)
    eligible = {
        name: float(np.mean([r["active_reduction_pct"] for r in group]))
        for name, group in by_policy.items()
        if all(r["accuracy_change_pp"][0] >= -MAX_ACCURACY_DROP_PP for r in group)
    }
    if not eligible:
        return None
    best = max(eligible, key=lambda name: (eligible[name], name))
    return {"policy": best, "mean_active_reduction_pct": eligible[best], "min_batch": min_batch, "max_drop_pp": MAX_ACCURACY_DROP_PP}


# -- outputs ---------------------------------------------------------------------------------------

CSV_FIELDS = ("engine", "experts", "batch", "policy", "accuracy", "accuracy_lo", "accuracy_hi", "accuracy_change_pp", "accuracy_change_lo",
              "accuracy_change_hi", "perplexity", "active_experts_model", "active_experts_policy", "active_reduction_pct",
              "routing_agreement", "tokens")


def _csv_row(row: dict[str, Any]) -> dict[str, Any]:
    change = row.get("accuracy_change_pp", (math.nan,) * 3)
    return {
        "engine": row["engine"], "experts": row.get("precision", "fp32"), "batch": row["batch"], "policy": row["policy"],
        "accuracy": row["accuracy"][0], "accuracy_lo": row["accuracy"][1], "accuracy_hi": row["accuracy"][2],
        "accuracy_change_pp": change[0], "accuracy_change_lo": change[1], "accuracy_change_hi": change[2],
        "perplexity": row["perplexity"][0], "active_experts_model": row["active_experts_model"][0],
        "active_experts_policy": row["active_experts_policy"][0], "active_reduction_pct": row.get("active_reduction_pct", math.nan),
        "routing_agreement": row["routing_agreement"][0], "tokens": row["tokens"],
    }


def summary_markdown(results: dict[str, Any]) -> str:
    m = results["model"]
    lines = [
        f"Model: {m['num_layers']} layers, H {m['hidden_size']}, {m['num_experts']} experts, top-{m['top_k']}. "
        f"{results['results'][0]['sequences']} held-out sequences of {results['config']['seq_len']} tokens, teacher-forced decode.",
        "",
        "| batch | policy | accuracy % (95% CI) | change pp (95% CI) | perplexity | active experts / layer (model → policy) | agreement |",
        "|---:|---|---|---|---:|---|---:|",
    ]
    for row in results["results"]:
        acc = row["accuracy"]
        change = row.get("accuracy_change_pp")
        change_text = f"{change[0]:+.2f} ({change[1]:+.2f}, {change[2]:+.2f})" if change and row["params"]["name"] != "off" else "—"
        lines.append(
            f"| {row['batch']} | {row['policy']} | {100 * acc[0]:.2f} ({100 * acc[1]:.2f}, {100 * acc[2]:.2f}) | {change_text} | "
            f"{row['perplexity'][0]:.3f} | {row['active_experts_model'][0]:.2f} → {row['active_experts_policy'][0]:.2f} | "
            f"{row['routing_agreement'][0]:.3f} |"
        )
    if results["onnx_check"]:
        lines += ["", f"Compiled model (ONNX Runtime, step-by-step decode with the KV cache) vs torch, policy {results['default_policy']}:", "",
                  "| batch | accuracy % ORT | accuracy % torch | positions predicted differently | active experts ORT | active experts torch |",
                  "|---:|---:|---:|---:|---:|---:|"]
        for row in (r for r in results["onnx_check"] if r.get("precision", "fp32") == "fp32"):
            differ = round((1 - row["prediction_agreement"]) * row["tokens"])
            lines.append(f"| {row['batch']} | {100 * row['accuracy_b']:.3f} | {100 * row['accuracy_a']:.3f} | "
                         f"{differ} of {row['tokens']} | {row['active_experts_policy'][0]:.3f} | {row['torch_active_experts']:.3f} |")
    quantized = [r for r in results["onnx_check"] if r.get("precision", "fp32") != "fp32"]
    if quantized:
        lines += ["", "Quantized experts (weight-only, block 32, MatMulNBits accuracy level 4), compiled ONNX Runtime model "
                  "vs torch with float experts and the same policy:", "",
                  "| batch | experts | policy | accuracy % ORT (95% CI) | accuracy % torch fp32 | perplexity ORT | "
                  "positions predicted differently | active experts ORT |",
                  "|---:|---|---|---|---:|---:|---:|---:|"]
        for row in quantized:
            acc = row["accuracy"]
            differ = round((1 - row["prediction_agreement"]) * row["tokens"])
            lines.append(f"| {row['batch']} | {row['precision']} | {row['policy']} | {100 * acc[0]:.2f} ({100 * acc[1]:.2f}, {100 * acc[2]:.2f}) | "
                         f"{100 * row['accuracy_a']:.2f} | {row['perplexity'][0]:.3f} | {differ} of {row['tokens']} | "
                         f"{row['active_experts_policy'][0]:.3f} |")
    chosen = results["chosen_policy"]
    lines += ["", "Chosen from the sweep: " + (
        f"{chosen['policy']} (mean active-expert reduction {chosen['mean_active_reduction_pct']:.1f}% at batch >= {chosen['min_batch']}, "
        f"accuracy within {chosen['max_drop_pp']:g} pp at each)" if chosen else "no policy cut experts within the accuracy bar")]
    return "\n".join(lines) + "\n"


def pareto_plot(results: dict[str, Any], path: pathlib.Path) -> pathlib.Path:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    batches = [b for b in results["config"]["batch_sizes"] if b > 1]
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4.2), sharey=True, squeeze=False)
    for ax, batch in zip(axes[0], batches):
        for row in results["results"]:
            if row["batch"] != batch or row["params"]["name"] == "off":
                continue
            change = row["accuracy_change_pp"]
            kind = row["params"]["name"]
            is_default = row["policy"] == results["default_policy"]
            is_authors = row["policy"] == results.get("authors_policy")
            ax.errorbar(row["active_reduction_pct"], change[0], yerr=[[change[0] - change[1]], [change[2] - change[0]]],
                        fmt="*" if is_default else ("o" if kind == "lynx" else "s"), ms=12 if is_default else 5,
                        color="tab:red" if is_default else ("tab:orange" if is_authors else ("tab:blue" if kind == "lynx" else "tab:gray")),
                        capsize=2)
            if is_default or is_authors:
                label = "default" if is_default else "authors' E8/K2"
                ax.annotate(label, (row["active_reduction_pct"], change[0]), textcoords="offset points", xytext=(6, 6), fontsize=8)
        ax.axhline(-MAX_ACCURACY_DROP_PP, color="tab:red", lw=0.8, ls="--")
        ax.axhline(0, color="black", lw=0.5)
        ax.set_title(f"batch {batch}")
        ax.set_xlabel("active experts cut vs model routing (%)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("next-token accuracy change (pp, 95% CI)")
    fig.suptitle("LYNX (circles) and budget (squares): accuracy vs experts cut", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(results: dict[str, Any], out_dir: pathlib.Path, plot: bool = True) -> list[pathlib.Path]:
    """results.json, results.csv, summary.md and pareto.png."""
    rows = [_csv_row(row) for row in results["results"] + results["onnx_check"]]
    written = write_results(out_dir, results, CSV_FIELDS, rows, summary_markdown(results))
    return written + ([pareto_plot(results, out_dir / "pareto.png")] if plot else [])
