"""ctypes binding of the LynxMoE core library (plugins/lynx_moe/include/lynx_moe.h).

The core library holds the plugin's CUDA kernels behind a small C API. This module is its only
Python binding: the Python TensorRT plugin's runtime half and the GPU check script call it. It
also turns a LynxMoE node's attributes into the C parameter struct, and mirrors the library's
workspace formula so that an engine can be built on a machine where the library cannot run
(tests compare the mirror with the compiled library).
"""

from __future__ import annotations

import ctypes
import enum
import math
import os
import pathlib
from collections.abc import Mapping

from lynx_export.errors import BackendUnavailable, ContractError, RunError
from lynx_export.op import contract

__all__ = [
    "API_VERSION",
    "DType",
    "Kernels",
    "Params",
    "Tensors",
    "RoutingPointers",
    "params_from_attributes",
    "workspace_bytes",
    "library_path",
    "CoreLibrary",
]

API_VERSION = 3
PLUGIN_DIR = pathlib.Path(__file__).resolve().parents[2] / "plugins" / "lynx_moe"
LIBRARY_ENV = "LYNX_MOE_LIBRARY"


class DType(enum.IntEnum):
    """lynx_dtype_t (contract.C_DTYPES by value; tests/test_contract.py checks both against the header)."""

    FLOAT32 = 0
    FLOAT16 = 1
    BFLOAT16 = 2


class Kernels(enum.IntFlag):
    """lynx_kernels_t: kernel variants to run instead of the defaults (the `kernels` parameter).

    DEFAULT (0) is what the plugins run. The others compute the same result with faster kernels
    and stay opt-in until a GPU run has verified them (docs/GPU.md); scripts/gpu_check.py checks
    and times both.
    """

    DEFAULT = 0
    PARALLEL_SCAN = 1
    POPULARITY_TABLE = 2
    GEMV_ONE_PASS = 4
    TENSOR_CORE_GEMM = 8
    ALL = 15


def _c_enum(attribute: str) -> dict[str, int]:
    """A string attribute's C enum: value name -> number (its position in contract.C_CHOICES)."""
    return {name: value for value, name in enumerate(contract.C_CHOICES[attribute])}


_ROUTERS, _POLICIES, _TIE_BREAKS = _c_enum("router"), _c_enum("policy"), _c_enum("tie_break")
_STATUS = {0: "ok", 1: "invalid argument", 2: "workspace too small", 3: "CUDA error"}
_C_TYPES = {"int32_t": ctypes.c_int32, "float": ctypes.c_float}


class Params(ctypes.Structure):
    """lynx_moe_params_t, laid out from contract.C_PARAMS."""

    _fields_ = [(name, _C_TYPES[c_type]) for name, c_type in contract.C_PARAMS]


class Tensors(ctypes.Structure):
    """lynx_moe_tensors_t: device pointers (0 for an absent optional input), one per contract.C_TENSORS."""

    _fields_ = [(name, ctypes.c_void_p) for name in contract.C_TENSORS]


class RoutingPointers(ctypes.Structure):
    """lynx_moe_routing_t: where the last call's routing lies in the workspace."""

    _fields_ = [("ids", ctypes.c_void_p), ("weights", ctypes.c_void_p), ("allowed", ctypes.c_void_p), ("counts", ctypes.c_void_p)]


def params_from_attributes(attrs: Mapping[str, object], activation_dtype: DType = DType.FLOAT32, weight_dtype: DType = DType.FLOAT32,
                           kernels: Kernels = Kernels.DEFAULT) -> Params:
    """The C parameters of a LynxMoE node's attributes (names and meanings: lynx_export/op/contract.py's table).

    Raises ValueError naming the first attribute that is missing or outside the contract.
    """

    def get(name: str) -> object:
        if name not in attrs:
            raise ContractError(f"attribute '{name}' is missing")
        return attrs[name]

    def choice(name: str, table: dict[str, int]) -> int:
        value = get(name)
        if value not in table:
            raise ContractError(f"attribute '{name}' is {value!r}; expected one of {', '.join(table)}")
        return table[value]

    if get("activation") != "swiglu":
        raise ContractError(f"attribute 'activation' is {get('activation')!r}; the plugin implements swiglu")
    bits = attrs.get("weight_bits", contract.ATTRIBUTE_BY_NAME["weight_bits"].default)
    if bits:
        raise ContractError(f"attribute 'weight_bits' is {bits!r}: the plugin does not implement quantized experts yet")
    # Absent SwiGLU parameters take the contract's defaults (the limit's is +inf, no clamp).
    default = {name: float(contract.ATTRIBUTE_BY_NAME[name].default)  # type: ignore[arg-type]
               for name in ("activation_alpha", "activation_beta", "swiglu_limit")}
    params = Params(
        num_experts=int(get("num_experts")),
        top_k=int(get("top_k")),
        hidden_size=int(get("hidden_size")),
        expert_size=int(get("expert_size")),
        router=choice("router", _ROUTERS),
        normalize=int(get("normalize")),
        policy=choice("policy", _POLICIES),
        alpha=float(attrs.get("alpha", 0.0)),
        beta=int(attrs.get("beta", -1)),
        budget=int(attrs.get("budget", 0)),
        tie_break=choice("tie_break", _TIE_BREAKS) if "tie_break" in attrs else 0,
        activation_dtype=int(activation_dtype),
        weight_dtype=int(weight_dtype),
        activation_alpha=float(attrs.get("activation_alpha", default["activation_alpha"])),
        activation_beta=float(attrs.get("activation_beta", default["activation_beta"])),
        swiglu_limit=float(attrs.get("swiglu_limit", default["swiglu_limit"])),
        kernels=int(kernels),
    )
    problem = _params_problem(params)
    if problem:
        raise ContractError(problem)
    return params


MAX_EXPERTS = 1024
MAX_TOP_K = 32


def _params_problem(p: Params) -> str:
    """What breaks the contract in `p` (lynx_moe_check_params's rules), or ''."""
    if not 1 <= p.num_experts <= MAX_EXPERTS:
        return f"num_experts={p.num_experts} is outside 1..{MAX_EXPERTS}"
    if not 1 <= p.top_k <= min(p.num_experts, MAX_TOP_K):
        return f"top_k={p.top_k} is outside 1..{min(p.num_experts, MAX_TOP_K)}"
    if p.hidden_size < 1 or p.expert_size < 1:
        return f"hidden_size={p.hidden_size} and expert_size={p.expert_size} must be >= 1"
    if not (math.isfinite(p.activation_alpha) and math.isfinite(p.activation_beta) and p.swiglu_limit > 0):
        return f"SwiGLU parameters alpha={p.activation_alpha}, beta={p.activation_beta}, limit={p.swiglu_limit} are outside the contract"
    if p.policy == _POLICIES["lynx"] and not (p.alpha > 0 and p.beta >= -1):
        return f"lynx needs alpha > 0 and beta >= -1, got alpha={p.alpha}, beta={p.beta}"
    if p.policy == _POLICIES["budget"] and not p.top_k <= p.budget <= p.num_experts:
        return f"budget={p.budget} is outside top_k..num_experts ({p.top_k}..{p.num_experts})"
    if p.kernels & ~int(Kernels.ALL):
        return f"kernels={p.kernels} has flags outside lynx_kernels_t ({int(Kernels.ALL)})"
    return ""


_ALIGN = 256


def workspace_bytes(p: Params, max_tokens: int) -> int:
    """Device workspace of a call with up to `max_tokens` tokens: the layout() of src/lynx_moe.cu."""
    tokens = max(int(max_tokens), 1)
    pairs = tokens * p.top_k
    experts = p.num_experts
    sizes = [
        pairs * 4, pairs * 4,  # ids, weights
        experts * 4, experts * 4, (experts + 1) * 4, experts * 4, experts * 4,  # allowed, counts, offsets, votes, popularity
        tokens * 4, tokens * 8,  # row_max, softmax terms
        pairs * 4, pairs * 4,  # slot_of, row_token
        pairs * p.expert_size * 4, pairs * p.hidden_size * 4,  # act, expert rows
    ]
    return sum(-(-size // _ALIGN) * _ALIGN for size in sizes)


def library_path() -> pathlib.Path:
    """liblynx_moe.so: $LYNX_MOE_LIBRARY, else the plain nvcc build in plugins/lynx_moe/build/."""
    return pathlib.Path(os.environ.get(LIBRARY_ENV) or PLUGIN_DIR / "build" / "liblynx_moe.so")


class CoreLibrary:
    """The loaded core library; every call is asynchronous on the given CUDA stream."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = pathlib.Path(path) if path else library_path()
        if not self.path.is_file():
            raise BackendUnavailable(f"{self.path}: LynxMoE core library not found; build it with `make -C plugins/lynx_moe` or set {LIBRARY_ENV}")
        try:
            lib = ctypes.CDLL(str(self.path))
        except OSError as exc:
            raise BackendUnavailable(f"{self.path}: cannot load the LynxMoE core library ({exc})") from None
        lib.lynx_moe_api_version.restype = ctypes.c_int32
        version = lib.lynx_moe_api_version()
        if version != API_VERSION:
            raise BackendUnavailable(f"{self.path}: core library API version {version}, this package needs {API_VERSION}")
        lib.lynx_moe_last_error.restype = ctypes.c_char_p
        lib.lynx_moe_check_params.argtypes = [ctypes.POINTER(Params)]
        lib.lynx_moe_workspace_size.argtypes = [ctypes.POINTER(Params), ctypes.c_int64]
        lib.lynx_moe_workspace_size.restype = ctypes.c_size_t
        call = [ctypes.POINTER(Params), ctypes.c_int64, ctypes.POINTER(Tensors), ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        lib.lynx_moe_enqueue.argtypes = call
        lib.lynx_moe_route.argtypes = call + [ctypes.POINTER(RoutingPointers)]
        self._lib = lib

    def check_params(self, p: Params) -> bool:
        return self._lib.lynx_moe_check_params(ctypes.byref(p)) == 0

    def workspace_size(self, p: Params, max_tokens: int) -> int:
        return int(self._lib.lynx_moe_workspace_size(ctypes.byref(p), max_tokens))

    def enqueue(self, p: Params, tokens: int, tensors: Tensors, workspace: int, workspace_size: int, stream: int) -> None:
        status = self._lib.lynx_moe_enqueue(ctypes.byref(p), tokens, ctypes.byref(tensors), workspace, workspace_size, stream)
        self._check(status, "lynx_moe_enqueue")

    def route(self, p: Params, tokens: int, tensors: Tensors, workspace: int, workspace_size: int, stream: int) -> RoutingPointers:
        routing = RoutingPointers()
        status = self._lib.lynx_moe_route(ctypes.byref(p), tokens, ctypes.byref(tensors), workspace, workspace_size, stream, ctypes.byref(routing))
        self._check(status, "lynx_moe_route")
        return routing

    def _check(self, status: int, what: str) -> None:
        if status == 0:
            return
        reason = _STATUS.get(status, f"status {status}")
        if status == 3:  # LYNX_STATUS_CUDA_ERROR: the library kept the CUDA error's name and text
            reason += f" ({(self._lib.lynx_moe_last_error() or b'').decode(errors='replace')})"
        raise RunError(f"{what} failed: {reason}")
