"""In-flight (continuous) batching of a decoder graph in onnxruntime-genai's form, on ONNX Runtime.

The generate model of a Triton repository (`NAME_generate`, `generate_model.py`) runs this module
beside itself, so it imports only numpy and onnxruntime: the server's Python environment needs no
lynx-export.

The graph: onnxruntime-genai's decoder convention (`input_ids`, `attention_mask`, optional 2-D
`position_ids`, `past_key_values.N.key|value` -> `present.N.key|value`, `logits`), its attention
GroupQueryAttention, which writes a step's new KV rows in place into a buffer bound as both the
past input and the present output. Every cache lives on the server in one buffer
[slots, kv_heads, rows, head_size]; each active request owns one slot. GroupQueryAttention's CPU
kernel costs with the buffer's rows, not with the past it is told to read (fine preset, batch 1:
20.6 ms a step at 2048 rows, 8-10 ms at 256), so the rows follow the longest active request: they
grow in blocks of ROW_BLOCK as it needs them, up to `max_length`, and shrink when half of them
hold nothing (one copy of the active slots each time).

Schedule, one tick at a time (`Scheduler.step`):

1. Cancelled requests leave; their slots are freed at once.
2. Waiting requests are admitted while slots are free, each prefilled alone: batch 1, its whole
   prompt, writing its KV rows into its own slot. A prefill keeps the model's own routing: the
   compiled LynxMoE is phase-gated (a step of more than one token per row never applies the
   policy). Its first token is sampled from the prefill's logits.
3. One decode step for every active request together: the batch is the active requests, their
   caches the first B slots of each buffer (kept packed: a leaving request's slot takes the last
   one's rows), each row's own past length given by the attention mask (ones over its past and
   its new token, zeros after). So each decode step's batch is exactly the set of active
   requests, and LYNX selects experts over that batch; prefill rows never share a call with
   decode rows (they are scheduled apart, so no decode row ever loses LYNX to a mixed call).

A request leaves after its `max_tokens`, at a stop token (once it has `min_length` tokens), or when
its cache is full. Its tokens reach its `emit` callback as they come, the last with the reason.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Layout", "Sampling", "Request", "RequestError", "UnsupportedModel", "Scheduler", "StepStats", "RoutingProbe", "open_session"]


class UnsupportedModel(Exception):
    """The graph is not a decoder this scheduler can serve (the message says why)."""


class RequestError(Exception):
    """A request that cannot be served (too long a prompt, ids out of range, bad options)."""


@dataclass(frozen=True)
class Layout:
    """The decoder convention's names and the cache shape, read from a session."""

    ids: str
    mask: str
    positions: str | None
    caches: tuple[tuple[str, str], ...]  # (past input, present output)
    logits: str
    kv_heads: int
    head_size: int
    vocab_size: int
    id_dtype: Any
    cache_dtype: Any

    @classmethod
    def read(cls, session: Any, head_size: int | None = None) -> Layout:
        inputs = {i.name: i for i in session.get_inputs()}
        outputs = {o.name for o in session.get_outputs()}
        for name in ("input_ids", "attention_mask"):
            if name not in inputs:
                raise UnsupportedModel(f"the graph has no '{name}' input (onnxruntime-genai's decoder convention)")
        caches = []
        for name in inputs:
            if name in ("input_ids", "attention_mask", "position_ids"):
                continue
            parts = name.split(".")
            if len(parts) != 3 or parts[0] != "past_key_values" or parts[2] not in ("key", "value"):
                raise UnsupportedModel(f"input '{name}' is neither a KV cache (past_key_values.N.key|value) nor ids, mask or "
                                       f"positions: only decoders whose state is their KV caches are served")
            present = f"present.{parts[1]}.{parts[2]}"
            if present not in outputs:
                raise UnsupportedModel(f"input '{name}' has no present output '{present}'")
            caches.append((name, present))
        if not caches:
            raise UnsupportedModel("the graph has no KV cache inputs (past_key_values.N.key|value)")
        if "position_ids" in inputs and len(inputs["position_ids"].shape) != 2:
            raise UnsupportedModel(f"position_ids of rank {len(inputs['position_ids'].shape)}: only [batch, sequence] positions are served")
        if "logits" not in outputs:
            raise UnsupportedModel("the graph has no 'logits' output")
        shape = inputs[caches[0][0]].shape
        kv_heads, size = shape[1], shape[3] if isinstance(shape[3], int) else head_size
        if not isinstance(kv_heads, int) or not isinstance(size, int):
            raise UnsupportedModel(f"cache '{caches[0][0]}' has no fixed head count and size ({shape}); give the head size (genai_config.json)")
        logits = next(o for o in session.get_outputs() if o.name == "logits").shape
        if not isinstance(logits[-1], int):
            raise UnsupportedModel("the logits' last dimension (the vocabulary) is not fixed")
        types = {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float)": np.float32, "tensor(float16)": np.float16}
        return cls(ids="input_ids", mask="attention_mask", positions="position_ids" if "position_ids" in inputs else None,
                   caches=tuple(caches), logits="logits", kv_heads=kv_heads, head_size=size, vocab_size=logits[-1],
                   id_dtype=types.get(inputs["input_ids"].type, np.int64), cache_dtype=types.get(inputs[caches[0][0]].type, np.float32))


@dataclass(frozen=True)
class RoutingProbe:
    """A MoE layer's routed logits [T,E] as a graph output: a step's active experts are the distinct
    top-k experts of its rows (the compiled model's selection, for softmax and sigmoid routers)."""

    output: str
    top_k: int


@dataclass(frozen=True)
class Sampling:
    """How a request's next token is chosen: greedy (temperature 0), or sampled at `temperature`
    from the `top_k` most likely tokens (0: all) within nucleus `top_p`, seeded by `seed`."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def check(self) -> None:
        if not (np.isfinite(self.temperature) and self.temperature >= 0):
            raise RequestError(f"temperature must be a finite number >= 0 (got {self.temperature})")
        if self.top_k < 0:
            raise RequestError(f"top_k must be >= 0 (got {self.top_k})")
        if not (0 < self.top_p <= 1):
            raise RequestError(f"top_p must be in (0, 1] (got {self.top_p})")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise RequestError(f"seed must be in [0, 2^64) (got {self.seed})")

    def choose(self, logits: np.ndarray, rng: np.random.Generator) -> int:
        if self.temperature == 0:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / self.temperature
        if 0 < self.top_k < z.size:
            z[np.argpartition(-z, self.top_k)[self.top_k :]] = -np.inf
        probs = np.exp(z - z.max())
        probs /= probs.sum()
        if self.top_p < 1:
            order = np.argsort(-probs, kind="stable")
            cumulative = np.cumsum(probs[order])
            keep = order[: int(np.searchsorted(cumulative, self.top_p)) + 1]  # the fewest whose mass reaches top_p
            kept = np.zeros_like(probs)
            kept[keep] = probs[keep]
            probs = kept / kept.sum()
        return int(rng.choice(probs.size, p=probs))


@dataclass(eq=False)
class Request:
    """One generation: its prompt ids and options, and `emit(request, new_ids, finish_reason)`,
    called from the scheduler's thread with each new token (the last call with the reason:
    "length", "stop", "cache_full"; with no ids "cancelled", or "error" with `error` set)."""

    prompt: Sequence[int]
    emit: Callable[[Request, list[int], str | None], None]
    max_tokens: int = 16
    min_length: int = 0
    sampling: Sampling = Sampling()
    stop: frozenset[int] = frozenset()
    is_cancelled: Callable[[], bool] = lambda: False
    tokens: list[int] = field(default_factory=list)
    slot: int = -1
    length: int = 0  # cache rows written
    rng: np.random.Generator | None = None
    error: str | None = None


@dataclass(frozen=True)
class StepStats:
    """One tick: requests prefilled, the decode step's batch (0: none ran), its seconds, and the mean
    over layers of the experts its batch ran (None without routing probes or without a decode)."""

    prefilled: int
    batch: int
    decode_s: float
    prefill_s: float
    active_experts: float | None


def open_session(path: str, threads: int = 0, spinning: bool = True) -> Any:
    """An ONNX Runtime CPU session of `path`; `spinning` off: its intra-op threads sleep between
    ops instead of spinning, leaving the cores to the server's other threads and its clients."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


class Scheduler:
    """In-flight batching over `session` (see the module docstring). `submit` may be called from
    any thread; `step` and `run` from one."""

    ROW_BLOCK = 128  # the cache rows grow and shrink by

    def __init__(self, session: Any, layout: Layout, *, slots: int, max_length: int, probes: Sequence[RoutingProbe] = (),
                 on_step: Callable[[StepStats], None] | None = None, cancel_poll_s: float = 0.0) -> None:
        import onnxruntime as ort

        if slots < 1 or max_length < 2:
            raise ValueError(f"slots ({slots}) must be >= 1 and max_length ({max_length}) >= 2")
        self._ort = ort
        self.session, self.layout, self.slots, self.max_length = session, layout, slots, max_length
        self.probes = tuple(probes)
        self.on_step = on_step
        # Asking whether a request was cancelled may cost a round trip to the server process (Triton's
        # python backend): asked at most every cancel_poll_s, not every step for every request.
        self.cancel_poll_s = cancel_poll_s
        self._polled = float("-inf")
        self.buffers: dict[str, np.ndarray] = {past: np.zeros((slots, layout.kv_heads, 0, layout.head_size), layout.cache_dtype)
                                               for past, _ in layout.caches}
        self.active: list[Request] = []  # active[i] owns slot i
        self._fit(1)
        self._waiting: deque[Request] = deque()
        self._admitting: list[Request] = []  # taken from the queue, not yet active
        self._lock = threading.Condition()
        self.totals = {"steps": 0, "decode_tokens": 0, "prefills": 0, "prefill_tokens": 0, "batch_sum": 0, "experts_sum": 0.0,
                       "expert_steps": 0, "finished": 0, "cancelled": 0, "busy_s": 0.0}

    # -- requests ---------------------------------------------------------------------------------

    def submit(self, request: Request) -> None:
        """Queue `request`, or raise RequestError saying what is wrong with it."""
        n = len(request.prompt)
        if n == 0:
            raise RequestError("the prompt is empty")
        if n >= self.max_length:
            raise RequestError(f"the prompt has {n} tokens; this model's cache holds {self.max_length} (prompt and answer)")
        bad = [t for t in request.prompt if not 0 <= int(t) < self.layout.vocab_size]
        if bad:
            raise RequestError(f"token id {bad[0]} is outside the vocabulary (0..{self.layout.vocab_size - 1})")
        if request.max_tokens < 1:
            raise RequestError(f"max_tokens must be >= 1 (got {request.max_tokens})")
        if request.min_length < 0:
            raise RequestError(f"min_length must be >= 0 (got {request.min_length})")
        request.sampling.check()
        request.rng = np.random.default_rng(request.sampling.seed)
        with self._lock:
            self._waiting.append(request)
            self._lock.notify()

    @property
    def waiting(self) -> int:
        with self._lock:
            return len(self._waiting)

    def idle(self) -> bool:
        with self._lock:
            return not self._waiting and not self.active

    # -- the loop ---------------------------------------------------------------------------------

    def run(self, stop: threading.Event, poll_s: float = 0.05, log: Callable[[str], None] = print) -> None:
        """Tick until `stop` is set, sleeping while there is nothing to do. A tick that fails ends
        the requests it held with the error (and `log`s it); the loop goes on with the others."""
        while not stop.is_set():
            with self._lock:
                if not self._waiting and not self.active:
                    self._lock.wait(poll_s)
                    continue
            try:
                self.step()
            except Exception as exc:  # noqa: BLE001 - one failed step must not stop the server's loop
                message = " ".join(f"{type(exc).__name__}: {exc}".split())
                log(f"lynx generate: a step failed ({message}); its {len(self.active) + len(self._admitting)} requests end with it")
                for request in [*self.active, *self._admitting]:
                    request.slot, request.error = -1, message
                    self.totals["finished"] += 1
                    request.emit(request, [], "error")
                self.active, self._admitting = [], []

    def wake(self) -> None:
        with self._lock:
            self._lock.notify_all()

    def step(self) -> StepStats:
        """One tick: drop the cancelled, admit and prefill the waiting that fit, decode the active."""
        now = time.monotonic()
        poll = now - self._polled >= self.cancel_poll_s
        if poll:
            self._polled = now
            for request in [r for r in self.active if r.is_cancelled()]:
                self._leave(request, "cancelled")
        with self._lock:
            dropped = [r for r in self._waiting if r.is_cancelled()] if poll else []
            for request in dropped:
                self._waiting.remove(request)
            admitted = []
            while self._waiting and len(self.active) + len(admitted) < self.slots:
                admitted.append(self._waiting.popleft())
        for request in dropped:
            self.totals["cancelled"] += 1
            request.emit(request, [], "cancelled")
        start = time.perf_counter()
        self._admitting = list(admitted)
        while self._admitting:
            self._prefill(self._admitting[0])
            self._admitting.pop(0)
        prefill_s = time.perf_counter() - start
        batch, decode_s, experts = len(self.active), 0.0, None
        if self.active:
            decode_s, experts = self._decode()
        stats = StepStats(len(admitted), batch, decode_s, prefill_s, experts)
        self.totals["busy_s"] += prefill_s + decode_s
        if batch:
            self.totals["steps"] += 1
            self.totals["batch_sum"] += batch
            if experts is not None:
                self.totals["experts_sum"] += experts
                self.totals["expert_steps"] += 1
        if self.on_step is not None:
            try:
                self.on_step(stats)
            except Exception:  # noqa: BLE001 - an observer's failure is not the requests'
                pass
        return stats

    def status(self) -> dict[str, Any]:
        t = self.totals
        return {"active": len(self.active), "waiting": self.waiting, "slots": self.slots, "max_length": self.max_length, "rows": self.rows, **t,
                "mean_batch": t["batch_sum"] / t["steps"] if t["steps"] else None,
                "mean_active_experts": t["experts_sum"] / t["expert_steps"] if t["expert_steps"] else None}

    # -- model calls ------------------------------------------------------------------------------

    def _run(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, rows: slice, probes: bool) -> dict[str, np.ndarray]:
        binding = self.session.io_binding()
        layout = self.layout
        names = [layout.logits, *(p.output for p in self.probes)] if probes else [layout.logits]
        for name in names:
            binding.bind_output(name)
        binding.bind_cpu_input(layout.ids, ids.astype(layout.id_dtype))
        binding.bind_cpu_input(layout.mask, mask)
        if layout.positions is not None:
            binding.bind_cpu_input(layout.positions, positions.astype(np.int64))
        for past, present in layout.caches:
            value = self._ort.OrtValue.ortvalue_from_numpy(self.buffers[past][rows])  # a view: the slots' own rows
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)
        self.session.run_with_iobinding(binding)
        return dict(zip(names, binding.copy_outputs_to_cpu()))

    def _fit(self, needed: int) -> None:
        """Give the buffers at least `needed` rows (whole blocks, at most max_length): grow when a row is
        missing, shrink when half of the rows would hold nothing."""
        rows = min(self.max_length, -(-needed // self.ROW_BLOCK) * self.ROW_BLOCK)
        if self.rows >= rows > self.rows // 2:
            return
        batch, kept = len(self.active), min(rows, self.rows)
        for name, old in self.buffers.items():
            new = np.zeros((self.slots, self.layout.kv_heads, rows, self.layout.head_size), self.layout.cache_dtype)
            new[:batch, :, :kept] = old[:batch, :, :kept]
            self.buffers[name] = new

    @property
    def rows(self) -> int:
        """The cache rows each slot has now (the buffers' third axis)."""
        return next(iter(self.buffers.values())).shape[2]

    def _prefill(self, request: Request) -> None:
        slot = len(self.active)
        n = len(request.prompt)
        self._fit(max([n, *(r.length for r in self.active)]) + 1)  # its prompt's rows and its first decode step's
        ids = np.asarray(request.prompt, dtype=np.int64)[None, :]
        out = self._run(ids, np.ones((1, n), np.int64), np.arange(n)[None, :], slice(slot, slot + 1), probes=False)
        request.slot, request.length = slot, n
        self.active.append(request)
        self.totals["prefills"] += 1
        self.totals["prefill_tokens"] += n
        self._append(request, out[self.layout.logits][0, -1])

    def _decode(self) -> tuple[float, float | None]:
        batch = len(self.active)
        lengths = np.array([r.length for r in self.active])
        self._fit(int(lengths.max()) + 1)  # the row each request's new token writes
        mask = (np.arange(lengths.max() + 1)[None, :] <= lengths[:, None]).astype(np.int64)
        ids = np.array([[r.tokens[-1]] for r in self.active])
        start = time.perf_counter()
        out = self._run(ids, mask, lengths[:, None], slice(0, batch), probes=bool(self.probes))
        seconds = time.perf_counter() - start
        experts = None
        if self.probes:
            counts = [np.unique(np.argpartition(-out[p.output].reshape(batch, -1), p.top_k - 1, axis=-1)[:, : p.top_k]).size for p in self.probes]
            experts = float(np.mean(counts))
        self.totals["decode_tokens"] += batch
        logits = out[self.layout.logits][:, -1]
        rows = list(self.active)
        for request in rows:  # every row's KV is written before any request leaves (and moves another's rows)
            request.length += 1
        for request, row in zip(rows, logits):
            self._append(request, row)
        return seconds, experts

    def _append(self, request: Request, logits: np.ndarray) -> None:
        token = request.sampling.choose(logits, request.rng)
        request.tokens.append(token)
        reason = None
        if len(request.tokens) >= request.max_tokens:
            reason = "length"
        elif token in request.stop and len(request.tokens) >= request.min_length:
            reason = "stop"
        elif request.length >= self.max_length:  # no row left for this token's KV, which the next step writes
            reason = "cache_full"
        if reason is None:
            request.emit(request, [token], None)
        else:
            self._leave(request, reason, [token])

    def _leave(self, request: Request, reason: str, last: list[int] | None = None) -> None:
        """Free the request's slot at once: the last active request's rows move into it."""
        slot, last_slot = request.slot, len(self.active) - 1
        moved = self.active[last_slot]
        if slot != last_slot:
            for buffer in self.buffers.values():
                buffer[slot, :, : moved.length] = buffer[last_slot, :, : moved.length]
            self.active[slot], moved.slot = moved, slot
        self.active.pop()
        request.slot = -1
        self.totals["cancelled" if reason == "cancelled" else "finished"] += 1
        request.emit(request, last or [], reason)
