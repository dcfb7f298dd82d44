"""`lynx-export build` run as a user runs it, and the checks the exporter-form tests share.

Every form × family test builds at the same shapes and asks the same of the result: with the
policy off the compiled model reproduces the original everywhere, with a policy only in
prefill; a block that cannot be rewritten is named with its reason and left as it is.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import onnx

BIN = pathlib.Path(sys.executable).parent / "lynx-export"
BATCHES, SEQS = (1, 3, 8), (1, 5)
SHAPES = ("--batch-sizes", ",".join(map(str, BATCHES)), "--seq-lens", ",".join(map(str, SEQS)))


def run_build(model: pathlib.Path, out: pathlib.Path, *args: str) -> tuple[subprocess.CompletedProcess, dict, dict]:
    """(process, manifest, report) of `lynx-export build MODEL -o OUT ARGS`; empty dicts when it failed."""
    r = subprocess.run([str(BIN), "build", str(model), "-o", str(out), *args], capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        return r, {}, {}
    return r, json.loads((out / "manifest.json").read_text()), json.loads((out / "report.json").read_text())


def check_report(report: dict, policy: str) -> None:
    """A build at SHAPES passed: every case ran, and where routing must be exact (policy off, or
    prefill under a policy) outputs match within 1e-4 with the model's own routing."""
    assert report["passed"] and report["phase_gated"] and report["tolerance"] == 1e-4
    assert [(c["batch"], c["seq_len"]) for c in report["cases"]] == [(b, s) for s in SEQS for b in BATCHES]
    for case in report["cases"]:
        assert case["must_match"] == (policy == "off" or case["phase"] == "prefill")
        if case["must_match"]:
            assert case["max_abs_diff"] <= 1e-4 and case["routing_agreement"] == 1.0


def check_left_as_it_is(r: subprocess.CompletedProcess, out: pathlib.Path, source: pathlib.Path, names: list[str], reason: str) -> None:
    """A build that rewrote nothing: each block named with `reason`, the model compiled unchanged."""
    assert r.returncode == 0, r.stderr
    assert "lynx-export: error" not in r.stderr
    for name in names:
        assert f"left as it is: block {name}: {reason}" in r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    report = json.loads((out / "report.json").read_text())
    assert manifest["rewrite"] == {"blocks": 0, "counts": {}} and manifest["blocks"] == []
    assert manifest["unsupported"] == report["unsupported"] == [{"name": n, "reason": reason} for n in names]
    assert report["passed"] and report["cases"] == []
    assert [n.op_type for n in onnx.load(out / "model.lynx.onnx").graph.node] == [n.op_type for n in onnx.load(source).graph.node]
