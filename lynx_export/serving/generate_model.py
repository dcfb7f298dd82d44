"""Triton python-backend model `NAME_generate`: text generation with in-flight batching.

Copied by `lynx-export triton` into `<repo>/NAME_generate/1/model.py` beside `scheduler.py` (the
batching), `model.onnx` (the build's compiled model, with each MoE layer's routed logits as extra
outputs), `serving.json` and, where the build has one, `tokenizer.json`. It imports numpy,
onnxruntime, Triton's backend utilities and, for text, the `tokenizers` library: the server's
Python environment needs no lynx-export.

Decoupled (`model_transaction_policy { decoupled: true }`): `execute` hands each request to the
scheduler and returns; the scheduler's thread steps every active request together and sends one
response per token (the last with TRITONSERVER_RESPONSE_COMPLETE_FINAL), or, with `stream` false,
one response with the whole answer. A request that cannot be served gets an error response of its
own; the others go on. A cancelled request (a gRPC stream cancelled, an HTTP client gone) leaves
before the next step and its cache slot is free at once.

Inputs (all optional, but a prompt is needed): `text_input` (string) or `input_ids` (int32 [n]);
`max_tokens`, `min_length`, `top_k` (int32), `temperature`, `top_p` (fp32), `seed` (uint64),
`stream`, `exclude_input_in_output` (bool). Outputs: `text_output` (string), `output_ids` (int32).
Metrics (Triton's metrics endpoint): `lynx_generate_*{model="NAME_generate"}`.
"""

import json
import os
import sys
import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils

SCALARS = {  # input -> (type, default)
    "max_tokens": (int, 16),
    "min_length": (int, 0),
    "top_k": (int, 0),
    "temperature": (float, 0.0),
    "top_p": (float, 1.0),
    "seed": (int, None),
    "stream": (bool, True),
    "exclude_input_in_output": (bool, True),
}
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
# Each metric update and each cancellation query is a message to the server process: metrics are
# published at most this often, cancellation asked at most this often (a cancelled request's slot
# is then free within 20 ms).
METRICS_S, CANCEL_POLL_S = 0.25, 0.02


class _Text:
    """A request's answer as text, decoded as its tokens come: text is sent once its bytes are
    whole (a token that ends inside a UTF-8 character waits for the next)."""

    def __init__(self, tokenizer, prefix: str) -> None:
        self.tokenizer, self.sent, self.prefix = tokenizer, "", prefix

    def more(self, tokens, final: bool) -> str:
        if self.tokenizer is None:
            return ""
        text = self.tokenizer.decode(tokens, skip_special_tokens=False)
        if not final and text.endswith("\ufffd"):
            return ""
        new, self.sent = text[len(self.sent) :], text
        new, self.prefix = self.prefix + new, ""
        return new


class TritonPythonModel:
    def initialize(self, args):
        folder = os.path.join(args["model_repository"], args["model_version"])
        sys.path.insert(0, folder)
        import scheduler

        self.scheduler_module = scheduler
        config = json.loads(args["model_config"])
        parameters = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        with open(os.path.join(folder, "serving.json")) as f:
            self.serving = json.load(f)
        session = scheduler.open_session(os.path.join(folder, "model.onnx"), int(parameters.get("intra_op_num_threads") or 0),
                                         spinning=parameters.get("allow_spinning", "1") != "0")
        layout = scheduler.Layout.read(session, self.serving.get("head_size"))
        probes = [scheduler.RoutingProbe(p["output"], p["top_k"]) for p in self.serving.get("probes", [])]
        self.tokenizer = None
        if os.path.exists(os.path.join(folder, "tokenizer.json")):
            from tokenizers import Tokenizer

            self.tokenizer = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
        self.stop_ids = frozenset(self.serving.get("stop_token_ids", []))
        self._metrics(args["model_name"])
        self.scheduler = scheduler.Scheduler(session, layout, slots=int(parameters.get("max_slots") or 32),
                                             max_length=int(parameters.get("max_length") or self.serving["max_length"]),
                                             probes=probes, on_step=self._on_step, cancel_poll_s=CANCEL_POLL_S)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.scheduler.run, args=(self._stop,), kwargs={"log": pb_utils.Logger.log_error},
                                        name="lynx-generate", daemon=True)
        self._thread.start()

    # -- metrics ------------------------------------------------------------------------------------

    def _metrics(self, model):
        self._families = []  # a Metric needs its MetricFamily alive

        def family(name, kind, description):
            self._families.append(pb_utils.MetricFamily(name=name, description=description, kind=kind))
            return self._families[-1].Metric(labels={"model": model})

        gauge, counter = pb_utils.MetricFamily.GAUGE, pb_utils.MetricFamily.COUNTER
        self.m_batch = family("lynx_generate_batch_size", gauge, "Requests in the latest decode step (its batch)")
        self.m_experts = family("lynx_generate_active_experts", gauge, "Mean over MoE layers of the experts the latest decode step ran")
        self.m_active = family("lynx_generate_active_requests", gauge, "Requests holding a cache slot")
        self.m_rate = family("lynx_generate_tokens_per_second", gauge, "Output tokens per second over the last second of work")
        self.m_steps = family("lynx_generate_decode_steps_total", counter, "Decode steps run")
        self.m_tokens = family("lynx_generate_output_tokens_total", counter, "Output tokens generated")
        self.m_batch_sum = family("lynx_generate_decode_batch_sum", counter, "Sum over decode steps of their batch size")
        self.m_experts_sum = family("lynx_generate_active_experts_sum", counter, "Sum over decode steps of their mean active experts")
        self.m_decode_s = family("lynx_generate_decode_seconds_total", counter, "Seconds in decode steps")
        self.m_prefill_s = family("lynx_generate_prefill_seconds_total", counter, "Seconds in prefills")
        self._window = []  # (time, tokens) of recent ticks
        self._pending = dict.fromkeys(("tokens", "steps", "batch_sum", "experts_sum", "decode_s", "prefill_s"), 0.0)
        self._last = {}  # the latest step's gauges
        self._published = time.monotonic()

    def _on_step(self, stats):
        tokens = stats.batch + stats.prefilled
        now = time.monotonic()
        self._window = [(t, n) for t, n in self._window if now - t <= 1.0] + [(now, tokens)]
        pending = self._pending
        pending["tokens"] += tokens
        pending["decode_s"] += stats.decode_s
        pending["prefill_s"] += stats.prefill_s
        if stats.batch:
            pending["steps"] += 1
            pending["batch_sum"] += stats.batch
            self._last["batch"] = stats.batch
            if stats.active_experts is not None:
                pending["experts_sum"] += stats.active_experts
                self._last["experts"] = stats.active_experts
        if now - self._published >= METRICS_S or not self.scheduler.active:
            self._publish(now, stats)

    def _publish(self, now, stats):
        span = max(now - self._window[0][0], stats.decode_s + stats.prefill_s, 1e-9)
        self.m_rate.set(sum(n for _, n in self._window) / span)
        self.m_active.set(len(self.scheduler.active))
        if "batch" in self._last:
            self.m_batch.set(self._last["batch"])
        if "experts" in self._last:
            self.m_experts.set(self._last["experts"])
        for metric, key in ((self.m_tokens, "tokens"), (self.m_steps, "steps"), (self.m_batch_sum, "batch_sum"),
                            (self.m_experts_sum, "experts_sum"), (self.m_decode_s, "decode_s"), (self.m_prefill_s, "prefill_s")):
            if self._pending[key]:
                metric.increment(self._pending[key])
                self._pending[key] = 0.0
        self._published = now

    # -- requests -----------------------------------------------------------------------------------

    def _options(self, request):
        values = {}
        for name, (kind, default) in SCALARS.items():
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                values[name] = default
                continue
            array = tensor.as_numpy().reshape(-1)
            if array.size != 1:
                raise self.scheduler_module.RequestError(f"input '{name}' must hold one value (got {array.size})")
            values[name] = kind(array[0].item())
        parameters = json.loads(request.parameters() or "{}")
        unknown = sorted(set(parameters) - {"triton_enable_empty_final_response"})
        if unknown:
            raise self.scheduler_module.RequestError(f"unknown parameter '{unknown[0]}' (this model takes inputs: text_input, input_ids, "
                                                     f"{', '.join(SCALARS)})")
        return values

    def _prompt(self, request):
        text = pb_utils.get_input_tensor_by_name(request, "text_input")
        ids = pb_utils.get_input_tensor_by_name(request, "input_ids")
        if (text is None) == (ids is None):
            raise self.scheduler_module.RequestError("give exactly one of text_input and input_ids")
        if ids is not None:
            return [int(t) for t in ids.as_numpy().reshape(-1)], ""
        values = text.as_numpy().reshape(-1)
        if values.size != 1:
            raise self.scheduler_module.RequestError(f"text_input must hold one string (got {values.size})")
        if self.tokenizer is None:
            raise self.scheduler_module.RequestError("this model has no tokenizer (no tokenizer.json); send input_ids")
        value = values[0]
        try:
            prompt = value.decode("utf-8") if isinstance(value, bytes) else str(value)
        except UnicodeDecodeError:
            raise self.scheduler_module.RequestError("text_input is not UTF-8") from None
        return self.tokenizer.encode(prompt, add_special_tokens=False).ids, prompt

    def execute(self, requests):
        s = self.scheduler_module
        for request in requests:
            sender = request.get_response_sender()
            try:
                options = self._options(request)
                prompt, prompt_text = self._prompt(request)
                text = _Text(self.tokenizer, "" if options["exclude_input_in_output"] else prompt_text)
                emit = self._emitter(sender, text, options["stream"])
                self.scheduler.submit(s.Request(
                    prompt=prompt, emit=emit, max_tokens=options["max_tokens"], min_length=options["min_length"], stop=self.stop_ids,
                    sampling=s.Sampling(options["temperature"], options["top_k"], options["top_p"], options["seed"]),
                    is_cancelled=sender.is_cancelled))
            except (s.RequestError, ValueError, OverflowError) as exc:
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))), flags=FINAL)
        return None

    def _emitter(self, sender, text, stream):
        def emit(request, ids, reason):
            final = reason is not None
            if reason in ("cancelled", "error"):
                error = pb_utils.TritonError("request cancelled", pb_utils.TritonError.CANCELLED) if reason == "cancelled" else \
                    pb_utils.TritonError(f"generation failed: {request.error}")
                sender.send(pb_utils.InferenceResponse(error=error), flags=FINAL)
                return
            if not stream and not final:
                return
            new_ids = ids if stream else request.tokens
            out = text.more(request.tokens, final)
            tensors = [pb_utils.Tensor("text_output", np.array([out.encode("utf-8")], dtype=np.object_)),
                       pb_utils.Tensor("output_ids", np.asarray(new_ids, dtype=np.int32))]
            sender.send(pb_utils.InferenceResponse(output_tensors=tensors), flags=FINAL if final else 0)

        return emit

    def finalize(self):
        self._stop.set()
        self.scheduler.wake()
        self._thread.join(timeout=30)
