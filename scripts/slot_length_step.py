"""One request through a generate model's scheduler, offline: its decode step and its rate (docs/SERVING.md).

GroupQueryAttention on CPU, bound to a shared past/present buffer, costs with the buffer's rows
(the scheduler keeps them to what the longest request needs, up to the slot length). This times
`--requests` requests submitted together (`--prompt` tokens each, then `--tokens` answered: the
decode batch is their number) through `serving.scheduler` at each slot length and slot count, on
a compiled model in onnxruntime-genai's form: the median decode step, and output tokens per
second over the whole run (prefills included), the rate a server running the same scheduler could
reach at that concurrency with no serving overhead and no client on the machine:

    .venv/bin/python scripts/slot_length_step.py engines/bench-serve-fine/moe/model.ort.onnx --lengths 256,2048,256 --slots 1,64
    .venv/bin/python scripts/slot_length_step.py engines/bs-fine-fp32/moe/model.ort.onnx --lengths 768 --slots 64 --prompt 256 --tokens 256 --requests 1,16
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from lynx_export.serving.scheduler import Layout, Request, Scheduler, open_session


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--lengths", default="256,2048")
    parser.add_argument("--slots", default="1", help="comma-separated slot counts (the buffer's first axis)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    parser.add_argument("--tokens", type=int, default=48, help="tokens answered")
    parser.add_argument("--requests", default="1", help="comma-separated counts of requests submitted together (the decode batch)")
    args = parser.parse_args()
    session = open_session(args.model, threads=args.threads)
    layout = Layout.read(session)
    runs = ((int(x), int(y), int(n)) for x in args.lengths.split(",") for y in args.slots.split(",") for n in args.requests.split(","))
    for length, slots, requests in runs:
        steps = []
        scheduler = Scheduler(session, layout, slots=max(slots, requests), max_length=length, on_step=steps.append)
        for r in range(requests):
            scheduler.submit(Request(prompt=[(t + r) % layout.vocab_size for t in range(args.prompt)], emit=lambda *a: None,
                                     max_tokens=args.tokens, min_length=args.tokens))
        start = time.perf_counter()
        while not scheduler.idle():
            scheduler.step()
        seconds = time.perf_counter() - start
        decode = [s.decode_s for s in steps if s.batch][8:]  # after the first steps' allocations
        print(f"{requests} request(s), {max(slots, requests)} slots of {length} rows: median decode step {np.median(decode) * 1e3:.2f} ms "
              f"over {len(decode)} steps; {requests * args.tokens / seconds:.1f} output tokens/s over the requests ({args.prompt}-token "
              f"prompts, prefill {sum(s.prefill_s for s in steps) * 1e3:.0f} ms)")


if __name__ == "__main__":
    main()
