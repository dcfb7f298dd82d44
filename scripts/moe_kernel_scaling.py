#!/usr/bin/env python3
"""How ONNX Runtime's CPU MoE kernel's time scales with the number of experts it must read.

One `com.microsoft.MoE` node (fp32, SwiGLU, H x I experts) runs T tokens whose router logits
allow exactly n experts (the others are -inf, as the LYNX lowering masks them), for n = K..E.
Beside it, a plain MatMul streams the same weight bytes (n experts' fc1 + fc2) for one token.
If the kernel were bound by weight reads, its time would grow like the MatMul's.

    python scripts/moe_kernel_scaling.py [--tokens 4] [--hidden 1024] [--inter 2048] [--experts 8]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


def _session(graph, threads: int) -> ort.InferenceSession:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _median_ms(session: ort.InferenceSession, feeds: dict, repeats: int) -> float:
    session.run(None, feeds)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--inter", type=int, default=2048)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    e, h, i, k, t = args.experts, args.hidden, args.inter, args.top_k, args.tokens
    rng = np.random.default_rng(0)
    fc1 = (rng.standard_normal((e, 2 * i, h)) * 0.02).astype(np.float32)
    fc2 = (rng.standard_normal((e, h, i)) * 0.02).astype(np.float32)
    expert_bytes = (fc1.nbytes + fc2.nbytes) // e

    moe = _session(
        helper.make_graph(
            [helper.make_node("MoE", ["x", "logits", "fc1", "", "fc2"], ["y"], domain="com.microsoft", k=k, activation_type="swiglu",
                              swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0, normalize_routing_weights=1)],
            "moe",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [t, h]), helper.make_tensor_value_info("logits", TensorProto.FLOAT, [t, e])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [t, h])],
            [numpy_helper.from_array(fc1, "fc1"), numpy_helper.from_array(fc2, "fc2")],
        ),
        args.threads,
    )
    x = rng.standard_normal((t, h)).astype(np.float32)
    print(f"ONNX Runtime {ort.__version__}, {args.threads} threads; E={e} K={k} H={h} I={i} fp32, T={t} tokens; "
          f"one expert = {expert_bytes / 1e6:.1f} MB")
    print(f"{'experts read':>12}  {'MoE ms':>8}  {'MoE GB/s':>8}  {'MatMul ms':>9}  {'MatMul GB/s':>11}")
    for n in range(k, e + 1):
        # Every token may use only experts 0..n-1, spread so that all n receive tokens.
        logits = np.full((t, e), -np.inf, dtype=np.float32)
        for row in range(t):
            for j in range(k):
                logits[row, (row * k + j) % n] = 1.0 - 0.1 * j
        moe_ms = _median_ms(moe, {"x": x, "logits": logits}, args.repeats)
        used = len({(row * k + j) % n for row in range(t) for j in range(k)})
        weight = (rng.standard_normal((h, used * 3 * i)) * 0.02).astype(np.float32)
        gemv = _session(
            helper.make_graph(
                [helper.make_node("MatMul", ["x", "w"], ["y"])],
                "gemv",
                [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, h])],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, used * 3 * i])],
                [numpy_helper.from_array(weight, "w")],
            ),
            args.threads,
        )
        mm_ms = _median_ms(gemv, {"x": x[:1]}, args.repeats)
        nbytes = used * expert_bytes
        print(f"{used:>12}  {moe_ms:>8.2f}  {nbytes / moe_ms / 1e6:>8.1f}  {mm_ms:>9.2f}  {weight.nbytes / mm_ms / 1e6:>11.1f}")


if __name__ == "__main__":
    main()
