"""A corpus of malformed model files, each paired with the error it must produce.

`make_corpus(folder, good)` writes every case into `folder` (from the valid model `good`) and
returns {case name: (model path, expected message fragment)}.
"""

from __future__ import annotations

import os
import pathlib

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _external(folder: pathlib.Path, name: str, location: str, *, length: int | None = None, data: bytes | None = None,
              dims: tuple[int, ...] = (4, 4)) -> pathlib.Path:
    """A small MatMul model whose weight lives in external data at `location`."""
    weight = numpy_helper.from_array(np.ones(dims, dtype=np.float32), "w")
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    entries = {"location": location, "offset": "0"}
    if length is not None:
        entries["length"] = str(length)
    for key, value in entries.items():
        weight.external_data.add(key=key, value=value)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, dims[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, dims[1]])],
        [weight],
    )
    path = folder / f"{name}.onnx"
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString())
    if data is not None:
        (folder / location).write_bytes(data)
    return path


def make_corpus(folder: pathlib.Path, good: pathlib.Path) -> dict[str, tuple[pathlib.Path, str]]:
    folder.mkdir(parents=True, exist_ok=True)
    raw = good.read_bytes()
    model = onnx.load(good)
    cases: dict[str, tuple[pathlib.Path, str]] = {}

    def write(name: str, data: bytes, message: str) -> None:
        path = folder / f"{name}.onnx"
        path.write_bytes(data)
        cases[name] = (path, message)

    def node(m: onnx.ModelProto, index: int) -> onnx.NodeProto:
        """The index-th node that has inputs and outputs (Constants have no inputs)."""
        return [n for n in m.graph.node if n.input and n.output][index]

    def mutate(name: str, change, message: str) -> None:
        m = onnx.ModelProto()
        m.CopyFrom(model)
        change(m)
        write(name, m.SerializeToString(), message)

    cases["missing"] = (folder / "missing.onnx", "no such file")
    (folder / "a_folder.onnx").mkdir()
    cases["a_folder"] = (folder / "a_folder.onnx", "not a file")
    write("empty", b"", "empty file")
    write("truncated_half", raw[: len(raw) // 2], "not an ONNX model")
    write("truncated_tail", raw[:-7], "not an ONNX model")
    write("random_bytes", np.random.default_rng(0).bytes(4096), "not an ONNX model")
    write("text", b"this is not a model\n" * 10, "not an ONNX model")
    write("tensor_proto", numpy_helper.from_array(np.ones(3, np.float32), "t").SerializeToString(), "not an ONNX model")
    write("no_graph", onnx.ModelProto(ir_version=8, producer_name="x").SerializeToString(), "no graph nodes")
    mutate("ir_version_too_new", lambda m: setattr(m, "ir_version", 99), "unsupported IR version 99")
    mutate("ir_version_too_old", lambda m: setattr(m, "ir_version", 2), "unsupported IR version 2")
    mutate("opset_too_new", lambda m: next(o for o in m.opset_import if o.domain == "").__setattr__("version", 99), "unsupported opset 99")
    mutate("dangling_input", lambda m: node(m, 0).input.__setitem__(0, "no_such_value"), "fails the ONNX checker")
    mutate("unknown_op", lambda m: setattr(node(m, 0), "op_type", "NoSuchOp"), "fails the ONNX checker")
    mutate("duplicate_output", lambda m: node(m, 1).output.__setitem__(0, node(m, 0).output[0]), "fails the ONNX checker")
    mutate("negative_dim", lambda m: m.graph.initializer[0].dims.__setitem__(0, -5), "negative dimension")
    mutate("short_raw_data", lambda m: setattr(m.graph.initializer[0], "raw_data", m.graph.initializer[0].raw_data[:-16]), "declares")
    cases["external_missing"] = (_external(folder, "external_missing", "weights.bin"), "external data file 'weights.bin' is missing")
    cases["external_dotdot"] = (_external(folder, "external_dotdot", "../outside.bin"), "escapes the model's folder")
    cases["external_absolute"] = (_external(folder, "external_absolute", "/etc/passwd"), "escapes the model's folder")
    outside = folder.parent / f"{folder.name}-outside.bin"
    outside.write_bytes(bytes(64))
    os.symlink(outside, folder / "link.bin")
    cases["external_symlink"] = (_external(folder, "external_symlink", "link.bin"), "links outside the model's folder")
    cases["external_too_short"] = (_external(folder, "external_too_short", "short.bin", data=bytes(16)), "declares 64 bytes")
    cases["external_length_past_end"] = (
        _external(folder, "external_length_past_end", "len.bin", length=640, data=bytes(64)), "which holds 64")
    return cases
