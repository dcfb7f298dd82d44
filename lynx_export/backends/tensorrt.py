"""TensorRT and TensorRT-RTX engines of a canonical (rewritten) model.

1. `prepare`: TensorRT's ONNX parser hands a plugin a null tensor for an empty optional input and
   then refuses it, so every LynxMoE node gets all eight plugin inputs (contract.PLUGIN_SLOTS):
   absent biases become zeros, an absent seq_len becomes 1 (every call is a decode step, as the
   contract says) and an absent num_valid becomes INT64_MAX (every row votes). A node with
   quantized experts is refused with an EngineError: the plugins do not implement them yet.
2. `engine_profiles`: optimisation profiles from the inputs' named dynamic dimensions, one for
   decode (batch 1..max_batch, one new token) and one for prefill.
3. `build_engine`: parses and builds in a child process (`python -m lynx_export.backends.tensorrt`),
   with the Python LynxMoE plugin registered. The child keeps a parser abort (TensorRT-RTX's
   parser kills the process on some errors) from taking the CLI with it, and gets the library
   search path TensorRT-RTX's plugin loading needs without touching the installed package.

TensorRT-RTX builds ahead of time on machines with no GPU; deserialising the engine needs one.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

from lynx_export.op import contract as lynx_op
from lynx_export.errors import BackendUnavailable, EngineError, OptionError, one_line
from lynx_export.progress import SILENT, Progress
from lynx_export.records import Record, doc, record

__all__ = ["FLAVOURS", "EngineOptions", "Profile", "prepare", "engine_profiles", "require", "build_engine", "Engine", "PLAN_NAME", "PREPARED_NAME"]

PLAN_NAME = "model.plan"
PREPARED_NAME = "model.trt.onnx"  # the canonical model with every LynxMoE input present


@dataclass(frozen=True)
class Flavour:
    module: str  # the Python package to import
    extra: str  # the lynx-export extra that installs it
    title: str


FLAVOURS = {
    "tensorrt-rtx": Flavour("tensorrt_rtx", "tensorrt-rtx", "TensorRT-RTX"),
    "tensorrt": Flavour("tensorrt", "tensorrt", "TensorRT"),
}
PRECISIONS = ("fp32", "fp16", "bf16")
# TensorRT-RTX targets by compute capability (it builds for no other).
RTX_TARGETS = {"7.5": "SM75", "8.0": "SM80", "8.6": "SM86", "8.9": "SM89", "12.0": "SM120", "12.1": "SM121"}


@dataclass(frozen=True)
class EngineOptions:
    max_batch: int = 256  # decode profile: batch 1..max_batch
    opt_batch: int = 8
    max_sequence: int = 1024  # longest prompt, and longest past in decode
    prefill_batch: int = 8  # prefill profile: batch 1..prefill_batch
    precision: str = "fp32"  # tensorrt only; TensorRT-RTX networks are strongly typed
    targets: tuple[str, ...] = ("8.0",)  # tensorrt-rtx compute capabilities

    def check(self, flavour: str) -> None:
        """Refuse options that no model could build with (OptionError, exit 2), before any work."""
        if not 1 <= self.opt_batch <= self.max_batch <= lynx_op.INT32_MAX or not 1 <= self.prefill_batch <= lynx_op.INT32_MAX \
                or not 2 <= self.max_sequence <= lynx_op.INT32_MAX:
            raise OptionError(f"bad profile limits: need 1 <= opt_batch ({self.opt_batch}) <= max_batch ({self.max_batch}) <= {lynx_op.INT32_MAX}, "
                              f"prefill_batch >= 1, 2 <= max_sequence ({self.max_sequence}) <= {lynx_op.INT32_MAX}")
        if self.precision not in PRECISIONS:
            raise OptionError(f"unknown precision '{self.precision}' (choose from {', '.join(PRECISIONS)})")
        if flavour == "tensorrt-rtx":
            if self.precision != "fp32":
                raise OptionError("TensorRT-RTX builds strongly typed networks: the engine keeps the model's types, so --precision applies to --backend tensorrt only")
            unknown = [t for t in self.targets if t not in RTX_TARGETS]
            if unknown or not self.targets:
                raise OptionError(f"TensorRT-RTX cannot target compute capability {', '.join(unknown) or '(none)'} (choose from {', '.join(RTX_TARGETS)})")


# --- 1. prepare ---------------------------------------------------------------------------------


def _filler(node: ir.Node, slot: lynx_op.Slot) -> np.ndarray:
    a = node.attributes
    experts, hidden, inner = a["num_experts"].value, a["hidden_size"].value, a["expert_size"].value
    weight_dtype = node.inputs[lynx_op.Slot.FC1].dtype.numpy()
    if slot == lynx_op.Slot.FC1_BIAS:
        return np.zeros((experts, 2 * inner), weight_dtype)
    if slot == lynx_op.Slot.FC2_BIAS:
        return np.zeros((experts, hidden), weight_dtype)
    if slot == lynx_op.Slot.SEQ_LEN:
        return np.array(1, np.int64)
    return np.array(np.iinfo(np.int64).max, np.int64)


def _check_implemented(node: ir.Node) -> None:
    """Refuse a node with quantized experts (weight_bits, or a quantized-only input): the plugins' kernels read float weights."""
    bits = node.attributes.get_int("weight_bits", 0)
    present = [lynx_op.INPUTS[s].name for s in lynx_op.QUANTIZED_SLOTS if len(node.inputs) > s and node.inputs[s] is not None]
    if bits or present:
        what = f"weight_bits={bits}" if bits else f"inputs {', '.join(present)}"
        raise EngineError(f"{lynx_op.OP_TYPE} node '{node.name}' has quantized experts ({what}): "
                          "the TensorRT plugin does not implement quantized experts yet")


class MaterializeOptionalInputsPass(ir.passes.InPlacePass):
    """Give every LynxMoE node all of its plugin inputs (see the module docstring)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        nodes = [n for n in graph if lynx_op.is_lynx_node(n)]
        for node in nodes:  # every node checked before any is changed
            _check_implemented(node)
        for node in nodes:
            # Empty quantized-only slots past the plugin's inputs are dropped (the check above found none filled).
            inputs = (list(node.inputs) + [None] * len(lynx_op.PLUGIN_SLOTS))[: len(lynx_op.PLUGIN_SLOTS)]
            for slot in lynx_op.PLUGIN_SLOTS:
                if inputs[slot] is None:
                    value = ir.Value(name=f"{node.name}.{slot.name.lower()}", const_value=ir.tensor(_filler(node, slot)))
                    graph.register_initializer(value)
                    inputs[slot] = value
            if len(inputs) != len(node.inputs) or any(a is not b for a, b in zip(inputs, node.inputs)):
                replacement = ir.Node(node.domain, node.op_type, inputs, attributes=list(node.attributes.values()), outputs=None,
                                      num_outputs=1, name=node.name)
                ir.convenience.replace_nodes_and_values(graph, node, [node], [replacement], node.outputs, replacement.outputs)
                modified = True
        return ir.passes.PassResult(model, modified=modified)


def prepare(model: ir.Model) -> ir.Model:
    """`model` (canonical form) made parseable by TensorRT, in place."""
    MaterializeOptionalInputsPass()(model)
    return model


# --- 2. profiles ---------------------------------------------------------------------------------

Profile = dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]  # input -> (min, opt, max)


def _dim_role(name: str) -> str | None:
    lowered = name.lower()
    for role, words in (("past", ("past",)), ("batch", ("batch",)), ("sequence", ("seq", "length", "total", "position"))):
        if any(w in lowered for w in words):
            return role
    return None


def engine_profiles(model: ir.Model, options: EngineOptions) -> dict[str, Profile]:
    """Decode and prefill profiles for `model`'s inputs, from the names of their dynamic dims.

    A dimension named like batch, past or sequence gets that role's range; any other dynamic
    dimension is an error naming the input and dimension.
    """
    b, s, p = options, options.max_sequence, options.max_sequence - 1
    ranges = {  # role -> (decode min, opt, max), (prefill min, opt, max)
        "batch": ((1, b.opt_batch, b.max_batch), (1, 1, b.prefill_batch)),
        "sequence": ((1, 1, 1), (1, s // 2, s)),
        "past": ((0, p // 2, p), (0, 0, 0)),
    }
    profiles: dict[str, Profile] = {"decode": {}, "prefill": {}}
    for value in model.graph.inputs:
        if value.shape is None:
            raise EngineError(f"input '{value.name}' has no shape; TensorRT needs each input's rank")
        per_phase: dict[str, list[list[int]]] = {phase: [[], [], []] for phase in profiles}
        for axis, dim in enumerate(value.shape):
            if isinstance(dim, int):
                bounds = {phase: (dim, dim, dim) for phase in profiles}
            else:
                role = _dim_role(str(dim.value or ""))
                if role is None:
                    raise EngineError(f"input '{value.name}' dimension {axis} ('{dim.value}') is dynamic and not named like batch, sequence or past; "
                                      "cannot derive an optimisation profile for it")
                bounds = dict(zip(profiles, ranges[role]))
            for phase, triple in bounds.items():
                for i in range(3):
                    per_phase[phase][i].append(triple[i])
        for phase in profiles:
            profiles[phase][value.name] = tuple(tuple(d) for d in per_phase[phase])  # type: ignore[assignment]
    return profiles


# --- 3. build -------------------------------------------------------------------------------------


def require(flavour: str) -> Flavour:
    """The flavour's description, or BackendUnavailable naming the extra to install."""
    if flavour not in FLAVOURS:
        raise EngineError(f"unknown engine backend '{flavour}' (choose from {', '.join(FLAVOURS)})")
    spec = FLAVOURS[flavour]
    if importlib.util.find_spec(spec.module) is None:
        raise BackendUnavailable(f"--backend {flavour} needs {spec.title}: pip install 'lynx-export[{spec.extra}]'")
    return spec


def _library_dir(flavour: Flavour, scratch: pathlib.Path) -> pathlib.Path | None:
    """A folder holding `libtensorrt_rtx.so` for the child's library path, when the package
    ships only the versioned file: TensorRT-RTX's parser loads its plugin support by that name."""
    if flavour.module != "tensorrt_rtx":
        return None
    libs = importlib.util.find_spec("tensorrt_rtx_libs")
    if libs is None or not libs.submodule_search_locations:
        return None
    folder = pathlib.Path(next(iter(libs.submodule_search_locations)))
    versioned = sorted(folder.glob("libtensorrt_rtx.so.*"))
    if (folder / "libtensorrt_rtx.so").exists() or not versioned:
        return None
    (scratch / "libtensorrt_rtx.so").symlink_to(versioned[0])
    return scratch


@record
class EngineBuilder(Record):
    package: str = doc("the Python package that built it (tensorrt or tensorrt_rtx)")
    version: str = doc("its version")


@record
class EnginePlugin(Record):
    name: str = doc("the plugin's name")
    namespace: str = doc("its namespace")
    version: str = doc("its version")
    implementation: str = doc("what implements it")
    layers: int = doc("plugin layers in the engine (one per block)")


@record
class Engine(Record):
    """manifest.json's `engine`: what model.plan holds."""

    file: str = doc("the plan file")
    backend: str = doc("tensorrt or tensorrt-rtx")
    builder: EngineBuilder = doc("what built it")
    precision: str = doc("the engine's precision")
    targets: tuple[str, ...] = doc("the GPUs it runs on")
    plugin: EnginePlugin = doc("its LynxMoE plugin layers")
    profiles: Mapping[str, Any] = doc("per phase, per input: the min / opt / max shapes of its optimization profile")


def build_engine(
    onnx_path: pathlib.Path,
    plan_path: pathlib.Path,
    flavour_name: str,
    options: EngineOptions,
    progress: Progress = SILENT,
) -> Engine:
    """Build `plan_path` from the prepared model at `onnx_path`; returns the manifest's engine entry."""
    flavour = require(flavour_name)
    options.check(flavour_name)
    profiles = engine_profiles(ir.load(onnx_path), options)
    job = {"flavour": flavour_name, "onnx": str(onnx_path), "plan": str(plan_path), "options": dataclasses.asdict(options), "profiles": profiles}
    with tempfile.TemporaryDirectory(prefix="lynx-trt-") as scratch:
        env = dict(os.environ)
        libdir = _library_dir(flavour, pathlib.Path(scratch))
        if libdir is not None:
            env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(libdir), env.get("LD_LIBRARY_PATH")]))
        job_file = pathlib.Path(scratch) / "job.json"
        job_file.write_text(json.dumps(job))
        progress.note(f"building the {flavour.title} engine ({', '.join(f'{k} profile' for k in profiles)})")
        proc = subprocess.run([sys.executable, "-m", __name__, str(job_file)], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("lynx-export-engine: ")]
        reason = lines[-1].removeprefix("lynx-export-engine: ") if lines else f"the builder process died (exit {proc.returncode}): {one_line(Exception(proc.stderr[-400:]))}"
        raise EngineError(f"{onnx_path.name}: {flavour.title} engine build failed: {reason}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    data = plan_path.read_bytes()
    if lynx_op.OP_TYPE.encode() not in data and result["plugin_layers"]:
        raise EngineError(f"{plan_path}: the engine holds no {lynx_op.OP_TYPE} plugin although the network had {result['plugin_layers']}")
    return Engine(
        file=plan_path.name,
        backend=flavour_name,
        builder=EngineBuilder(package=flavour.module, version=result["version"]),
        precision=options.precision,
        targets=tuple(options.targets) if flavour_name == "tensorrt-rtx" else ("the build machine's GPU",),
        plugin=EnginePlugin(name=lynx_op.OP_TYPE, namespace=lynx_op.PLUGIN_NAMESPACE, version=lynx_op.PLUGIN_VERSION,
                            implementation="lynx_export.backends.trt_plugin (Python IPluginV3); plugins/lynx_moe (C++) serves the same fields",
                            layers=result["plugin_layers"]),
        profiles={phase: {name: {"min": list(b[0]), "opt": list(b[1]), "max": list(b[2])} for name, b in shapes.items()}
                  for phase, shapes in profiles.items()},
    )


# --- the child process ------------------------------------------------------------------------------


def _run_job(job: dict[str, Any]) -> dict[str, Any]:
    import importlib

    from lynx_export.backends import trt_plugin

    flavour = FLAVOURS[job["flavour"]]
    trt = importlib.import_module(flavour.module)
    options = EngineOptions(**{**job["options"], "targets": tuple(job["options"]["targets"])})
    logger = trt.Logger(trt.Logger.ERROR)
    creator = trt_plugin.register(trt)
    creator.refusals.clear()
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(job["onnx"]):
        # A node the plugin refused: its reason, not the parser's "could not create the plugin".
        errors = creator.refusals[:1] or [one_line(Exception(str(parser.get_error(i)))) for i in range(parser.num_errors)]
        raise EngineError("; ".join(errors) or "the ONNX parser failed")
    config = builder.create_builder_config()
    if job["flavour"] == "tensorrt-rtx":
        config.num_compute_capabilities = len(options.targets)
        for i, target in enumerate(options.targets):
            config.set_compute_capability(getattr(trt.ComputeCapability, RTX_TARGETS[target]), i)
    elif options.precision != "fp32":
        config.set_flag(trt.BuilderFlag.FP16 if options.precision == "fp16" else trt.BuilderFlag.BF16)
    for shapes in job["profiles"].values():
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        # A plugin that refused its inputs while the engine was built (a shape outside the contract) says why.
        raise EngineError(creator.refusals[-1] if creator.refusals else "build_serialized_network returned no engine (see the builder's errors above)")
    pathlib.Path(job["plan"]).write_bytes(bytes(plan))
    plugin_layers = sum(1 for i in range(network.num_layers) if network.get_layer(i).type == trt.LayerType.PLUGIN_V3)
    return {"version": trt.__version__, "plugin_layers": plugin_layers}


def _main(argv: list[str]) -> int:
    try:
        result = _run_job(json.loads(pathlib.Path(argv[0]).read_text()))
    except Exception as exc:  # the parent turns this line into its one-line error
        print(f"lynx-export-engine: {one_line(exc)}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
