"""`triton`: write a Triton Inference Server model repository from a build folder.

Models written:
  1. `<name>_cpu`: Triton's python backend running `model.ort.onnx` with ONNX Runtime (runs on
     any CPU server; `lynx_export/serving/ort_model.py` is its model.py), dynamic batching.
     The server bundled by nvidia-pytriton serves this one (`lynx-export serve`, the tests).
  2. `<name>_onnx`: `backend: "onnxruntime"`, Triton's own ONNX Runtime backend, with the same
     `model.ort.onnx` as its `1/model.onnx` (the backend's default file name), the same tensors
     and dynamic batching, `instance_group` KIND_CPU (KIND_GPU works with a Triton whose
     onnxruntime backend is the GPU build of ONNX Runtime) and the ORT threads as the backend's
     `intra_op_thread_count` parameter. The model may hold com.microsoft contrib ops (MoE,
     MatMulNBits); that backend is ONNX Runtime, so it runs them. The bundled server has no
     onnxruntime backend: this model is checked against Triton's schema only, and
     `lynx-export serve` leaves it unloaded (see `server.py`).
  3. `<name>`: `platform: "tensorrt_plan"` with the build's `model.plan`, only when the build
     holds a full TensorRT engine (`build --backend tensorrt`); it needs the LynxMoE plugin
     library in the server process. TensorRT-RTX engines need the TensorRT-RTX runtime, which
     Triton's TensorRT backend is not, so they get no Triton model.
Every config.pbtxt is built as Triton's own `ModelConfig` protobuf and parsed back before
anything is written; the repository is staged beside its target and renamed into place.
"""

from __future__ import annotations

import json
import pathlib
import shutil
from dataclasses import dataclass
from importlib import resources

import onnx

from lynx_export.errors import BackendUnavailable, LynxError, OutputError
from lynx_export.compiler.output import check_out_dir, staged_folder

__all__ = ["TritonOptions", "TritonModel", "TritonResult", "write_repository", "model_config"]

PLAN_NAME = "model.plan"
TRITON_ENGINE_BACKEND = "tensorrt"  # the engine flavour Triton's tensorrt_plan platform runs
ORT_NAME = "model.ort.onnx"
ONNX_MODEL_NAME = "model.onnx"  # the file Triton's onnxruntime backend loads by default

_TRITON_TYPES = {
    onnx.TensorProto.FLOAT: "TYPE_FP32",
    onnx.TensorProto.FLOAT16: "TYPE_FP16",
    onnx.TensorProto.BFLOAT16: "TYPE_BF16",
    onnx.TensorProto.INT64: "TYPE_INT64",
    onnx.TensorProto.INT32: "TYPE_INT32",
    onnx.TensorProto.BOOL: "TYPE_BOOL",
}


@dataclass(frozen=True)
class TritonOptions:
    name: str = "lynx_moe"
    max_batch_size: int = 64
    preferred_batch_sizes: tuple[int, ...] = (8, 16, 32)
    max_queue_delay_us: int = 2000
    instances: int = 1
    threads: int = 0  # ONNX Runtime intra-op threads of the CPU and onnx models; 0 = ONNX Runtime's default
    force: bool = False


@dataclass(frozen=True)
class TritonModel:
    name: str
    kind: str  # "cpu" (python backend + ONNX Runtime), "onnx" (onnxruntime backend) or "gpu" (tensorrt_plan)
    path: pathlib.Path


@dataclass(frozen=True)
class TritonResult:
    repo: pathlib.Path
    models: tuple[TritonModel, ...]


class TritonConfigError(LynxError):
    """A model cannot be described as a valid Triton model configuration."""


def _pb2():
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        raise BackendUnavailable("Triton configs need tritonclient: pip install 'lynx-export[serve]'") from None
    return model_config_pb2, text_format


def _tensors(values, what: str) -> list[tuple[str, str, list[int]]]:
    specs = []
    for value in values:
        t = value.type.tensor_type
        if t.elem_type not in _TRITON_TYPES:
            raise TritonConfigError(f"{what} '{value.name}': element type {onnx.TensorProto.DataType.Name(t.elem_type)} has no Triton type here")
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
        if not dims or dims[0] != -1:
            raise TritonConfigError(f"{what} '{value.name}': first dimension must be the (dynamic) batch dimension")
        specs.append((value.name, _TRITON_TYPES[t.elem_type], dims[1:]))
    return specs


KINDS = ("cpu", "onnx", "gpu")


def model_config(onnx_path: pathlib.Path, name: str, kind: str, options: TritonOptions) -> str:
    """config.pbtxt text for the model at `onnx_path` (its signature names the tensors).

    `kind`: "cpu" (python backend running ONNX Runtime, our model.py), "onnx" (Triton's
    onnxruntime backend) or "gpu" (tensorrt_plan)."""
    if kind not in KINDS:
        raise ValueError(f"model kind {kind!r}: expected one of {', '.join(KINDS)}")
    pb2, text_format = _pb2()
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    config = pb2.ModelConfig(name=name, max_batch_size=options.max_batch_size)
    if kind == "cpu":
        config.backend = "python"
        config.parameters["intra_op_num_threads"].string_value = str(options.threads)  # read by ort_model.py
    elif kind == "onnx":
        config.backend = "onnxruntime"
        # The onnxruntime backend's documented session option (0: ONNX Runtime's default).
        config.parameters["intra_op_thread_count"].string_value = str(options.threads)
    else:
        config.platform = "tensorrt_plan"
    for spec_list, field in ((_tensors(graph.input, "input"), config.input), (_tensors(graph.output, "output"), config.output)):
        for tensor_name, dtype, dims in spec_list:
            field.add(name=tensor_name, data_type=pb2.DataType.Value(dtype), dims=dims)
    preferred = [b for b in options.preferred_batch_sizes if b <= options.max_batch_size]
    config.dynamic_batching.preferred_batch_size.extend(preferred)
    config.dynamic_batching.max_queue_delay_microseconds = options.max_queue_delay_us
    config.instance_group.add(count=options.instances, kind=pb2.ModelInstanceGroup.Kind.Value("KIND_GPU" if kind == "gpu" else "KIND_CPU"))
    text = text_format.MessageToString(config)
    # Parse back against the schema: what we write is what Triton will read.
    text_format.Parse(text, pb2.ModelConfig())
    return text


_REPO_README = """# Triton model repository written by lynx-export

Source build: {build}

| model | backend | runs on |
|---|---|---|
{rows}

Serve it (CPU): `tritonserver --model-repository {repo_name}` with Triton's python and
onnxruntime backends, and a Python environment holding numpy<2 and onnxruntime first on PATH
(the python backend runs {cpu} in it). A server without the onnxruntime backend (like the one
bundled by nvidia-pytriton) fails to get ready with {onnx} in the repository; load the other
models only: `tritonserver --model-repository {repo_name} --model-control-mode=explicit --load-model={cpu}`.
`make serve` in the lynx-export checkout (`lynx-export serve`) does that with the server bundled
by nvidia-pytriton: it serves {cpu} and warns that it leaves {onnx} unloaded.

{onnx} (`backend: "onnxruntime"`, Triton's own ONNX Runtime backend): 1/model.onnx is the
build's model.ort.onnx, byte for byte, with the same tensors and dynamic batching as {cpu}. It
may contain com.microsoft contrib ops (MoE, MatMulNBits); the backend is ONNX Runtime, so it
runs them. The lynx-export tests check its config against Triton's schema only (their server
has no onnxruntime backend); serve it with any Triton that has the onnxruntime backend (the
NGC `tritonserver` containers do). It runs on CPU as written (`instance_group` KIND_CPU). For
GPU, with a Triton whose onnxruntime backend is the GPU build of ONNX Runtime (the NGC
containers' is), set `kind: KIND_GPU` in its config.pbtxt: ONNX Runtime then runs it with the
CUDA execution provider (nodes without a CUDA kernel fall back to CPU). Its
`intra_op_thread_count` parameter holds the ONNX Runtime threads (0: ONNX Runtime's default).

GPU model (`tensorrt_plan`, present when the build holds model.plan): the engine contains
LynxMoE plugin layers, so the plugin library must be loaded into the server, either
`LD_PRELOAD=/path/to/liblynx_moe_trt_plugin.so tritonserver ...` or
`tritonserver --backend-config=tensorrt,plugins=/path/to/liblynx_moe_trt_plugin.so ...`.
"""

_README_ROWS = {
    "cpu": "python (ONNX Runtime, model.py) | CPU; served by `lynx-export serve`",
    "onnx": "onnxruntime (Triton's ONNX Runtime backend) | CPU; GPU with KIND_GPU and ONNX Runtime's GPU build; schema-checked only here",
    "gpu": "tensorrt_plan | GPU (needs the LynxMoE plugin library)",
}


def write_repository(build_dir: str | pathlib.Path, repo: str | pathlib.Path, options: TritonOptions = TritonOptions()) -> TritonResult:
    """Write the model repository for the build in `build_dir` to `repo`."""
    build_dir, repo = pathlib.Path(build_dir), pathlib.Path(repo)
    manifest_path = build_dir / "manifest.json"
    if not manifest_path.is_file():
        raise OutputError(f"{build_dir}: not a lynx-export build folder (no manifest.json)")
    if not (build_dir / ORT_NAME).is_file():
        raise OutputError(f"{build_dir}: build holds no {ORT_NAME}")
    if not options.name.replace("_", "").replace("-", "").isalnum():
        raise OutputError(f"model name '{options.name}' must be letters, digits, '_' or '-'")
    if options.max_batch_size < 1:
        raise OutputError("max batch size must be at least 1")
    check_out_dir(repo, options.force)
    # Everything that can fail is computed before the first byte is written.
    cpu_name, onnx_name = f"{options.name}_cpu", f"{options.name}_onnx"
    configs = {cpu_name: ("cpu", model_config(build_dir / ORT_NAME, cpu_name, "cpu", options)),
               onnx_name: ("onnx", model_config(build_dir / ORT_NAME, onnx_name, "onnx", options))}
    manifest = json.loads(manifest_path.read_text())
    if (build_dir / PLAN_NAME).is_file() and manifest.get("engine", {}).get("backend") == TRITON_ENGINE_BACKEND:
        # The engine was built from the same graph, so it has the ORT model's signature.
        configs[options.name] = ("gpu", model_config(build_dir / ORT_NAME, options.name, "gpu", options))
    model_py = resources.files("lynx_export.serving").joinpath("ort_model.py").read_text()

    models = []
    with staged_folder(repo) as staging:
        for name, (kind, text) in configs.items():
            version = staging / name / "1"
            version.mkdir(parents=True)
            (staging / name / "config.pbtxt").write_text(text)
            if kind == "cpu":
                shutil.copyfile(build_dir / ORT_NAME, version / ORT_NAME)
                (version / "model.py").write_text(model_py)
            elif kind == "onnx":
                shutil.copyfile(build_dir / ORT_NAME, version / ONNX_MODEL_NAME)
            else:
                shutil.copyfile(build_dir / PLAN_NAME, version / PLAN_NAME)
            models.append(TritonModel(name, kind, repo / name))
        rows = "\n".join(f"| {m.name} | {_README_ROWS[m.kind]} |" for m in models)
        source = manifest.get("source", {}).get("path", build_dir)
        (staging / "README.md").write_text(_REPO_README.format(build=source, rows=rows, repo_name=repo.name, cpu=cpu_name, onnx=onnx_name))
    return TritonResult(repo, tuple(models))
