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
  4. `<name>_generate`: text generation with in-flight batching (decoupled python backend,
     `generate_model.py` with `scheduler.py`): the KV caches stay on the server and every decode
     step runs all active requests together, so LYNX selects over the batch that load forms.
     Written for decoders in onnxruntime-genai's form (GroupQueryAttention updating its cache in
     place: a build of an onnxruntime-genai folder, or of `demo-model --form genai`); for any
     other graph it is left out and `TritonResult.skipped` says why.
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
from lynx_export.compiler.results import BlockEntry, Manifest

__all__ = ["TritonOptions", "TritonModel", "TritonResult", "write_repository", "model_config", "GenerateSource", "NotServed", "plan_generate",
           "write_generate_model", "generate_config"]

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
    max_slots: int = 32  # generate model: requests decoding at once (each holds a KV cache slot)
    max_length: int = 0  # generate model: tokens a slot holds (prompt and answer); 0: the config's context length, at most 2048
    spinning: bool = True  # generate model: ONNX Runtime's intra-op threads spin between ops (off: they sleep)


@dataclass(frozen=True)
class TritonModel:
    name: str
    kind: str  # "cpu" (python backend + ONNX Runtime), "onnx" (onnxruntime backend), "gpu" (tensorrt_plan) or "generate"
    path: pathlib.Path


@dataclass(frozen=True)
class TritonResult:
    repo: pathlib.Path
    models: tuple[TritonModel, ...]
    skipped: tuple[tuple[str, str], ...] = ()  # (model name, why it was not written)


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
GENERATE_MAX_LENGTH = 2048
GENERATE_INPUTS = (  # name, Triton type, dims: all optional (a request gives text_input or input_ids)
    ("text_input", "TYPE_STRING", [1]), ("input_ids", "TYPE_INT32", [-1]), ("max_tokens", "TYPE_INT32", [1]),
    ("min_length", "TYPE_INT32", [1]), ("top_k", "TYPE_INT32", [1]), ("temperature", "TYPE_FP32", [1]), ("top_p", "TYPE_FP32", [1]),
    ("seed", "TYPE_UINT64", [1]), ("stream", "TYPE_BOOL", [1]), ("exclude_input_in_output", "TYPE_BOOL", [1]),
)
GENERATE_OUTPUTS = (("text_output", "TYPE_STRING", [-1]), ("output_ids", "TYPE_INT32", [-1]))


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


def generate_config(name: str, options: TritonOptions, max_length: int) -> str:
    """config.pbtxt of the decoupled generate model (parsed back against Triton's schema)."""
    pb2, text_format = _pb2()
    config = pb2.ModelConfig(name=name, backend="python", max_batch_size=0)  # the scheduler batches, not Triton
    config.model_transaction_policy.decoupled = True
    for tensor_name, dtype, dims in GENERATE_INPUTS:
        config.input.add(name=tensor_name, data_type=pb2.DataType.Value(dtype), dims=dims, optional=True)
    for tensor_name, dtype, dims in GENERATE_OUTPUTS:
        config.output.add(name=tensor_name, data_type=pb2.DataType.Value(dtype), dims=dims)
    for key, value in (("intra_op_num_threads", options.threads), ("max_slots", options.max_slots), ("max_length", max_length),
                       ("allow_spinning", int(options.spinning))):
        config.parameters[key].string_value = str(value)
    config.instance_group.add(count=1, kind=pb2.ModelInstanceGroup.Kind.Value("KIND_CPU"))
    text = text_format.MessageToString(config)
    text_format.Parse(text, pb2.ModelConfig())
    return text


class NotServed(Exception):
    """Why a model gets no generate model."""


@dataclass(frozen=True)
class GenerateSource:
    """What a generate model serves: a decoder ONNX file, the folder holding its genai_config.json
    and tokenizer.json, its MoE blocks as a build's manifest lists them (with where each block's
    routing can be read: `observe`), and the policy it was built with."""

    model: pathlib.Path
    folder: pathlib.Path
    blocks: tuple[BlockEntry, ...] = ()
    policy: dict | None = None

    @classmethod
    def of_build(cls, build_dir: pathlib.Path, manifest: Manifest) -> GenerateSource:
        return cls(build_dir / ORT_NAME, build_dir, manifest.blocks, dict(manifest.policy))


@dataclass(frozen=True)
class _Arg:
    """What `scheduler.Layout.read` reads of an ONNX Runtime NodeArg."""

    name: str
    shape: tuple[int | str | None, ...]
    type: str  # "tensor(float)", as ONNX Runtime spells it


class _Signature:
    """A graph's inputs and outputs listed as an ONNX Runtime session lists them, so that the
    scheduler's own reader checks the model without a session (and its weights) being made."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        initializers = {t.name for t in graph.initializer}
        self._inputs = [self._arg(v) for v in graph.input if v.name not in initializers]
        self._outputs = [self._arg(v) for v in graph.output]

    @staticmethod
    def _arg(value: onnx.ValueInfoProto) -> _Arg:
        tensor = value.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim)
        return _Arg(value.name, dims, f"tensor({onnx.TensorProto.DataType.Name(tensor.elem_type).lower()})")

    def get_inputs(self) -> list[_Arg]:
        return self._inputs

    def get_outputs(self) -> list[_Arg]:
        return self._outputs


def plan_generate(source: GenerateSource, options: TritonOptions) -> dict:
    """serving.json of the generate model, or NotServed: the graph must be a decoder in
    onnxruntime-genai's form (GroupQueryAttention, KV caches its only state) that the scheduler
    reads (its own check, on the graph's signature)."""
    from lynx_export.serving import scheduler

    graph = onnx.load(str(source.model), load_external_data=False).graph
    if not any(n.op_type == "GroupQueryAttention" for n in graph.node):
        raise NotServed("its attention is not GroupQueryAttention updating a KV cache in place (onnxruntime-genai's form), so "
                        "requests at different past lengths cannot share a decode step; build an onnxruntime-genai folder "
                        "(or `demo-model --form genai`) to serve it with in-flight batching")
    config_path = source.folder / "genai_config.json"
    genai = json.loads(config_path.read_text()).get("model", {}) if config_path.is_file() else {}
    decoder = genai.get("decoder", {})
    head_size = decoder.get("head_size") if isinstance(decoder.get("head_size"), int) else None
    try:
        scheduler.Layout.read(_Signature(graph), head_size)
    except scheduler.UnsupportedModel as exc:
        raise NotServed(str(exc)) from None
    context = genai.get("context_length") if isinstance(genai.get("context_length"), int) else GENERATE_MAX_LENGTH
    max_length = options.max_length or min(context, GENERATE_MAX_LENGTH)
    eos = genai.get("eos_token_id", [])
    probes = [{"block": b.name, "output": b.observe.routed_logits, "top_k": b.spec["top_k"]} for b in source.blocks if b.observe is not None]
    return {"max_length": max_length, "head_size": head_size, "stop_token_ids": eos if isinstance(eos, list) else [eos], "probes": probes,
            "policy": source.policy, "source": str(source.model)}


def write_generate_model(source: GenerateSource, plan: dict, model_dir: pathlib.Path, options: TritonOptions) -> None:
    """The generate model's folder: config.pbtxt, and in 1/ the model with each block's routed
    logits as outputs, the scheduler, model.py, serving.json and the tokenizer."""
    import onnx_ir as ir

    from lynx_export.compiler.model_io import expose_outputs, save_model

    config = generate_config(model_dir.name, options, plan["max_length"])
    version = model_dir / "1"
    version.mkdir(parents=True)
    (model_dir / "config.pbtxt").write_text(config)
    save_model(expose_outputs(ir.load(source.model), (probe["output"] for probe in plan["probes"])), version / ONNX_MODEL_NAME)
    package = resources.files("lynx_export.serving")
    (version / "model.py").write_text(package.joinpath("generate_model.py").read_text())
    (version / "scheduler.py").write_text(package.joinpath("scheduler.py").read_text())
    (version / "serving.json").write_text(json.dumps(plan, indent=2) + "\n")
    if (source.folder / "tokenizer.json").is_file():
        shutil.copyfile(source.folder / "tokenizer.json", version / "tokenizer.json")


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
    "generate": "python, decoupled (in-flight batching: `scheduler.py`; ONNX Runtime) | CPU; served by `lynx-export serve`; "
                "stream with gRPC or HTTP `generate_stream`",
}


def write_repository(build_dir: str | pathlib.Path, repo: str | pathlib.Path, options: TritonOptions = TritonOptions()) -> TritonResult:
    """Write the model repository for the build in `build_dir` to `repo`."""
    build_dir, repo = pathlib.Path(build_dir), pathlib.Path(repo)
    manifest = Manifest.read(build_dir)
    if not (build_dir / ORT_NAME).is_file():
        raise OutputError(f"{build_dir}: build holds no {ORT_NAME}")
    if not options.name.replace("_", "").replace("-", "").isalnum():
        raise OutputError(f"model name '{options.name}' must be letters, digits, '_' or '-'")
    if options.max_batch_size < 1:
        raise OutputError("max batch size must be at least 1")
    if options.max_slots < 1 or options.max_length == 1 or options.max_length < 0:
        raise OutputError(f"max slots ({options.max_slots}) must be at least 1 and max length ({options.max_length}) 0 (the model's) or at least 2")
    check_out_dir(repo, options.force)
    # Everything that can fail is computed before the first byte is written.
    cpu_name, onnx_name = f"{options.name}_cpu", f"{options.name}_onnx"
    configs = {cpu_name: ("cpu", model_config(build_dir / ORT_NAME, cpu_name, "cpu", options)),
               onnx_name: ("onnx", model_config(build_dir / ORT_NAME, onnx_name, "onnx", options))}
    if (build_dir / PLAN_NAME).is_file() and manifest.engine is not None and manifest.engine.backend == TRITON_ENGINE_BACKEND:
        # The engine was built from the same graph, so it has the ORT model's signature.
        configs[options.name] = ("gpu", model_config(build_dir / ORT_NAME, options.name, "gpu", options))
    generate_name, skipped, generate = f"{options.name}_generate", [], None
    generate_source = GenerateSource.of_build(build_dir, manifest)
    try:
        generate = plan_generate(generate_source, options)
    except NotServed as exc:
        skipped.append((generate_name, str(exc)))
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
        if generate is not None:
            write_generate_model(generate_source, generate, staging / generate_name, options)
            models.append(TritonModel(generate_name, "generate", repo / generate_name))
        rows = "\n".join(f"| {m.name} | {_README_ROWS[m.kind]} |" for m in models)
        source = manifest.source.path
        (staging / "README.md").write_text(_REPO_README.format(build=source, rows=rows, repo_name=repo.name, cpu=cpu_name, onnx=onnx_name))
    return TritonResult(repo, tuple(models), tuple(skipped))
