"""The benchmark's results on disk: results.json, results.csv, summary.md and two PNG plots."""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from typing import Any

from lynx_export.compiler.output import write_results

__all__ = ["CSV_FIELDS", "summary_markdown", "write_outputs"]

CSV_FIELDS = (
    "variant", "precision", "ort_experts", "batch", "tokens_per_s", "tokens_per_s_p10", "tokens_per_s_p90", "ms_per_step",
    "ms_per_step_min", "ms_per_step_max", "repeats", "active_experts_per_layer", "active_experts_model_routing", "routing_agreement",
    "weight_bytes_per_step", "kv_bytes_per_step", "flops_per_step", "bound_ms", "bound_kind", "measured_over_bound",
    "profiled_ms_per_step", "moe_ms_per_step", "other_ms_per_step", "moe_weight_bytes_per_step", "moe_bound_ms", "moe_bound_kind",
    "moe_over_bound",
)


def _mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:.1f} MB"


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows), ""]


def _dense(precision: str) -> str:
    return "dense" if precision == "fp32" else f"dense:{precision}"


def _pairs(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(label, moe+lynx variant, moe variant) for every expert implementation and precision run."""
    variants = results["config"]["variants"]
    pairs = []
    for v in variants:
        if v.startswith("moe+lynx:"):
            rest = v.removeprefix("moe+lynx:")
            if f"moe:{rest}" in variants:
                pairs.append((rest, v, f"moe:{rest}"))
    return pairs


def summary_markdown(results: dict[str, Any]) -> str:
    """The results as Markdown: machine and model lines, then per batch size tokens/s against the
    bound, the ratios the targets name, active experts and the MoE layers' share of a step."""
    m, model = results["machine"], results["model"]
    lines = []
    if results["quick"]:
        lines.append(f"**{results['note']}**\n")
    nbits = "".join(f", MatMulNBits {p} {r:.1f} GFLOP/s" for p, r in m["nbits_peak_gflop_s"].items())
    llc = m["llc"]
    lines.append(
        f"Machine: {m['cpu']}, {m['threads']} threads, ONNX Runtime {m['onnxruntime']}; last-level cache {_mb(llc['total_bytes'])} "
        f"(L{llc['level']}); measured read bandwidth {m['read_bandwidth_gb_s']:.1f} GB/s, peak fp32 MatMul {m['peak_gflop_s']:.1f} GFLOP/s{nbits}.\n"
    )
    spec = model["spec"]
    over = model["expert_bytes_over_llc"]
    cache = ", ".join(f"{p} {_mb(b)} ({over[p]:.1f}x the cache)" for p, b in model["expert_weight_bytes_by_precision"].items())
    lines.append(
        f"Model: {model['source']}; {model['layers']} MoE layers of E{spec['num_experts']} K{spec['top_k']} H{spec['hidden_size']} "
        f"I{spec['expert_size']}; experts {100 * model['expert_fraction']:.1f}% of the weights; expert weights {cache}.\n"
    )
    memory = results.get("memory", {})
    if memory.get("sessions_resident_bytes") is not None:
        lines.append(
            f"Memory: the {len(results['config']['variants'])} timed sessions, open together, added {_mb(memory['sessions_resident_bytes'])} "
            f"resident (estimated {_mb(sum(memory['per_variant_bytes'].values()))}), {_mb(memory['shared_weight_bytes'])} of it weights "
            f"shared between sessions.\n"
        )
    if results.get("routing_trace"):
        lines.append(f"Routing: {results['inputs']}.\n")
    variants = results["config"]["variants"]
    batches = results["config"]["batch_sizes"]
    by = {(r["variant"], r["batch"]): r for r in results["results"]}
    precisions = list(dict.fromkeys(by[(v, batches[0])]["precision"] for v in variants))

    def grid(columns: list[str], cell) -> list[list[str]]:
        """One row per batch size: the batch, then cell(row of results, batch) per column."""
        return [[str(b)] + [cell(by[(v, b)], b) for v in columns] for b in batches]

    rows = grid(variants, lambda r, b: f"{r['tokens_per_s']:.1f} ({b / (r['bound_ms'] / 1e3):.1f} {r['bound_kind'][:3]})")
    lines.append("Tokens/s, median of the timed steps (the bound's tokens/s, memory- or compute-bound):\n")
    lines += _table(["batch"] + [f"{v} tok/s (bound)" for v in variants], rows)

    pairs = _pairs(results)
    head = ["batch"] + [f"lynx / moe ({label})" for label, _, _ in pairs]
    head += [f"best lynx / {_dense(p)}" for p in precisions if _dense(p) in variants]
    fp32_moe = [moe for label, _, moe in pairs if by[(moe, batches[0])]["precision"] == "fp32"]
    quantized = [p for p in precisions if p != "fp32"]
    head += [f"best lynx {p} / best fp32 moe" for p in quantized if fp32_moe]
    rows = []
    for batch in batches:
        tps = {v: by[(v, batch)]["tokens_per_s"] for v in variants}
        row = [str(batch)] + [f"{tps[lynx] / tps[moe]:.2f}x" for _, lynx, moe in pairs]
        best = {p: max((tps[lynx] for _, lynx, _ in pairs if by[(lynx, batch)]["precision"] == p), default=0.0) for p in precisions}
        row += [f"{best[p] / tps[_dense(p)]:.2f}x" for p in precisions if _dense(p) in variants]
        row += [f"{best[p] / max(tps[v] for v in fp32_moe):.2f}x" for p in quantized if fp32_moe]
        rows.append(row)
    lines.append("Ratios of tokens/s (each dense twin at the MoE's weight precision):\n")
    lines += _table(head, rows)

    moe_variants = [v for v in variants if not v.startswith("dense")]
    rows = grid(moe_variants, lambda r, b: f"{r['active_experts_per_layer']:.2f}")
    lines.append("Active experts per layer (mean over layers):\n")
    lines += _table(["batch"] + moe_variants, rows)

    if results["config"]["profile"]:
        rows = grid(variants, lambda r, b: f"{r['moe_ms_per_step']:.2f} / {r['other_ms_per_step']:.2f} ({r['moe_over_bound']:.1f}x)")
        lines.append("One profiled step per variant and batch: ms in the MoE layers' nodes / ms in the rest (the MoE layers' time "
                     "÷ their own bound); for a dense twin, its FFNs:\n")
        lines += _table(["batch"] + variants, rows)
    return "\n".join(lines)


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
        if v.startswith("dense"):
            continue
        ax.plot(batches, [by[(v, b)]["active_experts_per_layer"] for b in batches], marker="o", label=v)
    ax.set(ylabel="active experts per layer (mean)", title=f"Experts read per decode step — {title}")
    ax.set_ylim(0, results["model"]["spec"]["num_experts"] + 0.5)
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
