"""`build`: load -> detect -> rewrite -> lower -> verify -> write the engine folder atomically.

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
from lynx_export.compiler.lowering import ort as ort_lowering
from lynx_export.backends import tensorrt as trt_backend
from lynx_export.compiler.lowering.ort import LoweredBlock
from lynx_export.compiler.detect import detect
from lynx_export.errors import ModelLoadError, OutputError, one_line
from lynx_export.compiler.forms import rewritten as rewritten_form
from lynx_export.compiler.model_io import load_model_and_inputs, save_model, sha256_file
from lynx_export.compiler.output import check_out_dir, staged_folder
from lynx_export.compiler.rewrite import rewrite
from lynx_export.routing import OffPolicy, SelectionPolicy, make_policy
from lynx_export.compiler.blocks import MoEBlock
from lynx_export.op.spec import MoESpec
from lynx_export.compiler.verify import Case, VerifyOptions, verify

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

    def resolve(self, spec: MoESpec) -> SelectionPolicy:
        return make_policy(
            self.name, alpha=self.alpha, beta=self.beta, budget=self.budget, tie_break=self.tie_break,
            num_experts=spec.num_experts, top_k=spec.top_k,
        )


@dataclass(frozen=True)
class BuildOptions:
    policy: PolicyChoice = field(default_factory=PolicyChoice)
    backend: str = "ort"
    ort_experts: str = "fused"  # expert implementation of the ORT lowering: "fused" or "conditional"
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


def _reference_model(model_path: pathlib.Path, folder: pathlib.Path) -> pathlib.Path:
    """`model_path` (holding LynxMoE nodes) lowered for ONNX Runtime with every node's policy off."""
    model = ir.load(model_path)
    for node in model.graph:
        if rewritten_form.claims(node):
            spec = lynx_op.from_node(node).spec
            for name, value in lynx_op.to_attributes(spec, OffPolicy()).items():
                node.attributes[name] = ir.convenience.convert_attribute(name, value)
    path = folder / "reference.onnx"
    save_model(ort_lowering.lower(model).model, path)
    return path


def _write_json(path: pathlib.Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def build(
    model_path: str | pathlib.Path,
    out_dir: str | pathlib.Path,
    options: BuildOptions,
    progress: Callable[[str], None] = lambda _: None,
) -> BuildResult:
    """Compile `model_path` into `out_dir` (see the module docstring for the stages)."""
    model_path, out_dir = pathlib.Path(model_path), pathlib.Path(out_dir)
    if options.backend not in BACKENDS:
        raise OutputError(f"backend '{options.backend}' is not available (choose from {', '.join(BACKENDS)})")
    engine_backend = options.backend in trt_backend.FLAVOURS
    if engine_backend:  # a missing package or a bad option fails before any work
        trt_backend.require(options.backend)
        options.engine.check(options.backend)
    check_out_dir(out_dir, options.force)

    progress(f"loading {model_path}")
    model, inputs = load_model_and_inputs(model_path)
    _check_out_dir_spares_input(out_dir, inputs)
    source_hash = sha256_file(model_path)
    if any(v.dtype is None for node in model.graph for v in node.outputs):
        # Exporters that write no value_info (TorchScript) leave intermediate types unknown; the
        # rewrite and the lowerings type every value they create from their neighbours.
        progress("inferring value types")
        common_passes.ShapeInferencePass(check_type=False, strict_mode=False, data_prop=False)(model)
    progress("detecting MoE blocks")
    detected = detect(model)
    if detected.blocks and model.opset_imports.get("", 0) < ort_lowering.MIN_OPSET:
        progress(f"converting from opset {model.opset_imports.get('', 0)} to {ort_lowering.MIN_OPSET}, the ONNX Runtime lowering's")
        model = _upgrade_opset(model, model_path)
        detected = detect(model)
    blocks = detected.blocks
    unsupported = [c for c in detected.candidates if not c.supported]
    for c in unsupported:
        progress(f"left as it is: block {c.name}: {c.reason}")
    if not blocks:
        progress(f"no MoE block to rewrite in {model_path}: the model compiles unchanged")
    # One policy for the model; its defaults follow the first block's E and K.
    policy = options.policy.resolve(blocks[0].spec) if blocks else OffPolicy()
    rebuilt = any(b.form == rewritten_form.FORM for b in blocks)

    with staged_folder(out_dir) as staging, tempfile.TemporaryDirectory(prefix="lynx-reference-") as scratch:
        # A model rewritten before holds LynxMoE nodes, which ONNX Runtime cannot run: its
        # reference is its own ORT lowering with the policy off (the model's routing).
        reference = _reference_model(model_path, pathlib.Path(scratch)) if rebuilt else model_path
        progress(f"rewriting {len(blocks)} block(s) into LynxMoE nodes")
        rewritten = rewrite(model, blocks, policy)
        artifacts = save_model(rewritten.model, staging / CANONICAL_NAME)
        rewrite_counts = rewritten.counts
        del model, rewritten

        progress("lowering for ONNX Runtime")
        # Reloaded from disk rather than copied in memory: the canonical model must stay as saved.
        lowered = ort_lowering.lower(ir.load(staging / CANONICAL_NAME), options.ort_experts)
        artifacts += save_model(lowered.model, staging / ORT_NAME)
        lowered_blocks = lowered.blocks
        del lowered

        progress("verifying against the original model")
        gated = all(b.sequence_source is not None for b in blocks)

        def exact(case: Case) -> bool:
            # With the policy off, or in prefill (which keeps the model's routing), the compiled
            # model must reproduce the original.
            return policy.name == "off" or (gated and case.phase == "prefill")

        if blocks:
            model_bytes = sum(f.stat().st_size for f in inputs)
            verify_options = dataclasses.replace(options.verify, max_tokens=_reference_token_limit(blocks, model_bytes, options.verify.max_tokens))
            report = verify(reference, staging / ORT_NAME, lowered_blocks, exact=exact, options=verify_options, progress=progress)
        else:
            report = {"passed": True, "tolerance": options.verify.tolerance, "cases": [], "note": "no block rewritten: nothing to verify"}
        report = {"policy": {"name": policy.name, **policy.params()}, "phase_gated": gated,
                  "unsupported": [{"name": c.name, "reason": c.reason} for c in unsupported], **report}
        _write_json(staging / "report.json", report)

        engine = None
        if engine_backend:
            # The prepared graph is kept: it is what trtexec builds engines from on the target GPU.
            artifacts += save_model(trt_backend.prepare(ir.load(staging / CANONICAL_NAME)), staging / trt_backend.PREPARED_NAME)
            engine = trt_backend.build_engine(staging / trt_backend.PREPARED_NAME, staging / trt_backend.PLAN_NAME, options.backend,
                                              options.engine, progress)
            artifacts.append(staging / trt_backend.PLAN_NAME)
        manifest = {
            "tool": "lynx-export",
            "versions": _versions(),
            "backend": options.backend,
            "ort_experts": options.ort_experts,
            **({"engine": engine} if engine else {}),
            "source": {"path": str(model_path), "sha256": source_hash},
            "policy": {"name": policy.name, **policy.params()},
            "rewrite": {"blocks": len(blocks), "counts": rewrite_counts},
            "blocks": [{"name": b.name, "form": b.form, **b.spec.to_dict()} for b in blocks],
            "unsupported": [{"name": c.name, "reason": c.reason} for c in unsupported],
            "artifacts": [
                {"file": p.name, "bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in artifacts + [staging / "report.json"]
            ],
        }
        _write_json(staging / "manifest.json", manifest)
    progress(f"wrote {out_dir}")
    return BuildResult(out_dir, manifest, report, lowered_blocks)

