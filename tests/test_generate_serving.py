"""`NAME_generate` on a real Triton server: streamed generation with in-flight batching, text in and
out, cancellation, per-request errors and the metrics, on the demo model in onnxruntime-genai's
form (compiled with the policy off and with LYNX)."""

from __future__ import annotations

import contextlib
import json
import pathlib
import queue
import random
import time
import urllib.request

import numpy as np
import pytest

pytest.importorskip("torch")
tritonclient = pytest.importorskip("tritonclient")
import tritonclient.grpc as grpcclient  # noqa: E402
from tritonclient.utils import np_to_triton_dtype  # noqa: E402

from lynx_export.serving.repository import TritonOptions, write_repository  # noqa: E402
from lynx_export.serving.scheduler import Layout, Request, Scheduler, open_session  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
SERVE_ENV = ROOT / ".venv-serve"
MAX_LENGTH = 96
POLICIES = ("off", "lynx")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def builds(lynx_once):
    source = lynx_once("demo-model", "{out}", "--form", "genai").out
    return {p: lynx_once("build", source, "-o", "{out}", "--policy", p, "--batch-sizes", "2", "--seq-lens", "1,3").out for p in POLICIES}


@pytest.fixture(scope="module")
def server(builds, tmp_path_factory):
    if not (SERVE_ENV / "bin" / "python").exists():
        pytest.skip(f"no Triton serving environment at {SERVE_ENV} (`make test` creates it)")
    from lynx_export.serving.server import TritonServer

    root = tmp_path_factory.mktemp("generate-repos")
    repos = [write_repository(builds[p], root / p, TritonOptions(name=f"gen_{p}", max_slots=8, max_length=MAX_LENGTH, threads=1)).repo
             for p in POLICIES]
    with TritonServer(repos, SERVE_ENV) as running:
        yield running


@pytest.fixture
def stream(server):
    """A gRPC client with an open stream: (client, results queue of (result, error))."""
    results: queue.Queue = queue.Queue()
    with contextlib.closing(grpcclient.InferenceServerClient(server.grpc_url)) as client:
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        try:
            yield client, results
        finally:
            client.stop_stream(cancel_requests=True)


def _inputs(**values) -> list:
    out = []
    for name, value in values.items():
        array = np.array([value.encode()], dtype=np.object_) if isinstance(value, str) else np.asarray(value)
        tensor = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        out.append(tensor)
    return out


def _send(client, model: str, rid: str, parameters=None, **values) -> None:
    client.async_stream_infer(model, _inputs(**values), request_id=rid, enable_empty_final_response=True, parameters=parameters)


def _gather(results: queue.Queue, count: int, timeout_s: float = 120) -> dict[str, dict]:
    """Per request id: the ids of each response, the text, and the error (until `count` requests end)."""
    out: dict[str, dict] = {}
    done, deadline = 0, time.monotonic() + timeout_s
    while done < count:
        result, error = results.get(timeout=max(1.0, deadline - time.monotonic()))
        if error is not None:  # a stream's error carries no request id: numbered in arrival order
            out[f"error-{sum(k.startswith('error-') for k in out)}"] = {"error": error.message()}
            done += 1
            continue
        response = result.get_response()
        entry = out.setdefault(response.id, {"responses": [], "text": ""})
        ids = result.as_numpy("output_ids")
        if ids is not None:
            entry["responses"].append(ids.tolist())
            entry["text"] += result.as_numpy("text_output")[0].decode()
        if response.parameters["triton_final_response"].bool_param:
            done += 1
    return out


def _alone(build: pathlib.Path, prompt: list[int], max_tokens: int) -> list[int]:
    """The request run alone through the scheduler in this process."""
    session = open_session(str(build / "model.ort.onnx"), threads=1)
    scheduler = Scheduler(session, Layout.read(session), slots=1, max_length=MAX_LENGTH)
    tokens: list[int] = []
    request = Request(prompt=prompt, emit=lambda r, ids, reason: tokens.extend(ids), max_tokens=max_tokens)
    scheduler.submit(request)
    while not scheduler.idle():
        scheduler.step()
    return tokens


def _metrics(server, model: str = "gen_off_generate") -> dict[str, float]:
    from lynx_export.bench.serving import server_counters

    return server_counters(server.metrics_url, model)


def test_16_streams_arriving_at_random_get_the_tokens_they_get_alone(server, builds, stream):
    """Policy off, greedy: 16 requests sent at random moments over one gRPC stream; each gets one
    response per token (one id each), and its tokens are those it gets alone."""
    client, results = stream
    rng = random.Random(0)
    requests = {f"r{i}": ([rng.randrange(256) for _ in range(rng.randrange(1, 20))], rng.randrange(1, 24)) for i in range(16)}
    before = _metrics(server)
    for rid, (prompt, max_tokens) in requests.items():
        _send(client, "gen_off_generate", rid, input_ids=np.array(prompt, np.int32), max_tokens=np.array([max_tokens], np.int32))
        time.sleep(rng.uniform(0, 0.02))
    got = _gather(results, len(requests))
    for rid, (prompt, max_tokens) in requests.items():
        assert all(len(ids) == 1 for ids in got[rid]["responses"]), rid
        assert [ids[0] for ids in got[rid]["responses"]] == _alone(builds["off"], prompt, max_tokens), rid
    after = _metrics(server)
    steps = after["lynx_generate_decode_steps_total"] - before.get("lynx_generate_decode_steps_total", 0)
    batches = after["lynx_generate_decode_batch_sum"] - before.get("lynx_generate_decode_batch_sum", 0)
    assert steps > 0 and batches / steps > 1  # requests shared decode steps
    assert after["lynx_generate_active_requests"] == 0


def test_lynx_serves_concurrent_streams_and_reports_its_experts(server, stream):
    """With LYNX a request's tokens depend on the batches it shared, so the demo model's random
    weights may pick its stop token (0) at some timing and not at another: min_length = max_tokens
    holds every request to its 12 tokens, as the serving benchmark does."""
    client, results = stream
    for i in range(8):
        _send(client, "gen_lynx_generate", f"l{i}", input_ids=np.array([i + 1, 2 * i + 3, 5], np.int32), max_tokens=np.array([12], np.int32),
              min_length=np.array([12], np.int32))
    got = _gather(results, 8)
    assert all(len(got[f"l{i}"]["responses"]) == 12 for i in range(8))
    metrics = _metrics(server, "gen_lynx_generate")
    assert 1 <= metrics["lynx_generate_active_experts"] <= 8 and metrics["lynx_generate_active_experts_sum"] > 0


def test_text_in_and_out_over_http_generate_stream(server, builds):
    """HTTP `generate_stream` (server-sent events) with `text_input`: the byte tokenizer turns the
    prompt into its bytes; the events' text is the tokens' bytes, decoded as UTF-8; with
    exclude_input_in_output false the prompt comes first."""
    prompt = "def main():"
    body = json.dumps({"text_input": prompt, "max_tokens": 6, "exclude_input_in_output": False}).encode()
    url = f"http://{server.http_url}/v2/models/gen_off_generate/generate_stream"
    with urllib.request.urlopen(urllib.request.Request(url, data=body, method="POST"), timeout=60) as response:
        events = [json.loads(line[len("data: "):]) for line in response.read().decode().splitlines() if line.startswith("data: ")]
    assert len(events) == 6
    ids = [e["output_ids"][0] if isinstance(e["output_ids"], list) else e["output_ids"] for e in events]
    assert ids == _alone(builds["off"], list(prompt.encode()), 6)
    text = "".join(e["text_output"] for e in events)
    assert text == prompt + bytes(ids).decode("utf-8", errors="replace")


def test_errors_reach_their_request_while_the_others_go_on(server, builds, stream):
    client, results = stream
    _send(client, "gen_off_generate", "good", input_ids=np.array([3, 4, 5], np.int32), max_tokens=np.array([5], np.int32))
    _send(client, "gen_off_generate", "long", input_ids=np.arange(MAX_LENGTH, dtype=np.int32) % 256)
    _send(client, "gen_off_generate", "both", input_ids=np.array([1], np.int32), text_input="x")
    _send(client, "gen_off_generate", "param", parameters={"beam_width": 2}, input_ids=np.array([1], np.int32))
    _send(client, "gen_off_generate", "range", input_ids=np.array([300], np.int32))
    _send(client, "gen_off_generate", "topp", input_ids=np.array([1], np.int32), top_p=np.array([0.0], np.float32))
    got = _gather(results, 6)
    errors = sorted(v["error"] for k, v in got.items() if k.startswith("error-"))
    assert len(errors) == 5
    for expected in (f"the prompt has {MAX_LENGTH} tokens; this model's cache holds {MAX_LENGTH}", "give exactly one of text_input and input_ids",
                     "unknown parameter 'beam_width'", "token id 300 is outside the vocabulary", "top_p must be in (0, 1]"):
        assert any(expected in e for e in errors), (expected, errors)
    assert [ids[0] for ids in got["good"]["responses"]] == _alone(builds["off"], [3, 4, 5], 5)


def test_a_cancelled_stream_frees_its_slot_at_once(server, builds):
    results: queue.Queue = queue.Queue()
    with contextlib.closing(grpcclient.InferenceServerClient(server.grpc_url)) as client:
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        _send(client, "gen_off_generate", "long", input_ids=np.array([1, 2], np.int32), max_tokens=np.array([MAX_LENGTH], np.int32))
        results.get(timeout=60)  # its first token: it holds a slot
        client.stop_stream(cancel_requests=True)
    deadline = time.monotonic() + 30
    while _metrics(server)["lynx_generate_active_requests"] != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _metrics(server)["lynx_generate_active_requests"] == 0
    with contextlib.closing(grpcclient.InferenceServerClient(server.grpc_url)) as client:
        fresh: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: fresh.put((result, error)))
        _send(client, "gen_off_generate", "after", input_ids=np.array([1, 2], np.int32), max_tokens=np.array([4], np.int32))
        got = _gather(fresh, 1)
        client.stop_stream()
    assert [ids[0] for ids in got["after"]["responses"]] == _alone(builds["off"], [1, 2], 4)


def test_a_graph_in_another_form_gets_no_generate_model_and_the_reason(demo_builds, tmp_path):
    """The dynamo export's Concat attention cannot share a decode step across past lengths."""
    built = demo_builds("--policy", "off", "--batch-sizes", "2", "--seq-lens", "1,3").out
    result = write_repository(built, tmp_path / "repo")
    assert [m.kind for m in result.models] == ["cpu", "onnx"]
    assert result.skipped[0][0] == "lynx_moe_generate" and "not GroupQueryAttention" in result.skipped[0][1]
    assert not (tmp_path / "repo" / "lynx_moe_generate").exists()
