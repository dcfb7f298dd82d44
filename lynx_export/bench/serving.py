"""Serving benchmark: the dense twin, the MoE and the MoE with LYNX served side by side with in-flight
batching (`NAME_generate`), driven by Triton's own load generator, genai-perf, over concurrencies.

The model (a preset or a shipped trained model, in onnxruntime-genai's form) is built with its own
routing and with LYNX at one expert precision, its dense twin at the same precision; each becomes a
generate model in one repository, served by one `tritonserver` on 127.0.0.1. Per workload and
concurrency the three take turns (an order that rotates per point), each profiled by `genai-perf
profile` (gRPC streaming, the kserve endpoint with the tensorrtllm request format: text_input,
max_tokens, min_length = max_tokens so every answer has the workload's length). What genai-perf
records per request (the request's time and each streamed response's) gives time to first token,
inter-token latency (every gap between a request's responses: one response per token), request
latency and output tokens/s (responses over the span from the first request to the last
response); the server's metrics give the mean decode batch per step, the mean active experts per
step and the seconds spent in decode against prefill (LYNX is decode-only: that share is what it
can move).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import subprocess
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lynx_export.errors import BackendUnavailable, LynxError, OptionError
from lynx_export.progress import SILENT, Progress

__all__ = ["Workload", "WORKLOADS", "ServeBenchConfig", "check_config", "run_serve_bench", "profile_point", "point_metrics", "perf_env_vars",
           "summary_markdown", "write_outputs", "CSV_FIELDS", "server_counters"]

# Qwen2-VL's encoder makes one token of each 28x28 pixels, up to max_pixels; 1280 tokens
# (1280 * 28 * 28 pixels) is the cap commonly served (its processor's own default, 16384 tokens, is
# far above these images' sizes once downscaled).
PATCH_PIXELS, IMAGE_TOKEN_CAP = 28 * 28, 1280
BYTES_PER_TEXT_TOKEN = 4  # a BPE token of English text is about 4 characters


@dataclass(frozen=True)
class Workload:
    """Prompt and answer lengths in the served model's tokens (mean and standard deviation)."""

    name: str
    input_mean: int
    input_stddev: int
    output_mean: int
    about: str


def _image_tokens(width: int, height: int) -> int:
    return min(IMAGE_TOKEN_CAP, (width * height) // PATCH_PIXELS)


WORKLOADS: Mapping[str, Workload] = {
    w.name: w
    for w in (
        Workload("chat", 256, 64, 256, "chat-like: prompts and answers of a few hundred tokens (ShareGPT-style conversations as LLM serving "
                 "benchmarks use them: a few hundred tokens each way); 256 in (stddev 64), 256 out"),
        # DocVQA validation: 5,349 questions, question text 255 characters on average, page images
        # 593x294 to 5367x7184 px: a typical scanned page (~1700x2200) is over the cap.
        Workload("docvqa", _image_tokens(1700, 2200) + 255 // BYTES_PER_TEXT_TOKEN, 96, 4,
                 f"DocVQA-like: a page image as {_image_tokens(1700, 2200)} tokens (Qwen2-VL: one per 28x28 px, capped at "
                 f"{IMAGE_TOKEN_CAP}; pages of 593x294 to 5367x7184 px are mostly over the cap) plus a 255-character question "
                 f"(~{255 // BYTES_PER_TEXT_TOKEN} tokens); a word or phrase answered: 4 tokens"),
        # ChartQA test: 2,500 questions, 224 characters on average, images 184x326 to 800x1796 px.
        Workload("chartqa", _image_tokens(800, 600) + 224 // BYTES_PER_TEXT_TOKEN, 300, 3,
                 f"ChartQA-like: a chart image as {_image_tokens(800, 600)} tokens (an 800x600 chart; charts of 184x326 to 800x1796 px "
                 f"give {_image_tokens(184, 326)} to {_image_tokens(800, 1796)}: stddev 300) plus a 224-character question "
                 f"(~{224 // BYTES_PER_TEXT_TOKEN} tokens); a word or number answered: 3 tokens"),
    )
}
QUICK_WORKLOAD = Workload("quick", 24, 0, 8, "QUICK: 24 tokens in, 8 out (a smoke test)")
VARIANTS = ("dense", "moe", "moe+lynx")


@dataclass(frozen=True)
class ServeBenchConfig:
    preset: str = "fine"
    layers: int | None = None  # the preset's layers; None: scaled to the cache as `bench` scales them
    trained: str | None = None  # a shipped trained model instead of a preset
    precision: str = "fp32"  # the experts' (and the dense twin's) weights: fp32 or int4/int8
    concurrencies: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    workloads: tuple[str, ...] = ("chat", "docvqa", "chartqa")
    # Each point measures max(min_requests, concurrency x this) requests, after one warm-up request per stream.
    requests_per_user: int = 2
    min_requests: int = 8
    max_slots: int = 64
    # Tokens a slot holds at most; 0: the workloads' longest prompt (mean + 4 standard deviations)
    # and answer, rounded up to 128 (the slots' rows grow to what the active requests need, up to this).
    max_length: int = 0
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    perf_env: pathlib.Path = pathlib.Path(".venv-perf")
    serve_env: pathlib.Path = pathlib.Path(".venv-serve")
    quick: bool = False
    seed: int = 0
    spinning: bool = True  # the generate models' ONNX Runtime threads spin between ops (TritonOptions.spinning)

    def workload_list(self) -> list[Workload]:
        return [QUICK_WORKLOAD] if self.quick else [WORKLOADS[w] for w in self.workloads]

    def slot_length(self) -> int:
        if self.max_length:
            return self.max_length
        longest = max(w.input_mean + 4 * w.input_stddev + w.output_mean for w in self.workload_list())
        return -(-longest // 128) * 128

    def requests(self, concurrency: int) -> int:
        return max(self.min_requests, concurrency * self.requests_per_user)


def perf_env_vars(perf_env: pathlib.Path) -> dict[str, str]:
    """The environment genai-perf and perf_analyzer run in (`make test` sets the folder up)."""
    perf_env = perf_env.resolve()
    runtime = sorted(perf_env.glob("lib/python3*/site-packages/nvidia/cuda_runtime/lib"))
    b64 = perf_env / "libb64" / "usr" / "lib" / "x86_64-linux-gnu"
    if not (perf_env / "bin" / "genai-perf").exists() or not (perf_env / "bin" / "perf_analyzer").exists() or not runtime or not b64.is_dir():
        raise BackendUnavailable(f"{perf_env}: no genai-perf with perf_analyzer and its libraries (`make test` or `make serve` installs them)")
    return {**os.environ, "PATH": f"{perf_env / 'bin'}:{os.environ.get('PATH', '')}", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "LD_LIBRARY_PATH": ":".join(str(p) for p in (b64, runtime[0]) if p) + (":" + os.environ["LD_LIBRARY_PATH"] if os.environ.get("LD_LIBRARY_PATH") else "")}


def profile_point(env: Mapping[str, str], model: str, grpc_url: str, tokenizer: pathlib.Path, workload: Workload, concurrency: int,
                  requests: int, artifacts: pathlib.Path, seed: int = 0, timeout_s: float = 3600) -> dict[str, Any]:
    """One genai-perf profile of `model` at `concurrency` (after `concurrency` warm-up requests); the
    metrics computed from its per-request record (see the module docstring).

    perf_analyzer 2.51 never ends a profile whose warm-up count is below its concurrency (at 8 with
    4 warm-up requests it served 40,000 tokens in a minute for a count of 16): the warm-up is one
    request per stream."""
    command = [str(pathlib.Path(env["PATH"].split(":")[0]) / "genai-perf"), "profile", "-m", model, "--endpoint-type", "kserve",
               "--backend", "tensorrtllm", "--streaming", "-u", grpc_url, "--tokenizer", str(tokenizer.resolve()),
               "--synthetic-input-tokens-mean", str(workload.input_mean), "--synthetic-input-tokens-stddev", str(workload.input_stddev),
               "--output-tokens-mean", str(workload.output_mean), "--output-tokens-stddev", "0", "--output-tokens-mean-deterministic",
               "--concurrency", str(concurrency), "--request-count", str(requests), "--warmup-request-count", str(concurrency),
               "--random-seed", str(seed), "--artifact-dir", str(artifacts.resolve())]
    artifacts.mkdir(parents=True, exist_ok=True)  # genai-perf runs in it (its own files land there): absolute paths above
    r = subprocess.run(command, env=dict(env), capture_output=True, text=True, timeout=timeout_s, cwd=artifacts)
    exports = sorted(artifacts.glob("*/profile_export.json"))
    if r.returncode != 0 or not exports:
        tail = " ".join((r.stderr or r.stdout).split()[-60:])
        raise LynxError(f"genai-perf failed on {model} at concurrency {concurrency} (exit {r.returncode}): {tail}")
    return point_metrics(json.loads(exports[-1].read_text()), workload)


def point_metrics(export: Mapping[str, Any], workload: Workload) -> dict[str, Any]:
    """Metrics of one profile from genai-perf's per-request record (`profile_export.json`)."""
    requests = export["experiments"][0]["requests"]
    starts = np.array([r["timestamp"] for r in requests], dtype=np.float64) / 1e9
    responses = [np.array(r["response_timestamps"], dtype=np.float64) / 1e9 for r in requests]
    done = [(s, t) for s, t in zip(starts, responses) if t.size]
    ttft = np.array([t[0] - s for s, t in done])
    latency = np.array([t[-1] - s for s, t in done])
    gaps = np.concatenate([np.diff(t) for _, t in done if t.size > 1]) if any(t.size > 1 for _, t in done) else np.zeros(0)
    tokens = sum(t.size for _, t in done)
    span = max(t[-1] for _, t in done) - min(s for s, _ in done)

    def pct(x: np.ndarray, q: float) -> float | None:
        return float(np.percentile(x, q) * 1e3) if x.size else None

    return {"requests": len(requests), "completed": len(done), "output_tokens": int(tokens),
            "output_tokens_per_request": tokens / len(done) if done else None, "expected_tokens_per_request": workload.output_mean,
            "output_tokens_per_s": tokens / span if span > 0 else None, "requests_per_s": len(done) / span if span > 0 else None,
            "ttft_ms_p50": pct(ttft, 50), "ttft_ms_p99": pct(ttft, 99), "itl_ms_p50": pct(gaps, 50), "itl_ms_p99": pct(gaps, 99),
            "latency_ms_p50": pct(latency, 50), "latency_ms_p99": pct(latency, 99)}


def server_counters(metrics_url: str, model: str) -> dict[str, float]:
    """The lynx_generate_* values the server's metrics endpoint gives for generate model `model`."""
    label = f'{{model="{model}"}}'
    text = urllib.request.urlopen(metrics_url, timeout=30).read().decode()
    return {line.split()[0].removesuffix(label): float(line.split()[1]) for line in text.splitlines()
            if line.startswith("lynx_generate_") and line.split()[0].endswith(label)}


def _server_point(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, Any]:
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    steps = d.get("lynx_generate_decode_steps_total", 0.0)
    decode, prefill = d.get("lynx_generate_decode_seconds_total", 0.0), d.get("lynx_generate_prefill_seconds_total", 0.0)
    return {"decode_steps": int(steps), "mean_batch": d["lynx_generate_decode_batch_sum"] / steps if steps else None,
            "mean_active_experts": d["lynx_generate_active_experts_sum"] / steps if steps and d.get("lynx_generate_active_experts_sum") else None,
            "decode_s": decode, "prefill_s": prefill, "decode_share": decode / (decode + prefill) if decode + prefill > 0 else None,
            "server_output_tokens": int(d.get("lynx_generate_output_tokens_total", 0))}


# -- the run ---------------------------------------------------------------------------------------


def _prepare(config: ServeBenchConfig, work: pathlib.Path, progress: Progress) -> tuple[pathlib.Path, dict[str, Any], Any]:
    """Export the model in onnxruntime-genai's form, build it with each policy, write its dense
    twin and a repository with the three generate models; (repository, model summary, its tokenizer folder)."""
    from lynx_export.bench import presets
    from lynx_export.bench.benchmark import BenchConfig, source_model
    from lynx_export.bench.dense_twin import dense_twin
    from lynx_export.bench.machine import last_level_cache
    from lynx_export.compiler.build import BuildOptions, PolicyChoice, build
    from lynx_export.compiler.quantize import QuantizeOptions
    from lynx_export.compiler.verify import VerifyOptions
    from lynx_export.evaluation.demo import DemoConfig
    from lynx_export.serving.repository import GenerateSource, TritonOptions, plan_generate, write_generate_model

    if config.trained:
        from lynx_export.evaluation.trained import read_metadata, trained_model

        model = DemoConfig(**read_metadata(trained_model(config.trained).weights)["model"])
    elif config.quick:
        model = presets.PRESETS[config.preset].quick
    else:
        model = presets.scaled_model(presets.PRESETS[config.preset], last_level_cache().total_bytes, config.layers)
    source = source_model(BenchConfig(model=model, trained=config.trained, form="genai"), work, progress)
    quantize = None if config.precision == "fp32" else QuantizeOptions(config.precision)
    check = VerifyOptions(batch_sizes=(1, 4), seq_lens=(1, 3), context_len=4)
    sources: dict[str, GenerateSource] = {}
    for variant, policy in (("moe", "off"), ("moe+lynx", "lynx")):
        progress.note(f"building {variant} ({config.precision} experts, verified against the source)")
        built = build(source.parent, work / variant, BuildOptions(PolicyChoice(policy), quantize=quantize, verify=check, force=True),
                      progress=progress)
        sources[variant] = GenerateSource.of_build(built.out_dir, built.manifest)
    progress.note(f"writing the dense twin ({config.precision})")
    twin = dense_twin(source, work / "dense" / "model.onnx", quantize)
    for name in ("genai_config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(source.parent / name, work / "dense" / name)
    sources["dense"] = GenerateSource(twin.path, work / "dense")
    repo = work / "repository"
    shutil.rmtree(repo, ignore_errors=True)
    options = TritonOptions(max_slots=config.max_slots, max_length=config.slot_length(), threads=config.threads, spinning=config.spinning)
    for variant in VARIANTS:
        write_generate_model(sources[variant], plan_generate(sources[variant], options), repo / _model_name(variant), options)
    summary = {"config": model.to_dict(), "preset": None if config.trained else config.preset, "trained": config.trained,
               "precision": config.precision, "moe_parameters": twin.moe_parameters, "dense_parameters": twin.dense_parameters,
               "policy": sources["moe+lynx"].policy, "slot_length": config.slot_length()}
    return repo, summary, source.parent


def _model_name(variant: str) -> str:
    return variant.replace("+", "_") + "_generate"


def check_config(config: ServeBenchConfig) -> None:
    """Refuse, before any work, what no run admits (OptionError, one line)."""
    from lynx_export.compiler.quantize import PRECISIONS

    if config.precision != "fp32" and config.precision not in PRECISIONS:
        raise OptionError(f"--precision: choose from fp32, {', '.join(PRECISIONS)} (got {config.precision})")
    unknown = [w for w in config.workloads if w not in WORKLOADS]
    if unknown or not config.workloads:
        raise OptionError(f"--workloads: choose from {', '.join(WORKLOADS)} (got {unknown[0] if unknown else 'none'})")
    if not config.concurrencies or min(config.concurrencies) < 1:
        raise OptionError("--concurrency: give concurrencies of at least 1")


def run_serve_bench(config: ServeBenchConfig, work: pathlib.Path, progress: Progress = SILENT) -> dict[str, Any]:
    from lynx_export.bench.machine import machine_info
    from lynx_export.serving.server import TritonServer

    check_config(config)
    env = perf_env_vars(config.perf_env)  # before any slow work
    work.mkdir(parents=True, exist_ok=True)
    repo, model, tokenizer = _prepare(config, work, progress)
    rows: list[dict[str, Any]] = []
    results = {
        "quick": config.quick,
        "note": "QUICK MODE: tiny model, smoke test only; these numbers are not measurements" if config.quick else "",
        "machine": machine_info(config.threads),
        "model": model,
        "config": {**dataclasses.asdict(config), "perf_env": str(config.perf_env), "serve_env": str(config.serve_env)},
        "workloads": {w.name: dataclasses.asdict(w) for w in config.workload_list()},
        "timed": "genai-perf profile per (workload, concurrency, variant), gRPC streaming, one response per token; metrics from "
                 "genai-perf's per-request record (profile_export.json) and the server's lynx_generate_* counters over the profile",
        "results": rows,
    }
    with TritonServer([repo], config.serve_env) as server:
        for workload in config.workload_list():
            for index, concurrency in enumerate(config.concurrencies):
                order = list(VARIANTS[index % 3 :] + VARIANTS[: index % 3])
                for variant in order:
                    name = _model_name(variant)
                    progress.note(f"{workload.name}: {variant} at concurrency {concurrency}")
                    before = server_counters(server.metrics_url, name)
                    point = profile_point(env, name, server.grpc_url, tokenizer, workload, concurrency, config.requests(concurrency),
                                          work / "genai-perf" / workload.name / f"{variant}-c{concurrency}", config.seed)
                    rows.append({"workload": workload.name, "variant": variant, "concurrency": concurrency, **point,
                                 **_server_point(before, server_counters(server.metrics_url, name))})
                    write_outputs(results, work)  # after every point: a long run stopped early keeps what it measured
    return results


def summary_markdown(results: Mapping[str, Any]) -> str:
    m = results["model"]
    lines = [results["note"], "", f"Model: {'preset ' + m['preset'] if m['preset'] else 'trained ' + str(m['trained'])}, "
             f"{m['config']['num_layers']} layers of E{m['config']['num_experts']} K{m['config']['top_k']} H{m['config']['hidden_size']} "
             f"I{m['config']['expert_size']}; experts {m['precision']}; MoE {m['moe_parameters'] / 1e6:.1f} M parameters, dense twin "
             f"{m['dense_parameters'] / 1e6:.1f} M; LYNX {m['policy']}.", ""]
    by = {(r["workload"], r["concurrency"], r["variant"]): r for r in results["results"]}
    for workload in results["workloads"]:
        lines += [f"### {workload}: {results['workloads'][workload]['about']}", "",
                  "| concurrency | output tok/s dense / moe / moe+lynx | lynx/moe | lynx/dense | TTFT p50 ms (moe, lynx) | ITL p50 / p99 ms (moe) | "
                  "ITL p50 / p99 ms (lynx) | batch/step (lynx) | active experts/step moe → lynx | decode share (lynx) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for c in sorted({k[1] for k in by if k[0] == workload}):
            d, o, x = (by.get((workload, c, v)) for v in VARIANTS)
            if not (d and o and x):
                continue
            f = lambda v, fmt="{:.1f}": "—" if v is None else fmt.format(v)  # noqa: E731
            lines.append(f"| {c} | {f(d['output_tokens_per_s'])} / {f(o['output_tokens_per_s'])} / {f(x['output_tokens_per_s'])} | "
                         f"{x['output_tokens_per_s'] / o['output_tokens_per_s']:.2f}x | {x['output_tokens_per_s'] / d['output_tokens_per_s']:.2f}x | "
                         f"{f(o['ttft_ms_p50'])}, {f(x['ttft_ms_p50'])} | {f(o['itl_ms_p50'])} / {f(o['itl_ms_p99'])} | "
                         f"{f(x['itl_ms_p50'])} / {f(x['itl_ms_p99'])} | {f(x['mean_batch'], '{:.2f}')} | "
                         f"{f(o['mean_active_experts'], '{:.2f}')} → {f(x['mean_active_experts'], '{:.2f}')} | {f(x['decode_share'], '{:.0%}')} |")
        lines.append("")
    return "\n".join(lines)


CSV_FIELDS = ("workload", "variant", "concurrency", "requests", "completed", "output_tokens_per_s", "requests_per_s", "ttft_ms_p50",
              "ttft_ms_p99", "itl_ms_p50", "itl_ms_p99", "latency_ms_p50", "latency_ms_p99", "mean_batch", "mean_active_experts",
              "decode_share", "output_tokens_per_request", "expected_tokens_per_request")


def write_outputs(results: Mapping[str, Any], out: pathlib.Path) -> list[pathlib.Path]:
    from lynx_export.compiler.output import write_results

    return write_results(out, results, CSV_FIELDS, results["results"], summary_markdown(results) + "\n")
