"""Run the original and the compiled model on the same random inputs and compare them.

Runs first, compares after (as Polygraphy's comparator does): `case_set` makes the cases' steps
once, `run_model` runs each model once over them and keeps the results, `compare` compares two
models' results, reading each block's routing back from the compiled model (router logits vs the
logits its MoE kernel routed on) to report agreement and active experts. `verify` is the three in
a row; a quantized build compares several pairs of one set of runs (compiler/build.py).
"""

from __future__ import annotations

import pathlib
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir
import polygraphy
from polygraphy.comparator import AccuracyResult, Comparator, RunResults, SimpleCompareFunc
from polygraphy.comparator.compare import OutputCompareResult
from polygraphy.exception import PolygraphyException

from lynx_export.backends.ort import OrtRunner, polygraphy_quiet
from lynx_export.compiler.decoder import DecoderIO, Step
from lynx_export.compiler.lowering.ort import LoweredBlock
from lynx_export.compiler.replay import EXPECTED, INPUTS, load_replay, save_replay
from lynx_export.compiler.results import BlockRouting, CaseResult, Comparison, Deviation, OutputComparison, Replay, RoutingSummary, SkippedCase
from lynx_export.errors import RunError, ToleranceError, one_line
from lynx_export.compiler.ort_moe_node import to_cpu_form
from lynx_export.compiler.model_io import expose_outputs, save_model
from lynx_export.routing import selection_stats
from lynx_export.progress import SILENT, Progress

__all__ = ["ORIGINAL", "COMPILED", "VerifyOptions", "Case", "CaseSet", "ModelRuns", "verify", "case_set", "run_model", "compare", "case_steps", "probe_copy",
           "routing_summary", "output_rows", "check_replay"]


@dataclass(frozen=True)
class VerifyOptions:
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    seq_lens: tuple[int, ...] = (1, 16)  # 1 is a decode step; longer is prefill
    context_len: int = 8  # past tokens in the KV cache of a step that has one (decoder.DecoderIO)
    tolerance: float = 1e-4  # max abs output difference where routing must be exact
    seed: int = 0
    # Cases with more tokens (batch x seq) are skipped and reported; None: no limit. The build
    # sets it where running the original would take more memory than the model (see build.py).
    max_tokens: int | None = None
    dims: tuple[tuple[str, int], ...] = ()  # sizes of symbolic input dimensions the graph leaves open (--dim)


@dataclass(frozen=True)
class Case:
    batch: int
    seq_len: int

    @property
    def phase(self) -> str:
        return "decode" if self.seq_len == 1 else "prefill"


def case_steps(decoder: DecoderIO, cases: Sequence[Case], options: VerifyOptions) -> list[Step]:
    """One step per case, made by the graph's decoder convention."""
    rng = np.random.default_rng(options.seed)
    return [decoder.step(case.batch, case.seq_len, options.context_len, rng) for case in cases]


def probe_copy(compiled_path: pathlib.Path, blocks: Sequence[LoweredBlock], folder: pathlib.Path) -> pathlib.Path:
    """The compiled model with every block's router and routed logits as extra outputs."""
    model = expose_outputs(ir.load(compiled_path), (name for block in blocks for name in (block.router_logits, block.routed_logits)))
    path = folder / "probe.onnx"
    save_model(model, path)
    return path


def _routing_stats(block: LoweredBlock, router: np.ndarray, routed: np.ndarray) -> BlockRouting:
    stats = selection_stats(block.spec.routing, router, routed)
    return BlockRouting(name=block.name, active_experts_model=stats.active_model, active_experts_policy=stats.active_policy,
                        routing_agreement=stats.agreement)


def routing_summary(blocks: Sequence[LoweredBlock], outputs: dict[str, np.ndarray]) -> RoutingSummary:
    """Routing of every block read back from a probe run, and its means over the blocks."""
    stats = tuple(_routing_stats(b, outputs[b.router_logits], outputs[b.routed_logits]) for b in blocks)
    return RoutingSummary(mean_active_experts_model=_mean(s.active_experts_model for s in stats),
                          mean_active_experts_policy=_mean(s.active_experts_policy for s in stats),
                          routing_agreement=_mean(s.routing_agreement for s in stats), blocks=stats)


ORIGINAL, COMPILED = "original", "compiled"  # the two runners' names


@dataclass(frozen=True)
class CaseSet:
    """The cases a verification runs, the step each feeds (made once, fed to every model), and the
    original's output names (the outputs compared)."""

    cases: tuple[Case, ...]
    steps: tuple[Step, ...]
    outputs: tuple[str, ...]
    skipped: tuple[Case, ...] = ()


@dataclass(frozen=True)
class ModelRuns:
    """One model's outputs over a case set, each cut to what its step defines."""

    label: str  # what errors and reports call the model
    outputs: tuple[dict[str, np.ndarray], ...]


def case_set(original_path: pathlib.Path, options: VerifyOptions, decoder: DecoderIO | None = None,
             progress: Progress = SILENT) -> CaseSet:
    """The cases of `options` (those over `max_tokens` skipped, keeping a prefill) and their steps,
    made by the source's decoder convention (read from the original and its folder when not given)."""
    cases = [Case(b, s) for s in options.seq_lens for b in options.batch_sizes]
    skipped = [c for c in cases if options.max_tokens is not None and c.batch * c.seq_len > options.max_tokens]
    cases = [c for c in cases if c not in skipped] or [min(cases, key=lambda c: c.batch * c.seq_len)]
    if skipped and not any(c.phase == "prefill" for c in cases) and options.max_tokens and options.max_tokens >= 2:
        # Prefill keeps the model's routing, the check that must be exact under any policy: keep one.
        cases.append(Case(1, min(options.max_tokens, max(options.seq_lens))))
    skipped = [c for c in skipped if c not in cases]
    for case in skipped:
        progress.note(f"skipping batch {case.batch}, seq {case.seq_len}: over the limit of {options.max_tokens} tokens per case")
    if decoder is None:  # (a build reads its source's once, before any work)
        decoder = DecoderIO.read(ir.load(original_path), original_path.parent, dict(options.dims))
    return CaseSet(tuple(cases), tuple(case_steps(decoder, cases, options)), decoder.outputs, tuple(skipped))


def _run(path: pathlib.Path, feeds: Sequence[dict[str, np.ndarray]], *, role: str, label: str,
         announce: Callable[[int], None]) -> list[dict[str, np.ndarray]]:
    """`path` run once per feed through Polygraphy's runner (`role`: the runner's name); a failure
    is a one-line RunError naming `label`."""
    runner = OrtRunner(str(path), name=role, on_infer=announce, label=label)
    try:
        with polygraphy_quiet():
            results = Comparator.run([runner], data_loader=list(feeds))
    except PolygraphyException as exc:
        raise RunError(f"Polygraphy could not run {label} ({one_line(exc)})") from None
    return [dict(outputs) for outputs in results[role]]


def run_model(path: pathlib.Path, cases: CaseSet, *, label: str | None = None, blocks: Sequence[LoweredBlock] = (), role: str = ORIGINAL,
              progress: Progress = SILENT) -> ModelRuns:
    """`path` run once over every case of `cases`, on ONNX Runtime through Polygraphy's runner.

    With `blocks` (a compiled model) its probe copy runs, each block's router and routed logits
    as extra outputs (`routing_summary` reads them). A graph holding an ONNX Runtime MoE layout
    its CPU kernel cannot run (fc3, swiglu_fusion 0/2) runs as its equivalent interleaved form.
    """
    label = label or str(path)

    def announce(i: int) -> None:
        progress.step(role, i + 1, len(cases.cases), f"batch {cases.cases[i].batch}, seq {cases.cases[i].seq_len}")

    with tempfile.TemporaryDirectory(prefix="lynx-verify-") as tmp:
        if blocks:
            path = probe_copy(path, blocks, pathlib.Path(tmp))
        else:
            model = ir.load(path)
            if to_cpu_form(model):
                path = pathlib.Path(tmp) / "reference.onnx"
                save_model(model, path)
            del model
        # The data loader is the list of feeds: Polygraphy's own DataLoader cannot make a decoder's
        # consistent steps (masks, positions, caches), which DecoderIO does.
        results = _run(path, [step.feeds for step in cases.steps], role=role, label=label, announce=announce)
    return ModelRuns(label, tuple(step.defined(outputs) for step, outputs in zip(cases.steps, results)))


def _output_result(status: Any, ref: np.ndarray, got: np.ndarray) -> OutputComparison:
    """Polygraphy's verdict on one output, and where its largest deviation lies."""
    if not isinstance(status, OutputCompareResult):  # a bare bool: shapes differ
        return OutputComparison(max_abs_diff=float("inf"), mean_abs_diff=float("inf"), passed=False,
                                reason=f"shapes differ: {list(np.shape(ref))} and {list(np.shape(got))}")
    worst = None
    if ref.size:
        deviation = np.abs(ref.astype(np.float64) - got.astype(np.float64))
        worst = tuple(int(i) for i in np.unravel_index(int(np.nanargmax(np.nan_to_num(deviation, nan=np.inf))), ref.shape))
    return OutputComparison(max_abs_diff=float(status.max_absdiff), mean_abs_diff=float(status.mean_absdiff),
                            max_rel_diff=float(status.max_reldiff), median_abs_diff=float(status.median_absdiff), passed=bool(status),
                            worst_index=worst)


def _deviation(outputs: Mapping[str, OutputComparison]) -> dict[str, float]:
    """A case's deviation over its outputs: the largest, and the mean of their means."""
    return {"max_abs_diff": max(d.max_abs_diff for d in outputs.values()),
            "mean_abs_diff": float(np.mean([d.mean_abs_diff for d in outputs.values()]))}


def _compare(reference: ModelRuns, compiled: ModelRuns, output_names: Sequence[str], tolerance: float) -> list[dict[str, OutputComparison]]:
    """Per case, per output: Polygraphy's comparison with an absolute tolerance per output."""
    results = RunResults()
    for role, runs in ((ORIGINAL, reference), (COMPILED, compiled)):
        results.add([dict(outputs) for outputs in runs.outputs], runner_name=role)
    compare = SimpleCompareFunc(atol={n: tolerance for n in output_names}, rtol={n: 0.0 for n in output_names}, check_shapes=True)
    with polygraphy_quiet():
        accuracy = Comparator.compare_accuracy(results, compare_func=compare)
    if not isinstance(accuracy, AccuracyResult):  # newer Polygraphy: one AccuracyResult per compare function
        accuracy = accuracy[0]
    statuses = accuracy[(ORIGINAL, COMPILED)]
    return [{n: _output_result(status.get(n, False), ref[n], got[n]) for n in output_names if n in ref}
            for status, ref, got in zip(statuses, results[ORIGINAL], results[COMPILED])]


def verify(
    original_path: pathlib.Path,
    compiled_path: pathlib.Path,
    blocks: Sequence[LoweredBlock],
    *,
    exact: Callable[[Case], bool],
    options: VerifyOptions = VerifyOptions(),
    progress: Progress = SILENT,
    replay: pathlib.Path | None = None,
    decoder: DecoderIO | None = None,
    labels: tuple[str, str] | None = None,
) -> Comparison:
    """Run both models once over the cases, then `compare` them (see there). `decoder`: the source's
    input convention (read from the original and its folder when not given: a build gives the
    user's model's, whose folder may hold a genai_config.json). `labels`: what errors call the two
    models (default: their paths; a build names the user's model, not its temporary copies)."""
    cases = case_set(original_path, options, decoder, progress)
    labels = labels or (str(original_path), str(compiled_path))
    reference = run_model(original_path, cases, label=labels[0], role=ORIGINAL, progress=progress)
    compiled = run_model(compiled_path, cases, label=labels[1], blocks=blocks, role=COMPILED, progress=progress)
    return compare(reference, compiled, cases, blocks, exact=exact, options=options, replay=replay)


def compare(reference: ModelRuns, compiled: ModelRuns, cases: CaseSet, blocks: Sequence[LoweredBlock], *, exact: Callable[[Case], bool],
            options: VerifyOptions, replay: pathlib.Path | None = None, expected_from: str | None = None) -> Comparison:
    """Compare two models' runs over the same cases; raise ToleranceError where `exact(case)` and
    they differ by more than `options.tolerance`.

    The comparison is Polygraphy's (`Comparator.compare_accuracy`, an absolute tolerance per
    output); the routing is read back from the compiled model's probe outputs. With `replay`, the
    inputs and expected outputs are saved there in Polygraphy's JSON formats (see `save_replay`);
    `expected_from` says whose outputs they are (default: the original's where the outputs must
    match, the compiled model's elsewhere).
    """
    tolerance = options.tolerance
    compared = _compare(reference, compiled, cases.outputs, tolerance)
    results = tuple(
        CaseResult(batch=case.batch, seq_len=case.seq_len, phase=case.phase, must_match=exact(case), **_deviation(outputs),
                   outputs=outputs, routing=routing_summary(blocks, got))
        for case, got, outputs in zip(cases.cases, compiled.outputs, compared))
    failures = [r for r in results if r.must_match and not all(d.passed for d in r.outputs.values())]
    if failures:
        worst = max(failures, key=lambda r: r.max_abs_diff)
        name = max(worst.outputs, key=lambda n: worst.outputs[n].max_abs_diff)
        rows = output_rows(results, tolerance)
        raise ToleranceError(
            f"compiled model differs from the original: max abs diff {worst.max_abs_diff:.3g} > {tolerance:g} "
            f"on output '{name}' at batch {worst.batch}, seq {worst.seq_len} "
            f"({sum(not r['passed'] for r in rows)} of {len(rows)} outputs over the tolerance)",
            cases=tuple(rows),
        )
    saved = None
    if replay is not None:  # only a verification that passed is worth replaying
        # Expected outputs: the original's where the outputs must match, the compiled model's
        # elsewhere (a LYNX decode step differs from the original by design). Outputs a step
        # defines only in part (a decoder's cache rows) are left out: `polygraphy run` compares whole outputs.
        expected = [{n: (ref if result.must_match else got)[n] for n in cases.outputs if n in ref and n not in step.meaningful}
                    for result, step, ref, got in zip(results, cases.steps, reference.outputs, compiled.outputs)]
        save_replay(replay, [step.feeds for step in cases.steps], expected)
        saved = Replay(inputs=INPUTS, expected=EXPECTED, cases=len(cases.cases),
                       expected_from=expected_from or "the original where the outputs must match, the built model elsewhere")
    return Comparison(
        tolerance=tolerance, passed=True, cases=results,
        skipped=tuple(SkippedCase(batch=c.batch, seq_len=c.seq_len, reason=f"more than {options.max_tokens} tokens") for c in cases.skipped),
        comparator=f"Polygraphy {polygraphy.__version__} Comparator.compare_accuracy, SimpleCompareFunc(atol={tolerance:g} per output, rtol=0)",
        replay=saved)


def check_replay(build_dir: pathlib.Path, model_path: pathlib.Path, cases: Sequence[CaseResult], tolerance: float, *, label: str,
                 progress: Progress = SILENT) -> tuple[Deviation, ...]:
    """Run `model_path` once over the cases a build saved (verification/) and compare its outputs with
    the expected ones there, as `polygraphy run MODEL --load-inputs --load-outputs` does: a model
    that must compute what the build's own does (another lowering of its canonical model) is so
    verified without running the source again. `cases`: the build's report's, in the saved order.
    ToleranceError where a case that had to match the source (`must_match`) differs by more than
    `tolerance`; elsewhere (a LYNX decode step, whose expected outputs are the build's own) a
    near-tied selection may flip on rounding, so the deviation is returned, not judged."""
    feeds, expected = load_replay(build_dir)

    def announce(i: int) -> None:
        progress.step("replayed", i + 1, len(feeds), f"batch {cases[i].batch}, seq {cases[i].seq_len}")

    results = _run(model_path, feeds, role="replayed", label=label, announce=announce)
    reference = ModelRuns("the build's expected outputs", tuple(expected))
    got = ModelRuns(label, tuple({name: outputs[name] for name in want} for outputs, want in zip(results, expected)))
    compared = _compare(reference, got, sorted({name for want in expected for name in want}), tolerance)
    failures = [(case, name, d) for case, outputs in zip(cases, compared) if case.must_match for name, d in outputs.items() if not d.passed]
    if failures:
        case, name, worst = max(failures, key=lambda f: f[2].max_abs_diff)
        raise ToleranceError(f"{label} differs from the build's expected outputs ({build_dir / EXPECTED}): max abs diff "
                             f"{worst.max_abs_diff:.3g} > {tolerance:g} on output '{name}' at batch {case.batch}, seq {case.seq_len} "
                             f"({len(failures)} of {sum(map(len, compared))} outputs over the tolerance)")
    return tuple(Deviation(batch=case.batch, seq_len=case.seq_len, phase=case.phase, **_deviation(outputs))
                 for case, outputs in zip(cases, compared))


def output_rows(cases: Sequence[CaseResult], tolerance: float) -> list[dict[str, Any]]:
    """One row per output of each case that had to match: where, how far, and whether it passed."""
    return [{"output": name, "batch": c.batch, "seq_len": c.seq_len, "phase": c.phase, "max_abs_diff": d.max_abs_diff,
             "mean_abs_diff": d.mean_abs_diff, "tolerance": tolerance, "passed": d.passed}
            for c in cases if c.must_match for name, d in c.outputs.items()]


def _mean(values) -> float:
    values = list(values)
    return float(np.mean(values)) if values else 0.0
