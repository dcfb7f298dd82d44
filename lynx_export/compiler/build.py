"""`build`: load -> detect -> rewrite -> (quantize) -> lower -> verify -> write the engine folder atomically.

The one orchestrator of the stages; each stage is a function of the previous stage's result.
Artifacts are written into a temporary folder beside the target and renamed into place only
when everything, verification included, has succeeded.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import platform
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from lynx_export.compiler.lowering import DEFAULT_EXPERTS, EXPERT_IMPLEMENTATIONS, QUANTIZED_IMPLEMENTATIONS
from lynx_export.compiler.lowering import ort as ort_lowering
from lynx_export.backends import tensorrt as trt_backend
from lynx_export.compiler.lowering.experts import ACCURACY_LEVEL, set_accuracy_level
from lynx_export.compiler.lowering.ort import LoweredBlock
from lynx_export.compiler.detect import detect
from lynx_export.errors import LoweringError, ModelLoadError, OptionError, OutputError, RoutingError, RunError, one_line
from lynx_export.compiler.forms import rewritten as rewritten_form
from lynx_export.compiler.model_io import load_model_and_inputs, save_model, sha256_file
from lynx_export.compiler.output import check_out_dir, staged_files, staged_folder
from lynx_export.compiler import replay
from lynx_export.compiler.rewrite import rewrite
from lynx_export.routing import OffPolicy, SelectionPolicy, make_policy
from lynx_export.compiler.blocks import Candidate, MoEBlock
from lynx_export.compiler.quantize import QuantizeExpertsPass, QuantizeOptions, check_block_size
from lynx_export.compiler.decoder import DecoderIO
from lynx_export.compiler.genai_folder import GenaiFolder
from lynx_export.compiler.results import (MANIFEST_NAME, REPORT_NAME, Artifact, BlockEntry, Comparison, Deviation, KernelError, Manifest, Observe,
                                          QuantizeEntry, Report, RewriteSummary, Source, Unsupported, write_json)
from lynx_export.compiler.verify import Case, VerifyOptions, case_set, check_replay, compare, run_model, verify
from lynx_export.progress import SILENT, Progress

__all__ = ["BuildOptions", "BuildResult", "BuildPlan", "plan", "build", "lower_again", "CANONICAL_NAME", "ORT_NAME"]

log = logging.getLogger(__name__)

CANONICAL_NAME = "model.lynx.onnx"
ORT_NAME = "model.ort.onnx"
BACKENDS = ("ort", *trt_backend.FLAVOURS)  # every build also writes and verifies the ORT model


@dataclass(frozen=True)
class PolicyChoice:
    """The policy asked for; parameters left None take the defaults for the model's E and K."""

    name: str = "lynx"
    alpha: float | None = None
    beta: int | None = None
    budget: int | None = None
    tie_break: str = "logit"

    def resolve(self, num_experts: int, top_k: int, where: str = "the model") -> SelectionPolicy:
        """The policy for a block of E experts and top-K routing; a parameter out of range for
        them is a one-line RoutingError naming the block and the option."""
        try:
            return make_policy(self.name, alpha=self.alpha, beta=self.beta, budget=self.budget, tie_break=self.tie_break,
                               num_experts=num_experts, top_k=top_k)
        except RoutingError as exc:
            raise RoutingError(f"{where} (E={num_experts}, K={top_k}): {exc}") from None


@dataclass(frozen=True)
class BuildOptions:
    policy: PolicyChoice = field(default_factory=PolicyChoice)
    backend: str = "ort"
    # Expert implementation of the ORT lowering (lowering.EXPERT_IMPLEMENTATIONS). per-expert is the
    # fastest for float experts at every batch size measured (docs/BENCHMARKS.md) and the only
    # one that runs quantized experts.
    ort_experts: str = DEFAULT_EXPERTS
    quantize: QuantizeOptions | None = None  # weight-only block quantization of the experts
    verify: VerifyOptions = field(default_factory=VerifyOptions)
    engine: trt_backend.EngineOptions = field(default_factory=trt_backend.EngineOptions)  # tensorrt backends only
    force: bool = False  # replace a non-empty output folder


@dataclass(frozen=True)
class BuildResult:
    out_dir: pathlib.Path
    manifest: Manifest
    report: Report
    blocks: tuple[LoweredBlock, ...]  # where each block's routing shows in model.ort.onnx


def _check_out_dir_spares_input(out_dir: pathlib.Path, inputs: list[pathlib.Path]) -> None:
    """Replacing `out_dir` must never touch the model being compiled or its external data."""
    target = out_dir.resolve()
    for file in inputs:
        if file.is_relative_to(target) or target.is_relative_to(file):
            raise OutputError(f"{out_dir}: output folder would overwrite the input file {file}")


def _reference_token_limit(blocks: Sequence[MoEBlock], model_bytes: int, limit: int | None) -> int | None:
    """Most tokens per verification case: exporters that run experts as batched matmuls gather a
    copy of each routed expert's weights per (token, choice) — K·3·I·H floats per token and layer —
    so on a large model the original's own run, not the compiled one, bounds the cases. Its
    gathered copies may take a quarter of the model's size (at least 64 MiB)."""
    gathering = [b.spec for b in blocks if b.form == "batched_mm"]
    if not gathering:
        return limit
    per_token = max(s.top_k * 3 * s.expert_size * s.hidden_size * 4 for s in gathering)
    budget = max(1, max(64 << 20, model_bytes // 4) // per_token)
    return budget if limit is None else min(limit, budget)


def _upgrade_opset(model: ir.Model, model_path: pathlib.Path) -> ir.Model:
    """`model` converted to the default-domain opset the ONNX Runtime lowering writes."""
    from onnx import version_converter

    try:
        proto = version_converter.convert_version(ir.to_proto(model), ort_lowering.MIN_OPSET)
    except Exception as exc:  # the converter raises bare RuntimeErrors, also for protos over 2 GB
        raise ModelLoadError(f"{model_path}: cannot convert opset {model.opset_imports.get('', 0)} to {ort_lowering.MIN_OPSET} "
                             f"({one_line(exc)}); convert the model to opset {ort_lowering.MIN_OPSET} or newer first") from None
    return ir.from_proto(proto)


def _reference_model(model_path: pathlib.Path, folder: pathlib.Path, name: str = "reference.onnx") -> pathlib.Path:
    """`model_path` (holding LynxMoE nodes) lowered as its builds' reference (`lower_reference`),
    saved in `folder`: ONNX Runtime runs a model over 2 GiB only from a file."""
    path = folder / name
    save_model(ort_lowering.lower_reference(ir.load(model_path)).model, path)
    return path


def _float_activations(path: pathlib.Path, folder: pathlib.Path) -> pathlib.Path:
    """`path`, or a copy in `folder` whose MatMulNBits and QMoE nodes run at accuracy level 0
    (float activations) where any ran at another."""
    model = ir.load(path)
    if not set_accuracy_level(model, 0):
        return path
    copy = folder / f"{path.stem}.accuracy_level_0.onnx"
    save_model(model, copy)
    return copy


@dataclass(frozen=True)
class BuildPlan:
    """What a build will do, decided before any slow work (every refusal happens making it). The
    loaded model is handed on beside it, so that the plan does not keep it alive."""

    source: pathlib.Path  # the model compiled (a genai folder's decoder model)
    genai: GenaiFolder | None
    inputs: tuple[pathlib.Path, ...]  # the source's files (model and external data)
    source_hash: str
    blocks: tuple[MoEBlock, ...]
    unsupported: tuple[Candidate, ...]
    decoder: DecoderIO | None  # how to feed the source (None: no block, nothing to run)
    policy: SelectionPolicy
    quantized: bool  # the experts are quantized: asked for, or already in the source
    experts: str  # the ORT lowering's expert implementation

    @property
    def rebuilt(self) -> bool:
        """The source is a lynx-export build: its LynxMoE nodes are the blocks."""
        return any(b.form == rewritten_form.FORM for b in self.blocks)

    @property
    def gated(self) -> bool | None:
        """Prefill keeps the model's routing (a property of blocks: none, no answer)."""
        return all(b.sequence_source is not None for b in self.blocks) if self.blocks else None

    def exact(self, case: Case) -> bool:
        """With the policy off, or in prefill (which keeps the model's routing), the compiled
        model must reproduce the original."""
        return self.policy.name == "off" or (bool(self.gated) and case.phase == "prefill")

    @property
    def policy_entry(self) -> dict[str, Any]:
        return {"name": self.policy.name, **self.policy.params()}

    @property
    def unsupported_entries(self) -> tuple[Unsupported, ...]:
        return tuple(Unsupported(name=c.name, reason=c.reason) for c in self.unsupported)

    def report(self, comparison: Comparison, **quantized: Any) -> Report:
        """The build's report: its comparison (and, for quantized experts, `quantized`'s fields)."""
        return Report(policy=self.policy_entry, phase_gated=self.gated, unsupported=self.unsupported_entries, comparison=comparison, **quantized)


def plan(model_path: pathlib.Path, out_dir: pathlib.Path, options: BuildOptions, progress: Progress = SILENT) -> tuple[BuildPlan, ir.Model]:
    """Check the options, load and detect: the plan, and the model (opset-upgraded where needed)."""
    genai = GenaiFolder.resolve(model_path)
    if genai is not None:
        model_path = genai.model
    if options.backend not in BACKENDS:
        raise OutputError(f"backend '{options.backend}' is not available (choose from {', '.join(BACKENDS)})")
    if options.backend in trt_backend.FLAVOURS:  # a missing package or a bad option fails before any work
        trt_backend.require(options.backend)
        options.engine.check(options.backend)
    check_out_dir(out_dir, options.force)

    progress.note(f"loading {model_path}")
    model, inputs = load_model_and_inputs(model_path)
    _check_out_dir_spares_input(out_dir, inputs)
    if genai is not None:  # before any work: the folder's files must not collide with the build's own
        genai.check_names((CANONICAL_NAME, ORT_NAME, REPORT_NAME, MANIFEST_NAME, replay.FOLDER, trt_backend.PREPARED_NAME,
                           trt_backend.PLAN_NAME), inputs)
    source_hash = sha256_file(model_path)
    if any(v.dtype is None for node in model.graph for v in node.outputs):
        # Exporters that write no value_info (TorchScript) leave intermediate types unknown; the
        # rewrite and the lowerings type every value they create from their neighbours.
        progress.note("inferring value types")
        common_passes.ShapeInferencePass(check_type=False, strict_mode=False, data_prop=False)(model)
    progress.note("detecting MoE blocks")
    detected = detect(model)
    if detected.blocks and model.opset_imports.get("", 0) < ort_lowering.MIN_OPSET:
        progress.note(f"converting from opset {model.opset_imports.get('', 0)} to {ort_lowering.MIN_OPSET}, the ONNX Runtime lowering's")
        model = _upgrade_opset(model, model_path)
        detected = detect(model)
    blocks = detected.blocks
    # How to feed the source (its inputs' convention): read from the user's model and its folder,
    # before any slow work, so that an input it cannot fill is refused first.
    try:
        decoder = DecoderIO.read(model, model_path.parent, dict(options.verify.dims)) if blocks else None
    except RunError as exc:
        raise RunError(f"{model_path}: {exc}") from None
    unsupported = tuple(c for c in detected.candidates if not c.supported)
    for c in unsupported:
        progress.note(f"left as it is: block {c.name}: {c.reason}")
    if not blocks:
        progress.note(f"no MoE block to rewrite in {model_path}: the model compiles unchanged")
    if options.quantize is not None:  # before any slow work: a block size must fit every block
        for b in blocks:
            check_block_size(b.spec, options.quantize.block_size, f"block {b.name}")
    quantized = options.quantize is not None or any(b.weights.quantization is not None for b in blocks)
    if quantized and options.ort_experts not in QUANTIZED_IMPLEMENTATIONS:
        raise LoweringError(f"--ort-experts {options.ort_experts} runs float experts only; this model's quantized experts run --ort-experts "
                            f"{' or '.join(QUANTIZED_IMPLEMENTATIONS)}")
    # One policy for the model; its defaults follow the first block's E and K, and every block's
    # E and K must admit its parameters.
    policies = [options.policy.resolve(b.spec.num_experts, b.spec.top_k, f"block {b.name}") for b in blocks]
    return BuildPlan(source=model_path, genai=genai, inputs=tuple(inputs), source_hash=source_hash, blocks=blocks, unsupported=unsupported,
                     decoder=decoder, policy=policies[0] if policies else OffPolicy(), quantized=quantized,
                     experts=options.ort_experts), model


def _verify_float(planned: BuildPlan, reference: pathlib.Path, staging: pathlib.Path, blocks: Sequence[LoweredBlock],
                  options: VerifyOptions, progress: Progress, labels: tuple[str, str]) -> Report:
    comparison = verify(reference, staging / ORT_NAME, blocks, exact=planned.exact, options=options, progress=progress, replay=staging,
                        decoder=planned.decoder, labels=labels)
    return planned.report(comparison)


def _verify_quantized(planned: BuildPlan, reference: pathlib.Path, staging: pathlib.Path, blocks: Sequence[LoweredBlock],
                      verify_options: VerifyOptions, options: BuildOptions, scratch: pathlib.Path, progress: Progress,
                      labels: tuple[str, str]) -> Report:
    """Verification of quantized experts, in three comparisons.

    1. Must match: the lowered model with float activations (MatMulNBits accuracy level 0) against
       the same experts dequantized (run by the fused float kernel; for a QMoE source, the source
       itself), within the tolerance, as for float builds: this proves the graph, the weights'
       layout and the routing.
    2. Reported: the model as built (level ACCURACY_LEVEL, which rounds activations to int8 per
       block for int8 dot products) against the same reference: the kernel's own error. It grows
       with activation outliers and can flip near-tied routing in later layers, so no fixed
       bound holds for every model; docs/ACCURACY.md measures what it costs in accuracy.
    3. Reported, when the build quantized float experts: the model as built against the
       unquantized original: the quantization error.
    """
    if options.quantize is None:  # the source's own quantized experts (a QMoE source, at level 0, or a rebuild's reference)
        dequantized = _float_activations(reference, scratch)
    else:
        dequantized = _reference_model(staging / CANONICAL_NAME, scratch, "dequantized.onnx")
    # Each model runs once over one set of cases; the comparisons share the runs, each run dropped
    # once its last comparison is made (a decoder's outputs for every case can be large).
    cases = case_set(reference, verify_options, planned.decoder, progress)
    dequantized_runs = run_model(dequantized, cases, label=f"{labels[0]} with its experts dequantized", role="dequantized", progress=progress)
    level0 = run_model(_float_activations(staging / ORT_NAME, scratch), cases, label=f"{labels[1]} at accuracy level 0", blocks=blocks,
                       role="built at accuracy level 0", progress=progress)
    comparison = compare(dequantized_runs, level0, cases, blocks, exact=planned.exact, options=verify_options)
    del level0
    built = run_model(staging / ORT_NAME, cases, label=labels[1], blocks=blocks, role="built", progress=progress)
    # The replay files hold the shipped model's own outputs: it deviates from the dequantized
    # experts by the kernel error, which no fixed tolerance bounds.
    kernel = compare(dequantized_runs, built, cases, blocks, exact=lambda _: False, options=verify_options, replay=staging,
                     expected_from=f"the built model (accuracy level {ACCURACY_LEVEL}) in every case")
    del dequantized_runs
    quantization_error = None
    if options.quantize is not None:
        original = run_model(reference, cases, label=labels[0], role="original (unquantized)", progress=progress)
        quantization_error = Deviation.of(compare(original, built, cases, blocks, exact=lambda _: False, options=verify_options))
    return planned.report(dataclasses.replace(comparison, replay=kernel.replay), verified_at_accuracy_level=0,
                          kernel_error=KernelError(accuracy_level=ACCURACY_LEVEL, cases=Deviation.of(kernel)), quantization_error=quantization_error)


def _observed(name: str, lowered: Sequence[LoweredBlock]) -> Observe | None:
    """Where block `name`'s routing can be read in model.ort.onnx (values a probe copy makes
    outputs: serving reads a decode step's active experts from them)."""
    block = next((b for b in lowered if b.name == name), None)
    return None if block is None else Observe(router_logits=block.router_logits, routed_logits=block.routed_logits)


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for dist in ("lynx-export", "onnx", "onnx-ir", "onnxruntime", "numpy"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


def _manifest(planned: BuildPlan, options: BuildOptions, rewrite_counts: Mapping[str, int], lowered: Sequence[LoweredBlock],
              engine: trt_backend.Engine | None, staging: pathlib.Path, artifacts: Sequence[pathlib.Path]) -> Manifest:
    quantize = options.quantize
    return Manifest(
        tool="lynx-export",
        versions=_versions(),
        backend=options.backend,
        ort_experts=planned.experts,
        quantize=None if quantize is None else QuantizeEntry(precision=quantize.precision, block_size=quantize.block_size),
        engine=engine,
        source=Source(path=str(planned.source), sha256=planned.source_hash, genai_folder=None if planned.genai is None else str(planned.genai.folder)),
        policy=planned.policy_entry,
        rewrite=RewriteSummary(blocks=len(planned.blocks), counts=dict(rewrite_counts)),
        blocks=tuple(BlockEntry(name=b.name, form=b.form, spec=b.spec.to_dict(), observe=_observed(b.name, lowered)) for b in planned.blocks),
        unsupported=planned.unsupported_entries,
        artifacts=tuple(Artifact(file=str(p.relative_to(staging)), bytes=p.stat().st_size, sha256=sha256_file(p)) for p in artifacts),
    )


def build(
    model_path: str | pathlib.Path,
    out_dir: str | pathlib.Path,
    options: BuildOptions,
    progress: Progress = SILENT,
) -> BuildResult:
    """Compile `model_path` into `out_dir` (see the module docstring for the stages). `model_path`
    may be an onnxruntime-genai model folder: its config's decoder model is compiled, and `out_dir`
    becomes a folder onnxruntime-genai loads (genai_folder)."""
    out_dir = pathlib.Path(out_dir)
    planned, model = plan(pathlib.Path(model_path), out_dir, options, progress)
    blocks = planned.blocks

    with staged_folder(out_dir) as staging, tempfile.TemporaryDirectory(prefix="lynx-reference-") as scratch:
        # A model rewritten before holds LynxMoE nodes, which ONNX Runtime cannot run: its
        # reference is its own ORT lowering with the policy off (the model's routing).
        reference = _reference_model(planned.source, pathlib.Path(scratch)) if planned.rebuilt else planned.source
        progress.note(f"rewriting {len(blocks)} block(s) into LynxMoE nodes")
        rewritten = rewrite(model, blocks, planned.policy)
        weight_errors: dict[str, float] = {}
        if options.quantize is not None and blocks:
            progress.note(f"quantizing expert weights to {options.quantize.precision}, blocks of {options.quantize.block_size}")
            quantize_pass = QuantizeExpertsPass(options.quantize)
            quantize_pass(rewritten.model)
            weight_errors = quantize_pass.weight_errors
        artifacts = save_model(rewritten.model, staging / CANONICAL_NAME)
        rewrite_counts = rewritten.counts
        del model, rewritten

        progress.note("lowering for ONNX Runtime")
        # Reloaded from disk rather than copied in memory: the canonical model must stay as saved.
        lowered = ort_lowering.lower(ir.load(staging / CANONICAL_NAME), planned.experts)
        artifacts += save_model(lowered.model, staging / ORT_NAME)
        if planned.genai is not None:
            artifacts += planned.genai.write(staging, staging / ORT_NAME, list(planned.inputs))
        lowered_blocks = lowered.blocks
        del lowered

        progress.note("verifying against the original model")
        if blocks:
            # Errors name the user's model and what was built from it, not the temporary copies run.
            labels = (str(planned.source), f"{planned.source} as compiled ({ORT_NAME})")
            model_bytes = sum(f.stat().st_size for f in planned.inputs)
            verify_options = dataclasses.replace(options.verify, max_tokens=_reference_token_limit(blocks, model_bytes, options.verify.max_tokens))
            if planned.quantized:
                report = _verify_quantized(planned, reference, staging, lowered_blocks, verify_options, options, pathlib.Path(scratch), progress,
                                           labels)
            else:
                report = _verify_float(planned, reference, staging, lowered_blocks, verify_options, progress, labels)
        else:
            report = planned.report(Comparison(tolerance=options.verify.tolerance, passed=True, cases=(), skipped=(),
                                               comparator="none: no block rewritten"), note="no block rewritten: nothing to verify")
        if weight_errors:  # the quantized weights' own loss, per block (relative RMS of fc1 and fc2)
            report = dataclasses.replace(report, quantization_weight_error=weight_errors)
        saved = report.comparison.replay
        if saved is not None:
            artifacts += [staging / replay.INPUTS, staging / replay.EXPECTED]

        engine = None
        if options.backend in trt_backend.FLAVOURS:
            # The prepared graph is kept: it is what trtexec builds engines from on the target GPU.
            artifacts += save_model(trt_backend.prepare(ir.load(staging / CANONICAL_NAME)), staging / trt_backend.PREPARED_NAME)
            engine = trt_backend.build_engine(staging / trt_backend.PREPARED_NAME, staging / trt_backend.PLAN_NAME, options.backend,
                                              options.engine, progress)
            artifacts.append(staging / trt_backend.PLAN_NAME)
        if saved is not None:
            report = report.with_commands(replay.replay_commands(options.verify.tolerance, engine))
        write_json(staging / REPORT_NAME, report)
        manifest = _manifest(planned, options, rewrite_counts, lowered_blocks, engine, staging, artifacts + [staging / REPORT_NAME])
        write_json(staging / MANIFEST_NAME, manifest)
    progress.note(f"wrote {out_dir}")
    return BuildResult(out_dir, manifest, report, lowered_blocks)


def lower_again(build_dir: pathlib.Path, experts: str, out_path: pathlib.Path, progress: Progress = SILENT) -> tuple[LoweredBlock, ...]:
    """The canonical model of the build in `build_dir` lowered with another expert implementation
    into `out_path` (outside the build folder), published once it reproduces the build's expected
    outputs where they had to match the source (its verification cases, within its tolerance:
    `verify.check_replay`): one run of the new model, none of the source's, so a model lowered
    several ways is rewritten and verified against its source once."""
    if experts not in EXPERT_IMPLEMENTATIONS:
        raise OptionError(f"--ort-experts: choose from {', '.join(EXPERT_IMPLEMENTATIONS)} (got {experts})")
    if out_path.resolve().is_relative_to(build_dir.resolve()):
        raise OutputError(f"{out_path}: another lowering is written outside the build folder {build_dir}, whose manifest lists its files")
    report = Report.read(build_dir)
    if report.comparison.replay is None:
        raise OutputError(f"{build_dir}: the build saved no verification cases to check another lowering against")
    if report.kernel_error is not None and experts not in QUANTIZED_IMPLEMENTATIONS:  # quantized experts, built or in the source
        raise LoweringError(f"--ort-experts {experts} runs float experts only; this build's quantized experts run --ort-experts "
                            f"{' or '.join(QUANTIZED_IMPLEMENTATIONS)}")
    progress.note(f"lowering {build_dir / CANONICAL_NAME} with {experts} experts")
    lowered = ort_lowering.lower(ir.load(build_dir / CANONICAL_NAME), experts)
    with staged_files(out_path.parent, last=out_path.name) as staging:
        save_model(lowered.model, staging / out_path.name)
        deviations = check_replay(build_dir, staging / out_path.name, report.comparison.cases, report.comparison.tolerance,
                                  label=f"{out_path} ({experts} experts)", progress=progress)
    unjudged = [d for d, c in zip(deviations, report.comparison.cases) if not c.must_match]
    if unjudged:
        progress.note(f"{out_path}: max abs diff from the build's own outputs where the policy selects (not judged): "
                      f"{max(d.max_abs_diff for d in unjudged):.3g}")
    return lowered.blocks
