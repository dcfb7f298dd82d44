"""Graphs made by onnxruntime-genai's model builder (com.microsoft.MoE / QMoE experts,
GroupQueryAttention with its KV cache conventions), the form CPU users run, built and verified
as a user builds them; and the decoder convention that lets verification run them.

The builder's graphs take no past in a prefill of more than one row, need a sliding window's cache
to be at least the window long, read the KV head size from genai_config.json (the symbolic
`kv_cache_dim`) and leave unwritten cache slots uninitialised: `lynx_export.compiler.decoder`
makes steps that follow these rules and compares only what a step defines.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx_ir as ir
import pytest

pytest.importorskip("onnxruntime_genai")
pytest.importorskip("transformers")

from lynx_export.compiler.decoder import DecoderIO  # noqa: E402
from tests.cli_builds import SHAPES, check_report, lynx, run_build  # noqa: E402
from tests.genai_models import builder_folder  # noqa: E402

GRAPHS = [("lfm2_moe", "fp32"), ("lfm2_moe", "int4"), ("qwen3_5_moe", "fp32"), ("qwen3_5_moe", "int4"), ("gpt_oss", "fp32")]
IDS = [f"{family}-{precision}" for family, precision in GRAPHS]


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["off", "lynx"])
@pytest.mark.parametrize("family,precision", GRAPHS, ids=IDS)
def test_builder_graph_builds_verifies_and_runs_with_lynx(family, precision, policy, tmp_path):
    """Every block rewritten; with the policy off (and in prefill under LYNX) the compiled model
    reproduces the builder's; LYNX runs fewer experts at decode batch 8."""
    source = builder_folder(family, precision) / "model.onnx"
    r, manifest, report = run_build(source, tmp_path / "engine", "--policy", policy, *SHAPES)
    assert r.returncode == 0, r.stderr
    assert len(manifest["blocks"]) == 2 and manifest["unsupported"] == []
    assert manifest["rewrite"]["counts"] == {"ort_moe": 2}
    check_report(report, policy)
    if precision == "int4":  # QMoE: the source's own int4 experts, verified with float activations
        assert report["verified_at_accuracy_level"] == 0
    if policy == "lynx":
        decode8 = next(c for c in report["cases"] if (c["batch"], c["seq_len"]) == (8, 1))
        assert decode8["mean_active_experts_policy"] < decode8["mean_active_experts_model"]


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_lfm2s_router_before_the_moe_node_is_the_blocks_router(precision):
    """The builder computes LFM2's sigmoid + bias top-k before the MoE node and hands it log-scores
    with -10000 for unchosen experts; the block's router is the real one upstream (sigmoid with the
    expert bias, renormalised), whose logits a policy can trade."""
    from lynx_export.compiler.detect import detect
    from lynx_export.compiler.model_io import load_model
    from lynx_export.routing import RouterForm

    model = load_model(builder_folder("lfm2_moe", precision) / "model.onnx")
    blocks = detect(model).blocks
    assert len(blocks) == 2
    for block in blocks:
        spec = block.spec
        assert spec.router == RouterForm.SIGMOID_GROUPED and spec.normalize and (spec.num_groups, spec.topk_groups, spec.routed_scaling) == (1, 1, 1.0)
        assert spec.score_bias is not None and len(spec.score_bias) == 8
        router = next(n for n in model.graph if any(v.name == block.router_logits for v in n.outputs))
        assert router.op_type in ("Reshape", "MatMul")  # the router's own logits, not the scattered log-scores


@pytest.mark.slow
def test_decoder_steps_follow_the_builders_rules():
    folder = builder_folder("gpt_oss", "fp32")
    decoder = DecoderIO.read(ir.load(folder / "model.onnx"), folder)
    assert decoder.in_place_cache and decoder.window == 64
    assert decoder.symbols == {"kv_cache_dim": 16}  # genai_config.json's head_size
    assert decoder.windowed == ("past_key_values.0.key", "past_key_values.0.value")
    rng = np.random.default_rng(0)
    prefill = decoder.step(3, 5, 8, rng)
    # A prefill of several rows takes no past; the sliding layer's buffer is still a window long.
    assert prefill.past == 0 and prefill.feeds["attention_mask"].shape == (3, 5) and prefill.feeds["attention_mask"].all()
    assert prefill.feeds["past_key_values.0.key"].shape == (3, 2, 64, 16) and prefill.feeds["past_key_values.1.key"].shape == (3, 2, 0, 16)
    decode = decoder.step(8, 1, 8, rng)
    # A decode step comes after at least a window of tokens; the mask covers past and new.
    assert decode.past == 64 and decode.feeds["attention_mask"].shape == (8, 65)
    assert decode.feeds["past_key_values.1.key"].shape == (8, 2, 64, 16)
    assert decode.feeds["input_ids"].shape == (8, 1) and decode.feeds["input_ids"].max() < 200
    # Compared: the logits, the rows the step wrote into a full layer's cache, none of the windowed one.
    assert decode.meaningful["present.1.key"] == (slice(None), slice(None), slice(64, 65))
    assert decode.meaningful["present.0.key"] is None
    outputs = {"logits": np.zeros((8, 1, 200)), "present.0.key": np.zeros((8, 2, 64, 16)), "present.1.key": np.arange(8 * 2 * 65 * 16.0).reshape(8, 2, 65, 16)}
    defined = decode.defined(outputs)
    assert sorted(defined) == ["logits", "present.1.key"] and defined["present.1.key"].shape == (8, 2, 1, 16)
    np.testing.assert_array_equal(defined["present.1.key"], outputs["present.1.key"][:, :, 64:65])


@pytest.mark.slow
def test_a_dimension_nothing_tells_is_refused_in_one_line_and_can_be_given(tmp_path):
    """Without genai_config.json the KV head size is only a name: refused before any work, naming
    the model, the input and the dimension; `--dim` gives it."""
    folder = tmp_path / "model"
    shutil.copytree(builder_folder("qwen3_5_moe", "fp32"), folder)
    (folder / "genai_config.json").unlink()
    r = lynx("build", folder / "model.onnx", "-o", tmp_path / "engine", "--policy", "off")
    assert r.returncode == 1 and r.errors == [
        f"lynx-export: error: {folder / 'model.onnx'}: input 'past_key_values.1.key': cannot tell the size of its 'kv_cache_dim' dimension "
        "(axis 3); give it with build --dim NAME=SIZE"], r.stderr
    assert not (tmp_path / "engine").exists()
    r, _, report = run_build(folder / "model.onnx", tmp_path / "engine", "--policy", "off", "--dim", "kv_cache_dim=16", "--batch-sizes", "2",
                             "--seq-lens", "1")
    assert r.returncode == 0 and report["passed"], r.stderr


@pytest.mark.parametrize("value,message", [("kv_cache_dim", "expected NAME=SIZE"), ("=4", "expected NAME=SIZE"), ("d=0", "expected a size in [1, 65536]"),
                                           ("d=x", "expected NAME=SIZE")])
def test_dim_option_errors(demo_onnx, tmp_path, value, message):
    r = lynx("build", demo_onnx, "-o", tmp_path / "engine", "--dim", value)
    assert r.returncode == 2 and len(r.errors) == 1 and message in r.errors[0], r.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_replay_leaves_out_what_a_step_defines_only_in_part(tmp_path):
    """Cache outputs are compared on the rows a step wrote; `polygraphy run` compares whole
    outputs, so the replay's expected outputs hold the others only."""
    source = builder_folder("qwen3_5_moe", "fp32") / "model.onnx"
    r, _, _ = run_build(source, tmp_path / "engine", "--policy", "off", "--batch-sizes", "2", "--seq-lens", "1")
    assert r.returncode == 0, r.stderr
    expected = json.loads((tmp_path / "engine" / "verification" / "expected.json").read_text())  # Polygraphy's RunResults
    [(runner, iterations)] = expected["lst"]
    assert runner == "expected" and len(iterations) == 1
    names = set(iterations[0]["outputs"])
    assert {"logits", "present.0.conv", "present.0.recurrent"} <= names and not {"present.1.key", "present.1.value"} & names


@pytest.mark.slow
@pytest.mark.parametrize("precision,ran", [("fp32", ""), ("int4", " with its experts dequantized")])
def test_a_failing_run_names_the_users_model_and_onnx_runtime_logs_only_under_verbose(tmp_path, precision, ran):
    """A wrong --dim makes GroupQueryAttention fail at run time: the one-line error names the
    user's model (not a temporary copy verification ran); ONNX Runtime's own log line (written by
    the C++ library to the process's stderr) shows only with -v."""
    folder = tmp_path / "model"
    shutil.copytree(builder_folder("qwen3_5_moe", precision), folder)
    (folder / "genai_config.json").unlink()
    args = ("build", folder / "model.onnx", "-o", tmp_path / "engine", "--policy", "off", "--dim", "kv_cache_dim=8", "--batch-sizes", "1",
            "--seq-lens", "1")
    quiet = lynx(*args, process=True)
    assert quiet.returncode == 1 and len(quiet.errors) == 1, quiet.stderr
    assert quiet.errors[0].startswith(f"lynx-export: error: {folder / 'model.onnx'}{ran}: ONNX Runtime failed to run the model (")
    assert "GroupQueryAttention" in quiet.errors[0] and "lynx-reference-" not in quiet.errors[0] and "lynx-verify-" not in quiet.errors[0]
    assert "onnxruntime:" not in quiet.stderr and not (tmp_path / "engine").exists()
    loud = lynx("-v", *args, process=True)
    assert loud.returncode == 1 and "[E:onnxruntime:" in loud.stderr


def _greedy(folder, prompts: list[list[int]], new_tokens: int = 12) -> list[list[int]]:
    """onnxruntime-genai's own generator on `folder`: greedy tokens after each prompt."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    out = []
    for prompt in prompts:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=64, do_sample=False)  # a sliding window's cache must hold 64 (gpt-oss)
        generator = og.Generator(model, params)
        generator.append_tokens(np.array([prompt], dtype=np.int32))
        for _ in range(new_tokens):
            generator.generate_next_token()
        out.append([int(t) for t in generator.get_sequence(0)][len(prompt):])
    return out


@pytest.mark.slow
@pytest.mark.parametrize("family,precision", [("qwen3_5_moe", "fp32"), ("lfm2_moe", "fp32"), ("gpt_oss", "fp32"), ("qwen3_5_moe", "int4")])
def test_a_built_genai_folder_generates_the_sources_greedy_tokens(family, precision, tmp_path):
    """`build FOLDER` (an onnxruntime-genai model folder) writes a folder onnxruntime-genai loads; with
    the policy off its generator gives the source's greedy tokens. Quantized experts run as built,
    with int8 activations (MatMulNBits accuracy level 4, the kernel error the report gives), where
    the source's QMoE kernel keeps them float: a near-tied token may then differ, so there the
    generator's tokens are checked to come, and to start as the source's."""
    source = builder_folder(family, precision)
    r, manifest, _ = run_build(source, tmp_path / "engine", "--policy", "off", "--batch-sizes", "1", "--seq-lens", "1,4")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "engine"
    assert manifest["source"] == {"path": str(source / "model.onnx"), "sha256": manifest["source"]["sha256"], "genai_folder": str(source)}
    assert {"genai_config.json", "tokenizer.json", "model.onnx"} <= {p.name for p in out.iterdir()}
    assert (out / "model.onnx").read_bytes() == (out / "model.ort.onnx").read_bytes()  # the compiled model under the config's name
    assert {a["file"] for a in manifest["artifacts"]} >= {"genai_config.json", "tokenizer.json", "model.onnx"}
    prompts = [[3, 17, 42, 7], [5, 9]]
    expected, got = _greedy(source, prompts), _greedy(out, prompts)
    assert all(len(tokens) == 12 for tokens in expected + got)
    if precision == "fp32":
        assert got == expected
    else:
        assert [tokens[0] for tokens in got] == [tokens[0] for tokens in expected]


@pytest.mark.parametrize("make,message", [
    (lambda d: None, "not a file, and not an onnxruntime-genai model folder (no genai_config.json in it)"),
    (lambda d: (d / "genai_config.json").write_text("{"), "cannot be read as JSON"),
    (lambda d: (d / "genai_config.json").write_text('{"model": {}}'), "has no decoder section (model.decoder)"),
    (lambda d: (d / "genai_config.json").write_text('{"model": {"decoder": {}}}'), "names no decoder model"),
    (lambda d: (d / "genai_config.json").write_text('{"model": {"decoder": {"filename": "../x.onnx"}}}'), "is not a file in"),
])
def test_a_folder_that_is_not_a_genai_model_is_refused_in_one_line(tmp_path, make, message):
    folder = tmp_path / "model"
    folder.mkdir()
    make(folder)
    r = lynx("build", folder, "-o", tmp_path / "engine")
    assert r.returncode == 1 and len(r.errors) == 1 and message in r.errors[0] and r.errors[0].startswith("lynx-export: error: "), r.stderr
    assert not (tmp_path / "engine").exists()


@pytest.mark.slow
@pytest.mark.parametrize("text,message", [("{", "cannot be read as JSON"), ('{"model": []}', "has no decoder section")])
def test_a_broken_config_beside_a_model_file_is_a_one_line_error(tmp_path, text, message):
    folder = tmp_path / "model"
    shutil.copytree(builder_folder("gpt_oss", "fp32"), folder)
    (folder / "genai_config.json").write_text(text)
    r = lynx("build", folder / "model.onnx", "-o", tmp_path / "engine")
    assert r.returncode == 1 and len(r.errors) == 1 and r.errors[0].startswith(f"lynx-export: error: {folder / 'genai_config.json'}: "), r.stderr
    assert message in r.errors[0] and not (tmp_path / "engine").exists()


@pytest.mark.slow
def test_a_folder_file_named_like_a_build_output_is_refused_before_any_work(tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(builder_folder("gpt_oss", "fp32"), folder)
    (folder / "report.json").write_text("{}")
    r = lynx("build", folder, "-o", tmp_path / "engine")
    assert r.returncode == 1 and r.errors == [f"lynx-export: error: {folder / 'report.json'}: the build writes a file of that name itself; "
                                              "rename it (and the config's entry)"], r.stderr
    assert "rewriting" not in r.stderr and not (tmp_path / "engine").exists()


@pytest.mark.slow
def test_a_dimension_each_case_sets_cannot_be_given(tmp_path):
    source = builder_folder("qwen3_5_moe", "fp32") / "model.onnx"
    r = lynx("build", source, "-o", tmp_path / "engine", "--dim", "past_sequence_length=4")
    assert r.returncode == 1 and r.errors == [
        f"lynx-export: error: {source}: dimension 'past_sequence_length' is set by each verification case (batch, sequence, past or total "
        "length); it cannot be given"], r.stderr
    assert not (tmp_path / "engine").exists()
