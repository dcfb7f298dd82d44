"""`lynx-export` run as a user runs it, and the checks the exporter-form tests share.

Every form × family test builds at the same shapes and asks the same of the result: with the
policy off the compiled model reproduces the original everywhere, with a policy only in
prefill; a block that cannot be rewritten is named with its reason and left as it is.
"""

from __future__ import annotations

import contextlib
import json
import logging
import pathlib
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import onnx

BIN = pathlib.Path(sys.executable).parent / "lynx-export"
BATCHES, SEQS = (1, 3, 8), (1, 5)
SHAPES = ("--batch-sizes", ",".join(map(str, BATCHES)), "--seq-lens", ",".join(map(str, SEQS)))


@dataclass(frozen=True)
class Run:
    """What `lynx-export ARGS` did: exit code and the text of each stream."""

    returncode: int
    stdout: str
    stderr: str

    @property
    def errors(self) -> list[str]:
        """stderr without progress lines."""
        return [line for line in self.stderr.splitlines() if not line.startswith("[lynx-export]")]


@contextlib.contextmanager
def cli_state_kept() -> Iterator[None]:
    """The process-wide state the CLI sets for itself (the package logger's handlers, level and
    propagation; the SIGTERM handler), put back afterwards, so that a command run in this process
    leaves nothing behind for the next test."""
    package = logging.getLogger("lynx_export")
    saved = package.handlers[:], package.level, package.propagate, signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        package.handlers[:], package.level, package.propagate = saved[:3]
        signal.signal(signal.SIGTERM, saved[3])


def lynx(*args: object, cwd: pathlib.Path | None = None, process: bool = False, timeout: int = 900) -> Run:
    """`lynx-export ARGS` as a user runs it. In this process (click's runner: the same entry point,
    exit codes and streams, without 2-3 s of imports per command) unless `process`, which runs the
    installed command in a child: for what only a process shows (signals, the C libraries' own
    output on file descriptor 2, the interpreter's start-up) or a working folder of its own."""
    argv = [str(a) for a in args]
    if process or cwd is not None:
        r = subprocess.run([str(BIN), *argv], capture_output=True, text=True, cwd=cwd, timeout=timeout)
        return Run(r.returncode, r.stdout, r.stderr)
    from click.testing import CliRunner

    from lynx_export.cli import main

    result = CliRunner().invoke(main, argv, prog_name="lynx-export", catch_exceptions=False)  # conftest puts the CLI's state back
    return Run(result.exit_code, result.stdout, result.stderr)


def run_build(model: pathlib.Path, out: pathlib.Path, *args: str) -> tuple[Run, dict, dict]:
    """(run, manifest, report) of `lynx-export build MODEL -o OUT ARGS`; empty dicts when it failed."""
    r = lynx("build", model, "-o", out, *args)
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


def check_left_as_it_is(r: Run, out: pathlib.Path, source: pathlib.Path, names: list[str], reason: str) -> None:
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
