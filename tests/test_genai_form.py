"""The project's own models in onnxruntime-genai's form (`evaluation.genai_form`, `demo-model --form
genai`): the torch module's logits, onnxruntime-genai's generator, the build and LYNX on it."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")

from lynx_export.evaluation.demo import DemoConfig, build_demo_model, empty_cache  # noqa: E402
from lynx_export.evaluation.genai_form import FILES, byte_tokenizer, export_genai_model  # noqa: E402
from tests.cli_builds import SHAPES, check_report, lynx, run_build  # noqa: E402

CONFIG = DemoConfig()


@pytest.fixture(scope="module")
def demo():
    return build_demo_model(CONFIG)


@pytest.fixture(scope="module")
def folder(demo, tmp_path_factory):
    return export_genai_model(demo, tmp_path_factory.mktemp("genai") / "demo", max_length=256).parent


def _run(session, ids: np.ndarray, past: list[np.ndarray]) -> list[np.ndarray]:
    feeds = {"input_ids": ids, "attention_mask": np.ones((ids.shape[0], past[0].shape[2] + ids.shape[1]), np.int64)}
    for i in range(CONFIG.num_layers):
        feeds[f"past_key_values.{i}.key"], feeds[f"past_key_values.{i}.value"] = past[2 * i], past[2 * i + 1]
    return session.run(None, feeds)


def _tolerance(logits: np.ndarray) -> float:
    # Each layer's outputs are sums of at most max(H, I, past + S) = 128 fp32 products, summed in
    # another order by ONNX Runtime's kernels than by torch's; over 2 layers and the head, a
    # relative error of a few hundred fp32 epsilons of the largest logit bounds the difference.
    return 512 * float(np.finfo(np.float32).eps) * float(np.abs(logits).max())


def test_the_genai_form_computes_the_torch_modules_logits_and_caches(demo, folder):
    """Prefill from an empty cache, then a decode step on the prefill's caches: logits and the
    caches written match the torch module (the dynamo export's source)."""
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    ids = rng.integers(0, CONFIG.vocab_size, (3, 7))
    with torch.no_grad():
        expected = [t.numpy() for t in demo(torch.tensor(ids), *empty_cache(CONFIG, 3))]
    got = _run(session, ids, [np.asarray(p) for p in empty_cache(CONFIG, 3)])
    for e, g in zip(expected, got):
        assert g.shape == e.shape
        np.testing.assert_allclose(g, e, rtol=0, atol=_tolerance(expected[0]))
    step = rng.integers(0, CONFIG.vocab_size, (3, 1))
    with torch.no_grad():
        expected_step = [t.numpy() for t in demo(torch.tensor(step), *(torch.tensor(p) for p in expected[1:]))]
    got_step = _run(session, step, expected[1:])
    for e, g in zip(expected_step, got_step):
        np.testing.assert_allclose(g, e, rtol=0, atol=_tolerance(expected_step[0]))


def test_onnxruntime_genai_generates_the_torch_modules_greedy_tokens(demo, folder):
    """The folder loads in onnxruntime-genai; its tokenizer maps each byte to its own id; its
    generator (KV cache shared in place) gives the torch module's greedy tokens."""
    og = pytest.importorskip("onnxruntime_genai")
    import torch

    model = og.Model(str(folder))
    tokenizer = og.Tokenizer(model)
    prompt = "def main():"
    ids = [int(t) for t in tokenizer.encode(prompt)]
    assert ids == list(prompt.encode())
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 12, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([ids], dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    got = [int(t) for t in generator.get_sequence(0)]
    expected = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(12):
            logits = demo(expected, *empty_cache(CONFIG, 1))[0]
            expected = torch.cat([expected, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert got == expected[0].tolist()


def test_the_byte_tokenizer_round_trips_any_bytes():
    tokenizers = pytest.importorskip("tokenizers")
    tokenizer = tokenizers.Tokenizer.from_str(json.dumps(byte_tokenizer()))
    text = "naïve café ✓\n\tx"
    assert tokenizer.encode(text).ids == list(text.encode())
    assert tokenizer.decode(list(text.encode())) == text


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["off", "lynx"])
def test_the_genai_form_builds_verifies_and_runs_with_lynx(folder, policy, tmp_path):
    """`build FOLDER` on it: both blocks rewritten from the com.microsoft.MoE form, phase-gated
    (the MoE reads [B,S,H]); verified with the policy off; LYNX runs fewer experts at batch 8."""
    r, manifest, report = run_build(folder, tmp_path / "engine", "--policy", policy, *SHAPES)
    assert r.returncode == 0, r.stderr
    assert manifest["rewrite"]["counts"] == {"ort_moe": 2} and manifest["unsupported"] == []
    check_report(report, policy)
    if policy == "lynx":
        decode8 = next(c for c in report["cases"] if (c["batch"], c["seq_len"]) == (8, 1))
        assert decode8["mean_active_experts_policy"] < decode8["mean_active_experts_model"]


def test_demo_model_form_genai_writes_a_folder_and_refuses_to_overwrite_other_files(tmp_path):
    out = tmp_path / "genai"
    r = lynx("demo-model", out, "--form", "genai", "--layers", "1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out / "model.onnx")
    assert {p.name for p in out.iterdir()} <= set(FILES) and (out / "genai_config.json").is_file()
    config = json.loads((out / "genai_config.json").read_text())
    assert config["model"]["decoder"]["num_hidden_layers"] == 1 and config["search"]["past_present_share_buffer"] is True
    r = lynx("demo-model", out, "--form", "genai", "--layers", "2")  # its own files: replaced
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "genai_config.json").read_text())["model"]["decoder"]["num_hidden_layers"] == 2

    (out / "notes.txt").write_text("mine")
    r = lynx("demo-model", out, "--form", "genai")
    assert r.returncode == 1 and len(r.errors) == 1 and "holds other files than an exported model folder's" in r.errors[0]
    assert (out / "notes.txt").read_text() == "mine" and not [p for p in tmp_path.iterdir() if p.name.startswith(".genai")]
    r = lynx("demo-model", out / "notes.txt", "--form", "genai")
    assert r.returncode == 2 and "--form genai writes a folder, and this is a file" in r.stderr
    r = lynx("demo-model", out, "--form", "dynamo")
    assert r.returncode == 2 and "--form dynamo writes one ONNX file, and this is a folder" in r.stderr


def test_an_in_place_step_computes_what_a_plain_run_does_and_repeats_the_same_step(folder):
    """InPlaceStep (the benchmark's timed step): each cache and its present output bound to one
    buffer. Its logits equal a plain run's, the buffer's last row is the plain run's new present
    row, the past rows stay as given, and running it again gives the same again."""
    import onnx_ir as ir
    import onnxruntime as ort

    from lynx_export.backends.ort import InPlaceStep
    from lynx_export.compiler.decoder import DecoderIO

    decoder = DecoderIO.read(ir.load(folder / "model.onnx"), folder)
    assert decoder.in_place_cache and decoder.presents == {f"past_key_values.{i}.{k}": f"present.{i}.{k}"
                                                           for i in range(CONFIG.num_layers) for k in ("key", "value")}
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = decoder.step(4, 1, 9, np.random.default_rng(0)).feeds
    plain = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    step = InPlaceStep(session, feeds, decoder.presents, 1)
    for _ in range(2):
        assert step.run() > 0
        np.testing.assert_array_equal(step.results()["logits"], plain["logits"])
        for cache, present in decoder.presents.items():
            buffer = step.buffers[cache].numpy()
            assert buffer.shape[2] == 10
            np.testing.assert_array_equal(buffer[:, :, :9], feeds[cache])
            np.testing.assert_array_equal(buffer[:, :, 9], plain[present][:, :, 9])
