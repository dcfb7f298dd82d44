#!/usr/bin/env python3
"""Where a decode step's time goes: ONNX Runtime's profiler, summed by op type.

Runs one model (for example a benchmark variant under engines/bench/) back to back on random
decode inputs (input_ids [B,1], KV cache of --context) and prints the mean time per op type.
Back-to-back runs leave part of the weights in the CPU's last-level cache, so the step time is
lower than in the interleaved benchmark; use it for the split between ops, not for speed.

    python scripts/profile_decode_step.py engines/bench/moe+lynx-per-expert/model.ort.onnx --batch 8
"""

from __future__ import annotations

import argparse
import collections
import json
import os

import numpy as np
import onnxruntime as ort


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--top", type=int, default=8)
    args = parser.parse_args()

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.enable_profiling = True
    options.log_severity_level = 3
    session = ort.InferenceSession(args.model, options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {}
    for value in session.get_inputs():
        if value.type == "tensor(int64)":
            feeds[value.name] = rng.integers(0, 2, (args.batch, 1))
        else:  # [B, heads, past, head_dim]
            feeds[value.name] = rng.standard_normal((args.batch, value.shape[1], args.context, value.shape[3])).astype(np.float32)
    for _ in range(args.runs):
        session.run(None, feeds)
    trace = session.end_profiling()
    with open(trace) as f:
        events = json.load(f)
    os.remove(trace)
    runs = [e["dur"] for e in events if e.get("cat") == "Session" and e["name"] == "model_run"]
    by_op: collections.Counter[str] = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by_op[e["args"]["op_name"]] += e["dur"]
    print(f"{args.model}: batch {args.batch}, context {args.context}, {args.threads} threads, {len(runs)} runs")
    print(f"  step: {np.mean(runs) / 1e3:.2f} ms (mean)")
    for op, total in by_op.most_common(args.top):
        print(f"  {op:<16} {total / len(runs) / 1e3:8.2f} ms")


if __name__ == "__main__":
    main()
