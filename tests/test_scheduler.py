"""In-flight batching (`serving.scheduler`) on the demo model in onnxruntime-genai's form, offline:
the same tokens alone and among others, LYNX against an offline decode of the same step batches,
slots freed and reused, errors per request."""

from __future__ import annotations

import random
import time

import numpy as np
import pytest

pytest.importorskip("torch")

from lynx_export.serving.scheduler import Layout, Request, RequestError, RoutingProbe, Sampling, Scheduler, open_session  # noqa: E402

VOCAB = 256


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from lynx_export.evaluation.demo import DemoConfig, build_demo_model
    from lynx_export.evaluation.genai_form import export_genai_model

    return export_genai_model(build_demo_model(DemoConfig()), tmp_path_factory.mktemp("sched") / "demo", max_length=256).parent


@pytest.fixture(scope="module")
def built(folder, tmp_path_factory):
    """The genai-form demo compiled with each policy: (model.ort.onnx, its routing probes)."""
    import json

    from tests.cli_builds import lynx

    out = {}
    for policy in ("off", "lynx"):
        target = tmp_path_factory.mktemp(f"built-{policy}") / "engine"
        r = lynx("build", folder, "-o", target, "--policy", policy, "--batch-sizes", "2", "--seq-lens", "1,3")
        assert r.returncode == 0, r.stderr
        blocks = json.loads((target / "manifest.json").read_text())["blocks"]
        out[policy] = (target / "model.ort.onnx", [RoutingProbe(b["observe"]["routed_logits"], b["top_k"]) for b in blocks])
    return out


def _with_probes(path, probes, tmp_path):
    """The model with the probes' values as outputs (what `triton` serves)."""
    import onnx_ir as ir

    from lynx_export.compiler.model_io import expose_outputs

    ir.save(expose_outputs(ir.load(path), (p.output for p in probes)), tmp_path / "probed.onnx")
    return str(tmp_path / "probed.onnx")


def _scheduler(path, slots=4, max_length=64, probes=(), on_step=None) -> Scheduler:
    session = open_session(str(path), threads=1)
    return Scheduler(session, Layout.read(session), slots=slots, max_length=max_length, probes=probes, on_step=on_step)


def _collect(results: dict):
    def emit(request, ids, reason):
        results.setdefault(id(request), []).extend(ids)
        if reason is not None:
            results[(id(request), "reason")] = reason

    return emit


def _drain(scheduler: Scheduler, pending: list[Request], rng: random.Random | None = None) -> None:
    """Submit `pending` (a few per tick at random when `rng` is given, else all at once) and tick until idle."""
    pending = list(pending)
    while pending or not scheduler.idle():
        for _ in range(rng.randrange(0, 3) if rng else len(pending)):
            if pending:
                scheduler.submit(pending.pop(0))
        scheduler.step()


def _requests(n: int, seed: int, emit, prompt_len=None, max_tokens=None) -> list[Request]:
    rng = random.Random(seed)
    return [Request(prompt=[rng.randrange(VOCAB) for _ in range(prompt_len or rng.randrange(1, 12))], emit=emit,
                    max_tokens=max_tokens or rng.randrange(1, 20)) for _ in range(n)]


def test_a_requests_tokens_are_the_same_alone_and_among_others_arriving_at_random(built):
    """Policy off, greedy: 16 requests of random prompt lengths and answer lengths arrive at random
    over 4 slots (so they wait, join mid-flight, leave and hand their slot on); each request's
    tokens equal its tokens when run alone, and the torch module's greedy tokens."""
    import torch

    from lynx_export.evaluation.demo import DemoConfig, build_demo_model, empty_cache

    path, _ = built["off"]
    together: dict = {}
    requests = _requests(16, 0, _collect(together))
    scheduler = _scheduler(path)
    _drain(scheduler, requests, random.Random(1))
    assert scheduler.status()["finished"] == 16 and scheduler.status()["active"] == 0
    assert scheduler.status()["mean_batch"] > 1  # requests did share decode steps
    model = build_demo_model(DemoConfig())
    for request in requests:
        alone: dict = {}
        single = Request(prompt=request.prompt, emit=_collect(alone), max_tokens=request.max_tokens)
        _drain(_scheduler(path), [single])
        assert together[id(request)] == alone[id(single)]
        assert together[(id(request), "reason")] == "length"
        seq = torch.tensor([list(request.prompt)])
        with torch.no_grad():
            for _ in range(request.max_tokens):
                seq = torch.cat([seq, model(seq, *empty_cache(model.config, 1))[0][:, -1].argmax(-1, keepdim=True)], 1)
        assert together[id(request)] == seq[0, len(request.prompt) :].tolist()


def test_the_cache_rows_follow_the_longest_request(built, monkeypatch):
    """The buffers grow by whole blocks as the longest active request needs rows and shrink when half
    of them hold nothing, moving the active slots' rows each time: with 4-row blocks, 16 random
    arrivals grow and shrink them many times and still get the tokens each gets with buffers that
    never move (one block of the whole cache)."""
    path, _ = built["off"]
    results = {}
    for block in (4, 64):
        monkeypatch.setattr(Scheduler, "ROW_BLOCK", block)
        tokens: dict = {}
        requests = _requests(16, 2, _collect(tokens))
        rows: list[int] = []
        scheduler = _scheduler(path)
        scheduler.on_step = lambda stats, s=scheduler: rows.append(s.rows)
        _drain(scheduler, requests, random.Random(3))
        results[block] = [tokens[id(r)] for r in requests]
        if block == 4:
            assert len(set(rows)) > 3 and any(b < a for a, b in zip(rows, rows[1:]))  # grew and shrank
            assert all(r % 4 == 0 and r <= 64 for r in rows)
        else:
            assert set(rows) == {64}
    assert results[4] == results[64]


def _offline_batched_decode(path, prompts: list[list[int]], max_tokens: list[int]) -> list[list[int]]:
    """Greedy decode of prompts of one length that start together, each step one plain
    session.run over the requests still running (caches returned as outputs, not in place)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    caches = [i.name for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    heads, size = session.get_inputs()[2].shape[1], session.get_inputs()[2].shape[3]
    tokens: list[list[int]] = [[] for _ in prompts]
    past = {c: np.zeros((len(prompts), heads, 0, size), np.float32) for c in caches}
    ids = np.array(prompts)
    running = list(range(len(prompts)))
    while running:
        feeds = {"input_ids": ids, "attention_mask": np.ones((len(running), past[caches[0]].shape[2] + ids.shape[1]), np.int64), **past}
        out = dict(zip(names, session.run(None, feeds)))
        for row, r in enumerate(running):
            tokens[r].append(int(out["logits"][row, -1].argmax()))
        keep = [row for row, r in enumerate(running) if len(tokens[r]) < max_tokens[r]]
        past = {c: out[c.replace("past_key_values", "present")][keep] for c in caches}
        running = [running[row] for row in keep]
        ids = np.array([[tokens[r][-1]] for r in running])
    return tokens


def test_with_lynx_tokens_are_the_offline_decode_of_the_same_step_batches(built, tmp_path):
    """LYNX selects experts per decode batch, so a request's tokens depend on its company: they are
    compared with an offline decode of the same batches (8 requests starting together, leaving at
    their own max_tokens: every step's batch is the requests still running), run as plain
    session.run calls with the caches returned rather than shared in place. The scheduler's
    decode steps run fewer experts than the model's own routing does."""
    path, probes = built["lynx"]
    results: dict = {}
    requests = _requests(8, 3, _collect(results), prompt_len=5)
    requests = [Request(prompt=r.prompt, emit=r.emit, max_tokens=4 + 3 * i) for i, r in enumerate(requests)]
    steps = []
    scheduler = _scheduler(_with_probes(path, probes, tmp_path), slots=8, probes=probes, on_step=steps.append)
    _drain(scheduler, requests)
    expected = _offline_batched_decode(path, [list(r.prompt) for r in requests], [r.max_tokens for r in requests])
    assert [results[id(r)] for r in requests] == expected
    assert [s.batch for s in steps if s.batch] == [sum(r.max_tokens > k for r in requests) for k in range(1, 25) if any(r.max_tokens > k for r in requests)]
    off_path, off_probes = built["off"]
    off_steps = []
    _drain(_scheduler(_with_probes(off_path, off_probes, tmp_path), slots=8, probes=off_probes, on_step=off_steps.append),
           [Request(prompt=r.prompt, emit=lambda *a: None, max_tokens=r.max_tokens) for r in requests])
    mean = lambda ss: np.mean([s.active_experts for s in ss if s.batch >= 4])  # noqa: E731
    assert mean(steps) < mean(off_steps)


def test_a_cancelled_request_leaves_at_once_and_the_others_go_on(built):
    path, _ = built["off"]
    results: dict = {}
    cancel = {"now": False}
    requests = _requests(3, 5, _collect(results), max_tokens=12)
    victim = Request(prompt=requests[0].prompt, emit=requests[0].emit, max_tokens=40, is_cancelled=lambda: cancel["now"])
    scheduler = _scheduler(path)
    for r in (victim, *requests[1:]):
        scheduler.submit(r)
    for _ in range(3):
        scheduler.step()
    assert len(scheduler.active) == 3
    cancel["now"] = True
    scheduler.step()
    assert victim not in scheduler.active and victim.slot == -1 and results[(id(victim), "reason")] == "cancelled"
    assert len(results[id(victim)]) == 4  # the prefill's token and one per decode step
    _drain(scheduler, [])
    for request in requests[1:]:
        alone: dict = {}
        single = Request(prompt=request.prompt, emit=_collect(alone), max_tokens=12)
        _drain(_scheduler(path), [single])
        assert results[id(request)] == alone[id(single)]


def test_requests_end_at_stop_tokens_after_min_length_and_when_the_cache_is_full(built):
    path, _ = built["off"]
    probe: dict = {}
    first = Request(prompt=[7, 8, 9], emit=_collect(probe), max_tokens=6)
    _drain(_scheduler(path), [first])
    stop_token = probe[id(first)][1]
    results: dict = {}
    stopped = Request(prompt=[7, 8, 9], emit=_collect(results), max_tokens=6, stop=frozenset({stop_token}))
    late = Request(prompt=[7, 8, 9], emit=_collect(results), max_tokens=6, stop=frozenset({stop_token}), min_length=4)
    full = Request(prompt=list(range(10)), emit=_collect(results), max_tokens=100)
    _drain(_scheduler(path, max_length=16), [stopped, late, full])
    expected = probe[id(first)][: probe[id(first)].index(stop_token) + 1]
    assert results[id(stopped)] == expected and results[(id(stopped), "reason")] == "stop"
    assert results[(id(late), "reason")] in ("stop", "length") and len(results[id(late)]) >= 4
    # 16 rows: the prompt's 10 and the KV of 6 answer tokens; the 7th token needs no row.
    assert results[(id(full), "reason")] == "cache_full" and len(full.prompt) + len(results[id(full)]) == 17


@pytest.mark.parametrize("make,message", [
    (lambda e: Request(prompt=[], emit=e), "the prompt is empty"),
    (lambda e: Request(prompt=[1] * 64, emit=e), "the prompt has 64 tokens; this model's cache holds 64"),
    (lambda e: Request(prompt=[256], emit=e), "token id 256 is outside the vocabulary (0..255)"),
    (lambda e: Request(prompt=[1], emit=e, max_tokens=0), "max_tokens must be >= 1"),
    (lambda e: Request(prompt=[1], emit=e, min_length=-1), "min_length must be >= 0"),
    (lambda e: Request(prompt=[1], emit=e, sampling=Sampling(temperature=-1)), "temperature must be a finite number >= 0"),
    (lambda e: Request(prompt=[1], emit=e, sampling=Sampling(top_p=0)), "top_p must be in (0, 1]"),
    (lambda e: Request(prompt=[1], emit=e, sampling=Sampling(top_k=-2)), "top_k must be >= 0"),
])
def test_a_request_that_cannot_be_served_is_refused_with_the_reason(built, make, message):
    scheduler = _scheduler(built["off"][0])
    with pytest.raises(RequestError) as error:
        scheduler.submit(make(lambda *a: None))
    assert message in str(error.value)
    assert scheduler.idle()


def test_sampling_is_seeded_and_its_limits_hold():
    rng_logits = np.random.default_rng(0).standard_normal(50).astype(np.float32)
    greedy = int(np.argmax(rng_logits))
    assert Sampling().choose(rng_logits, np.random.default_rng(1)) == greedy
    assert Sampling(temperature=1.0, top_k=1).choose(rng_logits, np.random.default_rng(1)) == greedy
    assert Sampling(temperature=1.0, top_p=1e-6).choose(rng_logits, np.random.default_rng(1)) == greedy
    draws = lambda s, seed: [s.choose(rng_logits, g) for g in [np.random.default_rng(seed)] for _ in range(200)]  # noqa: E731
    assert draws(Sampling(temperature=1.0), 3) == draws(Sampling(temperature=1.0), 3)
    top3 = set(np.argsort(-rng_logits)[:3].tolist())
    assert set(draws(Sampling(temperature=5.0, top_k=3), 4)) <= top3
    probs = np.exp(rng_logits - rng_logits.max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    nucleus = set(order[: int(np.searchsorted(np.cumsum(probs[order]), 0.5)) + 1].tolist())
    assert set(draws(Sampling(temperature=1.0, top_p=0.5), 5)) <= nucleus


class _FailOnce:
    """A session whose next run_with_iobinding fails once (then it is the real one)."""

    def __init__(self, session) -> None:
        self.session, self.fail = session, False

    def __getattr__(self, name):
        return getattr(self.session, name)

    def run_with_iobinding(self, binding):
        if self.fail:
            self.fail = False
            raise RuntimeError("injected failure")
        return self.session.run_with_iobinding(binding)


def test_a_failed_step_ends_its_requests_with_the_error_and_the_loop_goes_on(built):
    import threading

    session = _FailOnce(open_session(str(built["off"][0]), threads=1))
    scheduler = Scheduler(session, Layout.read(session.session), slots=4, max_length=64)
    results: dict = {}
    first = Request(prompt=[1, 2, 3], emit=_collect(results), max_tokens=30)
    scheduler.submit(first)
    scheduler.step()
    session.fail = True
    stop, logged = threading.Event(), []
    thread = threading.Thread(target=scheduler.run, args=(stop,), kwargs={"log": logged.append})
    thread.start()
    def wait_for(key):
        deadline = time.monotonic() + 60
        while key not in results and time.monotonic() < deadline:
            time.sleep(0.01)

    try:
        wait_for((id(first), "reason"))
        assert results[(id(first), "reason")] == "error" and "injected failure" in first.error and "injected failure" in logged[0]
        second = Request(prompt=[1, 2, 3], emit=_collect(results), max_tokens=3)
        scheduler.submit(second)
        wait_for((id(second), "reason"))
        assert results[(id(second), "reason")] == "length" and len(results[id(second)]) == 3
    finally:
        stop.set()
        thread.join()


@pytest.mark.slow
@pytest.mark.parametrize("family,message", [("lfm2_moe", "input 'past.0.conv' is neither a KV cache"),  # LFM2's conv state
                                            ("qwen3_5_moe", "input 'past.0.conv' is neither a KV cache")])  # its linear attention's
def test_a_builder_graph_with_other_state_is_refused_by_name(family, message):
    pytest.importorskip("onnxruntime_genai")
    from lynx_export.serving.scheduler import UnsupportedModel
    from tests.genai_models import builder_folder

    with pytest.raises(UnsupportedModel, match=message.replace("[", r"\[").replace("]", r"\]")):
        Layout.read(open_session(str(builder_folder(family, "fp32") / "model.onnx")), head_size=16)


@pytest.mark.slow
def test_onnxruntime_genais_gpt_oss_graph_is_served_with_its_own_greedy_tokens():
    """A graph from onnxruntime-genai's builder (gpt-oss: a sliding-window layer, the KV head size
    from genai_config.json): the scheduler's tokens for requests decoded together are those of
    onnxruntime-genai's own generator for each alone."""
    og = pytest.importorskip("onnxruntime_genai")
    import json

    from tests.genai_models import builder_folder

    folder = builder_folder("gpt_oss", "fp32")
    head_size = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]["head_size"]
    session = open_session(str(folder / "model.onnx"), threads=1)
    scheduler = Scheduler(session, Layout.read(session, head_size), slots=4, max_length=96)
    results: dict = {}
    prompts = [[3, 17, 42, 7], [5, 9], [11, 12, 13, 14, 15, 16]]
    requests = [Request(prompt=p, emit=_collect(results), max_tokens=12) for p in prompts]
    _drain(scheduler, requests)
    model = og.Model(str(folder))
    for prompt, request in zip(prompts, requests):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=96, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(np.array([prompt], dtype=np.int32))
        for _ in range(12):
            generator.generate_next_token()
        assert results[id(request)] == [int(t) for t in generator.get_sequence(0)][len(prompt):]


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.slow
def test_memory_stays_flat_over_a_soak(built):
    """Waves of requests through the same scheduler (slots reused thousands of times, requests
    cancelled and finishing): after the first wave, resident memory grows by no more than a
    little allocator slack, whatever the number of waves."""
    path, _ = built["lynx"]
    scheduler = _scheduler(path, slots=8, max_length=256)
    rng = random.Random(7)

    def wave(seed: int) -> None:
        requests = _requests(40, seed, lambda *a: None)
        for request in requests[::5]:  # a fifth cancelled mid-flight, after their second token
            request.is_cancelled = lambda request=request: len(request.tokens) >= 2
        _drain(scheduler, requests, rng)

    wave(0)
    wave(1)
    settled = _resident_bytes()
    for seed in range(2, 8):
        wave(seed)
    assert scheduler.status()["finished"] + scheduler.status()["cancelled"] == 8 * 40 and scheduler.status()["cancelled"] > 0
    # 8 MiB of allocator slack. A leak of each request's cache slot (2 layers x K,V x 4 heads x 256
    # rows x 16 x 4 bytes = 256 KiB) over the 240 requests after settling would be 60 MiB.
    assert _resident_bytes() - settled < 8 << 20


def test_the_graphs_signature_reads_as_its_session(built):
    """`triton` checks a model with the scheduler's reader on the graph's signature, not on a
    session: both give the same layout."""
    import onnx

    from lynx_export.serving.repository import _Signature

    path, _ = built["lynx"]
    graph = onnx.load(str(path), load_external_data=False).graph
    assert Layout.read(_Signature(graph)) == Layout.read(open_session(str(path), threads=1))


def test_the_generate_models_threads_may_sleep_between_ops(built):
    """`--no-spinning`: the generate model's session threads sleep between ops."""
    path, _ = built["off"]
    options = open_session(str(path), threads=1, spinning=False).get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
