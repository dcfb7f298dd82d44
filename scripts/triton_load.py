#!/usr/bin/env python3
"""Load test: a real Triton server serving the MoE with its own routing and with LYNX, side by side.

Builds the demo model twice (policy off and lynx), writes both Triton repositories, starts
Triton on 127.0.0.1 and drives each model with decode requests (batch 1, sequence 1, a KV cache
of --context) from N concurrent gRPC clients for --seconds per level. Prints throughput and
latency percentiles per model and concurrency level, and writes them as JSON.

    python scripts/triton_load.py [--concurrency 1,4,16] [--seconds 10] [--out engines/triton-load]
                                  [--builds OFF_DIR,LYNX_DIR]   # serve these builds instead of building the demo

Soak: `--soak SECONDS` instead runs both models at once (half the clients each, concurrency =
the largest level) for SECONDS, compares every 10th response of the own-routing model with
ONNX Runtime run directly (LYNX responses depend on their batch mates, so for them shape and
finiteness are checked), and samples the server's resident memory every second.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import threading
import time

import numpy as np


def _parse_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _rss_mb(pgid: int) -> float:
    """Resident memory of every process in a process group (the server and its backend stubs)."""
    total = 0
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # field 5 of stat: the process group
            total += int(fields[21]) * 4096  # field 24: resident pages
    return total / 1e6


def _drive(url: str, model: str, feeds: dict[str, np.ndarray], concurrency: int, seconds: float, check=None) -> dict:
    import tritonclient.grpc as grpcclient

    from lynx_export.serving.server import request_inputs

    latencies: list[float] = []
    failures = [0]
    mismatches = [0]
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def worker() -> None:
        request = request_inputs(grpcclient, feeds)
        mine, failed, wrong = [], 0, 0
        # Closed when done: an open connection would hold the server's shutdown for its exit timeout.
        with grpcclient.InferenceServerClient(url) as client:
            while time.monotonic() < deadline:
                start = time.perf_counter()
                try:
                    result = client.infer(model, request)
                except Exception:  # noqa: BLE001 - counted and reported
                    failed += 1
                    continue
                mine.append(time.perf_counter() - start)
                if check is not None and len(mine) % 10 == 1 and not check(result):
                    wrong += 1
        with lock:
            latencies.extend(mine)
            failures[0] += failed
            mismatches[0] += wrong

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    ms = np.array(latencies) * 1e3 if latencies else np.array([np.nan])
    return {
        "model": model,
        "concurrency": concurrency,
        "requests": len(latencies),
        "failed": failures[0],
        "wrong_outputs": mismatches[0],
        "seconds": elapsed,
        "throughput_rps": len(latencies) / elapsed,
        "latency_ms_p50": float(np.percentile(ms, 50)),
        "latency_ms_p90": float(np.percentile(ms, 90)),
        "latency_ms_p99": float(np.percentile(ms, 99)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", default="1,4,16", type=_parse_ints)
    parser.add_argument("--seconds", default=10.0, type=float, help="Duration of each (model, concurrency) level.")
    parser.add_argument("--context", default=32, type=int, help="KV cache length of each decode request.")
    parser.add_argument("--out", default=pathlib.Path("engines/triton-load"), type=pathlib.Path)
    parser.add_argument("--env", default=pathlib.Path(".venv-serve"), type=pathlib.Path, help="Triton serving environment.")
    parser.add_argument("--soak", default=0.0, type=float, help="Run a soak of this many seconds instead of the levels.")
    parser.add_argument("--builds", type=lambda text: [pathlib.Path(p) for p in text.split(",")],
                        help="OFF_DIR,LYNX_DIR: build folders of the demo with policy off and lynx, served instead of building the demo.")
    args = parser.parse_args()
    if args.builds is not None and len(args.builds) != 2:
        parser.error("--builds takes two folders, OFF_DIR,LYNX_DIR")

    from lynx_export.compiler.build import BuildOptions, PolicyChoice, build
    from lynx_export.evaluation.demo import export_demo_model
    from lynx_export.serving.repository import TritonOptions, write_repository
    from lynx_export.serving.server import TritonServer
    from lynx_export.compiler.verify import VerifyOptions

    work = args.out
    builds = args.builds
    if builds is None:
        source = export_demo_model(work / "source" / "model.onnx")
        verify = VerifyOptions(batch_sizes=(2,), seq_lens=(1, 3))
        builds = [build(source, work / policy, BuildOptions(PolicyChoice(policy), verify=verify, force=True)).out_dir for policy in ("off", "lynx")]
    repos = [write_repository(build_dir, work / f"repo-{policy}", TritonOptions(name=f"demo_{policy}", force=True)).repo
             for policy, build_dir in zip(("off", "lynx"), builds)]

    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(0, 256, (1, 1)).astype(np.int64)}
    for layer in range(2):
        for kind in ("key", "value"):
            feeds[f"past_{kind}.{layer}"] = rng.standard_normal((1, 4, args.context, 16)).astype(np.float32)

    rows = []
    with TritonServer(repos, args.env) as server:
        if args.soak:
            return _soak(server, repos, feeds, max(args.concurrency), args.soak, work)
        for concurrency in args.concurrency:
            for policy in ("off", "lynx"):  # side by side at each level
                row = _drive(server.grpc_url, f"demo_{policy}_cpu", feeds, concurrency, args.seconds)
                rows.append(row)
                print(f"{row['model']:<14} c={concurrency:<3} {row['throughput_rps']:8.1f} req/s  p50 {row['latency_ms_p50']:7.2f} ms  "
                      f"p90 {row['latency_ms_p90']:7.2f} ms  p99 {row['latency_ms_p99']:7.2f} ms  failed {row['failed']}", flush=True)
    (work / "load.json").write_text(json.dumps({"context": args.context, "seconds_per_level": args.seconds, "results": rows}, indent=2) + "\n")
    print(f"wrote {work / 'load.json'}")
    return 1 if any(r["failed"] for r in rows) else 0


def _soak(server, repos, feeds, concurrency: int, seconds: float, work: pathlib.Path) -> int:
    import onnxruntime as ort

    reference = ort.InferenceSession(str(repos[0] / "demo_off_cpu" / "1" / "model.ort.onnx"), providers=["CPUExecutionProvider"])
    expected = dict(zip([o.name for o in reference.get_outputs()], reference.run(None, feeds)))

    def same_as_ort(result) -> bool:
        return all(np.allclose(result.as_numpy(name), value, rtol=1e-5, atol=1e-5) for name, value in expected.items())

    def sane(result) -> bool:
        return all(np.isfinite(result.as_numpy(name)).all() and result.as_numpy(name).shape == value.shape for name, value in expected.items())

    memory: list[tuple[float, float]] = []
    done = threading.Event()
    start = time.monotonic()

    def sample() -> None:
        while not done.wait(1.0):
            memory.append((time.monotonic() - start, _rss_mb(server.process.pid)))

    sampler = threading.Thread(target=sample)
    sampler.start()
    rows: list[dict] = []
    half = max(1, concurrency // 2)
    drivers = [
        threading.Thread(target=lambda m=m, c=c: rows.append(_drive(server.grpc_url, m, feeds, half, seconds, c)))
        for m, c in (("demo_off_cpu", same_as_ort), ("demo_lynx_cpu", sane))
    ]
    memory.append((0.0, _rss_mb(server.process.pid)))
    for d in drivers:
        d.start()
    for d in drivers:
        d.join()
    done.set()
    sampler.join()
    rss = [m for _, m in memory]
    report = {"seconds": seconds, "concurrency": concurrency, "results": rows,
              "server_rss_mb": {"start": rss[0], "end": rss[-1], "max": max(rss), "samples": memory}}
    (work / "soak.json").write_text(json.dumps(report, indent=2) + "\n")
    for row in rows:
        print(f"{row['model']:<14} {row['requests']} requests, {row['failed']} failed, {row['wrong_outputs']} wrong of the sampled, "
              f"{row['throughput_rps']:.1f} req/s, p50 {row['latency_ms_p50']:.2f} ms, p99 {row['latency_ms_p99']:.2f} ms")
    print(f"server RSS: {rss[0]:.0f} MB at start, {rss[-1]:.0f} MB at the end, {max(rss):.0f} MB max ({len(rss)} samples)")
    print(f"wrote {work / 'soak.json'}")
    return 1 if any(r["failed"] or r["wrong_outputs"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
