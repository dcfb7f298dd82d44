"""Building plugins/lynx_moe: the core library (nvcc, sm_80 and sm_90), the fake-runtime twin the
host tests use, and the C++ TensorRT plugin from TensorRT's headers alone (CMake, no libnvinfer).

These builds need nvcc and TensorRT's headers (the kernel-lens wheel pinned in
plugins/lynx_moe/tensorrt-headers.txt, which `make test` installs): without them the tests
fail rather than skip, since CI must prove that both halves compile.

The nvcc compile is the slow step (about a minute per architecture on two cores). `core_build`
and `cmake_plugin` run once per version of their inputs (every file the build reads, the nvcc and
cmake versions), through the tests' shared artefact cache (tests/artifacts.py: content-keyed,
locked, written atomically), and the other test modules (test_plugin_core, test_plugin_cpp,
test_plugin_python, test_gpu_check, test_tensorrt) take their libraries from here.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import shutil
import subprocess

import pytest

from tests.artifacts import cached, sources

ROOT = pathlib.Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "plugins" / "lynx_moe"
_BUILD_INPUTS = ("Makefile", "include/*.h", "src/*.cu", "src/*.cuh", "test/fake_cuda_runtime.cpp")
_CMAKE_INPUTS = ("CMakeLists.txt", "include/*.h", "trt/*")


def require_nvcc() -> str:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.fail("nvcc (the CUDA toolkit) is required: CI compiles the LynxMoE kernels and the C++ plugin")
    return nvcc


def tensorrt_headers() -> pathlib.Path:
    """TensorRT's headers from the kernel-lens wheel (pinned in plugins/lynx_moe/tensorrt-headers.txt)."""
    spec = importlib.util.find_spec("kernel_lens")  # the folder only: importing kernel_lens needs triton
    folder = pathlib.Path(next(iter(spec.submodule_search_locations))) / "include" / "tensorrt" if spec and spec.submodule_search_locations else None
    if folder is None or not (folder / "NvInferRuntime.h").is_file():
        pytest.fail("TensorRT headers not found: pip install --no-deps --require-hashes -r plugins/lynx_moe/tensorrt-headers.txt")
    return folder


def _tool_version(tool: str) -> str:
    return subprocess.run([tool, "--version"], capture_output=True, text=True, check=True).stdout.strip()


def core_build() -> pathlib.Path:
    """The folder with lynx_moe.o, liblynx_moe.so (sm_80 + sm_90) and liblynx_moe_fake_cuda.so."""
    nvcc = require_nvcc()

    def make(build: pathlib.Path) -> None:
        r = subprocess.run(["make", "-s", "-C", str(PLUGIN), f"BUILD={build}", "ARCHS=80 90", "all", "host-test"],
                           capture_output=True, text=True, timeout=1800)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    key = {"sources": sources(*_BUILD_INPUTS, root=PLUGIN), "nvcc": _tool_version(nvcc), "archs": "80 90"}
    return cached("plugin-core", key, make, folder=True)


# --- the core library ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_core_library_compiles_for_sm80_and_sm90():
    library = core_build() / "liblynx_moe.so"
    symbols = subprocess.run(["nm", "-D", "--defined-only", str(library)], check=True, capture_output=True, text=True).stdout
    for name in ("lynx_moe_api_version", "lynx_moe_check_params", "lynx_moe_workspace_size", "lynx_moe_enqueue", "lynx_moe_route",
                 "lynx_moe_status_string", "lynx_moe_last_error"):
        assert f" T {name}\n" in symbols
    data = library.read_bytes()
    assert b"sm_80" in data and b"sm_90" in data  # both targets' code is in the fat binary
    # The soname lets the C++ plugin find it next to itself rather than at this build's path.
    dynamic = subprocess.run(["readelf", "-d", str(library)], check=True, capture_output=True, text=True).stdout
    assert "Library soname: [liblynx_moe.so]" in dynamic


@pytest.mark.slow
def test_every_new_kernel_is_in_the_library():
    """The kernel variants behind lynx_kernels_t are compiled, so selectable (their host launch stubs exist)."""
    names = subprocess.run(["nm", "-C", str(core_build() / "lynx_moe.o")], check=True, capture_output=True, text=True).stdout
    for kernel in ("scan_counts_parallel", "lynx_popularity_table", "expert_gemv_one_pass", "expert_gemm_tc"):
        assert kernel in names, kernel


# --- the C++ plugin through CMake -----------------------------------------------------------------------


def cmake_plugin() -> tuple[pathlib.Path, str]:
    """liblynx_moe_trt_plugin.so built by CMake from the kernel-lens headers and the make-built core,
    and what CMake printed while configuring and building it."""
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.fail("cmake is required to build the C++ plugin")
    core, headers = core_build() / "liblynx_moe.so", tensorrt_headers()

    def make(out: pathlib.Path) -> None:
        env = {"PATH": os.environ["PATH"], "HOME": str(out)}
        configure = subprocess.run(["cmake", "-S", str(PLUGIN), "-B", str(out / "build"), f"-DTensorRT_ROOT={headers}",
                                    f"-DLYNX_MOE_CORE_LIBRARY={core}"], capture_output=True, text=True, timeout=600, env=env)
        assert configure.returncode == 0, configure.stdout + configure.stderr
        build = subprocess.run(["cmake", "--build", str(out / "build"), "-j", "1"], capture_output=True, text=True, timeout=900, env=env)
        assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
        shutil.copy(out / "build" / "liblynx_moe_trt_plugin.so", out / "liblynx_moe_trt_plugin.so")
        (out / "cmake.log").write_text(configure.stdout + build.stdout + build.stderr)

    key = {"sources": sources(*_CMAKE_INPUTS, root=PLUGIN), "core": str(core), "headers": sources("*.h", root=headers), "cmake": _tool_version(cmake)}
    folder = cached("plugin-cmake", key, make, folder=True)
    return folder / "liblynx_moe_trt_plugin.so", (folder / "cmake.log").read_text()


@pytest.mark.slow
def test_cmake_builds_the_cpp_plugin_from_the_headers_alone():
    plugin, log = cmake_plugin()
    assert "libnvinfer not found: building lynx_moe_trt_plugin from the headers alone" in log
    assert "prebuilt" in log and ".cu" not in log.split("prebuilt", 1)[1]  # the core was not compiled again
    assert "warning" not in log.lower()  # the headers' own deprecations are SYSTEM includes
    undefined = subprocess.run(["nm", "-D", "--undefined-only", str(plugin)], check=True, capture_output=True, text=True).stdout.split()
    ours = sorted({s for s in undefined if not s.startswith("_") and "@" not in s and s not in ("U", "w")})
    assert ours == ["lynx_moe_check_params", "lynx_moe_enqueue", "lynx_moe_last_error", "lynx_moe_status_string", "lynx_moe_workspace_size"]
    assert not [s for s in undefined if "nvinfer" in s.lower()]
    needed = subprocess.run(["readelf", "-d", str(plugin)], check=True, capture_output=True, text=True).stdout
    assert "[liblynx_moe.so]" in needed and "nvinfer" not in needed
    exported = subprocess.run(["nm", "-D", "--defined-only", str(plugin)], check=True, capture_output=True, text=True).stdout
    assert " T getCreators" in exported


def test_cmake_without_tensorrt_headers_skips_only_the_plugin(tmp_path):
    """Configure only (no nvcc compile): the core target stays, the plugin target is skipped."""
    require_nvcc()
    if shutil.which("cmake") is None:
        pytest.fail("cmake is required")
    r = subprocess.run(["cmake", "-S", str(PLUGIN), "-B", str(tmp_path), "-DCMAKE_CUDA_ARCHITECTURES=80", f"-DTensorRT_ROOT={tmp_path / 'none'}"],
                       capture_output=True, text=True, timeout=600, env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert "TensorRT headers not found (set TensorRT_ROOT): skipping target lynx_moe_trt_plugin" in r.stdout
    targets = subprocess.run(["cmake", "--build", str(tmp_path), "--target", "help"], capture_output=True, text=True).stdout
    assert "lynx_moe_core" in targets and "lynx_moe_trt_plugin" not in targets
