"""The benchmark's plan: its configuration, the variants it times, the checks made once before any
slow work (options, policies against the model's routers, the routing trace, memory), and the
variants compiled: one build per policy and precision, lowered once per expert implementation."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lynx_export.bench import presets
from lynx_export.bench.machine import mem_available
from lynx_export.bench.trace_routing import check_trace
from lynx_export.compiler.build import ORT_NAME, BuildOptions, BuildResult, PolicyChoice, build, lower_again
from lynx_export.compiler.detect import detect
from lynx_export.compiler.lowering import EXPERT_IMPLEMENTATIONS, QUANTIZED_IMPLEMENTATIONS
from lynx_export.compiler.lowering.ort import LoweredBlock
from lynx_export.compiler.model_io import input_files, load_model
from lynx_export.compiler.quantize import DEFAULT_BLOCK_SIZE, PRECISIONS, QuantizeOptions
from lynx_export.compiler.verify import VerifyOptions
from lynx_export.errors import LynxError, OptionError
from lynx_export.evaluation.demo import DemoConfig
from lynx_export.evaluation.trace import RouterTrace
from lynx_export.progress import Progress
from lynx_export.routing import RouterForm

__all__ = ["BENCH_MODEL", "QUICK_MODEL", "FORMS", "Variant", "BenchConfig", "planned_runs", "check_config", "memory_estimate", "check_memory",
           "Compiled", "compile_variants"]

BENCH_MODEL = presets.PRESETS["demo"].layer
QUICK_MODEL = presets.PRESETS["demo"].quick
MEMORY_FRACTION = 0.7  # of MemAvailable that the variants' sessions may take together
# Expert implementations whose kernels read their weights in place, so that the timed sessions of
# several variants can share one copy (SharedInitializers). MatMul (per-expert, the
# dense twin) prepacks a private copy per session: sharing would add the shared copy and save
# nothing (measured: docs/BENCHMARKS.md, "Sharing weights between sessions").
SHARED_WEIGHT_IMPLS = ("fused",)
FORMS = ("genai", "dynamo")


@dataclass(frozen=True)
class Variant:
    """One timed model: a dense twin or a MoE build, at one weight precision."""

    name: str
    routing: str  # "dense", "moe" (the model's own routing), "moe+lynx", "moe+budget"
    precision: str = "fp32"  # "fp32" (the source's float weights) or a PRECISIONS key
    policy: PolicyChoice | None = None  # MoE variants
    ort_experts: str | None = None  # MoE variants: the expert implementation

    @property
    def folder(self) -> str:
        return self.name.replace(":", "-")

    def quantize(self, block_size: int) -> QuantizeOptions | None:
        return None if self.precision == "fp32" else QuantizeOptions(self.precision, block_size)


@dataclass(frozen=True)
class BenchConfig:
    model: DemoConfig = BENCH_MODEL  # exported with random weights unless `source` or `trained`
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    context_len: int = 128  # KV cache length each decode step attends over
    warmup: int = 2
    repeats: int = 15
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    budget: int | None = None  # also time the budget policy with this many experts
    lynx: PolicyChoice = PolicyChoice("lynx")  # the moe+lynx variants' policy (parameters default by E and K)
    ort_experts: tuple[str, ...] = ("fused", "per-expert")  # float expert implementations of the ORT lowering
    quick: bool = False
    seed: int = 0
    # A shipped model trained on the standard library's source (a TRAINED_MODELS name), decoding
    # held-out text: real routing and a real KV cache. Otherwise `model` with random weights and
    # random inputs.
    trained: str | None = None
    source: pathlib.Path | None = None  # benchmark this ONNX model (any the pass supports) instead of exporting `model`
    preset: str | None = presets.DEFAULT_PRESET  # the preset `model` comes from, recorded in the results
    quantize: tuple[str, ...] = ()  # also these expert precisions (PRECISIONS keys): quantized MoE and dense twin
    block_size: int = DEFAULT_BLOCK_SIZE  # inputs per quantization block
    profile: bool = True  # one profiled step per variant and batch: MoE layers' time vs the rest
    bandwidth_bytes: int | None = None  # read-bandwidth array; None: max(1 GiB, CACHE_MULTIPLE x last-level cache)
    # A `lynx-export trace` file: the MoE variants' timed steps route on its router logits (layer l
    # on trace layer l mod L) instead of the model's random routers; weights stay as they are.
    routing_trace: pathlib.Path | None = None
    # The form the preset or trained model is exported in (`FORMS`): "genai", onnxruntime-genai's
    # (GroupQueryAttention; each step's KV cache updated in place, as onnxruntime-genai runs it), or
    # "dynamo", torch's export (attention by Concat: each step copies the whole cache into its
    # present outputs). A MODEL is timed in place when its graph updates its caches in place.
    form: str = "genai"

    @property
    def precisions(self) -> tuple[str, ...]:
        return ("fp32", *self.quantize)

    @property
    def variant_list(self) -> tuple[Variant, ...]:
        """Every timed variant: per precision its dense twin, then its MoE builds."""
        routings = [("moe", PolicyChoice("off")), ("moe+lynx", self.lynx)]
        if self.budget:
            routings.append(("moe+budget", PolicyChoice("budget", budget=self.budget)))
        out = []
        for precision in self.precisions:
            fp32 = precision == "fp32"
            out.append(Variant("dense" if fp32 else f"dense:{precision}", "dense", precision))
            for impl in self.ort_experts if fp32 else QUANTIZED_IMPLEMENTATIONS:
                suffix = "" if fp32 else f":{precision}"
                out += [Variant(f"{name}:{impl}{suffix}", name, precision, choice, impl) for name, choice in routings]
        return tuple(out)

    @property
    def builds(self) -> dict[str, Variant]:
        """The MoE variants by name."""
        return {v.name: v for v in self.variant_list if v.routing != "dense"}

    @property
    def variants(self) -> tuple[str, ...]:
        return tuple(v.name for v in self.variant_list)


def planned_runs(config: BenchConfig) -> int:
    return len(config.batch_sizes) * len(config.variants) * (config.warmup + config.repeats)


def check_config(config: BenchConfig) -> dict[str, Any]:
    """Refuse, before any slow work, options no model admits (OptionError), policies that the
    benchmarked model's E and K do not (RoutingError), a routing trace it cannot replay (DataError)
    and variants that would not fit in memory together; return the memory estimate, for results.json."""
    unknown = [i for i in config.ort_experts if i not in EXPERT_IMPLEMENTATIONS]
    if not config.ort_experts or unknown:
        raise OptionError(f"--ort-experts: choose from {', '.join(EXPERT_IMPLEMENTATIONS)} (got {', '.join(config.ort_experts) or 'none'})")
    if any(p not in PRECISIONS for p in config.quantize):
        raise OptionError(f"--quantize: choose from {', '.join(PRECISIONS)} (got {', '.join(config.quantize)})")
    if config.source is not None and config.trained:
        raise OptionError("MODEL and --trained are exclusive: --trained benchmarks the shipped model")
    if config.form not in FORMS:
        raise OptionError(f"--form: choose from {', '.join(FORMS)} (got {config.form})")
    if config.routing_trace is not None and config.trained:
        raise OptionError("--routing-trace and --trained are exclusive: the trained model routes on its own learned routers")
    if config.source is None:  # the presets (and the demo model) route softmax -> top-K
        routers = {"the model": (config.model.num_experts, config.model.top_k, RouterForm.SOFTMAX_TOPK)}
    else:
        routers = {f"{config.source}: block {b.name}": (b.spec.num_experts, b.spec.top_k, b.spec.router)
                   for b in detect(load_model(config.source)).blocks}
    for variant in config.builds.values():
        for where, (experts, top_k, _) in routers.items():
            variant.policy.resolve(experts, top_k, where)
    if config.routing_trace is not None:
        trace = RouterTrace.load(config.routing_trace)
        for where, (experts, top_k, router) in routers.items():
            check_trace(trace, config.routing_trace, where, num_experts=experts, top_k=top_k, router=router,
                        max_batch=max(config.batch_sizes))
    return check_memory(config)


# -- memory ----------------------------------------------------------------------------------------


def memory_estimate(config: BenchConfig) -> dict[str, int]:
    """Bytes each variant's session holds: its weights (ONNX Runtime keeps about one copy, its
    prepacked MatMul weights replacing the originals), less the expert weights it reads from an
    earlier variant's (SHARED_WEIGHT_IMPLS). A MODEL's variants are each taken at the file's
    size, an upper bound."""
    if config.source is not None:
        size = sum(f.stat().st_size for f in input_files(config.source))
        return {v.name: size for v in config.variant_list}
    out, sharing = {}, set()
    for v in config.variant_list:
        out[v.name] = presets.weight_bytes(config.model, v.precision, config.block_size, dense=v.routing == "dense")
        if v.ort_experts in SHARED_WEIGHT_IMPLS:
            if (v.ort_experts, v.precision) in sharing:  # reads the experts of the first such variant
                out[v.name] -= presets.expert_bytes(config.model, v.precision, config.block_size)
            sharing.add((v.ort_experts, v.precision))
    return out


def check_memory(config: BenchConfig, available: int | None = None) -> dict[str, Any]:
    """Refuse (one line) when the variants' sessions, all open together while they are timed, plus
    the largest one again (a session holds its file's weights twice while it loads), need more
    than MEMORY_FRACTION of MemAvailable. Returns what was estimated, for results.json."""
    per_variant = memory_estimate(config)
    needed = sum(per_variant.values()) + max(per_variant.values())
    available = mem_available() if available is None else available
    if available is not None and needed > MEMORY_FRACTION * available:
        raise LynxError(f"the {len(per_variant)} variants need about {needed / 1e9:.1f} GB of memory together, over "
                        f"{MEMORY_FRACTION:.0%} of the {available / 1e9:.1f} GB available; use fewer --layers, --ort-experts or "
                        f"--quantize precisions")
    return {"per_variant_bytes": per_variant, "estimate_bytes": needed, "mem_available_bytes": available,
            "fraction_allowed": MEMORY_FRACTION}


# -- compiling -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Compiled:
    """A MoE variant's model.ort.onnx, where its blocks' routing shows, and its policy's entry."""

    path: pathlib.Path
    blocks: tuple[LoweredBlock, ...]
    policy: Mapping[str, Any]


def compile_variants(config: BenchConfig, source: pathlib.Path, work_dir: pathlib.Path, progress: Progress) -> dict[str, Compiled]:
    """Every MoE variant compiled: per policy and precision one build (rewrite, quantize, verify
    against the source), its canonical model lowered once per further expert implementation and
    checked against that build's verification cases (compiler.build.lower_again)."""
    check = VerifyOptions(batch_sizes=(1, 4), seq_lens=(1, 3), context_len=4)
    built: dict[tuple[str, str], BuildResult] = {}
    out: dict[str, Compiled] = {}
    for name, v in config.builds.items():
        first = built.get((v.routing, v.precision))
        if first is None:
            progress.note(f"building {name} (policy {v.policy.name}, {v.ort_experts} experts, {v.precision}, verified against the source)")
            options = BuildOptions(v.policy, ort_experts=v.ort_experts, quantize=v.quantize(config.block_size), verify=check, force=True)
            first = built[(v.routing, v.precision)] = build(source, work_dir / v.folder, options, progress=progress)
            out[name] = Compiled(first.out_dir / ORT_NAME, first.blocks, first.manifest.policy)
        else:
            blocks = lower_again(first.out_dir, v.ort_experts, work_dir / v.folder / ORT_NAME, progress)
            out[name] = Compiled(work_dir / v.folder / ORT_NAME, blocks, first.manifest.policy)
    return out
