#!/usr/bin/env python3
"""What one expert costs in each expert implementation of the ONNX Runtime lowering.

One LynxMoE layer (SwiGLU, H x I experts, policy off) is lowered with each implementation and
precision, and timed on T tokens whose router logits allow exactly n experts (the others at
-inf, as LYNX masks them), for several n. Two numbers per implementation:

- cost per active expert: the slope of step time over n (least squares), beside what reading
  one expert's weights takes at the read bandwidth measured in the same run;
- cost per inactive expert: the same layer with E more experts that no token can reach, minus
  the layer without them, divided by E.

An implementation whose time follows the experts it reads has a near-zero inactive cost and an
active cost near bytes / bandwidth.

    python scripts/expert_costs.py [--experts 64] [--top-k 8] [--hidden 1024] [--inter 384] [--tokens 16] [--block-sizes 32]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from lynx_export.bench.benchmark import measure_read_bandwidth
from lynx_export.compiler.lowering.ort import lower
from lynx_export.compiler.quantize import QuantizeExpertsPass, QuantizeOptions
from lynx_export.op import contract as lynx_op
from lynx_export.op.spec import MoESpec
from lynx_export.routing import OffPolicy, RouterForm

FLOAT_IMPLS = ("fused", "per-expert")


def _layer(e: int, k: int, h: int, i: int, precision: str, block: int, impl: str, threads: int, rng: np.random.Generator) -> ort.InferenceSession:
    spec = MoESpec(num_experts=e, top_k=k, hidden_size=h, expert_size=i, activation="swiglu", router=RouterForm.SOFTMAX_TOPK, normalize=True)
    fc1 = (rng.standard_normal((e, 2 * i, h)) * 0.02).astype(np.float32)
    fc2 = (rng.standard_normal((e, h, i)) * 0.02).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node(lynx_op.OP_TYPE, ["x", "logits", "fc1", "", "fc2"], ["y"], name="moe", domain=lynx_op.DOMAIN,
                          **lynx_op.to_attributes(spec, OffPolicy()))],
        "moe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", h]), helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["T", e])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", h])],
        [numpy_helper.from_array(fc1, "fc1"), numpy_helper.from_array(fc2, "fc2")],
    )
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(lynx_op.DOMAIN, 1)]))
    if precision != "fp32":
        QuantizeExpertsPass(QuantizeOptions(precision, block))(model)
    proto = ir.to_proto(lower(model, impl).model)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _logits(t: int, k: int, n: int, e: int, rng: np.random.Generator) -> np.ndarray:
    """[T,E] logits allowing experts 0..n-1 only, spread so that all n receive tokens."""
    logits = np.full((t, e), -np.inf, dtype=np.float32)
    for row in range(t):
        for j in range(k):
            logits[row, (row * k + j) % n] = 1.0 - 0.1 * j + 0.01 * rng.random()
    return logits


def _median_ms(session: ort.InferenceSession, feeds: list[dict], repeats: int) -> float:
    for f in feeds:
        session.run(None, f)
    times = []
    for _ in range(repeats):
        for f in feeds:
            start = time.perf_counter()
            session.run(None, f)
            times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--inter", type=int, default=384)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--block-sizes", default="32", help="quantization block sizes of the int4/int8 rows (comma-separated)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args()
    e, k, h, i, t = args.experts, args.top_k, args.hidden, args.inter, args.tokens
    rng = np.random.default_rng(0)
    bandwidth = measure_read_bandwidth(args.threads)
    counts = sorted({n for n in (k, e // 4, e // 2, 3 * e // 4, e) if k <= n <= min(e, t * k)})
    x = [{"x": rng.standard_normal((t, h)).astype(np.float32)} for _ in range(3)]
    blocks = [int(b) for b in args.block_sizes.split(",")]
    variants = [("fp32", impl, 0) for impl in FLOAT_IMPLS] + [(p, "per-expert", b) for p in ("int8", "int4") for b in blocks]
    rows = []
    for precision, impl, block in variants:
        # Packed weights plus one float32 scale per block.
        expert_bytes = 3 * h * i * {"fp32": 4, "int8": 1, "int4": 0.5}[precision] + (3 * h * i // block * 4 if block else 0)
        session = _layer(e, k, h, i, precision, block, impl, args.threads, rng)
        wide = _layer(2 * e, k, h, i, precision, block, impl, args.threads, rng)
        ms = [_median_ms(session, [{**f, "logits": _logits(t, k, n, e, rng)} for f in x], args.repeats) for n in counts]
        slope = float(np.polyfit(counts, ms, 1)[0])
        n_mid = counts[len(counts) // 2]
        narrow_ms = ms[len(counts) // 2]
        wide_ms = _median_ms(wide, [{**f, "logits": _logits(t, k, n_mid, 2 * e, rng)} for f in x], args.repeats)
        rows.append({
            "precision": precision, "impl": impl, "block_size": block or None, "ms_by_active": dict(zip(counts, ms)),
            "active_us": 1e3 * slope, "inactive_us": 1e3 * (wide_ms - narrow_ms) / e,
            "read_us": 1e6 * expert_bytes / bandwidth, "expert_bytes": expert_bytes,
        })
        del session, wide
    result = {"onnxruntime": ort.__version__, "threads": args.threads, "read_bandwidth_gb_s": bandwidth / 1e9,
              "shape": {"E": e, "K": k, "H": h, "I": i, "T": t}, "rows": rows}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"ONNX Runtime {ort.__version__}, {args.threads} threads, read bandwidth {bandwidth / 1e9:.1f} GB/s; "
          f"one layer E={e} K={k} H={h} I={i}, T={t} tokens")
    print(f"{'precision':9}  {'impl':11}  {'block':>5}  {'per active us':>13}  {'bytes/bw us':>11}  {'per inactive us':>15}  ms at n = {', '.join(map(str, counts))}")
    for r in rows:
        print(f"{r['precision']:9}  {r['impl']:11}  {r['block_size'] or '-':>5}  {r['active_us']:13.1f}  {r['read_us']:11.1f}  {r['inactive_us']:15.1f}  "
              + ", ".join(f"{v:.2f}" for v in r["ms_by_active"].values()))


if __name__ == "__main__":
    main()
