#!/usr/bin/env python3
"""GPU check of the LynxMoE core library: compile, compare with references, time, keeping results as it goes.

    python scripts/gpu_check.py --out gpu-check              # everything, within --budget-s (330 s)
    python scripts/gpu_check.py --out gpu-check --dry-run    # compile, plan, print: no GPU, no torch
    python scripts/gpu_check.py --quick                      # small shapes (the test suite's GPU test)

Sections, in order; OUT/results.json and .md are rewritten after each section and timing row, so an
exception (recorded with its traceback; the next section runs) or a kill loses one section at most.
1. compile: make with BUILD=OUT/build (absolute) and ARCHS = this GPU's compute capability.
2. probe: a child process runs each kernel set (lynx_kernels_t `default`; `new` = every variant, off
   by default until verified here) once per shape; a crash there cannot poison this process's CUDA
   context, and leaves `new` out of the rest, with the reason.
3. routing: lynx_moe_route vs the numpy oracle, every policy and router form, E/K up to 1024/32,
   decode/prefill/padded calls, ties, lynx also with the popularity table: ids and allowed sets equal.
4. layer: lynx_moe_enqueue vs the float64 reference, both kernel sets, unused experts' weights NaN, on
   cases that take every kernel path (scalar GEMV: odd H, I % 8 != 0, unaligned weights; 1-8, 9-16,
   17-32, >32 rows per expert; E 256, K 16; padded and prefill calls; dtype pairs; gpt-oss SwiGLU).
5. decode: a bf16 layer, batch 1..256, Mixtral-like (H 4096 I 14336 E 8 K 2) and Qwen3-like (H 2048
   I 768 E 128 K 8), policy off / lynx, both kernel sets, each row checked against torch fp32 on the
   GPU, then timed. Logits N(0,1) + a fixed per-expert bias N(0,1); calls cycle through 2-4 weight
   copies (distinct layers) so the active weights exceed the 50 MB L2.
6. prefill: 512 and 2048 tokens (seq_len 7: no policy), the grouped GEMMs: fp32 SIMT vs tensor cores.
7. sanitizer (--sanitizer): compute-sanitizer memcheck over `--quick --sections layer`, in a child.
Timing: N calls in one CUDA graph (else between one pair of events), ~10 ms a sample, median of 5: no
launch latency in it. us/call, tokens/s, GB/s (active experts' weights once + activations), TFLOP/s,
and their fraction of the peaks (H200: 4.8 TB/s, 989 TFLOP/s bf16). --budget-s: after compiling each
section gets a share of the time left and stops (truncated) when it is spent. Exit: 0 passed, 1 a
check failed or a section raised, 2 no GPU. --device cpu: this code over the fake-runtime library (no
kernel runs, checks fail), for tests/test_gpu_check.py. Imports numpy, torch (not in a dry run), the
op contract and reference, the routing oracle and the ctypes binding: GPU machines may lack onnx-ir.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import time
import traceback
import types
from collections.abc import Callable

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lynx_export.backends import lynx_moe_lib  # noqa: E402
from lynx_export.backends.lynx_moe_lib import Kernels  # noqa: E402
from lynx_export.op import contract, reference  # noqa: E402
from lynx_export.routing import default_lynx_params  # noqa: E402

DTYPES = {"fp32": lynx_moe_lib.DType.FLOAT32, "fp16": lynx_moe_lib.DType.FLOAT16, "bf16": lynx_moe_lib.DType.BFLOAT16}
KERNEL_SETS = {"default": Kernels.DEFAULT, "new": Kernels.ALL}
TIMING_SHAPES = {"mixtral-like": (4096, 14336, 8, 2), "qwen3-like": (2048, 768, 128, 8)}  # H, I, E, K
QUICK_SHAPES = {"tiny": (256, 512, 8, 2)}
COPIES = {"mixtral-like": 2, "qwen3-like": 4, "tiny": 2}  # weight copies the timed calls cycle through
PEAKS = {"H200": {"GBps": 4800, "bf16_TFLOPs": 989, "fp32_TFLOPs": 67}, "H100": {"GBps": 3350, "bf16_TFLOPs": 989, "fp32_TFLOPs": 67}}
SHARES = {"probe": 0.08, "routing": 0.12, "layer": 0.25, "decode": 0.35, "prefill": 0.12, "sanitizer": 0.08}
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 4e-2}  # max |out - ref| / max |ref|, by the coarser dtype
GPT_OSS = {"activation_alpha": 1.702, "activation_beta": 1.0, "swiglu_limit": 7.0}
ROW_RANGES = ((1, 8), (9, 16), (17, 32), (33, 1 << 30))  # rows per expert, by the kernel that owns them
DEVICE = "cuda"


def _torch():
    return importlib.import_module("torch")  # imported late: a dry run needs no torch


def _tdtype(name: str):
    return getattr(_torch(), {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[name])


def _attrs(policy: str, experts: int, top_k: int, **extra) -> dict:
    attrs = {"num_experts": experts, "top_k": top_k, "activation": "swiglu", "router": "softmax_topk", "normalize": 1,
             "policy": policy, "alpha": 0.0, "beta": -1, "budget": 0, "tie_break": "logit"}
    if policy == "lynx":
        alpha, beta = default_lynx_params(experts, top_k)
        attrs.update(alpha=alpha, beta=-1 if beta is None else beta)
    attrs.update(extra)
    return attrs


def routing_cases(quick: bool) -> list[dict]:
    shapes = [(8, 2), (64, 8)] if quick else [(8, 2), (16, 4), (64, 8), (128, 8), (256, 8), (64, 16), (1024, 32)]
    variants = [("off", {}), ("lynx", {}), ("lynx", {"alpha": 0.7, "beta": 1}), ("lynx", {"alpha": 1.0, "beta": -1, "tie_break": "index"}),
                ("budget", {}), ("lynx", {"router": "topk_softmax"}), ("lynx", {"normalize": 0})]
    return [{"E": e, "K": k, "policy": policy, "extra": {**extra, "budget": min(e, 2 * k)} if policy == "budget" else extra, "act": act,
             "tokens": [1, 3, 17, 64] if quick or e >= 256 else [1, 2, 3, 17, 64, 256], "kernels": ["default", "table"] if policy == "lynx" else ["default"]}
            for (e, k), (policy, extra), act in itertools.product(shapes, variants, ("fp32", "fp16"))]


def layer_cases(quick: bool) -> list[dict]:
    """(shape, dtypes, SwiGLU, policy, biases, token counts, call mode, unaligned weights) per layer."""
    case = lambda h, i, e, k, a, w, s, p, b, tokens, mode="decode": dict(  # noqa: E731
        H=h, I=i, E=e, K=k, act=a, weight=w, swiglu=s, policy=p, biases=b, tokens=tokens, mode=mode, unaligned=mode == "unaligned")
    if quick:
        return [case(64, 96, 8, 2, a, w, s, p, b, [1, 5, 12, 40])
                for (a, w), s, p, b in itertools.product([("fp32", "fp32"), ("bf16", "bf16")], ("plain", "gpt-oss"), ("off", "lynx"), (False, True))]
    # At E 8, K 2 the 12/24/40-token calls put 9-16 and 17-32 rows on some experts, 300 more than 32.
    pairs = [("fp32", "fp32"), ("fp16", "fp16"), ("bf16", "bf16"), ("fp32", "bf16")]
    cases = [case(256, 384, 8, 2, a, w, s, p, b, [1, 5, 12, 24, 40, 300])
             for (a, w), s, p, b in itertools.product(pairs, ("plain", "gpt-oss"), ("off", "lynx"), (False, True))]
    cases += [case(h, i, e, k, a, w, "plain", p, True, [1, 12, 40, 300])
              for (h, i, e, k), (a, w), p in itertools.product([(203, 136, 16, 4), (128, 100, 8, 2), (128, 64, 256, 8), (128, 64, 64, 16)],
                                                               [("bf16", "bf16"), ("fp16", "fp16"), ("fp32", "fp32")], ("off", "lynx"))]
    return cases + [case(256, 384, 8, 2, a, w, "plain", "lynx", True, [5, 40, 300], mode)
                    for (a, w), mode in itertools.product([("bf16", "bf16"), ("fp16", "fp32")], ("unaligned", "padded", "prefill"))]


def plan(args) -> dict:
    """What the run will do: sections and their budget shares, case counts, the timing matrix."""
    shapes, shares = (QUICK_SHAPES if args.quick else TIMING_SHAPES), {s: SHARES[s] for s in args.sections if s in SHARES}
    return {"sections": args.sections, "budget_s": args.budget_s, "shares": {s: round(v / sum(shares.values()), 2) for s, v in shares.items()},
            "routing_calls": sum(len(c["tokens"]) * 6 * len(c["kernels"]) for c in routing_cases(args.quick)),
            "layer_calls": sum(len(c["tokens"]) for c in layer_cases(args.quick)) * len(KERNEL_SETS), "kernel_sets": list(KERNEL_SETS),
            "timed_shapes": shapes, "decode_batch_sizes": args.batch_sizes, "prefill_tokens": args.prefill_tokens,
            "weight_GB": {n: round(COPIES[n] * e * 3 * h * i * 2 / 1e9, 2) for n, (h, i, e, k) in shapes.items()}}


class Results:
    """The run's record; saved (atomically) after every section and every timing row."""

    def __init__(self, out: pathlib.Path, head: dict) -> None:
        self.out, self.data = out, {**head, "status": "running", "sections": {}}

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        for name, text in (("results.json", json.dumps(self.data, indent=1, default=str) + "\n"), ("results.md", markdown(self.data))):
            partial = self.out / f"{name}.partial"
            partial.write_text(text)
            partial.replace(self.out / name)

    def run(self, name: str, fn: Callable[[dict], None]) -> None:
        """fn fills its section's dict (saving as it likes); an exception is recorded and the run goes on."""
        section = self.data["sections"][name] = {"status": "running"}
        started = time.perf_counter()
        try:
            fn(section)
            section["status"] = "failed" if section.get("failed") else "ok"
        except Exception as exc:  # recorded, not raised: the next section still runs
            section.update(status="error", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()[-4000:])
            print(f"gpu_check: section {name} raised {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        section["seconds"] = round(time.perf_counter() - started, 2)
        self.save()


def time_calls(run: Callable[[int], None], calls: int, samples: int, timer) -> list[float]:
    """Seconds per call: `calls` back-to-back calls between one pair of the timer's marks, `samples` times."""
    out = []
    for _ in range(samples):
        start, end = timer.mark(), timer.mark()
        start.record()
        for i in range(calls):
            run(i)
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end) / 1e3 / calls)
    return out


def _host_mark():
    """torch.cuda.Event's three methods on the host clock (--device cpu)."""
    mark = types.SimpleNamespace(at=0.0, synchronize=lambda: None)
    mark.record = lambda: setattr(mark, "at", time.perf_counter())
    mark.elapsed_time = lambda end: (end.at - mark.at) * 1e3
    return mark


class Timer:
    """CUDA events on the GPU (host clock with --device cpu); a CUDA graph of the calls when capture works."""

    def __init__(self) -> None:
        self.graphs, self.graph_error = DEVICE == "cuda", None

    def mark(self):
        return _torch().cuda.Event(enable_timing=True) if DEVICE == "cuda" else _host_mark()

    def measure(self, run: Callable[[int], None], target_s: float = 0.01, samples: int = 5, max_calls: int = 200) -> dict:
        run(0)
        once = float(np.median(time_calls(run, 1, 3, self)))
        calls = int(min(max_calls, max(2, target_s / max(once, 1e-7))))
        samples = samples if once < 0.02 else 3  # prefill on the fp32 GEMM: tens of ms a call
        if self.graphs:
            try:
                torch = _torch()
                graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
                with torch.cuda.graph(graph, stream=stream):
                    for i in range(calls):
                        run(i)
                seconds = float(np.median(time_calls(lambda _: graph.replay(), 1, samples, self))) / calls
                return {"us_per_call": seconds * 1e6, "calls_per_sample": calls, "samples": samples, "method": "cuda graph"}
            except Exception as exc:  # capture unsupported here: events from now on
                self.graphs, self.graph_error = False, f"{type(exc).__name__}: {exc}"
        host = time.perf_counter()
        seconds = float(np.median(time_calls(run, calls, samples, self)))
        host_us = (time.perf_counter() - host) / (calls * samples) * 1e6
        return {"us_per_call": seconds * 1e6, "calls_per_sample": calls, "samples": samples, "method": "events", "host_us_per_call": host_us}


class Layer:
    def __init__(self, lib, attrs: dict, act: str, weight: str, max_tokens: int, kernels: Kernels = Kernels.DEFAULT) -> None:
        self.lib, self.attrs, self.act, self.weight = lib, attrs, act, weight
        self.params = lynx_moe_lib.params_from_attributes(attrs, DTYPES[act], DTYPES[weight], kernels)
        self.workspace_bytes = lib.workspace_size(self.params, max_tokens)
        self.workspace = _torch().zeros(self.workspace_bytes, dtype=_torch().uint8, device=DEVICE)

    def with_kernels(self, kernels: Kernels) -> Layer:
        """The same layer and workspace, other kernels."""
        twin = object.__new__(Layer)
        twin.__dict__.update(self.__dict__, params=lynx_moe_lib.Params.from_buffer_copy(self.params))
        twin.params.kernels = int(kernels)
        return twin

    @staticmethod
    def tensors(**tensors) -> lynx_moe_lib.Tensors:
        return lynx_moe_lib.Tensors(**{name: 0 if t is None else t.data_ptr() for name, t in tensors.items()})

    def route(self, tokens: int, x) -> dict[str, np.ndarray]:
        ptrs = self.lib.route(self.params, tokens, x, self.workspace.data_ptr(), self.workspace_bytes, _stream())
        _sync()
        base, k, torch = self.workspace.data_ptr(), self.params.top_k, _torch()
        view = lambda ptr, n, dt: self.workspace[ptr - base: ptr - base + 4 * n].view(dt).cpu().numpy()  # noqa: E731
        return {"ids": view(ptrs.ids, tokens * k, torch.int32).reshape(tokens, k), "weights": view(ptrs.weights, tokens * k, torch.float32).reshape(tokens, k),
                "allowed": view(ptrs.allowed, self.params.num_experts, torch.int32).astype(bool)}

    def enqueue(self, tokens: int, x) -> None:
        self.lib.enqueue(self.params, tokens, x, self.workspace.data_ptr(), self.workspace_bytes, _stream())


def _stream() -> int:
    return _torch().cuda.current_stream().cuda_stream if DEVICE == "cuda" else 0


def _sync() -> None:
    if DEVICE == "cuda":
        _torch().cuda.synchronize()


def _logits(rng, tokens: int, experts: int, ties: bool = False) -> np.ndarray:
    logits = rng.normal(size=(tokens, experts)) + np.random.default_rng(1234).normal(size=experts)
    return (np.round(logits * 2) / 2 if ties else logits).astype(np.float32)


def _scalar(value: int):
    return _torch().tensor(value, dtype=_torch().int64, device=DEVICE)


def _inputs(rng, tokens: int, hidden_size: int, experts: int, act: str) -> tuple:
    """hidden N(0,1), router logits (_logits) and a zeroed output, on the device in the activation dtype."""
    torch, dtype = _torch(), _tdtype(act)
    hidden = torch.from_numpy(rng.normal(size=(tokens, hidden_size)).astype(np.float32)).to(DEVICE).to(dtype)
    return hidden, torch.from_numpy(_logits(rng, tokens, experts)).to(DEVICE).to(dtype), torch.zeros(tokens, hidden_size, dtype=dtype, device=DEVICE)


def _row_ranges(ids: np.ndarray, experts: int) -> list[str]:
    counts = np.bincount(ids.ravel(), minlength=experts)
    return [f"{lo}-{hi}" if hi < 1 << 30 else f">{lo - 1}" for lo, hi in ROW_RANGES if ((counts >= lo) & (counts <= hi)).any()]


def _past(deadline: float) -> bool:
    """True once `deadline` is reached: a budget of 0 s truncates every section before its first case."""
    return time.perf_counter() >= deadline


def check_routing(lib, sets: dict, quick: bool, deadline: float, section: dict) -> None:
    torch, rng, passed, total, failures = _torch(), np.random.default_rng(0), 0, 0, []
    for case in routing_cases(quick):
        if _past(deadline):
            section["truncated"] = True
            break
        attrs = _attrs(case["policy"], case["E"], case["K"], hidden_size=8, expert_size=8, **case["extra"])
        layer = Layer(lib, attrs, case["act"], "fp32", max(case["tokens"]))
        variants = {name: layer.with_kernels(Kernels.POPULARITY_TABLE if name == "table" else Kernels.DEFAULT) for name in case["kernels"]
                    if name == "default" or "new" in sets}
        parsed = contract.from_attributes(attrs)
        for tokens, (seq_len, valid), ties in itertools.product(case["tokens"], ((1, None), (1, -2), (5, None)), (False, True)):
            valid = tokens if valid is None else max(tokens + valid, 0)
            logits_dev = torch.from_numpy(_logits(rng, tokens, case["E"], ties)).to(DEVICE).to(_tdtype(case["act"]))
            logits = logits_dev.float().cpu().numpy()
            want = reference.select(parsed.spec, parsed.policy, logits, seq_len=seq_len, num_valid=valid)
            allowed = reference.phase_policy(parsed.policy, seq_len).allowed(logits, case["K"], reference.valid_rows(valid, tokens))
            scalars = {"seq_len": _scalar(seq_len), "num_valid": _scalar(valid)}  # alive while x points at them
            x = Layer.tensors(router_logits=logits_dev, **scalars)
            for name, variant in variants.items():
                got = variant.route(tokens, x)
                ok = (np.array_equal(got["ids"], want.ids) and np.array_equal(got["allowed"], allowed)
                      and float(np.max(np.abs(got["weights"] - want.weights))) <= 1e-6)
                total, passed = total + 1, passed + ok
                if not ok and len(failures) < 20:
                    failures.append({**case, "tokens": tokens, "seq_len": seq_len, "valid": valid, "ties": ties, "kernels": name})
    section.update(cases=total, passed=passed, failures=failures, failed=passed != total or total == 0)  # nothing checked is no pass


def _copy(values, unaligned: bool):
    """A copy of `values`; unaligned: placed one element into its storage, so not 16-byte aligned."""
    out = _torch().empty(values.numel() + 1, dtype=values.dtype, device=DEVICE)[1:].view(values.shape) if unaligned else _torch().empty_like(values)
    return out.copy_(values)


def _generator(seed: int):
    return _torch().Generator(device=DEVICE).manual_seed(seed)


def _weights(gen, shape: tuple, std: float, dtype: str, unaligned: bool):
    return _copy((_torch().randn(shape, generator=gen, device=DEVICE) * std).to(_tdtype(dtype)), unaligned)


def _relative_error(got: np.ndarray, ref: np.ndarray) -> float:
    """max |got - ref| / max |ref|; inf for a non-finite output or an all-zero reference (it would prove nothing)."""
    return float(np.max(np.abs(got - ref)) / np.max(np.abs(ref))) if np.abs(ref).max() > 0 and np.isfinite(got).all() else float("inf")


def check_layer(lib, sets: dict, quick: bool, deadline: float, section: dict) -> None:
    torch, rng, gen, total, passed, worst, paths, failures = _torch(), np.random.default_rng(1), _generator(1), 0, 0, {}, {}, []
    for case in layer_cases(quick):
        if _past(deadline):
            section["truncated"] = True
            break
        h, i, e, k, act, weight = case["H"], case["I"], case["E"], case["K"], case["act"], case["weight"]
        attrs = _attrs(case["policy"], e, k, hidden_size=h, expert_size=i, **(GPT_OSS if case["swiglu"] == "gpt-oss" else {}))
        spec = contract.from_attributes(attrs).spec
        layer = Layer(lib, attrs, act, weight, max(case["tokens"]))
        fc1_std = (8.0 if case["swiglu"] == "gpt-oss" else 1.0) * h ** -0.5  # gpt-oss: pre-activations past the clamp
        fc1, fc2 = _weights(gen, (e, 2 * i, h), fc1_std, weight, case["unaligned"]), _weights(gen, (e, h, i), i ** -0.5, weight, case["unaligned"])
        biases = {n: _weights(gen, shape, 0.1, weight, False) if case["biases"] else None for n, shape in (("fc1_bias", (e, 2 * i)), ("fc2_bias", (e, h)))}
        for tokens in case["tokens"]:
            seq_len, valid = (7, tokens) if case["mode"] == "prefill" else (1, tokens // 2 if case["mode"] == "padded" else tokens)
            hidden, logits, output = _inputs(rng, tokens, h, e, act)
            scalars = {"seq_len": _scalar(seq_len), "num_valid": _scalar(valid)}
            routing = layer.route(tokens, Layer.tensors(router_logits=logits, **scalars))
            unused = torch.from_numpy(~np.isin(np.arange(e), routing["ids"])).to(DEVICE)
            poisoned = [_copy(w, case["unaligned"]) for w in (fc1, fc2)]
            for w in poisoned:  # the weights of experts no token uses: any read of them shows in the output
                w[unused] = float("nan")
            to64 = lambda t: None if t is None else t.double().cpu().numpy()  # noqa: E731
            ref = reference.combine(to64(hidden), routing["ids"], routing["weights"].astype(np.float64), to64(fc1), to64(fc2), spec,
                                    fc1_bias=to64(biases["fc1_bias"]), fc2_bias=to64(biases["fc2_bias"]))
            ranges = _row_ranges(routing["ids"], e)
            for name, kernels in sets.items():
                output.zero_()
                layer.with_kernels(kernels).enqueue(tokens, Layer.tensors(hidden=hidden, router_logits=logits, fc1=poisoned[0], fc2=poisoned[1],
                                                                          output=output, **biases, **scalars))
                _sync()
                error = _relative_error(output.double().cpu().numpy(), ref)
                ok = error <= TOLERANCE[weight if TOLERANCE[weight] > TOLERANCE[act] else act]
                total, passed = total + 1, passed + ok
                worst[f"{name} {act}/{weight}"] = max(worst.get(f"{name} {act}/{weight}", 0.0), error)
                for r in ranges:
                    label = f"{name} rows {r}" + (" unaligned" if case["unaligned"] else "") + (f" H{h} I{i}" if h % 8 or i % 8 else "")
                    paths[label] = paths.get(label, 0) + 1
                if not ok and len(failures) < 20:
                    failures.append({**{k_: v for k_, v in case.items() if k_ != "tokens"}, "tokens": tokens, "kernels": name, "relative_error": error})
    section.update(cases=total, passed=passed, worst={k_: f"{v:.2e}" for k_, v in worst.items()}, paths=dict(sorted(paths.items())),
                   failures=failures, failed=passed != total or total == 0)


def _torch_reference(hidden, ids: np.ndarray, weights: np.ndarray, fc1, fc2, attrs: dict):
    """fp32 MoE on the device from the library's routing (TF32 off): the reference at the timed shapes."""
    torch = _torch()
    alpha, beta, limit = (attrs.get(n, d) for n, d in (("activation_alpha", 1.0), ("activation_beta", 0.0), ("swiglu_limit", float("inf"))))
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    ids_t, w_t = torch.from_numpy(ids.astype(np.int64)).to(hidden.device), torch.from_numpy(weights).to(hidden.device)
    for e in np.unique(ids):
        tok, slot = torch.nonzero(ids_t == int(e), as_tuple=True)
        gu = hidden[tok].float() @ fc1[e].float().T
        gate, up = gu[:, 0::2].clamp(max=limit), gu[:, 1::2].clamp(-limit, limit)
        act = gate * torch.sigmoid(alpha * gate) * (up + beta)
        out.index_add_(0, tok, (act @ fc2[e].float().T) * w_t[tok, slot][:, None])
    return out


def _row(lib, rng, shape: str, dims: tuple, tokens: int, policies: tuple, sets: dict, copies: list, seq_len: int, timer: Timer) -> dict:
    torch, (h, i, e, k) = _torch(), dims
    hidden, logits, output = _inputs(rng, tokens, h, e, "bf16")
    scalars = {"seq_len": _scalar(seq_len), "num_valid": _scalar(tokens)}
    peak = next((p for name, p in PEAKS.items() if name in str(torch.cuda.get_device_name(0) if DEVICE == "cuda" else "")), None)
    row: dict = {"shape": shape, "tokens": tokens, "seq_len": seq_len}
    for policy in policies:
        base = Layer(lib, _attrs(policy, e, k, hidden_size=h, expert_size=i), "bf16", "bf16", tokens)
        routing = base.route(tokens, Layer.tensors(router_logits=logits, **scalars))
        active = int(np.unique(routing["ids"]).size)
        ref = _torch_reference(hidden, routing["ids"], routing["weights"], *copies[0], base.attrs)
        moved, flops = active * 3 * h * i * 2 + 2 * tokens * h * 2, tokens * k * 6 * h * i
        for name, kernels in sets.items():
            layer = base.with_kernels(kernels)
            xs = [Layer.tensors(hidden=hidden, router_logits=logits, fc1=f1, fc2=f2, output=output, **scalars) for f1, f2 in copies]
            output.zero_()
            layer.enqueue(tokens, xs[0])
            _sync()
            error = _relative_error(output.float().cpu().numpy(), ref.cpu().numpy())
            timing = timer.measure(lambda n: layer.enqueue(tokens, xs[n % len(xs)]))
            seconds = timing["us_per_call"] / 1e6
            result = {"active_experts": active, "relative_error": error, "passed": bool(error <= TOLERANCE["bf16"]), **timing,
                      "tokens_per_s": tokens / seconds, "GBps": moved / seconds / 1e9, "TFLOPs": flops / seconds / 1e12}
            if peak:  # the tensor-core kernels against the bf16 peak, the SIMT ones against fp32's
                compute = peak["bf16_TFLOPs" if kernels & Kernels.TENSOR_CORE_GEMM else "fp32_TFLOPs"]
                result.update(of_peak_GBps=result["GBps"] / peak["GBps"], of_peak_TFLOPs=result["TFLOPs"] / compute)
            row[f"{policy}/{name}"] = result
    return row


def time_layers(lib, sets: dict, shapes: dict, token_counts: list[int], policies: tuple, seq_len: int, deadline: float, section: dict, save) -> None:
    rng, gen, timer = np.random.default_rng(2), _generator(2), Timer()
    section.update(rows=[], skipped=[])
    for shape, dims in shapes.items():
        h, i, e, _ = dims
        copies = [(_weights(gen, (e, 2 * i, h), h ** -0.5, "bf16", False), _weights(gen, (e, h, i), i ** -0.5, "bf16", False)) for _ in range(COPIES[shape])]
        for tokens in token_counts:
            if _past(deadline):
                section["skipped"].append(f"{shape} {tokens} tokens (budget)")
                continue
            row = _row(lib, rng, shape, dims, tokens, policies, sets, copies, seq_len, timer)
            section["rows"].append(row)
            print(f"  {shape} T={tokens}: " + " | ".join(f"{c} {_cell(row[c])}" for c in row if "/" in c), flush=True)
            save()
        del copies  # before the next shape's weights
    section.update(timing_method="events" if timer.graph_error or DEVICE != "cuda" else "cuda graph", graph_error=timer.graph_error,
                   failed=not section["rows"] or any(not r[c]["passed"] for r in section["rows"] for c in r if "/" in c),
                   truncated=bool(section["skipped"]))


def probe(lib, quick: bool, prefill: list[int]) -> None:
    """Child process: each kernel set once per shape (a quarter of the layer cases, the timed shapes), announcing each first."""
    rng, gen = np.random.default_rng(3), _generator(3)
    timed = [dict(H=h, I=i, E=e, K=k, act="bf16", weight="bf16", tokens=[1, 24, 256, *prefill], unaligned=False)
             for h, i, e, k in (QUICK_SHAPES if quick else TIMING_SHAPES).values()]
    for name, case in itertools.product(KERNEL_SETS, layer_cases(quick)[::4] + timed):
        h, i, e, k = case["H"], case["I"], case["E"], case["K"]
        layer = Layer(lib, _attrs("lynx", e, k, hidden_size=h, expert_size=i), case["act"], case["weight"], max(case["tokens"]), KERNEL_SETS[name])
        fc1, fc2 = (_weights(gen, shape, 0.02, case["weight"], case["unaligned"]) for shape in ((e, 2 * i, h), (e, h, i)))
        for tokens in case["tokens"]:
            print(f"probe: {name} H{h} I{i} E{e} K{k} {case['act']}/{case['weight']} T{tokens}{' unaligned' if case['unaligned'] else ''}", flush=True)
            hidden, logits, output = _inputs(rng, tokens, h, e, case["act"])
            layer.enqueue(tokens, Layer.tensors(hidden=hidden, router_logits=logits, fc1=fc1, fc2=fc2, output=output))
            _sync()
    print("probe: done", flush=True)


def _child(args, extra: list[str], timeout: float, section: dict, prefix: list[str] | None = None) -> int:
    command = [*(prefix or []), sys.executable, str(pathlib.Path(__file__).resolve()), "--library", str(args.library), "--device", DEVICE, *extra]
    section["command"] = " ".join(command)
    try:
        r = subprocess.run(command, capture_output=True, text=True, timeout=max(timeout, 5.0))
        out, err, rc = r.stdout, r.stderr, r.returncode
    except subprocess.TimeoutExpired as exc:  # what it printed so far still says how far it got
        out, err, rc = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or "", "(timed out)", -1
    section.update(returncode=rc, output=out, output_tail=out[-1500:] + err[-2500:])  # output: for the caller to parse and drop
    return rc


def compile_library(build: pathlib.Path, archs: str) -> pathlib.Path:
    r = subprocess.run(["make", "-s", "-C", str(ROOT / "plugins" / "lynx_moe"), f"BUILD={build}", f"ARCHS={archs}"], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"make failed ({r.returncode}): {r.stderr[-2000:]}")
    return build / "liblynx_moe.so"


def markdown(data: dict) -> str:
    s = data["sections"]
    lines = [f"# LynxMoE core library on {data['machine'].get('gpu', '?')}", "", f"Command: `{data['command']}`; status: {data['status']}", ""]
    for name, sec in s.items():
        detail = f"{sec.get('passed')}/{sec.get('cases')} passed" if "cases" in sec else sec.get("error") or sec.get("note", "")
        lines.append(f"- {name}: {sec['status']}{' (truncated by the budget)' if sec.get('truncated') else ''}, {sec.get('seconds', '?')} s; {detail}")
    if "layer" in s and s["layer"].get("worst"):
        lines += ["", f"Layer, worst relative error by kernel set and dtypes: {s['layer']['worst']}", f"Kernel paths reached (cases): {s['layer'].get('paths')}"]
    for name in ("decode", "prefill"):
        if rows := s.get(name, {}).get("rows"):
            columns = [c for c in rows[0] if "/" in c]
            lines += ["", f"## {name} ({s[name].get('timing_method')}; us per call, GB/s, TFLOP/s, error vs torch fp32)", "",
                      "| shape | tokens | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
            lines += [f"| {r['shape']} | {r['tokens']} | " + " | ".join(_cell(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _cell(r: dict) -> str:
    peak = f" ({r['of_peak_GBps']:.0%}, {r['of_peak_TFLOPs']:.0%})" if "of_peak_GBps" in r else ""
    return (f"{r['active_experts']} exp, {r['us_per_call']:.1f} us, {r['GBps']:.0f} GB/s, {r['TFLOPs']:.1f} TF{peak}, "
            f"err {r['relative_error']:.1e}{'' if r['passed'] else ' FAIL'}")


def run_probe(args, sets: dict, deadline: float, sec: dict) -> None:
    extra = ["--probe", "--prefill-tokens", ",".join(map(str, args.prefill_tokens))] + (["--quick"] if args.quick else [])
    rc = _child(args, extra, deadline - time.perf_counter(), sec)
    runs = [line.removeprefix("probe: ") for line in sec.pop("output", "").splitlines() if line.startswith("probe: ")]
    sec["runs"] = len(runs) - (runs[-1:] == ["done"])
    if rc != 0 or runs[-1:] != ["done"]:
        sets.pop("new", None)  # what crashed the child would poison this process's context: the defaults only from here
        sec.update(failed=True, stopped_at=runs[-1] if runs else None,
                   note=f"the probe stopped at {runs[-1] if runs else 'its start'} (exit {rc}): kernel set `new` is left out of the rest")
    sec["kernel_sets"] = list(sets)


def run_sanitizer(args, deadline: float, sec: dict) -> None:
    tool = shutil.which("compute-sanitizer") or next((str(p) for p in pathlib.Path("/usr/local").glob("cuda*/bin/compute-sanitizer")), None)
    if tool is None:
        sec["note"] = "compute-sanitizer not found: skipped"
        return
    left = deadline - time.perf_counter()
    extra = ["--quick", "--sections", "layer", "--out", str(args.out / "sanitizer"), "--budget-s", str(max(left - 20, 10))]
    rc = _child(args, extra, left, sec, [tool, "--tool", "memcheck", "--error-exitcode", "99"])
    sec["failed"] = rc != 0 or "ERROR SUMMARY: 0 errors" not in sec.pop("output", "") + sec.get("output_tail", "")


def _arguments():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("gpu-check"), help="results folder (default ./gpu-check)")
    parser.add_argument("--quick", action="store_true", help="small shapes only")
    parser.add_argument("--dry-run", action="store_true", help="compile, plan and print; needs no GPU and no torch")
    parser.add_argument("--library", type=pathlib.Path, help="use this liblynx_moe.so instead of compiling")
    parser.add_argument("--budget-s", type=float, default=330.0, help="wall-clock budget of the whole run (default 330)")
    parser.add_argument("--sections", default="probe,routing,layer,decode,prefill", help="comma-separated; sanitizer too with --sanitizer")
    parser.add_argument("--sanitizer", action="store_true", help="also run compute-sanitizer memcheck over --quick --sections layer")
    parser.add_argument("--batch-sizes", default="1,2,4,8,16,32,64,128,256")
    parser.add_argument("--prefill-tokens", default="512,2048")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: the script's code over the fake-runtime library")
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)  # the probe section's child process
    args = parser.parse_args()
    args.out = args.out.resolve()  # make runs in plugins/lynx_moe: a relative BUILD would land there
    args.library = args.library.resolve() if args.library else None
    args.sections = [s for s in args.sections.split(",") if s] + (["sanitizer"] if args.sanitizer else [])
    args.batch_sizes = [1, 4, 16] if args.quick else [int(b) for b in args.batch_sizes.split(",")]
    args.prefill_tokens = [128] if args.quick else [int(t) for t in args.prefill_tokens.split(",")]
    return args


def main() -> int:
    global DEVICE
    args, started = _arguments(), time.perf_counter()
    DEVICE = args.device
    machine = {"cpu": platform.processor() or platform.machine()}
    if not args.dry_run:
        try:
            torch = _torch()
        except ImportError:
            torch = None
        if torch is None or (DEVICE == "cuda" and not torch.cuda.is_available()):
            print("gpu_check: " + ("PyTorch is not installed; it allocates the GPU memory" if torch is None else "no NVIDIA GPU visible: nothing to check"),
                  file=sys.stderr)
            return 2
        if args.probe:
            return probe(lynx_moe_lib.CoreLibrary(args.library), args.quick, args.prefill_tokens) or 0
        if DEVICE == "cuda":
            props = torch.cuda.get_device_properties(0)
            machine.update(gpu=props.name, compute_capability=f"{props.major}.{props.minor}", memory_GiB=round(props.total_memory / 2**30, 1),
                           torch=torch.__version__, cuda=torch.version.cuda)
    results = Results(args.out, {"command": "python scripts/gpu_check.py " + " ".join(sys.argv[1:]), "machine": machine, "plan": plan(args)})
    archs = machine["compute_capability"].replace(".", "") if "compute_capability" in machine else "80 90"
    loaded: dict = {}

    def compile_section(sec: dict) -> None:
        if args.library is None:
            sec["archs"], args.library = archs, compile_library(args.out / "build", archs)
        sec["library"], loaded["lib"] = str(args.library), lynx_moe_lib.CoreLibrary(args.library)

    results.run("compile", compile_section)
    if "lib" not in loaded:
        results.data["status"] = "compile failed"
        return results.save() or 1
    lib, sets, end, pending = loaded["lib"], dict(KERNEL_SETS), started + args.budget_s, [s for s in args.sections if s in SHARES]

    def deadline(name: str) -> float:
        """Section `name`'s share of the time left, among the sections still to run."""
        share = SHARES[name] / sum(SHARES[s] for s in pending)
        pending.remove(name)
        return time.perf_counter() + max(end - time.perf_counter(), 0.0) * share

    if args.dry_run:
        for case in layer_cases(args.quick):  # every planned layer's parameters pass the library's own check
            params = lynx_moe_lib.params_from_attributes(_attrs(case["policy"], case["E"], case["K"], hidden_size=case["H"], expert_size=case["I"]))
            assert lib.check_params(params) and lib.workspace_size(params, max(case["tokens"])) > 0, case
        results.data.update(status="dry run", seconds_after_compile=round(end - time.perf_counter()))
        print(json.dumps({"library": str(args.library), "out": str(args.out), **results.data["plan"]}))
        return results.save() or 0
    shapes = QUICK_SHAPES if args.quick else TIMING_SHAPES
    sections = {
        "probe": lambda sec: run_probe(args, sets, deadline("probe"), sec),
        "routing": lambda sec: check_routing(lib, sets, args.quick, deadline("routing"), sec),
        "layer": lambda sec: check_layer(lib, sets, args.quick, deadline("layer"), sec),
        "decode": lambda sec: time_layers(lib, sets, shapes, args.batch_sizes, ("off", "lynx"), 1, deadline("decode"), sec, results.save),
        "prefill": lambda sec: time_layers(lib, sets, shapes, args.prefill_tokens, ("off",), 7, deadline("prefill"), sec, results.save),
        "sanitizer": lambda sec: run_sanitizer(args, deadline("sanitizer"), sec),
    }
    for name in sections:
        if name in args.sections:
            print(f"gpu_check: {name} ...", file=sys.stderr, flush=True)
            results.run(name, sections[name])
    failed = [n for n, s in results.data["sections"].items() if s["status"] != "ok"]
    results.data.update(status="done" if not failed else f"done; not ok: {', '.join(failed)}", check_s=round(time.perf_counter() - started, 1))
    results.save()
    print(markdown(results.data))
    print("gpu_check:", "all checks passed" if not failed else f"CHECKS FAILED ({', '.join(failed)})", file=sys.stderr)
    return 0 if not failed else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
