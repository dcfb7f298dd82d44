"""The core library's host code on a machine with no GPU: its C API over a fake CUDA runtime.

liblynx_moe_fake_cuda.so is the nvcc-built object of src/lynx_moe.cu linked to
plugins/lynx_moe/test/fake_cuda_runtime.cpp instead of libcudart: every launch is recorded
(kernel, grid, block, shared memory, stream) and refused as CUDA would refuse a bad configuration,
and CUDA errors can be injected. So these tests see which kernels a call launches (the default
ones, the lynx_kernels_t variants, the vectorised or scalar GEMV), and what the C API does with
CUDA errors: a stale error left by someone else, a failing launch, a failing memset.
Pointers are fake addresses; nothing is dereferenced. Last, the one piece of a new kernel's
arithmetic that is host code too (the popularity table's lookup) runs on the host.
"""

from __future__ import annotations

import ctypes
import dataclasses
import re
import subprocess

import pytest

from lynx_export.backends import lynx_moe_lib
from lynx_export.backends.lynx_moe_lib import DType, Kernels
from lynx_export.errors import RunError
from tests.test_plugin_build import PLUGIN, core_build, require_nvcc

# cudaError_t values (driver_types.h).
INVALID_VALUE, ILLEGAL_ADDRESS, NO_DEVICE = 1, 700, 100


@dataclasses.dataclass(frozen=True)
class Launch:
    kernel: str  # unqualified name, "expert_gemv"
    template: tuple[str, ...]  # template arguments, ("(lynx::Epilogue)0", "8", "float", "__nv_bfloat16")
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    shared: int
    stream: int


class FakeCuda:
    """ctypes face of fake_cuda_runtime.cpp's control functions."""

    def __init__(self, path) -> None:
        self.lib = ctypes.CDLL(str(path))
        self.lib.lynx_fake_launch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.POINTER(ctypes.c_uint),
                                              ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_void_p)]

    def reset(self) -> None:
        self.lib.lynx_fake_reset()

    def set_pending(self, error: int) -> None:
        self.lib.lynx_fake_set_pending(error)

    def pending(self) -> int:
        return self.lib.lynx_fake_pending()

    def fail_launch(self, index: int, error: int) -> None:
        self.lib.lynx_fake_fail_launch(index, error)

    def fail_memset(self, error: int) -> None:
        self.lib.lynx_fake_fail_memset(error)

    def launches(self) -> list[Launch]:
        out = []
        for i in range(self.lib.lynx_fake_launch_count()):
            name, dims = ctypes.create_string_buffer(1024), (ctypes.c_uint * 6)()
            shared, stream = ctypes.c_size_t(), ctypes.c_void_p()
            assert self.lib.lynx_fake_launch(i, name, 1024, dims, ctypes.byref(shared), ctypes.byref(stream)) == 0
            match = re.match(r"(?:void )?lynx::(\w+)(?:<(.*?)>)?\(", name.value.decode())
            assert match, name.value
            template = tuple(a.strip() for a in match.group(2).split(",")) if match.group(2) else ()
            out.append(Launch(match.group(1), template, tuple(dims[:3]), tuple(dims[3:]), shared.value, stream.value or 0))
        return out


@pytest.fixture(scope="module")
def fake() -> tuple[lynx_moe_lib.CoreLibrary, FakeCuda]:
    path = core_build() / "liblynx_moe_fake_cuda.so"
    return lynx_moe_lib.CoreLibrary(path), FakeCuda(path)


def params(policy: str = "lynx", experts: int = 8, top_k: int = 2, hidden: int = 64, inner: int = 96, act: DType = DType.BFLOAT16,
           weight: DType = DType.BFLOAT16, kernels: Kernels = Kernels.DEFAULT, **extra) -> lynx_moe_lib.Params:
    attrs = {"num_experts": experts, "top_k": top_k, "hidden_size": hidden, "expert_size": inner, "activation": "swiglu", "router": "softmax_topk",
             "normalize": 1, "policy": policy, "alpha": 3.0 if policy == "lynx" else 0.0, "beta": 1, "budget": 0, "tie_break": "logit", **extra}
    return lynx_moe_lib.params_from_attributes(attrs, act, weight, kernels)


MiB = 1 << 20


def tensors(**overrides: int) -> lynx_moe_lib.Tensors:
    """Fake device addresses, 256-byte aligned as TensorRT's and torch's allocations are."""
    values = {name: (i + 1) * 64 * MiB for i, name in enumerate(lynx_moe_lib.contract.C_TENSORS)}
    return lynx_moe_lib.Tensors(**{**values, **overrides})


WORKSPACE = 1 << 40  # an address; the size passed is what the call needs


def enqueue(core: lynx_moe_lib.CoreLibrary, fake: FakeCuda, p: lynx_moe_lib.Params, tokens: int, stream: int = 0x5000, **overrides: int) -> list[Launch]:
    fake.reset()
    core.enqueue(p, tokens, tensors(**overrides), WORKSPACE, core.workspace_size(p, tokens), stream)
    return fake.launches()


def names(launches: list[Launch]) -> list[str]:
    return [launch.kernel for launch in launches]


# --- CUDA errors ---------------------------------------------------------------------------------------


def test_a_stale_error_from_someone_else_is_not_this_calls(fake):
    core, cuda = fake
    cuda.reset()
    cuda.set_pending(INVALID_VALUE)  # left by another library, never read
    core.enqueue(params(), 4, tensors(), WORKSPACE, core.workspace_size(params(), 4), 0)
    assert cuda.lib.lynx_fake_launch_count() > 5 and cuda.pending() == 0


def test_a_failed_launch_is_reported_once_with_its_cause(fake):
    core, cuda = fake
    p = params()
    cuda.reset()
    cuda.fail_launch(3, ILLEGAL_ADDRESS)
    with pytest.raises(RunError, match=r"lynx_moe_enqueue failed: CUDA error \(cudaErrorIllegalAddress: injected by the fake CUDA runtime\)"):
        core.enqueue(p, 4, tensors(), WORKSPACE, core.workspace_size(p, 4), 0)
    assert cuda.pending() == 0  # read and cleared: the next call does not inherit it
    assert len(enqueue(core, cuda, p, 4)) > 5


def test_a_failed_memset_stops_the_call(fake):
    core, cuda = fake
    p = params()
    cuda.reset()
    cuda.fail_memset(NO_DEVICE)
    with pytest.raises(RunError, match="cudaErrorNoDevice"):
        core.enqueue(p, 4, tensors(), WORKSPACE, core.workspace_size(p, 4), 0)
    launched = names(cuda.launches())
    assert "route_tokens" in launched and "count_pairs" not in launched  # routing ran, then the call stopped
    cuda.reset()


def test_refused_calls_launch_nothing(fake):
    core, cuda = fake
    p = params()
    cuda.reset()
    with pytest.raises(RunError, match="workspace too small"):
        core.enqueue(p, 4, tensors(), WORKSPACE, core.workspace_size(p, 4) - 1, 0)
    with pytest.raises(RunError, match="invalid argument"):
        core.enqueue(p, 4, tensors(fc1=0), WORKSPACE, core.workspace_size(p, 4), 0)
    assert enqueue(core, cuda, p, 0) == []  # no tokens: nothing to launch
    bad = params()
    bad.kernels = 16
    assert not core.check_params(bad) and core.workspace_size(bad, 4) == 0


def test_the_stream_and_the_launch_configurations_pass_through(fake):
    core, cuda = fake
    for p, tokens in ((params(), 4), (params(experts=256, top_k=8), 256), (params(experts=64, top_k=16), 33),
                      (params(experts=1024, top_k=32, policy="budget", budget=64), 7)):
        launched = enqueue(core, cuda, p, tokens, stream=0xBEEF)  # the fake refuses configurations CUDA would
        assert launched and {launch.stream for launch in launched} == {0xBEEF}
        route = next(launch for launch in launched if launch.kernel == "route_tokens")
        assert route.grid[0] == -(-tokens // 4) and route.shared <= 48 * 1024
        combine = launched[-1]
        assert combine.kernel == "combine" and combine.grid[0] == -(-tokens * p.hidden_size // 256)


# --- which kernels run -------------------------------------------------------------------------------


def test_the_default_kernels(fake):
    core, cuda = fake
    launched = enqueue(core, cuda, params(), 40)  # 80 pairs over 8 experts: GEMV and GEMM both possible
    assert names(launched) == ["init_selection", "lynx_row_max", "lynx_popularity", "lynx_pick", "route_tokens", "count_pairs", "scan_counts",
                               "place_pairs", "expert_gemv", "expert_gemm", "expert_gemv", "expert_gemm", "combine"]
    gemv = [launch for launch in launched if launch.kernel == "expert_gemv"]
    assert [g.template[1] for g in gemv] == ["8", "8"]  # 16-byte vectors of bf16 weights, both projections


def test_every_variant_selected(fake):
    core, cuda = fake
    launched = enqueue(core, cuda, params(kernels=Kernels.ALL), 40)
    assert names(launched) == ["init_selection", "lynx_row_max", "lynx_popularity_table", "lynx_pick", "route_tokens", "count_pairs",
                               "scan_counts_parallel", "place_pairs",
                               "expert_gemv", "expert_gemv_one_pass", "expert_gemv_one_pass", "expert_gemm_tc",
                               "expert_gemv", "expert_gemv_one_pass", "expert_gemv_one_pass", "expert_gemm_tc", "combine"]
    popularity = launched[2]
    assert popularity.grid == (8, 1, 1) and popularity.block == (256, 1, 1)  # a block per expert
    scan = launched[6]
    assert scan.grid == (1, 1, 1) and scan.block == (32, 1, 1)
    one_pass = [launch.template[2] for launch in launched if launch.kernel == "expert_gemv_one_pass"]
    assert one_pass == ["16", "32", "16", "32"]
    tc = next(launch for launch in launched if launch.kernel == "expert_gemm_tc")
    assert tc.grid == (-(-2 * 96 // 128), 8, 2) and tc.block == (256, 1, 1)  # fc1: 2I outputs in 128-wide tiles, 80 pairs in 64-row tiles


@pytest.mark.parametrize("experts,block", [(8, 32), (33, 64), (256, 256), (1000, 1024), (1024, 1024)])
def test_the_parallel_scan_has_a_thread_per_expert(fake, experts, block):
    core, cuda = fake
    launched = enqueue(core, cuda, params(policy="off", experts=experts, kernels=Kernels.PARALLEL_SCAN), 3)
    scan = next(launch for launch in launched if launch.kernel == "scan_counts_parallel")
    assert scan.block == (block, 1, 1)


@pytest.mark.parametrize("tokens,expected", [(4, []), (5, ["16"]), (8, ["16"]), (9, ["16", "32"]), (256, ["16", "32"])])
def test_one_pass_gemv_launches_only_what_some_expert_can_reach(fake, tokens, expected):
    """An expert holds at most T*K rows: the 9..16 and 17..32 row kernels start only when that allows them."""
    core, cuda = fake
    launched = enqueue(core, cuda, params(policy="off", kernels=Kernels.GEMV_ONE_PASS), tokens)
    assert [launch.template[2] for launch in launched if launch.kernel == "expert_gemv_one_pass"] == expected * 2  # fc1, fc2


def test_fp32_weights_keep_the_default_expert_kernels(fake):
    core, cuda = fake
    launched = enqueue(core, cuda, params(act=DType.FLOAT32, weight=DType.FLOAT32, kernels=Kernels.ALL), 40)
    assert "expert_gemv_one_pass" not in names(launched) and "expert_gemm_tc" not in names(launched)
    assert "expert_gemm" in names(launched) and "scan_counts_parallel" in names(launched)


# --- vector loads ----------------------------------------------------------------------------------------


def _gemv_vectors(launched: list[Launch]) -> list[str]:
    return [launch.template[1] for launch in launched if launch.kernel == "expert_gemv"]


def test_vector_loads_need_an_aligned_base_pointer(fake):
    """A weight tensor may be a view at any element offset: 16-byte loads only from 16-byte aligned bases."""
    core, cuda = fake
    p = params()
    assert _gemv_vectors(enqueue(core, cuda, p, 2)) == ["8", "8"]
    shifted = tensors().fc1 + 2  # one bf16 element in
    assert _gemv_vectors(enqueue(core, cuda, p, 2, fc1=shifted)) == ["1", "8"]
    assert _gemv_vectors(enqueue(core, cuda, p, 2, fc2=tensors().fc2 + 8)) == ["8", "1"]
    assert _gemv_vectors(enqueue(core, cuda, p, 2, fc2=tensors().fc2 + 16)) == ["8", "8"]


@pytest.mark.parametrize("hidden,inner,expected", [(200, 136, ["8", "8"]), (203, 136, ["1", "8"]), (64, 100, ["8", "1"]), (33, 99, ["1", "1"])])
def test_vector_loads_need_the_depth_to_divide(fake, hidden, inner, expected):
    """fc1 dots over H, fc2 over I: each takes 8-wide bf16 vectors only when its depth is a multiple of 8
    (H 200 and I 136 both are, so that shape alone never takes the unvectorised path)."""
    core, cuda = fake
    assert _gemv_vectors(enqueue(core, cuda, params(hidden=hidden, inner=inner), 3)) == expected


# --- numerics that run on the host ---------------------------------------------------------------


def test_the_popularity_table_equals_pow_bit_for_bit(tmp_path):
    """LYNX_KERNEL_POPULARITY_TABLE's lookup is host code too (test/routing_host_test.cu): for every kind
    of bin it returns pow's value, so the variant's popularity sums, and its routing, equal the default's."""
    exe = tmp_path / "routing_host_test"
    build = subprocess.run([require_nvcc(), "-std=c++17", "-O1", "-gencode", "arch=compute_80,code=sm_80", "-I", str(PLUGIN / "src"),
                            "-I", str(PLUGIN / "include"), str(PLUGIN / "test" / "routing_host_test.cu"), "-o", str(exe)],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "routing_host_test: ok", r.stdout
