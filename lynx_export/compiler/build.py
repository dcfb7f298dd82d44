"""`build`: load -> detect -> rewrite -> (quantize) -> lower -> verify -> write the engine folder atomically.

The one orchestrator of the stages; each stage is a function of the previous stage's result.
Artifacts are written into a temporary folder beside the target and renamed into place only
when everything, verification included, has succeeded.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import platform
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from lynx_export.op import contract as lynx_op
from lynx_export.compiler.lowering import DEFAULT_EXPERTS, QUANTIZED_IMPLEMENTATIONS
from lynx_export.compiler.lowering import ort as ort_lowering
from lynx_export.backends import tensorrt as trt_backend
from lynx_export.compiler.lowering.experts import ACCURACY_LEVEL, set_accuracy_level
from lynx_export.compiler.lowering.ort import LoweredBlock
from lynx_export.compiler.detect import detect
from lynx_export.errors import LoweringError, ModelLoadError, OutputError, RoutingError, RunError, one_line
from lynx_export.compiler.forms import rewritten as rewritten_form
from lynx_export.compiler.model_io import load_model_and_inputs, save_model, sha256_file
from lynx_export.compiler.output import check_out_dir, staged_folder
from lynx_export.compiler import replay
from lynx_export.compiler.rewrite import rewrite
from lynx_export.routing import OffPolicy, SelectionPolicy, make_policy
from lynx_export.compiler.blocks import MoEBlock
from lynx_export.compiler.quantize import DequantizeExpertsPass, QuantizeExpertsPass, QuantizeOptions, check_block_size
from lynx_export.compiler.decoder import DecoderIO
from lynx_export.compiler.genai_folder import GenaiFolder
from lynx_export.compiler.verify import Case, VerifyOptions, case_set, compare, run_model, verify
from lynx_export.progress import SILENT, Progress

__all__ = ["BuildOptions", "BuildResult", "build", "CANONICAL_NAME", "ORT_NAME"]

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
    manifest: dict[str, Any]
    report: dict[str, Any]
    blocks: tuple[LoweredBlock, ...]  # where each block's routing shows in model.ort.onnx


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for dist in ("lynx-export", "onnx", "onnx-ir", "onnxruntime", "numpy"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


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
    """`model_path` (holding LynxMoE nodes) lowered for ONNX Runtime with every node's policy off
    and quantized experts replaced by their dequantized values (run by the fused float kernel)."""
    model = ir.load(model_path)
    DequantizeExpertsPass()(model)
    for node in model.graph:
        if rewritten_form.claims(node):
            spec = lynx_op.from_node(node).spec
            for attr, value in lynx_op.to_attributes(spec, OffPolicy()).items():
                node.attributes[attr] = ir.convenience.convert_attribute(attr, value)
    path = folder / name
    # The fused kernel: a reference computed by other code than the per-expert lowering's.
    save_model(ort_lowering.lower(model, "fused").model, path)
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


def _deviation(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per case max / mean output deviation of a report-only comparison."""
    return [{k: c[k] for k in ("batch", "seq_len", "phase", "max_abs_diff", "mean_abs_diff")} for c in report["cases"]]


def _verify_quantized(reference: pathlib.Path, staging: pathlib.Path, blocks: Sequence[LoweredBlock], exact: Callable[[Case], bool],
                      verify_options: VerifyOptions, options: BuildOptions, scratch: pathlib.Path,
                      progress: Progress, decoder: DecoderIO | None,
                      labels: tuple[str, str]) -> dict[str, Any]:
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
    cases = case_set(reference, verify_options, decoder, progress)
    dequantized_runs = run_model(dequantized, cases, label=f"{labels[0]} with its experts dequantized", role="dequantized", progress=progress)
    level0 = run_model(_float_activations(staging / ORT_NAME, scratch), cases, label=f"{labels[1]} at accuracy level 0", blocks=blocks,
                       role="built at accuracy level 0", progress=progress)
    report = compare(dequantized_runs, level0, cases, blocks, exact=exact, options=verify_options)
    del level0
    built = run_model(staging / ORT_NAME, cases, label=labels[1], blocks=blocks, role="built", progress=progress)
    # The replay files hold the shipped model's own outputs: it deviates from the dequantized
    # experts by the kernel error, which no fixed tolerance bounds.
    kernel = compare(dequantized_runs, built, cases, blocks, exact=lambda _: False, options=verify_options, replay=staging)
    del dequantized_runs
    report["verified_at_accuracy_level"] = 0
    report["replay"] = {**kernel["replay"], "expected_from": f"the built model (accuracy level {ACCURACY_LEVEL}) in every case"}
    report["kernel_error"] = {"accuracy_level": ACCURACY_LEVEL, "cases": _deviation(kernel)}
    if options.quantize is not None:
        original = run_model(reference, cases, label=labels[0], role="original (unquantized)", progress=progress)
        report["quantization_error"] = _deviation(compare(original, built, cases, blocks, exact=lambda _: False, options=verify_options))
    return report


def _observed(name: str, lowered: Sequence[LoweredBlock]) -> dict[str, Any]:
    """Where block `name`'s routing can be read in model.ort.onnx (values a probe copy makes
    outputs: serving reads a decode step's active experts from them)."""
    block = next((b for b in lowered if b.name == name), None)
    return {} if block is None else {"observe": {"router_logits": block.router_logits, "routed_logits": block.routed_logits}}


def _write_json(path: pathlib.Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def build(
    model_path: str | pathlib.Path,
    out_dir: str | pathlib.Path,
    options: BuildOptions,
    progress: Progress = SILENT,
) -> BuildResult:
    """Compile `model_path` into `out_dir` (see the module docstring for the stages). `model_path`
    may be an onnxruntime-genai model folder: its config's decoder model is compiled, and `out_dir`
    becomes a folder onnxruntime-genai loads (genai_folder)."""
    model_path, out_dir = pathlib.Path(model_path), pathlib.Path(out_dir)
    genai = GenaiFolder.resolve(model_path)
    if genai is not None:
        model_path = genai.model
    if options.backend not in BACKENDS:
        raise OutputError(f"backend '{options.backend}' is not available (choose from {', '.join(BACKENDS)})")
    engine_backend = options.backend in trt_backend.FLAVOURS
    if engine_backend:  # a missing package or a bad option fails before any work
        trt_backend.require(options.backend)
        options.engine.check(options.backend)
    check_out_dir(out_dir, options.force)

    progress.note(f"loading {model_path}")
    model, inputs = load_model_and_inputs(model_path)
    _check_out_dir_spares_input(out_dir, inputs)
    if genai is not None:  # before any work: the folder's files must not collide with the build's own
        genai.check_names((CANONICAL_NAME, ORT_NAME, "report.json", "manifest.json", replay.FOLDER, trt_backend.PREPARED_NAME,
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
    unsupported = [c for c in detected.candidates if not c.supported]
    for c in unsupported:
        progress.note(f"left as it is: block {c.name}: {c.reason}")
    if not blocks:
        progress.note(f"no MoE block to rewrite in {model_path}: the model compiles unchanged")
    if options.quantize is not None:  # before any slow work: a block size must fit every block
        for b in blocks:
            check_block_size(b.spec, options.quantize.block_size, f"block {b.name}")
    # Quantized experts: asked for, or already in the source (QMoE, a rebuilt quantized model).
    quantized = options.quantize is not None or any(b.weights.quantization is not None for b in blocks)
    experts = options.ort_experts
    if quantized and experts not in QUANTIZED_IMPLEMENTATIONS:
        raise LoweringError(f"--ort-experts {experts} runs float experts only; this model's quantized experts run --ort-experts "
                            f"{' or '.join(QUANTIZED_IMPLEMENTATIONS)}")
    # One policy for the model; its defaults follow the first block's E and K, and every block's
    # E and K must admit its parameters.
    policies = [options.policy.resolve(b.spec.num_experts, b.spec.top_k, f"block {b.name}") for b in blocks]
    policy = policies[0] if policies else OffPolicy()
    rebuilt = any(b.form == rewritten_form.FORM for b in blocks)

    with staged_folder(out_dir) as staging, tempfile.TemporaryDirectory(prefix="lynx-reference-") as scratch:
        # A model rewritten before holds LynxMoE nodes, which ONNX Runtime cannot run: its
        # reference is its own ORT lowering with the policy off (the model's routing).
        reference = _reference_model(model_path, pathlib.Path(scratch)) if rebuilt else model_path
        progress.note(f"rewriting {len(blocks)} block(s) into LynxMoE nodes")
        rewritten = rewrite(model, blocks, policy)
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
        lowered = ort_lowering.lower(ir.load(staging / CANONICAL_NAME), experts)
        artifacts += save_model(lowered.model, staging / ORT_NAME)
        if genai is not None:
            artifacts += genai.write(staging, staging / ORT_NAME, inputs)
        lowered_blocks = lowered.blocks
        del lowered

        progress.note("verifying against the original model")
        gated = all(b.sequence_source is not None for b in blocks)

        def exact(case: Case) -> bool:
            # With the policy off, or in prefill (which keeps the model's routing), the compiled
            # model must reproduce the original.
            return policy.name == "off" or (gated and case.phase == "prefill")

        if blocks:
            # Errors name the user's model and what was built from it, not the temporary copies run.
            labels = (str(model_path), f"{model_path} as compiled ({ORT_NAME})")
            model_bytes = sum(f.stat().st_size for f in inputs)
            verify_options = dataclasses.replace(options.verify, max_tokens=_reference_token_limit(blocks, model_bytes, options.verify.max_tokens))
            if quantized:
                report = _verify_quantized(reference, staging, lowered_blocks, exact, verify_options, options, pathlib.Path(scratch), progress,
                                           decoder, labels)
            else:
                report = verify(reference, staging / ORT_NAME, lowered_blocks, exact=exact, options=verify_options, progress=progress,
                                replay=staging, decoder=decoder, labels=labels)
                report["replay"]["expected_from"] = "the original where the outputs must match, the built model elsewhere"
        else:
            report = {"passed": True, "tolerance": options.verify.tolerance, "cases": [], "note": "no block rewritten: nothing to verify"}
        if weight_errors:  # the quantized weights' own loss, per block (relative RMS of fc1 and fc2)
            report["quantization_weight_error"] = weight_errors
        # Phase gating (prefill keeps the model's routing) is a property of blocks: none, no answer.
        report = {"policy": {"name": policy.name, **policy.params()}, "phase_gated": gated if blocks else None,
                  "unsupported": [{"name": c.name, "reason": c.reason} for c in unsupported], **report}
        if "replay" in report:
            artifacts += [staging / replay.INPUTS, staging / replay.EXPECTED]

        engine = None
        if engine_backend:
            # The prepared graph is kept: it is what trtexec builds engines from on the target GPU.
            artifacts += save_model(trt_backend.prepare(ir.load(staging / CANONICAL_NAME)), staging / trt_backend.PREPARED_NAME)
            engine = trt_backend.build_engine(staging / trt_backend.PREPARED_NAME, staging / trt_backend.PLAN_NAME, options.backend,
                                              options.engine, progress)
            artifacts.append(staging / trt_backend.PLAN_NAME)
        if "replay" in report:
            report["replay"]["commands"] = replay.replay_commands(options.verify.tolerance, engine)
        _write_json(staging / "report.json", report)
        manifest = {
            "tool": "lynx-export",
            "versions": _versions(),
            "backend": options.backend,
            "ort_experts": experts,
            **({"quantize": {"precision": options.quantize.precision, "block_size": options.quantize.block_size}} if options.quantize else {}),
            **({"engine": engine} if engine else {}),
            "source": {"path": str(model_path), "sha256": source_hash, **({"genai_folder": str(genai.folder)} if genai else {})},
            "policy": {"name": policy.name, **policy.params()},
            "rewrite": {"blocks": len(blocks), "counts": rewrite_counts},
            "blocks": [{"name": b.name, "form": b.form, **b.spec.to_dict(), **_observed(b.name, lowered_blocks)} for b in blocks],
            "unsupported": [{"name": c.name, "reason": c.reason} for c in unsupported],
            "artifacts": [
                {"file": str(p.relative_to(staging)), "bytes": p.stat().st_size, "sha256": sha256_file(p)}
                for p in artifacts + [staging / "report.json"]
            ],
        }
        _write_json(staging / "manifest.json", manifest)
    progress.note(f"wrote {out_dir}")
    return BuildResult(out_dir, manifest, report, lowered_blocks)

