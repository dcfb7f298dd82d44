#!/usr/bin/env python3
"""How ONNX Runtime's CPU MoE kernel's time scales with the number of experts it must read.

One MoE layer (fp32, SwiGLU, H x I experts) runs T tokens whose router logits allow exactly n
experts (the others are -inf, as the LYNX lowering masks them), for n = K..E, in both expert
implementations of lynx-export's ONNX Runtime lowering: `fused` (the `com.microsoft.MoE`
kernel) and `per-expert` (one MatMul chain per expert over its rows). Beside them, a plain MatMul streams the same
weight bytes (n experts' fc1 + fc2) for one token. A layer bound by weight reads would grow
like the MatMul as n grows.

    python scripts/moe_kernel_scaling.py [--tokens 4] [--hidden 1024] [--inter 2048] [--experts 8]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from lynx_export.op import contract as lynx_op
from lynx_export.compiler.lowering.ort import lower
from lynx_export.routing import OffPolicy, RouterForm
from lynx_export.op.spec import MoESpec


def _session(graph, threads: int, experts: str | None = None) -> ort.InferenceSession:
    """A session for `graph`; with `experts`, the graph's LynxMoE node is lowered that way first."""
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid(lynx_op.DOMAIN if experts else "com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    if experts:
        model = ir.to_proto(lower(ir.from_proto(model), experts).model)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
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

    spec = MoESpec(num_experts=e, top_k=k, hidden_size=h, expert_size=i, activation="swiglu", router=RouterForm.SOFTMAX_TOPK, normalize=True)
    layer = helper.make_graph(
        [helper.make_node(lynx_op.OP_TYPE, ["x", "logits", "fc1", "", "fc2"], ["y"], name="moe", domain=lynx_op.DOMAIN,
                          **lynx_op.to_attributes(spec, OffPolicy()))],
        "moe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [t, h]), helper.make_tensor_value_info("logits", TensorProto.FLOAT, [t, e])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [t, h])],
        [numpy_helper.from_array(fc1, "fc1"), numpy_helper.from_array(fc2, "fc2")],
    )
    impls = {name: _session(layer, args.threads, name) for name in ("fused", "per-expert")}
    x = rng.standard_normal((t, h)).astype(np.float32)
    print(f"ONNX Runtime {ort.__version__}, {args.threads} threads; E={e} K={k} H={h} I={i} fp32, T={t} tokens; "
          f"one expert = {expert_bytes / 1e6:.1f} MB")
    print(f"{'experts read':>12}  {'fused ms':>8}  {'GB/s':>5}  {'per-expert ms':>14}  {'GB/s':>5}  {'MatMul ms':>9}  {'GB/s':>5}")
    seen: set[int] = set()
    for n in range(k, e + 1):
        # Every token may use only experts 0..n-1, spread so that all n receive tokens.
        logits = np.full((t, e), -np.inf, dtype=np.float32)
        for row in range(t):
            for j in range(k):
                logits[row, (row * k + j) % n] = 1.0 - 0.1 * j
        used = len({(row * k + j) % n for row in range(t) for j in range(k)})
        if used in seen:
            continue  # fewer tokens than experts: a larger n reaches no further expert
        seen.add(used)
        ms = {name: _median_ms(sess, {"x": x, "logits": logits}, args.repeats) for name, sess in impls.items()}
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
        fused, cond = ms["fused"], ms["per-expert"]
        print(f"{used:>12}  {fused:>8.2f}  {nbytes / fused / 1e6:>5.1f}  {cond:>14.2f}  {nbytes / cond / 1e6:>5.1f}  "
              f"{mm_ms:>9.2f}  {weight.nbytes / mm_ms / 1e6:>5.1f}")


if __name__ == "__main__":
    main()
