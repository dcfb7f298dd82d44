"""Decode-step time of a generate model's scheduler against its cache slots' length (docs/SERVING.md).

GroupQueryAttention on CPU, bound to a shared past/present buffer, costs with the buffer's length:
this times the median decode step of one request (a 128-token prompt, 48 tokens) through
`serving.scheduler` at each slot length, offline, on a compiled model in onnxruntime-genai's form:

    .venv/bin/python scripts/slot_length_step.py engines/bench-serve-fine/moe/model.ort.onnx --lengths 256,2048,256 --slots 1,64
"""

from __future__ import annotations

import argparse

import numpy as np

from lynx_export.serving.scheduler import Layout, Request, Scheduler, open_session


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--lengths", default="256,2048")
    parser.add_argument("--slots", default="1", help="comma-separated slot counts (the buffer's first axis)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    session = open_session(args.model, threads=args.threads)
    layout = Layout.read(session)
    for length, slots in ((int(x), int(y)) for x in args.lengths.split(",") for y in args.slots.split(",")):
        steps = []
        scheduler = Scheduler(session, layout, slots=slots, max_length=length, on_step=steps.append)
        scheduler.submit(Request(prompt=list(range(128)), emit=lambda *a: None, max_tokens=48))
        while not scheduler.idle():
            scheduler.step()
        decode = [s.decode_s for s in steps if s.batch][8:]  # after the first steps' allocations
        print(f"{slots} slots of {length} rows: median decode step {np.median(decode) * 1e3:.2f} ms over {len(decode)} steps")


if __name__ == "__main__":
    main()
