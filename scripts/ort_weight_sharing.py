#!/usr/bin/env python3
"""Would ONNX Runtime's shared initializers let the benchmark's sessions share expert weights?

Opens SESSIONS sessions of one built model (`model.ort.onnx` of a `lynx-export build`) three
ways and prints the resident memory each adds: plain; with every large initializer passed as
one shared OrtValue (`SessionOptions.add_initializer`, numpy memory, no copy); shared and with
prepacking disabled (`session.disable_prepacking`). Then times one step at T rows with
prepacking on and off, since MatMul prepacks a private copy of its weights per session and the
Python API has no prepacked-weights container to share it.

    python scripts/ort_weight_sharing.py BUILD/model.ort.onnx [--sessions 3] [--rows 1,16]

The model's first input must be a [T, H] float tensor (a bare MoE stack, as tests/test_bench_model.py
builds); docs/BENCHMARKS.md records a run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

LARGE = 1 << 16  # initializers above 64 KiB are shared


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def _options(shared: dict[str, ort.OrtValue] | None, prepack: bool, threads: int | None = None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    for name, value in (shared or {}).items():
        options.add_initializer(name, value)
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    return options


MODES = {"plain": (False, True), "shared": (True, True), "shared, no prepacking": (True, False)}


def memory(path: str, sessions: int, mode: str) -> None:
    """One mode in this process: memory freed by an earlier mode would be reused and hide the cost."""
    share, prepack = MODES[mode]
    shared = None
    if share:
        model = onnx.load(path)
        arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        arrays = {name: a for name, a in arrays.items() if a.nbytes > LARGE}
        del model
        shared = {name: ort.OrtValue.ortvalue_from_numpy(a) for name, a in arrays.items()}
    base, held = _rss_mb(), []
    for _ in range(sessions):
        held.append(ort.InferenceSession(path, _options(shared, prepack), providers=["CPUExecutionProvider"]))
    print(f"{mode:24s} {sessions} sessions add {_rss_mb() - base:7.0f} MB" + (f" (beside {len(shared)} shared initializers)" if shared else ""))


def timing(path: str, rows: list[int], threads: int) -> None:
    for prepack in (True, False, True, False):  # interleaved, twice
        session = ort.InferenceSession(path, _options(None, prepack, threads), providers=["CPUExecutionProvider"])
        first = session.get_inputs()[0]
        cells = []
        for t in rows:
            feeds = {first.name: np.random.default_rng(0).standard_normal((t, first.shape[1])).astype(np.float32)}
            for _ in range(3):
                session.run(None, feeds)
            times = []
            for _ in range(15):
                start = time.perf_counter()
                session.run(None, feeds)
                times.append(time.perf_counter() - start)
            cells.append(f"T={t}: {1e3 * statistics.median(times):6.1f} ms")
        print(f"prepacking {'on ' if prepack else 'off'}  " + "  ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--sessions", type=int, default=3)
    parser.add_argument("--rows", default="1,16")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--mode", choices=list(MODES), help=argparse.SUPPRESS)  # one memory mode, in a child process
    args = parser.parse_args()
    if args.mode:
        memory(args.model, args.sessions, args.mode)
        return
    for mode in MODES:
        subprocess.run([sys.executable, __file__, args.model, "--sessions", str(args.sessions), "--mode", mode], check=True)
    timing(args.model, [int(x) for x in args.rows.split(",")], args.threads)


if __name__ == "__main__":
    main()
