"""What the machine offers a decode step: its caches and memory, read from the OS, and its read
bandwidth and kernel peak rates, measured in the benchmark's own run."""

from __future__ import annotations

import os
import pathlib
import platform
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["CacheInfo", "MachineRates", "last_level_cache", "mem_available", "resident_bytes", "machine_info", "measure_read_bandwidth",
           "measure_peak_flops", "measure_peak_nbits_flops", "measure_rates"]

FP32 = 4
SYS_CPU = pathlib.Path("/sys/devices/system/cpu")
# Where no cache size can be read: larger than any last-level cache seen on these machines (480
# MiB), so a preset scaled to it still streams its experts from memory.
ASSUMED_LLC = 512 << 20


@dataclass(frozen=True)
class CacheInfo:
    """The last-level cache: one instance's size and how many instances serve this process's CPUs."""

    level: int
    size_bytes: int  # one instance
    instances: int  # distinct instances across the CPUs this process may run on
    source: str  # where it was read

    @property
    def total_bytes(self) -> int:
        return self.size_bytes * self.instances

    def to_dict(self) -> dict[str, Any]:
        return {"level": self.level, "size_bytes": self.size_bytes, "instances": self.instances, "total_bytes": self.total_bytes,
                "source": self.source}


def _size(text: str) -> int:
    """sysfs / cpuinfo sizes: '32768K', '1M', '512 KB'."""
    text = text.strip().upper().removesuffix("B").strip()
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(text.rstrip("KMG").strip()) * scale


def _cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def last_level_cache(root: pathlib.Path = SYS_CPU, cpuinfo: pathlib.Path = pathlib.Path("/proc/cpuinfo")) -> CacheInfo:
    """The highest-level data or unified cache of cpu0 (sysfs), counted once per instance among
    this process's CPUs; else /proc/cpuinfo's `cache size`; else ASSUMED_LLC."""
    best: tuple[int, int, str] | None = None  # (level, bytes, index folder name)
    for index in sorted((root / "cpu0" / "cache").glob("index*")):
        try:
            level, kind, size = ((index / f).read_text().strip() for f in ("level", "type", "size"))
        except OSError:
            continue
        if kind != "Instruction" and (best is None or int(level) > best[0]):
            best = (int(level), _size(size), index.name)
    if best is not None:
        level, size, name = best
        shared = set()
        for cpu in _cpus():
            try:
                shared.add((root / f"cpu{cpu}" / "cache" / name / "shared_cpu_list").read_text().strip())
            except OSError:
                continue
        return CacheInfo(level, size, max(1, len(shared)), str(root / "cpu0" / "cache" / name))
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("cache size"):
                return CacheInfo(0, _size(line.split(":", 1)[1]), 1, f"{cpuinfo} cache size")
    except (OSError, ValueError):
        pass
    return CacheInfo(0, ASSUMED_LLC, 1, "assumed: no cache size readable")


def mem_available(meminfo: pathlib.Path = pathlib.Path("/proc/meminfo")) -> int | None:
    """MemAvailable in bytes, None where the kernel does not say."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return _size(line.split(":", 1)[1])
    except (OSError, ValueError):
        pass
    return None


def resident_bytes(statm: pathlib.Path = pathlib.Path("/proc/self/statm")) -> int | None:
    """This process's resident memory in bytes, None where the kernel does not say."""
    try:
        return int(statm.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def machine_info(threads: int) -> dict[str, Any]:
    """CPU, caches, memory and software versions, for results.json."""
    cpu = platform.processor() or ""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import onnxruntime

    cache = SYS_CPU / "cpu0" / "cache"
    caches = {}
    for index in sorted(cache.glob("index*")) if cache.exists() else []:
        try:
            level, kind, size = ((index / f).read_text().strip() for f in ("level", "type", "size"))
        except OSError:
            continue
        if kind != "Instruction":
            caches[f"L{level}"] = size
    return {
        "cpu": cpu,
        "caches_per_instance": caches,
        "llc": last_level_cache().to_dict(),
        "mem_available_bytes": mem_available(),
        "logical_cpus": os.cpu_count(),
        "threads": threads,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
    }


# -- measured rates ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class MachineRates:
    """Read bandwidth (bytes/s) and the peak FLOP/s of each kernel that runs weights: fp32 MatMul,
    and MatMulNBits per weight width."""

    read_bandwidth: float
    peak_flops: float  # ONNX Runtime's fp32 MatMul
    nbits_peak_flops: Mapping[int, float] = field(default_factory=dict)  # MatMulNBits, by weight bits

    def peak(self, bits: int) -> float:
        """The peak of the kernel that runs `bits`-wide weights (32: fp32 MatMul)."""
        return self.peak_flops if bits == 32 else self.nbits_peak_flops[bits]


def measure_read_bandwidth(threads: int, nbytes: int = 1 << 30, rounds: int = 5) -> float:
    """Bytes/s that `threads` threads read from memory (numpy sums over disjoint chunks)."""
    data = np.ones(nbytes // FP32, dtype=np.float32)
    chunks = np.array_split(data, threads)
    best = float("inf")
    for _ in range(rounds):
        workers = [threading.Thread(target=np.sum, args=(c,)) for c in chunks]
        start = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = min(best, time.perf_counter() - start)
    return data.nbytes / best


def _best_time(path: pathlib.Path, feeds: dict[str, np.ndarray], threads: int, rounds: int) -> float:
    from lynx_export.backends.ort import OrtRunner

    with OrtRunner(str(path), threads=threads) as runner:
        runner.infer(feeds)
        best = float("inf")
        for _ in range(rounds):
            runner.infer(feeds)
            best = min(best, runner.last_inference_s)
    return best


def measure_peak_flops(threads: int, folder: pathlib.Path, m: int = 256, k: int = 2048, n: int = 2048, rounds: int = 10) -> float:
    """FLOP/s of ONNX Runtime's fp32 MatMul [m,k] x [k,n] (constant weight), best of `rounds`."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "peak",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
        [weight],
    )
    path = folder / "peak_matmul.onnx"
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString())
    feeds = {"x": rng.standard_normal((m, k)).astype(np.float32)}
    return 2.0 * m * k * n / _best_time(path, feeds, threads, rounds)


def measure_peak_nbits_flops(bits: int, threads: int, folder: pathlib.Path, block_size: int = 32, m: int = 256, k: int = 2048,
                             n: int = 2048, rounds: int = 10) -> float:
    """FLOP/s of MatMulNBits [m,k] x [k,n] with `bits`-wide block-quantized weights at the lowering's
    accuracy level (the kernel that runs quantized experts), best of `rounds`."""
    import onnx_ir as ir

    from lynx_export.compiler.graph_builder import GraphBuilder
    from lynx_export.compiler.lowering.experts import MS_DOMAIN, projection
    from lynx_export.op.quantization import quantize_blockwise

    rng = np.random.default_rng(0)
    b = GraphBuilder("peak")
    x = ir.Value(name="x", shape=ir.Shape([m, k]), type=ir.TensorType(ir.DataType.FLOAT))
    y = projection(b, x, quantize_blockwise(rng.standard_normal((n, k)).astype(np.float32), bits, block_size), "w")
    y.name = "y"
    graph = ir.Graph([x], [y], nodes=b.tape.nodes, initializers=b.tape.initializers, opset_imports={"": 18, MS_DOMAIN: 1}, name="peak")
    path = folder / f"peak_matmulnbits_{bits}.onnx"
    ir.save(ir.Model(graph, ir_version=10), path)
    feeds = {"x": rng.standard_normal((m, k)).astype(np.float32)}
    return 2.0 * m * k * n / _best_time(path, feeds, threads, rounds)


def measure_rates(threads: int, bits: tuple[int, ...] = (), bandwidth_bytes: int = 1 << 30, block_size: int = 32,
                  rounds: int = 10) -> MachineRates:
    """All rates of one run: fp32 MatMul peak, MatMulNBits peak per width in `bits`, read bandwidth."""
    with tempfile.TemporaryDirectory(prefix="lynx-bench-") as tmp:
        folder = pathlib.Path(tmp)
        peak = measure_peak_flops(threads, folder, rounds=rounds)
        nbits = {b: measure_peak_nbits_flops(b, threads, folder, block_size, rounds=rounds) for b in sorted(set(bits))}
    return MachineRates(measure_read_bandwidth(threads, bandwidth_bytes), peak, nbits)
