"""Load and save ONNX models as onnx-ir graphs, turning every parse failure into one-line errors."""

from __future__ import annotations

import hashlib
import pathlib
from collections.abc import Iterable, Iterator

import onnx
import onnx_ir as ir
from onnx import external_data_helper

from lynx_export.errors import ModelLoadError, one_line

__all__ = ["load_model", "load_model_and_inputs", "input_files", "save_model", "expose_outputs", "sha256_file", "EXTERNAL_DATA_THRESHOLD", "MIN_IR_VERSION"]

# Protobuf cannot serialise a message over 2 GiB; above this many weight bytes, weights go to a
# side file.
EXTERNAL_DATA_THRESHOLD = 1 << 30


MIN_IR_VERSION = 7  # ONNX 1.6, the oldest the opsets lynx-export lowers to can appear in


def _tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor stored in a graph: initializers and tensor attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.TENSORS:
                yield from attr.tensors
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from _tensors(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _tensors(g)


def _declared_bytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes the tensor's dims and type call for; None for types without a fixed item size."""
    if tensor.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return None
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, ValueError, TypeError):
        return None
    count = 1
    for d in tensor.dims:
        count *= d
    # 4-bit types pack two elements per byte.
    if tensor.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        return (count + 1) // 2
    return count * itemsize


def _check_tensors(proto: onnx.ModelProto, path: pathlib.Path) -> list[pathlib.Path]:
    """Check every stored tensor's bytes exist where it says; return the external data files.

    External data must be a relative path that stays inside the model's folder (also after
    resolving symlinks), and the file must hold the bytes the tensor's shape calls for.
    """
    base = path.parent.resolve()
    files: dict[pathlib.Path, None] = {}
    for tensor in _tensors(proto.graph):
        if any(d < 0 for d in tensor.dims):
            raise ModelLoadError(f"{path}: tensor '{tensor.name}' has a negative dimension")
        needed = _declared_bytes(tensor)
        if not external_data_helper.uses_external_data(tensor):
            if tensor.HasField("raw_data") and needed is not None and len(tensor.raw_data) != needed:
                raise ModelLoadError(
                    f"{path}: tensor '{tensor.name}' declares {needed} bytes but holds {len(tensor.raw_data)}")
            continue
        info = external_data_helper.ExternalDataInfo(tensor)
        location = pathlib.PurePosixPath(info.location.replace("\\", "/"))
        if not info.location or location.is_absolute() or ".." in location.parts or pathlib.PureWindowsPath(info.location).drive:
            raise ModelLoadError(f"{path}: tensor '{tensor.name}' external data '{info.location}' escapes the model's folder")
        target = base / location
        if not target.resolve().is_relative_to(base):
            raise ModelLoadError(f"{path}: tensor '{tensor.name}' external data '{info.location}' links outside the model's folder")
        if not target.is_file():
            raise ModelLoadError(f"{path}: tensor '{tensor.name}' external data file '{info.location}' is missing")
        size = target.stat().st_size
        offset = info.offset or 0
        length = info.length if info.length is not None else size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise ModelLoadError(
                f"{path}: tensor '{tensor.name}' reads bytes {offset}..{offset + length} of '{info.location}', which holds {size}")
        if needed is not None and length < needed:
            raise ModelLoadError(f"{path}: tensor '{tensor.name}' declares {needed} bytes but its external data holds {length}")
        files[target] = None
    return list(files)


# Ops ONNX Runtime registers in the default domain although ONNX does not define them; exporters'
# ONNX Runtime fusions write them there (transformers' `ort_fusions`, onnxscript's RMSNorm fusion).
RUNTIME_DEFAULT_DOMAIN_OPS = frozenset({"SimplifiedLayerNormalization"})


def _prepare_for_checker(proto: onnx.ModelProto) -> None:
    """Make `proto` (read without external data, and no longer needed) checkable in memory.

    1. Initializers stored outside become typed graph inputs: `_check_tensors` has checked their
       files already, and an in-memory check could not find them (it has no folder).
    2. RUNTIME_DEFAULT_DOMAIN_OPS nodes move to ONNX Runtime's own domain, which the checker
       leaves alone, so that the rest of the graph is checked as ever.
    """
    inputs = {i.name for i in proto.graph.input}
    stored_outside = [t for t in proto.graph.initializer if external_data_helper.uses_external_data(t)]
    if stored_outside:
        for tensor in stored_outside:
            if tensor.name not in inputs:
                proto.graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
        kept = [t for t in proto.graph.initializer if not external_data_helper.uses_external_data(t)]
        del proto.graph.initializer[:]
        proto.graph.initializer.extend(kept)
    moved = False
    for node in proto.graph.node:
        if node.domain in ("", "ai.onnx") and node.op_type in RUNTIME_DEFAULT_DOMAIN_OPS:
            node.domain = "com.microsoft"
            moved = True
    if moved and not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.add(domain="com.microsoft", version=1)


def _read_proto(path: pathlib.Path) -> onnx.ModelProto:
    """The model's protobuf without external data, or ModelLoadError."""
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if not path.is_file():
        raise ModelLoadError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise ModelLoadError(f"{path}: empty file, not an ONNX model")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and friends; all mean "not ONNX"
        raise ModelLoadError(f"{path}: not an ONNX model ({one_line(exc)})") from None
    if not proto.HasField("graph") or len(proto.graph.node) == 0:
        raise ModelLoadError(f"{path}: not an ONNX model (no graph nodes)")
    return proto


def input_files(path: str | pathlib.Path) -> list[pathlib.Path]:
    """The model file and every external data file it reads (checked as `load_model` does)."""
    path = pathlib.Path(path)
    return [path.resolve(), *(f.resolve() for f in _check_tensors(_read_proto(path), path))]


def load_model(path: str | pathlib.Path) -> ir.Model:
    """Read and check an ONNX model; raise ModelLoadError saying what is wrong and where."""
    return load_model_and_inputs(path)[0]


def load_model_and_inputs(path: str | pathlib.Path) -> tuple[ir.Model, list[pathlib.Path]]:
    """`load_model`, plus what `input_files` returns, from one read of the file."""
    path = pathlib.Path(path)
    proto = _read_proto(path)
    max_ir = onnx.IR_VERSION
    if not MIN_IR_VERSION <= proto.ir_version <= max_ir:
        raise ModelLoadError(f"{path}: unsupported IR version {proto.ir_version} (supported: {MIN_IR_VERSION}..{max_ir})")
    max_opset = onnx.defs.onnx_opset_version()
    for opset in proto.opset_import:
        if opset.domain in ("", "ai.onnx") and not 1 <= opset.version <= max_opset:
            raise ModelLoadError(f"{path}: unsupported opset {opset.version} (supported: 1..{max_opset})")
    # Before anything reads external data: where it points and how much it holds.
    files = [path.resolve(), *(f.resolve() for f in _check_tensors(proto, path))]
    _prepare_for_checker(proto)
    try:
        # The proto holds no external data, so it is under protobuf's 2 GiB whatever the model's size.
        onnx.checker.check_model(proto)
    except Exception as exc:
        raise ModelLoadError(f"{path}: fails the ONNX checker ({one_line(exc)})") from None
    del proto
    try:
        return ir.load(path), files
    except Exception as exc:
        raise ModelLoadError(f"{path}: cannot be read ({one_line(exc)})") from None


def _weight_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def expose_outputs(model: ir.Model, names: Iterable[str]) -> ir.Model:
    """`model` with the values named `names` (node outputs) also as graph outputs, each once, in
    order; what a probe copy reads (the routing of each block) without changing what it computes."""
    values = {v.name: v for node in model.graph for v in node.outputs}
    present = {v.name for v in model.graph.outputs}
    for name in names:
        if name not in present:
            model.graph.outputs.append(values[name])
            present.add(name)
    return model


def save_model(model: ir.Model, path: pathlib.Path) -> list[pathlib.Path]:
    """Save `model` to `path`; weights go to `<name>.data` beside it when they are large.

    The files written hold every weight: none refers to the source model's external data.

    Returns the files written.
    """
    if _weight_bytes(model) > EXTERNAL_DATA_THRESHOLD:
        data = path.with_name(path.name + ".data")
        ir.save(model, path, external_data=data.name)  # every tensor, the source's external ones too
        return [path, data]
    # Weights the source kept in external files (and the passes left alone) would otherwise stay
    # references to the source's files: the output must stand on its own.
    ir.external_data.load_to_model(model)
    ir.save(model, path)
    return [path]


def sha256_file(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
