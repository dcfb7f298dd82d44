"""transformers MoE families exported by torch's dynamo exporter (`batched_mm` experts): what the
`batched_mm` form finds in each, and that `build --policy off` reproduces the supported ones.

Tiny random-weight models built from each family's config class (tests/transformers_models.py),
exported once and kept in pytest's cache (`.pytest_cache/d/transformers-exports`) between runs,
keyed by family, configuration, torch and transformers versions and the export code.
"""

from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass

import numpy as np
import onnx
import pytest

from lynx_export.compiler.detect import detect
from lynx_export.compiler.model_io import load_model
from lynx_export.routing import RouterForm
from lynx_export.op.spec import MoESpec
from tests import artifacts
from tests.cli_builds import SHAPES, check_left_as_it_is, lynx, run_build

MLP = ["model.model.layers.0.mlp", "model.model.layers.1.mlp"]


@dataclass(frozen=True)
class Supported:
    names: list[str]
    router: RouterForm
    normalize: bool
    layout: str = "out_in"  # gate_up and down: [E,2I,H] / [E,H,I] ("out_in") or transposed ("in_out")
    interleaved: bool = False  # gate/up rows alternate ([gate; up] concatenated otherwise)
    biases: bool = False
    # SwiGLU gate * sigmoid(alpha * gate) * (up + beta), gate <= limit, |up| <= limit (plain: 1, 0, none).
    alpha: float = 1.0
    beta: float = 0.0
    limit: float | None = None
    # sigmoid_grouped: num_groups, topk_groups, routed_scaling (score_bias is checked against the graph).
    grouping: dict | None = None


SUPPORTED = {
    "mixtral": Supported(MLP, RouterForm.SOFTMAX_TOPK, True),
    "qwen3_moe": Supported(MLP, RouterForm.SOFTMAX_TOPK, True),
    "olmoe": Supported(MLP, RouterForm.SOFTMAX_TOPK, False),
    # The shared expert and its sigmoid gate stay outside the block.
    "qwen2_moe": Supported(MLP, RouterForm.SOFTMAX_TOPK, False),
    "granitemoe": Supported(["model.model.layers.0.block_sparse_moe", "model.model.layers.1.block_sparse_moe"],
                            RouterForm.TOPK_SOFTMAX, True),
    # gpt-oss: [E,H,2I] interleaved, biases, a router bias, clamped SwiGLU (alpha 1.702, beta 1, limit 7).
    "gpt_oss": Supported(MLP, RouterForm.TOPK_SOFTMAX, True, layout="in_out", interleaved=True, biases=True,
                         alpha=1.702, beta=1.0, limit=7.0),
    # gpt-oss's expert layout with its clamped activation replaced by SwiGLU (not a released model).
    "gpt_oss_swiglu": Supported(MLP, RouterForm.TOPK_SOFTMAX, True, layout="in_out", interleaved=True, biases=True),
    # Sigmoid scores with a (random) correction bias, 2 of 4 groups kept, renormalised, scaled by 2.5;
    # the shared expert stays outside the block.
    "deepseek_v3": Supported(MLP, RouterForm.SIGMOID_GROUPED, True, grouping=dict(num_groups=4, topk_groups=2, routed_scaling=2.5)),
}

# Family -> (candidates, reason). Unsupported candidates are named after the scope of the node
# that routes them (the router module).
UNSUPPORTED = {
    "phimoe": (
        ["model.model.layers.0.mlp.router", "model.model.layers.1.mlp.router"],
        "PhiMoE sparse mixer router (argmax rounds over masked logits): ONNX Runtime's MoE kernel cannot reproduce it",
    ),
}


@pytest.fixture(scope="module")
def exported():
    """family -> path of its tiny export, from the tests' artefact cache (made on first use)."""
    pytest.importorskip("transformers")
    from tests.transformers_models import ExportFailed, cached_export

    made: dict[str, pathlib.Path | ExportFailed] = {}

    def get(family: str) -> pathlib.Path:
        if family not in made:
            try:
                made[family] = cached_export(family)
            except ExportFailed as exc:
                made[family] = exc
        result = made[family]
        if isinstance(result, ExportFailed):
            pytest.fail(f"{family}: export fails: {result}")
        return result

    return get


@pytest.mark.parametrize("family", sorted(SUPPORTED))
def test_blocks_are_found_with_their_spec(exported, family):
    expect = SUPPORTED[family]
    model = load_model(exported(family))
    result = detect(model)
    assert [c.name for c in result.candidates] == expect.names
    assert [(c.supported, c.reason) for c in result.candidates] == [(True, "")] * len(expect.names)
    for block in result.blocks:
        assert block.form == "batched_mm"
        grouping = dict(expect.grouping or {})
        if grouping:
            # Each layer's own correction bias, as the graph holds it.
            bias = model.graph.initializers[f"{block.name}.gate.e_score_correction_bias"].const_value.numpy()
            assert np.array_equal(np.float32(block.spec.score_bias), bias) and np.abs(bias).min() > 0
            grouping["score_bias"] = block.spec.score_bias
        assert block.spec == MoESpec(
            num_experts=8, top_k=2, hidden_size=32, expert_size=48, activation="swiglu", router=expect.router,
            normalize=expect.normalize, activation_alpha=expect.alpha, activation_beta=expect.beta,
            swiglu_limit=expect.limit, **grouping,
        )
        w = block.weights
        assert (w.gate_up_layout, w.down_layout, w.gate_first, w.interleaved) == (expect.layout, expect.layout, True, expect.interleaved)
        assert w.up is None and w.up_bias is None
        shapes = {name: model.graph.initializers[name].shape for name in (w.gate_up, w.down)}
        if expect.layout == "out_in":
            assert (shapes[w.gate_up], shapes[w.down]) == ((8, 96, 32), (8, 32, 48))
        else:
            assert (shapes[w.gate_up], shapes[w.down]) == ((8, 32, 96), (8, 48, 32))
        if expect.biases:
            assert model.graph.initializers[w.gate_up_bias].shape == (8, 96)
            assert model.graph.initializers[w.down_bias].shape == (8, 32)
        else:
            assert w.gate_up_bias is None and w.down_bias is None
        assert block.sequence_source is not None


@pytest.mark.parametrize("family", sorted(SUPPORTED))
def test_build_with_policy_off_reproduces_the_model(exported, family, tmp_path):
    source = exported(family)
    out = tmp_path / "engine"
    r = lynx("build", source, "-o", out, "--policy", "off", *SHAPES)
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    report = json.loads((out / "report.json").read_text())
    blocks = SUPPORTED[family].names
    assert [b["name"] for b in manifest["blocks"]] == blocks and manifest["unsupported"] == []
    assert manifest["rewrite"] == {"blocks": len(blocks), "counts": {"batched_mm": len(blocks)}}
    assert report["passed"] and report["phase_gated"] and report["tolerance"] == 1e-4
    assert sorted((c["batch"], c["seq_len"]) for c in report["cases"]) == [(b, s) for b in (1, 3, 8) for s in (1, 5)]
    for case in report["cases"]:
        assert case["must_match"] and case["max_abs_diff"] <= 1e-4, case
        assert case["routing_agreement"] == 1.0
    ops = [n.op_type for n in onnx.load(out / "model.lynx.onnx").graph.node]
    assert ops.count("LynxMoE") == len(blocks) and "TopK" not in ops
    if family == "qwen2_moe":
        # Each block's routed SwiGLU went into its LynxMoE node; the shared expert's SwiGLU and
        # its sigmoid gate are still there.
        source_ops = [n.op_type for n in onnx.load(source).graph.node]
        assert source_ops.count("Sigmoid") == 3 * len(blocks) and ops.count("Sigmoid") == 2 * len(blocks)
    if family == "deepseek_v3":
        # The router's sigmoid and the routed SwiGLU went into the LynxMoE node (which reads the
        # router's logits); the shared expert's SwiGLU is still there.
        source_ops = [n.op_type for n in onnx.load(source).graph.node]
        assert source_ops.count("Sigmoid") == 3 * len(blocks) and ops.count("Sigmoid") == len(blocks)


def test_gpt_oss_export_exceeds_the_swiglu_limit(exported):
    """The clamp matters in the gpt-oss test model: each layer has routed gate values above the
    limit 7 and up values outside [-7, 7], and the logits move far beyond the verification's
    tolerance without the clamps (so a build that ignored the limit, or clamped the wrong half,
    would fail verification)."""
    import numpy as np
    import onnxruntime as ort

    proto = onnx.load(exported("gpt_oss"))
    clips = [n for n in proto.graph.node if n.op_type == "Clip"]
    # Per layer: the gate is clamped above only (no min input), up on both sides.
    gates = [n.input[0] for n in clips if len(n.input) > 1 and n.input[1] == ""]
    ups = [n.input[0] for n in clips if len(n.input) > 1 and n.input[1] != ""]
    assert len(gates) == len(ups) == len(MLP)
    ids = np.random.default_rng(0).integers(0, 128, (3, 5), dtype=np.int64)

    def run_model(model: onnx.ModelProto, names: list[str]) -> list:
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(names, {"input_ids": ids})

    probed = onnx.ModelProto.FromString(proto.SerializeToString())
    probed.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in gates + ups)
    logits, *pre_clamp = run_model(probed, ["logits", *gates, *ups])
    values = dict(zip(gates + ups, pre_clamp))
    for gate, up in zip(gates, ups):
        assert (values[gate] > 7).mean() > 0.02 and (np.abs(values[up]) > 7).mean() > 0.02
        assert (values[gate] <= 7).mean() > 0.5 and (np.abs(values[up]) <= 7).mean() > 0.5
    for clip in clips:  # no clamp: Clip(x) with no bounds is the identity
        del clip.input[1:]
    (unclamped,) = run_model(proto, ["logits"])
    assert np.abs(unclamped - logits).max() > 100 * 1e-4


def test_gpt_oss_builds_with_policy_lynx(exported, tmp_path):
    out = tmp_path / "engine"
    r = lynx("build", exported("gpt_oss"), "-o", out, "--policy", "lynx", "--batch-sizes", "1,8,32", "--seq-lens", "1,6")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    report = json.loads((out / "report.json").read_text())
    assert manifest["policy"]["name"] == "lynx" and [b["name"] for b in manifest["blocks"]] == MLP
    assert report["passed"] and report["phase_gated"]
    prefill = [c for c in report["cases"] if c["phase"] == "prefill"]
    assert prefill and all(c["must_match"] and c["max_abs_diff"] <= 1e-4 for c in prefill)
    decode = [c for c in report["cases"] if c["phase"] == "decode"]
    assert decode and all(c["mean_active_experts_policy"] <= c["mean_active_experts_model"] for c in decode)
    node = next(n for n in onnx.load(out / "model.lynx.onnx").graph.node if n.op_type == "LynxMoE")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["activation_alpha"] == pytest.approx(1.702) and attrs["activation_beta"] == 1.0 and attrs["swiglu_limit"] == 7.0


@pytest.mark.parametrize("family", sorted(UNSUPPORTED))
def test_unsupported_family_is_reported_with_its_reason(exported, family):
    names, reason = UNSUPPORTED[family]
    r = lynx("inspect", exported(family), "--json")
    assert r.returncode == 0, r.stderr
    candidates = json.loads(r.stdout)
    assert [(c["name"], c["supported"], c["reason"]) for c in candidates] == [(n, False, reason) for n in names]
    assert all(c["num_experts"] is None for c in candidates)


@pytest.mark.parametrize("family", sorted(UNSUPPORTED))
def test_build_of_unsupported_family_says_why_and_leaves_it(exported, family, tmp_path):
    """Nothing to rewrite: the model compiles unchanged, each block's reason is shown and recorded."""
    names, reason = UNSUPPORTED[family]
    source = exported(family)
    out = tmp_path / "engine"
    r, _, _ = run_build(source, out, "--policy", "off", *SHAPES)
    assert r.returncode == 0 and r.errors == [], r.stderr
    assert "no MoE block to rewrite" in r.stderr
    check_left_as_it_is(r, out, source, names, reason)


# -- the export cache ------------------------------------------------------------------------


def test_cache_key_follows_family_config_and_versions(monkeypatch):
    pytest.importorskip("transformers")
    import transformers

    from tests.transformers_models import cache_key

    key = cache_key("qwen3_moe")
    assert key.startswith("qwen3_moe-") and key == cache_key("qwen3_moe")
    assert key != cache_key("qwen3_moe", norm_topk_prob=False)
    assert cache_key("gpt_oss") != cache_key("gpt_oss_swiglu")
    monkeypatch.setattr(transformers, "__version__", "0.0.0")
    assert cache_key("qwen3_moe") != key


def test_cached_export_exports_once(monkeypatch, tmp_path):
    pytest.importorskip("transformers")
    from tests import transformers_models as tm

    calls = []

    def fake_export(family, path, **overrides):
        calls.append(family)
        pathlib.Path(path).write_bytes(b"model")
        return pathlib.Path(path)

    monkeypatch.setattr(tm, "export_tiny", fake_export)
    monkeypatch.setattr(artifacts, "CACHE", tmp_path)
    first = tm.cached_export("olmoe")
    assert tm.cached_export("olmoe") == first and first.read_bytes() == b"model"
    assert calls == ["olmoe"]
    assert sorted(p.name for p in first.parent.iterdir()) == [first.name, f"{first.name}.lock"]  # no temporary left behind


def test_cached_export_remembers_a_failure(monkeypatch, tmp_path):
    pytest.importorskip("transformers")
    from tests import transformers_models as tm

    calls = []

    def failing_export(family, path, **overrides):
        calls.append(family)
        raise RuntimeError("cannot trace this\nmore detail")

    monkeypatch.setattr(tm, "export_tiny", failing_export)
    monkeypatch.setattr(artifacts, "CACHE", tmp_path)
    for _ in range(2):
        with pytest.raises(tm.ExportFailed, match=r"^RuntimeError: cannot trace this$"):
            tm.cached_export("phimoe")
    assert calls == ["phimoe"]
    assert sorted(p.suffix for p in (tmp_path / "transformers-dynamo").iterdir()) == [".error", ".lock"]  # no temporary, no model
