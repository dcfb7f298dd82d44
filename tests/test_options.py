"""Options and failure paths as a user meets them: one line naming the option, exit 2 for an
error in the options alone, exit 1 for one that depends on the model, nothing written."""

from __future__ import annotations

import json
import pathlib

import pytest
from click.testing import CliRunner, Result

from lynx_export.cli import main


def invoke(*args: object) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], prog_name="lynx-export")


def error_lines(result: Result) -> list[str]:
    """stderr without progress lines."""
    return [line for line in result.stderr.splitlines() if not line.startswith("[lynx-export]")]


def tree(folder: pathlib.Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def assert_refused(result: Result, code: int, message: str, folder: pathlib.Path, before: list[str]) -> None:
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    lines = error_lines(result)
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert lines[0].startswith("lynx-export") and "Traceback" not in result.output
    assert tree(folder) == before, "a refused command wrote files"


BUILD_CASES = [
    # The reproductions first.
    (["--policy", "budget"], 2, "--policy budget needs --budget N"),
    (["--policy", "budget", "--budget", "1"], 1, "block layers.0.mlp (E=8, K=2): budget must be in [top_k=2, num_experts=8], got 1"),
    (["--policy", "budget", "--budget", "9"], 1, "budget must be in [top_k=2, num_experts=8], got 9"),
    (["--alpha", "inf"], 2, "Invalid value for '--alpha': 'inf' is not a finite float32 in (0,"),
    (["--alpha", "nan"], 2, "Invalid value for '--alpha': 'nan' is not a finite float32"),
    (["--tolerance", "nan"], 2, "Invalid value for '--tolerance': 'nan' is not a finite float32 in [0,"),
    (["--beta", "100000000000000000000"], 2, "Invalid value for '--beta': 100000000000000000000 is not in the range 0<=x<=2147483647"),
    # Values the attributes cannot hold, and contradictions.
    (["--alpha", "1e-50"], 2, "Invalid value for '--alpha'"),
    (["--alpha", "1e39"], 2, "Invalid value for '--alpha'"),
    (["--tolerance", "-1"], 2, "Invalid value for '--tolerance'"),
    (["--budget", "3"], 2, "--budget applies to --policy budget only"),
    (["--policy", "off", "--alpha", "2"], 2, "--alpha applies to --policy lynx only"),
    (["--policy", "budget", "--budget", "4", "--tie-break", "index"], 2, "--tie-break applies to --policy lynx only"),
    (["--block-size", "64"], 2, "--block-size applies to --quantize only"),
    (["--quantize", "int4", "--ort-experts", "fused"], 2, "--quantize runs on --ort-experts per-expert only, not fused"),
    (["--quantize", "int4", "--block-size", "256"], 1, "--block-size 256 does not divide the hidden size H = 64"),
    (["--max-batch", "4"], 2, "--max-batch applies to --backend tensorrt and tensorrt-rtx only"),
    (["--precision", "fp16"], 2, "--precision applies to --backend tensorrt only"),
    (["--target", "8.6"], 2, "--target applies to --backend tensorrt-rtx only"),
    (["--batch-sizes", "0"], 2, "Invalid value for '--batch-sizes': expected integers in [1, 65536], got '0'"),
    (["--batch-sizes", "4096", "--seq-lens", "1,32"], 2, "the largest case has 131072 tokens, over 65536 per case"),
    (["--policy", "nope"], 2, "Invalid value for '--policy'"),
    (["--no-such-option"], 2, "No such option '--no-such-option'"),
]


@pytest.mark.parametrize("extra, code, message", BUILD_CASES, ids=[" ".join(c[0]) for c in BUILD_CASES])
def test_build_option_errors(demo_onnx, tmp_path, extra, code, message):
    before = tree(tmp_path)
    result = invoke("build", demo_onnx, "-o", tmp_path / "out", *extra)
    assert_refused(result, code, message, tmp_path, before)


def test_triton_repo_inside_the_build_is_refused(demo_onnx, tmp_path):
    result = invoke("build", demo_onnx, "-o", tmp_path / "out", "--triton-repo", tmp_path / "out" / "triton")
    assert_refused(result, 2, "--triton-repo and --out must be separate folders", tmp_path, [])


OTHER_CASES = [
    (["demo-model", "{tmp}/m.onnx", "--trained", "--layers", "3"], 2, "--layers applies to the random-weight demo model"),
    (["demo-model", "{tmp}/m.onnx", "--seed", "-1"], 2, "Invalid value for '--seed'"),
    (["demo-model", "{tmp}/m.onnx", "--seed", "4294967296"], 2, "Invalid value for '--seed'"),
    (["bench", "--quick", "--out", "{tmp}/b", "--block-size", "64"], 2, "--block-size applies to --quantize only"),
    (["bench", "--quick", "--out", "{tmp}/b", "--ort-experts", ""], 2, "--ort-experts: name at least one"),
    (["bench", "--quick", "--out", "{tmp}/b", "--repeats", "0"], 2, "Invalid value for '--repeats'"),
    (["bench", "--quick", "--out", "{tmp}/b", "--alpha", "nan"], 2, "Invalid value for '--alpha'"),
    (["bench", "--trained", "--quick", "--out", "{tmp}/b"], 2, "--quick applies to the generated models"),
    # Depends on the model: the quick demo model has 8 experts, top-2; refused before its export.
    (["bench", "--quick", "--out", "{tmp}/b", "--budget", "1"], 1, "the model (E=8, K=2): budget must be in [top_k=2, num_experts=8], got 1"),
    (["eval", "--sequences", "4", "--batch-sizes", "8", "--out", "{tmp}/e"], 2, "--batch-sizes: batch size 8 is larger than --sequences (4)"),
    (["eval", "--threads", "0", "--out", "{tmp}/e"], 2, "Invalid value for '--threads'"),
    (["eval", "--no-onnx", "--quantize", "int4", "--out", "{tmp}/e"], 2, "--quantize decodes through the compiled model: it needs --onnx"),
    (["trace", "-o", "{tmp}/t.npz", "--seq-len", "1"], 2, "Invalid value for '--seq-len'"),
    (["replay", "{tmp}/t.npz", "--batch-sizes", "1,x"], 2, "expected comma-separated integers"),
    (["triton", "{tmp}/build", "--repo", "{tmp}/r", "--name", "../escape"], 2, "Invalid value for '--name': '../escape' must be 1-64 ASCII"),
    (["triton", "{tmp}/build", "--repo", "{tmp}/r", "--name", ""], 2, "Invalid value for '--name'"),
    (["triton", "{tmp}/build", "--repo", "{tmp}/r", "--preferred-batch-sizes", "128"], 2, "--preferred-batch-sizes: 128 is over --max-batch-size 64"),
    (["triton", "{tmp}/build", "--repo", "{tmp}/r", "--max-queue-delay-us", "-1"], 2, "Invalid value for '--max-queue-delay-us'"),
    (["serve", "{tmp}/missing"], 2, "Invalid value for 'REPOS...'"),
    (["inspect"], 2, "Missing argument 'MODEL'"),
    (["nope"], 2, "No such command 'nope'"),
]


@pytest.mark.parametrize("args, code, message", OTHER_CASES, ids=[" ".join(c[0][:1] + c[0][2:]) for c in OTHER_CASES])
def test_other_command_option_errors(tmp_path, args, code, message):
    before = tree(tmp_path)
    result = invoke(*(a.format(tmp=tmp_path) for a in args))
    assert_refused(result, code, message, tmp_path, before)


# -- a failed verification explains itself -------------------------------------------------------------


@pytest.fixture
def logits_diverge(monkeypatch):
    """Fault injection: the compiled model's 'logits' come out 0.5 higher in every case."""
    from lynx_export.backends.ort import OrtRunner
    from lynx_export.compiler import verify

    real = OrtRunner.infer_impl

    def infer_impl(self, feed_dict):
        outputs = real(self, feed_dict)
        if self.name == verify.COMPILED:
            outputs["logits"] = outputs["logits"] + 0.5
        return outputs

    monkeypatch.setattr(OrtRunner, "infer_impl", infer_impl)


def test_failed_verification_prints_its_cases_and_writes_nothing(demo_onnx, tmp_path, logits_diverge):
    result = invoke("build", demo_onnx, "-o", tmp_path / "out", "--policy", "off", "--batch-sizes", "1,2", "--seq-lens", "1")
    assert result.exit_code == 1
    lines = error_lines(result)
    assert lines[0].split() == ["output", "batch", "seq", "phase", "max|diff|", "mean|diff|", "tolerance", "result"]
    rows = [line.split() for line in lines[2:-1]]
    assert [r[0] for r in rows if r[-1] == "FAIL"] == ["logits", "logits"]
    assert {(r[1], r[2]) for r in rows} == {("1", "1"), ("2", "1")} and all(r[-1] == "ok" for r in rows if r[0] != "logits")
    assert lines[-1].startswith("lynx-export: error: compiled model differs from the original: max abs diff 0.5 > 0.0001 on output 'logits'"), lines[-1]
    assert "2 of 10 outputs over the tolerance" in lines[-1]
    assert tree(tmp_path) == []


def test_failed_verification_with_json_prints_the_error_and_cases(demo_onnx, tmp_path, logits_diverge):
    result = invoke("build", demo_onnx, "-o", tmp_path / "out", "--policy", "off", "--batch-sizes", "1", "--seq-lens", "1", "--json")
    assert result.exit_code == 1
    failure = json.loads(result.stdout)
    assert failure["error"].startswith("compiled model differs from the original")
    assert [c["output"] for c in failure["cases"] if not c["passed"]] == ["logits"]
    assert all({"batch", "seq_len", "phase", "max_abs_diff", "mean_abs_diff", "tolerance"} <= set(c) for c in failure["cases"])
    assert tree(tmp_path) == []


# -- small truths ------------------------------------------------------------------------------------


def test_a_model_without_blocks_reports_no_phase_gating(dense_onnx, tmp_path):
    result = invoke("build", dense_onnx, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["phase_gated"] is None and report["cases"] == []


def test_verbose_logs_the_package(demo_onnx):
    quiet = invoke("inspect", demo_onnx)
    loud = invoke("-v", "inspect", demo_onnx)
    assert quiet.exit_code == loud.exit_code == 0
    assert "DEBUG" not in quiet.stderr
    assert "DEBUG lynx_export.compiler.detect: batched_mm matches block layers.0.mlp" in loud.stderr, loud.stderr
