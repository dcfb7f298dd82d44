"""End to end: build the demo model, check files, hashes and verification numbers."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from lynx_export.compiler.build import BuildOptions, PolicyChoice, build
from lynx_export.errors import OptionError, OutputError
from lynx_export.compiler.model_io import sha256_file
from lynx_export.compiler.verify import VerifyOptions
from lynx_export.progress import Recorder

QUICK = VerifyOptions(batch_sizes=(1, 8, 16), seq_lens=(1, 5))


@pytest.fixture(scope="module")
def off_build(demo_onnx, tmp_path_factory):
    return build(demo_onnx, tmp_path_factory.mktemp("off") / "engine", BuildOptions(PolicyChoice("off"), verify=QUICK))


@pytest.fixture(scope="module")
def lynx_build(demo_onnx, tmp_path_factory):
    return build(demo_onnx, tmp_path_factory.mktemp("lynx") / "engine", BuildOptions(PolicyChoice("lynx"), verify=QUICK))


def test_off_matches_original_within_tolerance(off_build):
    report = off_build.report
    assert report.passed and report.policy["name"] == "off"
    assert len(report.comparison.cases) == 6
    for case in report.comparison.cases:
        assert case.must_match
        assert case.max_abs_diff <= 1e-4
        assert case.routing.routing_agreement == 1.0
        assert case.routing.mean_active_experts_policy == case.routing.mean_active_experts_model


def test_artifacts_and_manifest(off_build):
    out = off_build.out_dir
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.lynx.onnx", "model.ort.onnx", "report.json", "verification"]
    assert sorted(p.name for p in (out / "verification").iterdir()) == ["expected.json", "inputs.json"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest == off_build.manifest.to_json()
    assert json.loads((out / "report.json").read_text()) == off_build.report.to_json()
    for artifact in manifest["artifacts"]:
        assert sha256_file(out / artifact["file"]) == artifact["sha256"]
        assert (out / artifact["file"]).stat().st_size == artifact["bytes"]
    assert manifest["rewrite"] == {"blocks": 2, "counts": {"batched_mm": 2}}
    assert [b["name"] for b in manifest["blocks"]] == ["layers.0.mlp", "layers.1.mlp"]
    assert manifest["versions"]["onnxruntime"] == ort.__version__
    assert len(manifest["source"]["sha256"]) == 64
    # No staging folders are left beside the output.
    assert [p.name for p in out.parent.iterdir()] == [out.name]


def test_canonical_model_has_lynx_nodes(off_build):
    model = onnx.load(off_build.out_dir / "model.lynx.onnx")
    lynx = [n for n in model.graph.node if n.op_type == "LynxMoE"]
    assert len(lynx) == 2
    assert all(n.domain == "trt.plugins" for n in lynx)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in lynx[0].attribute}
    assert attrs["plugin_namespace"] == b"lynx" and attrs["plugin_version"] == b"1"
    assert attrs["num_experts"] == 8 and attrs["top_k"] == 2 and attrs["policy"] == b"off"
    # The old expert subgraph is gone.
    assert not [n for n in model.graph.node if n.op_type == "GatherND"]


def test_ort_model_runs_standalone_with_original_signature(off_build, demo_onnx):
    original = ort.InferenceSession(str(demo_onnx), providers=["CPUExecutionProvider"])
    compiled = ort.InferenceSession(str(off_build.out_dir / "model.ort.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in compiled.get_inputs()] == [i.name for i in original.get_inputs()]
    assert [o.name for o in compiled.get_outputs()] == [o.name for o in original.get_outputs()]
    types = {n.op_type for n in onnx.load(off_build.out_dir / "model.ort.onnx").graph.node}
    # The default (per-expert) lowering: standard ops only, one MatMul chain per expert.
    assert "LynxMoE" not in types and "MoE" not in types and "Split" in types
    rng = np.random.default_rng(3)
    feeds = {"input_ids": rng.integers(0, 256, (33, 1)).astype(np.int64)}
    for inp in original.get_inputs()[1:]:
        feeds[inp.name] = rng.standard_normal((33, 4, 2, 16)).astype(np.float32)
    for a, b in zip(original.run(None, feeds), compiled.run(None, feeds)):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_lynx_reduces_active_experts_in_decode(lynx_build):
    report = lynx_build.report
    assert report.passed and report.phase_gated
    assert report.policy == {"name": "lynx", "alpha": 3.0, "beta": 1, "tie_break": "logit"}
    for case in report.comparison.cases:
        if case.phase == "prefill":
            assert case.must_match and case.max_abs_diff <= 1e-4
        elif case.batch >= 8:
            assert case.routing.mean_active_experts_policy < case.routing.mean_active_experts_model
            assert 0.5 < case.routing.routing_agreement < 1.0
        else:
            # One token: the logit tie-break keeps exactly the model's routing.
            assert case.routing.routing_agreement == 1.0


def test_budget_policy_caps_active_experts(demo_onnx, tmp_path):
    result = build(demo_onnx, tmp_path / "engine", BuildOptions(PolicyChoice("budget", budget=3), verify=QUICK))
    for case in result.report.comparison.cases:
        if case.phase == "decode":
            assert case.routing.mean_active_experts_policy <= 3


def test_no_moe_builds_unchanged(dense_onnx, tmp_path):
    messages = Recorder()
    result = build(dense_onnx, tmp_path / "engine", BuildOptions(), progress=messages)
    assert any("no MoE block to rewrite" in m and "compiles unchanged" in m for m in messages.lines)
    assert result.manifest.blocks == () and result.manifest.to_json()["rewrite"] == {"blocks": 0, "counts": {}}
    assert result.report.passed and result.report.comparison.cases == ()
    source, compiled = onnx.load(dense_onnx), onnx.load(tmp_path / "engine" / "model.ort.onnx")
    assert [n.op_type for n in compiled.graph.node] == [n.op_type for n in source.graph.node]


def test_a_rewritten_model_rebuilds_without_rewriting_twice(demo_onnx, tmp_path):
    first = build(demo_onnx, tmp_path / "first", BuildOptions(PolicyChoice("lynx"), verify=QUICK))
    # Its canonical model is a valid input: every LynxMoE node is a block again, with the new policy.
    second = build(tmp_path / "first" / "model.lynx.onnx", tmp_path / "second", BuildOptions(PolicyChoice("off"), verify=QUICK))
    assert [b.form for b in second.manifest.blocks] == ["lynx_moe"] * len(first.manifest.blocks)
    assert [b.name for b in second.manifest.blocks] == [b.name for b in first.manifest.blocks]
    nodes = [n for n in onnx.load(tmp_path / "second" / "model.lynx.onnx").graph.node if n.op_type == "LynxMoE"]
    assert len(nodes) == len(first.manifest.blocks)
    assert all(onnx.helper.get_attribute_value(next(a for a in n.attribute if a.name == "policy")) == b"off" for n in nodes)
    # With the policy off it must reproduce the first build's model with its routing (the reference).
    assert second.report.passed and all(c.must_match for c in second.report.comparison.cases)
    third = build(tmp_path / "second" / "model.lynx.onnx", tmp_path / "third", BuildOptions(PolicyChoice("lynx"), verify=QUICK))
    assert third.report.passed and third.manifest.policy["name"] == "lynx"
    initializers = [i.name for i in onnx.load(tmp_path / "third" / "model.lynx.onnx").graph.initializer]
    assert len(initializers) == len(set(initializers))


def test_existing_output_needs_force(demo_onnx, tmp_path):
    out = tmp_path / "engine"
    out.mkdir()
    (out / "keep.txt").write_text("previous build")
    with pytest.raises(OutputError, match="not empty"):
        build(demo_onnx, out, BuildOptions(PolicyChoice("off"), verify=QUICK))
    assert (out / "keep.txt").read_text() == "previous build"
    build(demo_onnx, out, BuildOptions(PolicyChoice("off"), verify=QUICK, force=True))
    assert not (out / "keep.txt").exists() and (out / "manifest.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine"]


def test_failed_verification_keeps_previous_output(demo_onnx, tmp_path, monkeypatch):
    import lynx_export.compiler.build as build_module
    from lynx_export.errors import ToleranceError

    out = tmp_path / "engine"
    out.mkdir()
    (out / "keep.txt").write_text("previous build")

    def failing_verify(*args, **kwargs):
        raise ToleranceError("forced")

    monkeypatch.setattr(build_module, "verify", failing_verify)
    with pytest.raises(ToleranceError):
        build(demo_onnx, out, BuildOptions(PolicyChoice("off"), verify=QUICK, force=True))
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine"]


def test_builds_are_deterministic(demo_onnx, tmp_path):
    """Same input and options: byte-identical ONNX artifacts and the same hashes."""
    options = BuildOptions(PolicyChoice("lynx"), verify=VerifyOptions(batch_sizes=(2,), seq_lens=(1,)))
    first = build(demo_onnx, tmp_path / "a", options)
    second = build(demo_onnx, tmp_path / "b", options)
    hashes = [{a.file: a.sha256 for a in r.manifest.artifacts if a.file.endswith(".onnx")} for r in (first, second)]
    assert hashes[0] == hashes[1] and len(hashes[0]) == 2
    for name in hashes[0]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_input_model_is_not_modified(demo_onnx, tmp_path):
    before = sha256_file(demo_onnx)
    build(demo_onnx, tmp_path / "engine", BuildOptions(PolicyChoice("lynx"), verify=QUICK))
    assert sha256_file(demo_onnx) == before


def test_output_stands_on_its_own_when_the_source_has_external_data(demo_onnx, tmp_path):
    import shutil

    import onnx_ir as ir

    source = tmp_path / "src" / "model.onnx"
    source.parent.mkdir()
    ir.save(ir.load(demo_onnx), source, external_data="model.onnx.data")
    assert (tmp_path / "src" / "model.onnx.data").stat().st_size > 1_000_000
    build(source, tmp_path / "engine", BuildOptions(PolicyChoice("off"), verify=QUICK))
    # Moved away from the source, every artifact still loads with all of its weights.
    shutil.move(tmp_path / "engine", tmp_path / "moved")
    shutil.rmtree(tmp_path / "src")
    for name in ("model.lynx.onnx", "model.ort.onnx"):
        model = onnx.load(str(tmp_path / "moved" / name))
        assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
        onnx.checker.check_model(model, full_check=False)


def test_verification_cases_are_bounded_by_the_originals_memory(demo_onnx, tmp_path):
    from lynx_export.compiler.build import _reference_token_limit
    from lynx_export.compiler.detect import detect
    from lynx_export.compiler.model_io import load_model

    blocks = detect(load_model(demo_onnx)).blocks
    per_token = 2 * 3 * 128 * 64 * 4  # K x (gate, up, down) x I x H floats, gathered per token by batched_mm
    assert _reference_token_limit(blocks, 10 * per_token * 4, None) == max(64 << 20, 10 * per_token) // per_token
    assert _reference_token_limit(blocks, 400 * per_token * 4, 16) == 16
    # A limit keeps the cases under it, and one prefill case, and reports the others.
    result = build(demo_onnx, tmp_path / "engine", BuildOptions(PolicyChoice("lynx"), verify=VerifyOptions(max_tokens=4)))
    ran = [(c.batch, c.seq_len) for c in result.report.comparison.cases]
    assert ran == [(1, 1), (1, 4)] and all(b * s <= 4 for b, s in ran)
    assert [(c.batch, c.seq_len) for c in result.report.comparison.skipped] == [(8, 1), (32, 1), (1, 16), (8, 16), (32, 16)]
    assert result.report.passed and result.report.comparison.cases[1].must_match


def test_another_lowering_is_checked_against_the_builds_cases(lynx_build, tmp_path, model_runs):
    """lower_again: the canonical model lowered with fused experts runs once per saved case (the
    source not at all) and is published only where it reproduces the build's expected outputs."""
    from lynx_export.compiler.build import lower_again

    out = tmp_path / "fused" / "model.ort.onnx"
    blocks = lower_again(lynx_build.out_dir, "fused", out)
    assert [b.name for b in blocks] == [b.name for b in lynx_build.blocks]
    assert dict(model_runs) == {f"{out} (fused experts)": len(lynx_build.report.comparison.cases)}
    assert "MoE" in {n.op_type for n in onnx.load(out).graph.node}
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.ort.onnx"]


def test_another_lowering_that_differs_is_refused(lynx_build, off_build, tmp_path):
    """The policy-off build's cases must all match the source: its folder holding the LYNX build's
    canonical model instead, whose decode steps at batch 8 and 16 route differently, nothing is
    published."""
    import shutil

    from lynx_export.compiler.build import CANONICAL_NAME, lower_again
    from lynx_export.errors import ToleranceError

    folder = tmp_path / "build"
    shutil.copytree(off_build.out_dir, folder)
    shutil.copyfile(lynx_build.out_dir / CANONICAL_NAME, folder / CANONICAL_NAME)
    out = tmp_path / "fused" / "model.ort.onnx"
    with pytest.raises(ToleranceError, match=r"differs from the build's expected outputs .* at batch (8|16), seq 1 "):
        lower_again(folder, "fused", out)
    assert not out.exists() and list(out.parent.iterdir()) == []
    with pytest.raises(OptionError, match=r"--ort-experts: choose from per-expert, fused \(got conditional\)"):
        lower_again(folder, "conditional", out)
    with pytest.raises(OutputError, match="is written outside the build folder"):
        lower_again(folder, "fused", folder / "model.ort.onnx")
    (tmp_path / "empty").mkdir()
    with pytest.raises(OutputError, match=f"{tmp_path / 'empty'}: not a lynx-export build folder \\(no report.json\\)"):
        lower_again(tmp_path / "empty", "fused", out)
