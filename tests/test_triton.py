"""Triton model repositories: the writer, and a real Triton server serving what it wrote."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
from google.protobuf import text_format

from lynx_export.errors import OutputError
from lynx_export.serving.repository import TritonOptions, model_config, write_repository
from lynx_export.serving.server import ServerError, model_backend, request_inputs

tritonclient = pytest.importorskip("tritonclient")
import tritonclient.grpc as grpcclient  # noqa: E402
import tritonclient.http as httpclient  # noqa: E402
from tritonclient.grpc import model_config_pb2  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
SERVE_ENV = ROOT / ".venv-serve"


@pytest.fixture(scope="module")
def builds(demo_builds):
    """The demo built with each policy (shared: a test that changes one copies it first)."""
    return {p: demo_builds("--policy", p, "--batch-sizes", "2", "--seq-lens", "1,3").out for p in ("off", "lynx")}


@pytest.fixture(scope="module")
def repos(builds, tmp_path_factory):
    root = tmp_path_factory.mktemp("triton-repos")
    return {p: write_repository(d, root / p, TritonOptions(name=f"demo_{p}", max_batch_size=32, preferred_batch_sizes=(4, 8))) for p, d in builds.items()}


@pytest.fixture(scope="module")
def server(repos):
    if not (SERVE_ENV / "bin" / "python").exists():
        pytest.skip(f"no Triton serving environment at {SERVE_ENV} (`make test` creates it)")
    from lynx_export.serving.server import TritonServer

    with TritonServer([r.repo for r in repos.values()], SERVE_ENV) as running:
        yield running


@pytest.fixture
def clients():
    """`clients(module, url, **options)`: a tritonclient of `module` (http or grpc), closed after the
    test: an open connection holds the server's shutdown for its whole exit timeout (30 s)."""
    with contextlib.ExitStack() as opened:
        yield lambda module, url, **options: opened.enter_context(module.InferenceServerClient(url, **options))


def _feeds(rng: np.random.Generator, batch: int, past: int = 5) -> dict[str, np.ndarray]:
    feeds = {"input_ids": rng.integers(0, 256, (batch, 1)).astype(np.int64)}
    for layer in range(2):
        for kind in ("key", "value"):
            feeds[f"past_{kind}.{layer}"] = rng.standard_normal((batch, 4, past, 16)).astype(np.float32)
    return feeds


def _ort(model_dir: pathlib.Path, feeds):
    session = ort.InferenceSession(str(model_dir / "1" / "model.ort.onnx"), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


# -- the writer --------------------------------------------------------------------------------------


def test_repository_layout_and_configs(repos):
    repo = repos["off"]
    assert [(m.name, m.kind) for m in repo.models] == [("demo_off_cpu", "cpu"), ("demo_off_onnx", "onnx")]
    model_dir = repo.repo / "demo_off_cpu"
    assert sorted(p.name for p in (model_dir / "1").iterdir() if p.name != "__pycache__") == ["model.ort.onnx", "model.py"]
    config = text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.name == "demo_off_cpu" and config.backend == "python" and config.max_batch_size == 32
    assert [i.name for i in config.input] == ["input_ids", "past_key.0", "past_value.0", "past_key.1", "past_value.1"]
    assert list(config.input[0].dims) == [-1] and list(config.input[1].dims) == [4, -1, 16]
    assert [o.name for o in config.output][:1] == ["logits"] and list(config.output[0].dims) == [-1, 256]
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8]
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert (repo.repo / "README.md").exists()


def _config(model_dir: pathlib.Path):
    return text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def test_onnxruntime_backend_model(repos, builds):
    # Triton's own ONNX Runtime backend: the same ORT model, tensors and batching as NAME_cpu.
    repo = repos["lynx"]
    model_dir = repo.repo / "demo_lynx_onnx"
    assert [p.name for p in (model_dir / "1").iterdir()] == ["model.onnx"]
    assert (model_dir / "1" / "model.onnx").read_bytes() == (builds["lynx"] / "model.ort.onnx").read_bytes()
    config, cpu = _config(model_dir), _config(repo.repo / "demo_lynx_cpu")
    assert config.name == "demo_lynx_onnx" and config.backend == "onnxruntime" and config.platform == ""
    assert config.max_batch_size == cpu.max_batch_size == 32
    assert list(config.input) == list(cpu.input) and list(config.output) == list(cpu.output)
    assert config.dynamic_batching == cpu.dynamic_batching and list(config.dynamic_batching.preferred_batch_size) == [4, 8]
    assert [(g.kind, g.count) for g in config.instance_group] == [(model_config_pb2.ModelInstanceGroup.KIND_CPU, 1)]
    assert dict((k, v.string_value) for k, v in config.parameters.items()) == {"intra_op_thread_count": "0"}
    # Its tensors are the ONNX model's own (batch dimension first, left out of dims).
    session = ort.InferenceSession(str(model_dir / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in config.input] == [i.name for i in session.get_inputs()]
    assert [o.name for o in config.output] == [o.name for o in session.get_outputs()]
    assert model_backend(model_dir) == "onnxruntime" and model_backend(repo.repo / "demo_lynx_cpu") == "python"
    readme = (repo.repo / "README.md").read_text()
    assert "| demo_lynx_onnx | onnxruntime" in readme and "KIND_GPU" in readme and "com.microsoft" in readme


def test_onnx_model_threads_and_kinds(builds, tmp_path):
    write_repository(builds["off"], tmp_path / "repo", TritonOptions(name="t", threads=3, instances=2))
    config = _config(tmp_path / "repo" / "t_onnx")
    assert config.parameters["intra_op_thread_count"].string_value == "3"
    assert [(g.kind, g.count) for g in config.instance_group] == [(model_config_pb2.ModelInstanceGroup.KIND_CPU, 2)]
    assert _config(tmp_path / "repo" / "t_cpu").parameters["intra_op_num_threads"].string_value == "3"
    with pytest.raises(ValueError, match="model kind 'tpu'"):
        model_config(builds["off"] / "model.ort.onnx", "t", "tpu", TritonOptions())


def test_model_backend_reads_backend_or_platform(tmp_path):
    for name, text, expected in (("a", 'backend: "python"', "python"), ("b", "platform: 'tensorrt_plan'", "tensorrt"),
                                 ("c", 'platform: "onnxruntime_onnx"', "onnxruntime"), ("d", "max_batch_size: 1", None),
                                 ("e", "not a config {", None)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.pbtxt").write_text(text)
        assert model_backend(tmp_path / name) == expected, text
    assert model_backend(tmp_path / "no_such_model") is None


def _with_engine(build_dir: pathlib.Path, backend: str) -> None:
    (build_dir / "model.plan").write_bytes(b"serialized engine")
    manifest = json.loads((build_dir / "manifest.json").read_text())
    manifest["engine"] = {"file": "model.plan", "backend": backend, "builder": {"package": backend.replace("-", "_"), "version": "10.0"},
                          "precision": "fp16", "targets": ["8.0"], "profiles": {},
                          "plugin": {"name": "LynxMoE", "namespace": "lynx", "version": "1", "implementation": "", "layers": 2}}
    (build_dir / "manifest.json").write_text(json.dumps(manifest))


def test_tensorrt_rtx_engine_gets_no_triton_model(builds, tmp_path):
    # Triton's tensorrt_plan platform runs full TensorRT engines, not TensorRT-RTX ones.
    build_dir = tmp_path / "build"
    shutil.copytree(builds["lynx"], build_dir)
    _with_engine(build_dir, "tensorrt-rtx")
    result = write_repository(build_dir, tmp_path / "repo", TritonOptions(name="demo"))
    assert [(m.name, m.kind) for m in result.models] == [("demo_cpu", "cpu"), ("demo_onnx", "onnx")]


def test_gpu_model_when_the_build_has_an_engine(builds, tmp_path):
    build_dir = tmp_path / "build"
    shutil.copytree(builds["lynx"], build_dir)
    _with_engine(build_dir, "tensorrt")
    result = write_repository(build_dir, tmp_path / "repo", TritonOptions(name="demo"))
    assert [(m.name, m.kind) for m in result.models] == [("demo_cpu", "cpu"), ("demo_onnx", "onnx"), ("demo", "gpu")]
    config = text_format.Parse((tmp_path / "repo" / "demo" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.platform == "tensorrt_plan" and config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert (tmp_path / "repo" / "demo" / "1" / "model.plan").read_bytes() == b"serialized engine"
    assert "LD_PRELOAD" in (tmp_path / "repo" / "README.md").read_text()


def test_existing_repository_is_kept_without_force(builds, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "other_model").mkdir()
    with pytest.raises(OutputError, match="not empty"):
        write_repository(builds["off"], repo)
    assert [p.name for p in repo.iterdir()] == ["other_model"]
    write_repository(builds["off"], repo, TritonOptions(force=True))
    assert sorted(p.name for p in repo.iterdir()) == ["README.md", "lynx_moe_cpu", "lynx_moe_onnx"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]


@pytest.mark.parametrize("bad,match", [({"name": "a b"}, "must be letters"), ({"max_batch_size": 0}, "at least 1")])
def test_bad_options_write_nothing(builds, tmp_path, bad, match):
    with pytest.raises(OutputError, match=match):
        write_repository(builds["off"], tmp_path / "repo", TritonOptions(**bad))
    assert list(tmp_path.iterdir()) == []


def test_not_a_build_folder(tmp_path):
    with pytest.raises(OutputError, match="not a lynx-export build folder"):
        write_repository(tmp_path, tmp_path / "repo")


def test_cli_triton(builds, tmp_path):
    exe = [sys.executable, "-m", "lynx_export.cli", "triton", str(builds["off"]), "--repo", str(tmp_path / "r"), "--name", "m"]
    r = subprocess.run(exe, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[:2] == [f"m_cpu (cpu): {tmp_path / 'r' / 'm_cpu'}", f"m_onnx (onnx): {tmp_path / 'r' / 'm_onnx'}"]
    assert len(lines) == 3 and lines[2].startswith("m_generate: not written: its attention is not GroupQueryAttention")
    r = subprocess.run(exe, capture_output=True, text=True)
    assert r.returncode == 1 and "not empty" in r.stderr


# -- a real server ---------------------------------------------------------------------------------


def test_ready_and_metadata(server, repos, clients):
    http, grpc = clients(httpclient, server.http_url), clients(grpcclient, server.grpc_url)
    assert http.is_server_live() and http.is_server_ready() and grpc.is_server_ready()
    # The repositories hold the onnxruntime-backend models too; this server has no such backend,
    # so it leaves them unloaded, says why, and serves the python-backend models.
    assert all((r.repo / f"demo_{p}_onnx" / "1" / "model.onnx").exists() for p, r in repos.items())
    assert server.loaded == ["demo_off_cpu", "demo_lynx_cpu"]
    assert sorted(server.skipped) == ["demo_lynx_onnx", "demo_off_onnx"]
    assert all("no 'onnxruntime' backend" in why for why in server.skipped.values())
    assert not http.is_model_ready("demo_off_onnx")
    for name in ("demo_off_cpu", "demo_lynx_cpu"):
        assert http.is_model_ready(name) and grpc.is_model_ready(name)
        meta = http.get_model_metadata(name)
        assert [(i["name"], i["datatype"], i["shape"]) for i in meta["inputs"]][:2] == [
            ("input_ids", "INT64", [-1, -1]), ("past_key.0", "FP32", [-1, 4, -1, 16])]
        assert grpc.get_model_metadata(name).outputs[0].name == "logits"


@pytest.mark.parametrize("policy", ["off", "lynx"])
def test_http_and_grpc_equal_onnxruntime(server, repos, clients, policy):
    name = f"demo_{policy}_cpu"
    feeds = _feeds(np.random.default_rng(1), batch=3)
    expected = _ort(repos[policy].repo / name, feeds)
    for module, url in ((httpclient, server.http_url), (grpcclient, server.grpc_url)):
        result = clients(module, url).infer(name, request_inputs(module, feeds))
        for out, value in expected.items():
            np.testing.assert_allclose(result.as_numpy(out), value, rtol=1e-5, atol=1e-5)


def test_concurrent_requests_are_batched_and_correct(server, repos, clients):
    # The model's own routing: each request's answer does not depend on its batch mates.
    # (With LYNX it does, by design: the batch chooses the experts.)
    name = "demo_off_cpu"
    client = clients(httpclient, server.http_url, concurrency=16)
    before = client.get_inference_statistics(name)["model_stats"][0]
    requests = [_feeds(np.random.default_rng(100 + i), batch=1) for i in range(32)]
    # All in flight at once (the HTTP client's async calls; it is not thread-safe).
    pending = [client.async_infer(name, request_inputs(httpclient, f)) for f in requests]
    results = [p.get_result().as_numpy("logits") for p in pending]
    for feeds, logits in zip(requests, results):
        np.testing.assert_allclose(logits, _ort(repos["off"].repo / name, feeds)["logits"], rtol=1e-5, atol=1e-5)
    after = client.get_inference_statistics(name)["model_stats"][0]
    inferences = after["inference_count"] - before["inference_count"]
    executions = after["execution_count"] - before["execution_count"]
    assert inferences == 32
    assert executions < inferences  # the dynamic batcher merged requests


def test_malformed_requests_get_errors_and_server_keeps_serving(server, clients):
    client = clients(httpclient, server.http_url)
    feeds = _feeds(np.random.default_rng(2), batch=2)
    wrong_dtype = dict(feeds, input_ids=feeds["input_ids"].astype(np.float32))
    with pytest.raises(InferenceServerException, match="input_ids"):
        client.infer("demo_off_cpu", request_inputs(httpclient, wrong_dtype))
    wrong_shape = dict(feeds, **{"past_key.0": np.zeros((2, 3, 5, 16), np.float32)})
    with pytest.raises(InferenceServerException, match="past_key.0"):
        client.infer("demo_off_cpu", request_inputs(httpclient, wrong_shape))
    with pytest.raises(InferenceServerException, match="unknown model|not found"):
        client.infer("no_such_model", request_inputs(httpclient, feeds))
    assert client.infer("demo_off_cpu", request_inputs(httpclient, feeds)).as_numpy("logits").shape == (2, 1, 256)


@pytest.mark.slow
def test_server_stops_cleanly(repos):
    if not (SERVE_ENV / "bin" / "python").exists():
        pytest.skip(f"no Triton serving environment at {SERVE_ENV}")
    from lynx_export.serving.server import TritonServer

    with TritonServer(repos["off"].repo, SERVE_ENV) as running:
        pgid = running.process.pid
        with httpclient.InferenceServerClient(running.http_url) as client:
            assert client.is_model_ready("demo_off_cpu")
    assert running.process.returncode is not None
    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)  # no server or python-backend stub left in its process group


def test_python_backend_model_that_fails_to_load_is_an_error(repos, tmp_path, caplog):
    # Skipping is for backends the server lacks; a python-backend model that breaks is not hidden.
    if not (SERVE_ENV / "bin" / "python").exists():
        pytest.skip(f"no Triton serving environment at {SERVE_ENV}")
    from lynx_export.serving.server import TritonServer

    repo = tmp_path / "repo"
    shutil.copytree(repos["off"].repo, repo)
    (repo / "demo_off_cpu" / "1" / "model.py").write_text("raise RuntimeError('model.py is broken')\n")
    with pytest.raises(ServerError, match="could not load demo_off_cpu: .*model.py is broken"):
        with TritonServer(repo, SERVE_ENV, startup_timeout_s=60):
            pass
    assert "not loading model demo_off_onnx" in caplog.text and "no 'onnxruntime' backend" in caplog.text


def test_repository_with_nothing_this_server_can_load(repos, tmp_path):
    if not (SERVE_ENV / "bin" / "python").exists():
        pytest.skip(f"no Triton serving environment at {SERVE_ENV}")
    from lynx_export.serving.server import TritonServer

    repo = tmp_path / "repo"
    shutil.copytree(repos["off"].repo / "demo_off_onnx", repo / "demo_off_onnx")
    with pytest.raises(ServerError, match="nothing this server can load.*demo_off_onnx: this server has no 'onnxruntime' backend"):
        with TritonServer(repo, SERVE_ENV):
            pass


def _load_script(out: pathlib.Path, *args: str) -> dict:
    """Run scripts/triton_load.py against a fresh server; return the JSON it wrote."""
    if not (SERVE_ENV / "bin" / "python").exists():
        pytest.skip(f"no Triton serving environment at {SERVE_ENV}")
    script = [sys.executable, str(ROOT / "scripts" / "triton_load.py"), *args, "--out", str(out), "--env", str(SERVE_ENV)]
    r = subprocess.run(script, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    written = [p for p in (out / "load.json", out / "soak.json") if p.exists()]
    assert len(written) == 1
    return json.loads(written[0].read_text())


@pytest.mark.slow
def test_load_script_reports_both_models(tmp_path):
    """As documented: the script builds the demo itself."""
    rows = _load_script(tmp_path, "--seconds", "1", "--concurrency", "1,4")["results"]
    assert [(x["model"], x["concurrency"]) for x in rows] == [
        ("demo_off_cpu", 1), ("demo_lynx_cpu", 1), ("demo_off_cpu", 4), ("demo_lynx_cpu", 4)]
    assert all(x["requests"] > 0 and x["failed"] == 0 and x["latency_ms_p50"] <= x["latency_ms_p99"] for x in rows)


@pytest.mark.slow
def test_soak_mode_checks_outputs_and_memory(builds, tmp_path):
    report = _load_script(tmp_path, "--soak", "2", "--concurrency", "4", "--builds", f"{builds['off']},{builds['lynx']}")
    assert sorted(x["model"] for x in report["results"]) == ["demo_lynx_cpu", "demo_off_cpu"]
    assert all(x["requests"] > 0 and x["failed"] == 0 and x["wrong_outputs"] == 0 for x in report["results"])
    assert 0 < report["server_rss_mb"]["start"] <= report["server_rss_mb"]["max"]


@pytest.mark.slow
def test_a_port_taken_before_the_server_binds_it_is_chosen_again(repos, monkeypatch, caplog):
    """Ports are chosen free, then bound by the server a moment later: another process (a second
    test worker, another server) may take one in between. The server is started again on others."""
    if not (SERVE_ENV / "bin" / "python").exists():
        pytest.skip(f"no Triton serving environment at {SERVE_ENV}")
    from lynx_export.serving import server as server_module

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        calls, free = [], server_module._free_ports

        def ports(count: int) -> list[int]:  # the first choice includes the taken port
            calls.append(count)
            chosen = free(count)
            return [port, *chosen[1:]] if len(calls) == 1 else chosen

        monkeypatch.setattr(server_module, "_free_ports", ports)
        caplog.set_level(logging.INFO, logger=server_module.__name__)
        with server_module.TritonServer(repos["off"].repo, SERVE_ENV) as running:
            assert port not in (running.http_port, running.grpc_port, running.metrics_port)
            with httpclient.InferenceServerClient(running.http_url) as client:
                assert client.is_model_ready("demo_off_cpu")
    assert "a port was taken by another process (attempt 1 of 3)" in caplog.text and calls == [3, 3]


def test_the_ports_chosen_together_are_distinct():
    from lynx_export.serving.server import _free_ports

    for _ in range(50):  # one at a time, the system may hand the same free port out twice
        assert len(set(_free_ports(3))) == 3


def test_the_generate_config_says_whether_its_threads_spin():
    from lynx_export.serving.repository import generate_config

    def spinning(options: TritonOptions) -> str:
        return text_format.Parse(generate_config("g", options, 128), model_config_pb2.ModelConfig()).parameters["allow_spinning"].string_value

    assert spinning(TritonOptions()) == "1" and spinning(TritonOptions(spinning=False)) == "0"
