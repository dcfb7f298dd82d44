#!/usr/bin/env python3
"""GPU check of the LynxMoE core library: compile, compare with the numpy reference, time.

Run on a machine with an NVIDIA GPU, nvcc and PyTorch with CUDA (under 5 minutes on one GPU):

    python scripts/gpu_check.py --out gpu-check            # full check and timings
    python scripts/gpu_check.py --quick                    # small shapes only (the test suite's GPU test)

1. Compiles plugins/lynx_moe (make, sm_80 and sm_90 unless ARCHS is set) and loads it.
2. Routing: `lynx_moe_route` against the op's numpy reference (lynx_export.op.reference.select:
   the routing oracle with the policy only in decode calls and padded rows not voting) for every
   policy, both router forms, decode and prefill calls and padded batches. Expert ids and allowed
   sets must be identical; gate weights equal within 1 ulp-level (1e-6).
3. The whole layer: `lynx_moe_enqueue` against the op's float64 numpy reference over the same
   routing (lynx_export.op.reference.combine), for fp32, fp16 and bf16 activations and weights,
   with and without biases, at token counts that take the decode kernel (GEMV) and the grouped
   GEMM. The weights of experts no token uses are NaN, so any use of them would show in the output.
4. Timing: one MoE layer at batch sizes 1..256 (decode: one token per sequence), for a
   Mixtral-like shape (H 4096, I 14336, E 8, K 2) and a Qwen3-like shape (H 2048, I 768,
   E 128, K 8), bf16, with the model's routing (policy off) and with LYNX (the default
   parameters for E and K). Router logits are synthetic: N(0, 1) per token plus a fixed
   per-expert bias N(0, 1) (some experts popular, some rare, as in trained MoEs); they are
   stated in the results. Timed: the enqueue call only (routing, permutation, expert FFNs,
   combine), CUDA events, median of repeated runs. Bytes = weights of the experts actually
   used (counted from the routing) + activations; bandwidth = bytes / time.

Exit status: 0 when every check passed, 1 when one failed, 2 when no GPU is available.

Imports numpy, the routing oracle, lynx_export.op.contract / reference and the ctypes binding
only: GPU machines may lack onnx-ir.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lynx_export.backends import lynx_moe_lib  # noqa: E402
from lynx_export.op import contract, reference  # noqa: E402
from lynx_export.routing import default_lynx_params  # noqa: E402

DTYPES = {"fp32": lynx_moe_lib.DType.FLOAT32, "fp16": lynx_moe_lib.DType.FLOAT16, "bf16": lynx_moe_lib.DType.BFLOAT16}
TIMING_SHAPES = {"mixtral-like": (4096, 14336, 8, 2), "qwen3-like": (2048, 768, 128, 8)}  # H, I, E, K


def _torch():
    import torch

    return torch


def _torch_dtype(name: str):
    torch = _torch()
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


class Layer:
    """One layer's parameters, device tensors and workspace, and calls into the core library."""

    def __init__(self, lib: lynx_moe_lib.CoreLibrary, attrs: dict, act: str, weight: str, max_tokens: int) -> None:
        self.lib = lib
        self.attrs = attrs
        self.params = lynx_moe_lib.params_from_attributes(attrs, DTYPES[act], DTYPES[weight])
        self.act, self.weight = act, weight
        torch = _torch()
        self.workspace_bytes = lib.workspace_size(self.params, max_tokens)
        self.workspace = torch.empty(self.workspace_bytes, dtype=torch.uint8, device="cuda")

    def tensors(self, **tensors) -> lynx_moe_lib.Tensors:
        """Device pointers by the contract's names (contract.C_TENSORS); absent ones are null."""
        unknown = set(tensors) - set(contract.C_TENSORS)
        if unknown:
            raise TypeError(f"not LynxMoE tensors: {', '.join(sorted(unknown))}")
        return lynx_moe_lib.Tensors(**{name: 0 if t is None else t.data_ptr() for name, t in tensors.items()})

    def stream(self) -> int:
        return _torch().cuda.current_stream().cuda_stream

    def route(self, tokens: int, tensors: lynx_moe_lib.Tensors) -> dict[str, np.ndarray]:
        torch = _torch()
        ptrs = self.lib.route(self.params, tokens, tensors, self.workspace.data_ptr(), self.workspace_bytes, self.stream())
        torch.cuda.synchronize()
        return self.read_routing(ptrs, tokens)

    def read_routing(self, ptrs: lynx_moe_lib.RoutingPointers, tokens: int) -> dict[str, np.ndarray]:
        base, k, e = self.workspace.data_ptr(), self.params.top_k, self.params.num_experts
        torch = _torch()

        def view(ptr: int, count: int, dtype) -> np.ndarray:
            start = ptr - base
            return self.workspace[start: start + 4 * count].view(dtype).cpu().numpy()

        return {
            "ids": view(ptrs.ids, tokens * k, torch.int32).reshape(tokens, k),
            "weights": view(ptrs.weights, tokens * k, torch.float32).reshape(tokens, k),
            "allowed": view(ptrs.allowed, e, torch.int32).astype(bool),
        }

    def enqueue(self, tokens: int, tensors: lynx_moe_lib.Tensors) -> None:
        self.lib.enqueue(self.params, tokens, tensors, self.workspace.data_ptr(), self.workspace_bytes, self.stream())


def _policy_attrs(policy: str, experts: int, top_k: int, **extra) -> dict:
    attrs = {"num_experts": experts, "top_k": top_k, "activation": "swiglu", "router": "softmax_topk", "normalize": 1,
             "policy": policy, "alpha": 0.0, "beta": -1, "budget": 0, "tie_break": "logit"}
    if policy == "lynx":
        alpha, beta = default_lynx_params(experts, top_k)
        attrs.update(alpha=alpha, beta=-1 if beta is None else beta)
    attrs.update(extra)
    return attrs


def _oracle(attrs: dict, logits: np.ndarray, seq_len: int, valid: int):
    """The reference's routing of one call and the allowed set of the policy that call runs."""
    parsed = contract.from_attributes(attrs)
    routing = reference.select(parsed.spec, parsed.policy, logits, seq_len=seq_len, num_valid=valid)
    chosen = reference.phase_policy(parsed.policy, seq_len)
    return routing, chosen.allowed(logits, parsed.spec.top_k, reference.valid_rows(valid, logits.shape[0]))


def _logits(rng: np.random.Generator, tokens: int, experts: int, ties: bool) -> np.ndarray:
    bias = np.random.default_rng(1234).normal(size=experts)
    logits = rng.normal(size=(tokens, experts)) + bias
    if ties:  # coarse values make equal logits, bins and scores common: the tie-breaks get exercised
        logits = np.round(logits * 2) / 2
    return logits.astype(np.float32)


def check_routing(lib, rng, quick: bool) -> list[dict]:
    torch = _torch()
    cases = []
    shapes = [(8, 2), (64, 8)] if quick else [(8, 2), (16, 4), (64, 8), (128, 8)]
    token_counts = [1, 3, 17, 64] if quick else [1, 2, 3, 17, 64, 256]
    variants = [
        ("off", {}), ("lynx", {}), ("lynx", {"alpha": 0.7, "beta": 1}), ("lynx", {"alpha": 1.0, "beta": -1, "tie_break": "index"}),
        ("budget", {"budget": None}), ("lynx", {"router": "topk_softmax"}), ("lynx", {"normalize": 0}),
    ]
    for experts, top_k in shapes:
        for policy, extra in variants:
            extra = dict(extra)
            if "budget" in extra:
                extra["budget"] = min(experts, 2 * top_k)
            attrs = _policy_attrs(policy, experts, top_k, hidden_size=8, expert_size=8, **extra)
            for act in ("fp32", "fp16"):
                layer = Layer(lib, attrs, act, "fp32", max(token_counts))
                for tokens in token_counts:
                    for seq_len, valid in ((1, tokens), (1, max(tokens - 2, 0)), (5, tokens)):
                        for ties in (False, True):
                            logits32 = _logits(rng, tokens, experts, ties)
                            logits_dev = torch.from_numpy(logits32).cuda().to(_torch_dtype(act))
                            logits = logits_dev.float().cpu().numpy()  # what the kernel sees
                            seq_dev = torch.tensor(seq_len, dtype=torch.int64, device="cuda")
                            valid_dev = torch.tensor(valid, dtype=torch.int64, device="cuda")
                            got = layer.route(tokens, layer.tensors(router_logits=logits_dev, seq_len=seq_dev, num_valid=valid_dev))
                            want, allowed = _oracle(attrs, logits, seq_len, valid)
                            case = {"E": experts, "K": top_k, "policy": policy, **extra, "act": act, "tokens": tokens, "seq_len": seq_len,
                                    "valid": valid, "ties": ties,
                                    "ids_equal": bool(np.array_equal(got["ids"], want.ids)),
                                    "allowed_equal": bool(np.array_equal(got["allowed"], allowed)),
                                    "max_weight_diff": float(np.max(np.abs(got["weights"] - want.weights)))}
                            case["passed"] = case["ids_equal"] and case["allowed_equal"] and case["max_weight_diff"] <= 1e-6
                            cases.append(case)
    return cases


PLAIN_SWIGLU: dict = {}
GPT_OSS_SWIGLU = {"activation_alpha": 1.702, "activation_beta": 1.0, "swiglu_limit": 7.0}


TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 4e-2}  # max |out - ref| / max |ref|, by the coarser dtype


def check_layer(lib, rng, quick: bool) -> list[dict]:
    torch = _torch()
    cases = []
    shapes = [(64, 96, 8, 2)] if quick else [(256, 384, 8, 2), (128, 64, 64, 8), (200, 136, 16, 4)]  # H, I, E, K (200: no 16-byte vectors)
    dtype_pairs = [("fp32", "fp32"), ("fp16", "fp16"), ("bf16", "bf16"), ("fp32", "bf16")]
    token_counts = [1, 5, 40] if quick else [1, 5, 40, 300]  # 300 tokens put more than 32 rows on experts: the GEMM path
    for hidden_size, inner, experts, top_k in shapes:
        for (act, weight), swiglu, policy in itertools.product(dtype_pairs, (PLAIN_SWIGLU, GPT_OSS_SWIGLU), ("off", "lynx")):
            attrs = _policy_attrs(policy, experts, top_k, hidden_size=hidden_size, expert_size=inner, **swiglu)
            spec = contract.from_attributes(attrs).spec
            layer = Layer(lib, attrs, act, weight, max(token_counts))
            for biases in (False, True):
                wdt, adt = _torch_dtype(weight), _torch_dtype(act)
                # gpt-oss: pre-activations spread past the limit, so that both clamps are exercised.
                fc1_std = (8.0 if swiglu else 1.0) * hidden_size ** -0.5
                fc1 = torch.from_numpy(rng.normal(0, fc1_std, (experts, 2 * inner, hidden_size)).astype(np.float32)).cuda().to(wdt)
                fc2 = torch.from_numpy(rng.normal(0, inner ** -0.5, (experts, hidden_size, inner)).astype(np.float32)).cuda().to(wdt)
                fc1_bias = torch.from_numpy(rng.normal(0, 0.1, (experts, 2 * inner)).astype(np.float32)).cuda().to(wdt) if biases else None
                fc2_bias = torch.from_numpy(rng.normal(0, 0.1, (experts, hidden_size)).astype(np.float32)).cuda().to(wdt) if biases else None
                for tokens in token_counts:
                    hidden = torch.from_numpy(rng.normal(size=(tokens, hidden_size)).astype(np.float32)).cuda().to(adt)
                    logits = torch.from_numpy(_logits(rng, tokens, experts, False)).cuda().to(adt)
                    output = torch.empty(tokens, hidden_size, dtype=adt, device="cuda")
                    bias_tensors = {"fc1_bias": fc1_bias, "fc2_bias": fc2_bias}
                    x = layer.tensors(hidden=hidden, router_logits=logits, fc1=fc1, fc2=fc2, output=output, **bias_tensors)
                    routing = layer.route(tokens, x)
                    unused = ~np.isin(np.arange(experts), routing["ids"])
                    poisoned = [fc1.clone(), fc2.clone()]
                    for w in poisoned:
                        w[torch.from_numpy(unused).cuda()] = float("nan")
                    x = layer.tensors(hidden=hidden, router_logits=logits, fc1=poisoned[0], fc2=poisoned[1], output=output, **bias_tensors)
                    layer.enqueue(tokens, x)
                    torch.cuda.synchronize()
                    to64 = lambda t: None if t is None else t.double().cpu().numpy()  # noqa: E731
                    ref = reference.combine(to64(hidden), routing["ids"], routing["weights"].astype(np.float64), to64(fc1), to64(fc2), spec,
                                            fc1_bias=to64(fc1_bias), fc2_bias=to64(fc2_bias))
                    got = output.double().cpu().numpy()
                    error = float(np.max(np.abs(got - ref)) / max(np.max(np.abs(ref)), 1e-30))
                    coarser = weight if TOLERANCE[weight] > TOLERANCE[act] else act
                    cases.append({"H": hidden_size, "I": inner, "E": experts, "K": top_k, "act": act, "weight": weight, "policy": policy, "swiglu": swiglu or "plain",
                                  "biases": biases, "tokens": tokens, "max_rows_per_expert": int(np.bincount(routing["ids"].ravel()).max()),
                                  "unused_experts": int(unused.sum()), "finite": bool(np.isfinite(got).all()), "relative_error": error,
                                  "passed": bool(np.isfinite(got).all()) and error <= TOLERANCE[coarser]})
    return cases


def time_layer(lib, rng, quick: bool, batch_sizes: list[int], repeats: int) -> list[dict]:
    torch = _torch()
    rows = []
    shapes = {"tiny": (256, 512, 8, 2)} if quick else TIMING_SHAPES
    for shape_name, (hidden_size, inner, experts, top_k) in shapes.items():
        fc1 = torch.randn(experts, 2 * inner, hidden_size, dtype=torch.bfloat16, device="cuda") * hidden_size ** -0.5
        fc2 = torch.randn(experts, hidden_size, inner, dtype=torch.bfloat16, device="cuda") * inner ** -0.5
        expert_bytes = 3 * hidden_size * inner * 2
        layers = {p: Layer(lib, _policy_attrs(p, experts, top_k, hidden_size=hidden_size, expert_size=inner), "bf16", "bf16", max(batch_sizes))
                  for p in ("off", "lynx")}
        for batch in batch_sizes:
            hidden = torch.randn(batch, hidden_size, dtype=torch.bfloat16, device="cuda")
            logits = torch.from_numpy(_logits(rng, batch, experts, False)).cuda().to(torch.bfloat16)
            output = torch.empty_like(hidden)
            result = {"shape": shape_name, "H": hidden_size, "I": inner, "E": experts, "K": top_k, "batch": batch}
            for policy, layer in layers.items():
                x = layer.tensors(hidden=hidden, router_logits=logits, fc1=fc1, fc2=fc2, output=output)
                active = int(np.unique(layer.route(batch, x)["ids"]).size)
                for _ in range(3):
                    layer.enqueue(batch, x)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                times = []
                for _ in range(repeats):
                    start.record()
                    layer.enqueue(batch, x)
                    end.record()
                    end.synchronize()
                    times.append(start.elapsed_time(end) / 1e3)
                seconds = float(np.median(times))
                moved = active * expert_bytes + 2 * batch * hidden_size * 2
                result[policy] = {"active_experts": active, "seconds": seconds, "tokens_per_s": batch / seconds, "bytes": moved,
                                  "bandwidth_GBps": moved / seconds / 1e9}
            result["lynx_speedup"] = result["lynx"]["tokens_per_s"] / result["off"]["tokens_per_s"]
            rows.append(result)
            print(f"  {shape_name:12s} B={batch:4d}  off: {result['off']['active_experts']:3d} experts {result['off']['tokens_per_s']:11.0f} tok/s "
                  f"{result['off']['bandwidth_GBps']:7.0f} GB/s | lynx: {result['lynx']['active_experts']:3d} experts "
                  f"{result['lynx']['tokens_per_s']:11.0f} tok/s {result['lynx']['bandwidth_GBps']:7.0f} GB/s | x{result['lynx_speedup']:.2f}", flush=True)
        del fc1, fc2, layers
        torch.cuda.empty_cache()
    return rows


def compile_library(build: pathlib.Path) -> tuple[pathlib.Path, float]:
    start = time.perf_counter()
    subprocess.run(["make", "-s", "-C", str(ROOT / "plugins" / "lynx_moe"), f"BUILD={build}"], check=True)
    return build / "liblynx_moe.so", time.perf_counter() - start


def _markdown(results: dict) -> str:
    lines = [f"# LynxMoE core library on {results['machine']['gpu']}", "", f"Command: `{results['command']}`", "",
             f"- routing: {results['routing']['passed']}/{results['routing']['cases']} cases identical to the numpy oracle",
             f"- layer: {results['layer']['passed']}/{results['layer']['cases']} cases within tolerance "
             f"(worst relative error by dtype: {results['layer']['worst']})", "",
             "Timing: one MoE layer, bf16, decode (one token per sequence), enqueue only, median of "
             f"{results['timing_repeats']} runs; logits N(0,1) + fixed per-expert bias N(0,1).", "",
             "| shape | batch | active (off) | tok/s (off) | GB/s (off) | active (lynx) | tok/s (lynx) | GB/s (lynx) | lynx / off |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results["timing"]:
        lines.append(f"| {r['shape']} | {r['batch']} | {r['off']['active_experts']} | {r['off']['tokens_per_s']:.0f} | {r['off']['bandwidth_GBps']:.0f} | "
                     f"{r['lynx']['active_experts']} | {r['lynx']['tokens_per_s']:.0f} | {r['lynx']['bandwidth_GBps']:.0f} | {r['lynx_speedup']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, help="write results.json and results.md here")
    parser.add_argument("--quick", action="store_true", help="small shapes only")
    parser.add_argument("--library", type=pathlib.Path, help="use this liblynx_moe.so instead of compiling")
    parser.add_argument("--batch-sizes", default="1,2,4,8,16,32,64,128,256")
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    try:
        torch = _torch()
    except ImportError:
        print("gpu_check: PyTorch is not installed; it allocates the GPU memory", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("gpu_check: no NVIDIA GPU visible: nothing to check", file=sys.stderr)
        return 2
    build = (args.out or ROOT / "plugins" / "lynx_moe") / "build"
    library, compile_s = (args.library, 0.0) if args.library else compile_library(build)
    lib = lynx_moe_lib.CoreLibrary(library)
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    print("routing vs the numpy oracle ...", flush=True)
    routing = check_routing(lib, rng, args.quick)
    print("whole layer vs float64 numpy ...", flush=True)
    layer = check_layer(lib, rng, args.quick)
    print("timing ...", flush=True)
    batch_sizes = [1, 4, 16] if args.quick else [int(b) for b in args.batch_sizes.split(",")]
    timing = time_layer(lib, rng, args.quick, batch_sizes, 10 if args.quick else args.repeats)
    worst: dict[str, float] = {}
    for c in layer:
        key = f"{c['act']}/{c['weight']}"
        worst[key] = max(worst.get(key, 0.0), c["relative_error"])
    props = torch.cuda.get_device_properties(0)
    results = {
        "command": "python scripts/gpu_check.py " + " ".join(sys.argv[1:]),
        "machine": {"gpu": props.name, "compute_capability": f"{props.major}.{props.minor}", "memory_GiB": round(props.total_memory / 2**30, 1),
                    "cpu": platform.processor() or platform.machine(), "torch": torch.__version__, "cuda": torch.version.cuda},
        "compile_s": compile_s,
        "check_s": time.perf_counter() - started,
        "routing": {"cases": len(routing), "passed": sum(c["passed"] for c in routing), "failures": [c for c in routing if not c["passed"]][:20]},
        "layer": {"cases": len(layer), "passed": sum(c["passed"] for c in layer), "worst": {k: f"{v:.2e}" for k, v in worst.items()},
                  "failures": [c for c in layer if not c["passed"]][:20]},
        "timing_repeats": args.repeats,
        "timing": timing,
    }
    print(_markdown(results))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps({**results, "routing_cases": routing, "layer_cases": layer}, indent=1) + "\n")
        (args.out / "results.md").write_text(_markdown(results))
    ok = results["routing"]["passed"] == len(routing) and results["layer"]["passed"] == len(layer)
    for failure in results["routing"]["failures"][:5] + results["layer"]["failures"][:5]:
        print("FAILED:", failure, file=sys.stderr)
    print("gpu_check:", "all checks passed" if ok else "CHECKS FAILED", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
