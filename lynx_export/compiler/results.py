"""What a build hands on: the verification's comparison, report.json and manifest.json, as records.

`verify.compare` makes a `Comparison`; `build` wraps it in the `Report` and writes the `Manifest`;
the CLI, serving and bench read their fields, and `Manifest.read` reads a build folder's file
back. engines/README.md's tables of the two files are `schema_markdown(Report)` and
`schema_markdown(Manifest)` (tests/test_results.py checks that they are the same).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Mapping
from typing import Any, TypeVar

from lynx_export.backends.tensorrt import Engine
from lynx_export.errors import DataError, OutputError
from lynx_export.records import Record, doc, record, schema_markdown

__all__ = ["OutputComparison", "BlockRouting", "RoutingSummary", "CaseResult", "SkippedCase", "ReplayCommand", "Replay", "Comparison",
           "Deviation", "KernelError", "Unsupported", "Report", "Source", "RewriteSummary", "Observe", "BlockEntry", "Artifact",
           "QuantizeEntry", "Manifest", "REPORT_NAME", "MANIFEST_NAME", "write_json", "schema_section"]

R = TypeVar("R", bound=Record)
REPORT_NAME = "report.json"
MANIFEST_NAME = "manifest.json"


# -- verification ----------------------------------------------------------------------------------


@record
class OutputComparison(Record):
    """Polygraphy's verdict on one output of one case, and where its largest deviation lies."""

    max_abs_diff: float = doc("largest absolute difference, original against compiled (infinite where the shapes differ)")
    mean_abs_diff: float = doc("mean absolute difference")
    max_rel_diff: float | None = doc("largest relative difference", None)
    median_abs_diff: float | None = doc("median absolute difference", None)
    passed: bool = doc("within the tolerance")
    worst_index: tuple[int, ...] | None = doc("index of the largest deviation", None)
    reason: str | None = doc("why it failed without a comparison (shapes differ)", None)


@record
class BlockRouting(Record):
    name: str = doc("the block")
    active_experts_model: float = doc("distinct experts the model's own routing runs in this case")
    active_experts_policy: float = doc("distinct experts the compiled model ran")
    routing_agreement: float = doc("share of the (token, choice) pairs the policy kept")


@record
class RoutingSummary(Record):
    """A case's routing read back from the compiled model (router vs routed logits per block)."""

    mean_active_experts_model: float = doc("mean over the blocks of the model's active experts")
    mean_active_experts_policy: float = doc("mean over the blocks of the compiled model's active experts")
    routing_agreement: float = doc("mean over the blocks of the routing agreement")
    blocks: tuple[BlockRouting, ...] = doc("per block")


@record
class CaseResult(Record):
    batch: int = doc("batch size of the case")
    seq_len: int = doc("tokens per sequence (1: a decode step)")
    phase: str = doc("decode or prefill")
    must_match: bool = doc("the outputs had to match within the tolerance (policy off, or a gated prefill)")
    max_abs_diff: float = doc("largest deviation over the outputs")
    mean_abs_diff: float = doc("mean over the outputs of their mean deviation")
    outputs: Mapping[str, OutputComparison] = doc("per output")
    routing: RoutingSummary = doc("the routing read back", flatten=True)


@record
class SkippedCase(Record):
    batch: int = doc("batch size")
    seq_len: int = doc("tokens per sequence")
    reason: str = doc("why it was not run")


@record
class ReplayCommand(Record):
    artifact: str = doc("the file it checks")
    command: str = doc("the `polygraphy run` command, run in the build folder")
    needs: str = doc("what it needs to run")


@record
class Replay(Record):
    inputs: str = doc("the cases' inputs, in Polygraphy's JSON format")
    expected: str = doc("the expected outputs, in Polygraphy's JSON format")
    cases: int = doc("how many cases")
    expected_from: str | None = doc("which model's outputs are expected", None)
    commands: tuple[ReplayCommand, ...] | None = doc("per artifact", None)


@record
class Comparison(Record):
    """Two models' runs over one case set compared (verify.compare)."""

    tolerance: float = doc("absolute tolerance per output")
    passed: bool = doc("every case that had to match did")
    cases: tuple[CaseResult, ...] = doc("per batch size and sequence length")
    skipped: tuple[SkippedCase, ...] = doc("cases not run")
    comparator: str = doc("what compared the outputs")
    replay: Replay | None = doc("the cases saved for `polygraphy run`", None)


# -- report.json -----------------------------------------------------------------------------------


@record
class Deviation(Record):
    batch: int = doc("batch size")
    seq_len: int = doc("tokens per sequence")
    phase: str = doc("decode or prefill")
    max_abs_diff: float = doc("largest output deviation")
    mean_abs_diff: float = doc("mean output deviation")

    @classmethod
    def of(cls, comparison: Comparison) -> tuple[Deviation, ...]:
        """Per case max / mean output deviation of a report-only comparison."""
        return tuple(cls(batch=c.batch, seq_len=c.seq_len, phase=c.phase, max_abs_diff=c.max_abs_diff, mean_abs_diff=c.mean_abs_diff)
                     for c in comparison.cases)


@record
class KernelError(Record):
    accuracy_level: int = doc("the MatMulNBits accuracy level the model runs at")
    cases: tuple[Deviation, ...] = doc("the built model against the dequantized experts")


@record
class Unsupported(Record):
    name: str = doc("the block left as it is")
    reason: str = doc("why")


@record
class Report(Record):
    """report.json: the verification against the source model."""

    policy: Mapping[str, Any] = doc("the policy: name and parameters")
    phase_gated: bool | None = doc("prefill keeps the model's routing (null: no block)")
    unsupported: tuple[Unsupported, ...] = doc("blocks left as they are")
    comparison: Comparison = doc("the compiled model against the source", flatten=True)
    note: str | None = doc("why nothing was compared", None)
    verified_at_accuracy_level: int | None = doc("quantized experts: the MatMulNBits accuracy level the comparison ran at", None)
    kernel_error: KernelError | None = doc("quantized experts: the kernel's own error", None)
    quantization_error: tuple[Deviation, ...] | None = doc("quantized by the build: the built model against the unquantized source", None)
    quantization_weight_error: Mapping[str, float] | None = doc("quantized by the build: per block, the relative RMS error of its weights",
                                                                None)

    @property
    def passed(self) -> bool:
        return self.comparison.passed

    def with_commands(self, commands: tuple[ReplayCommand, ...]) -> Report:
        """The report with the replay's commands (known once the engine, if any, is built)."""
        replay = dataclasses.replace(self.comparison.replay, commands=commands)
        return dataclasses.replace(self, comparison=dataclasses.replace(self.comparison, replay=replay))

    @classmethod
    def read(cls, build_dir: pathlib.Path) -> Report:
        """The report of the build in `build_dir` (see `read_record`)."""
        return read_record(cls, build_dir, REPORT_NAME)


# -- manifest.json ---------------------------------------------------------------------------------


@record
class Source(Record):
    path: str = doc("the model compiled")
    sha256: str = doc("its hash")
    genai_folder: str | None = doc("the onnxruntime-genai folder it came from", None)


@record
class RewriteSummary(Record):
    blocks: int = doc("blocks rewritten into LynxMoE nodes")
    counts: Mapping[str, int] = doc("blocks per exporter form")


@record
class Observe(Record):
    router_logits: str = doc("the value holding the model's router logits in model.ort.onnx")
    routed_logits: str = doc("the value holding the logits its experts were routed on")


@record
class BlockEntry(Record):
    name: str = doc("the block")
    form: str = doc("the exporter form it was found in")
    spec: Mapping[str, Any] = doc("every other key: the block's MoESpec fields (lynx_export/op/spec.py)", flatten=True)
    observe: Observe | None = doc("where its routing can be read in model.ort.onnx", None)


@record
class Artifact(Record):
    file: str = doc("path in the build folder")
    bytes: int = doc("size")
    sha256: str = doc("hash")


@record
class QuantizeEntry(Record):
    precision: str = doc("int4 or int8")
    block_size: int = doc("inputs per quantization block")


@record
class Manifest(Record):
    """manifest.json: what was built, from what, and with what."""

    tool: str = doc("lynx-export")
    versions: Mapping[str, str] = doc("python and package versions")
    backend: str = doc("the --backend")
    ort_experts: str = doc("the expert implementation of model.ort.onnx")
    quantize: QuantizeEntry | None = doc("the experts' weight quantization", None)
    engine: Engine | None = doc("what model.plan holds", None)
    source: Source = doc("the compiled model")
    policy: Mapping[str, Any] = doc("the policy: name and parameters")
    rewrite: RewriteSummary = doc("the rewrite")
    blocks: tuple[BlockEntry, ...] = doc("per block rewritten")
    unsupported: tuple[Unsupported, ...] = doc("blocks left as they are")
    artifacts: tuple[Artifact, ...] = doc("every file but manifest.json")

    @classmethod
    def read(cls, build_dir: pathlib.Path) -> Manifest:
        """The manifest of the build in `build_dir` (see `read_record`)."""
        return read_record(cls, build_dir, MANIFEST_NAME)


def read_record(cls: type[R], build_dir: pathlib.Path, name: str) -> R:
    """The record file `name` of the build in `build_dir`; OutputError when the folder has none or
    one this version cannot read (a key it does not know, or not JSON)."""
    path = build_dir / name
    if not path.is_file():
        raise OutputError(f"{build_dir}: not a lynx-export build folder (no {name})")
    try:
        return cls.from_json(json.loads(path.read_text()), name)
    except (ValueError, DataError) as exc:
        raise OutputError(f"{path}: not a {name} this lynx-export reads ({exc})") from None


def write_json(path: pathlib.Path, record: Record) -> None:
    path.write_text(json.dumps(record.to_json(), indent=2) + "\n")


def schema_section() -> str:
    """engines/README.md's description of manifest.json and report.json, from the records."""
    return "\n\n".join([
        f"### `{MANIFEST_NAME}`\n\n{schema_markdown(Manifest)}",
        f"### `{REPORT_NAME}`\n\n{schema_markdown(Report)}",
    ])


if __name__ == "__main__":  # python -m lynx_export.compiler.results: print the section
    print(schema_section())
