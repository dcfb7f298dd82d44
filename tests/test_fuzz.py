"""Bounded fuzzing of `inspect` and `build` with mutated MoE models.

Allowed outcomes: a clean LynxError (what the CLI prints as one line) or a correct result. Any
other exception is a bug. `LYNX_FUZZ_EXAMPLES` raises the example count for a longer campaign.
"""

from __future__ import annotations

import os
import pathlib
import tempfile

import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lynx_export.compiler.build import BuildOptions, PolicyChoice, build
from lynx_export.compiler.detect import detect
from lynx_export.errors import LynxError
from lynx_export.compiler.model_io import load_model
from lynx_export.compiler.verify import VerifyOptions

SCALE = int(os.environ.get("LYNX_FUZZ_EXAMPLES", "1"))
FUZZ = settings(deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
TINY = VerifyOptions(batch_sizes=(2,), seq_lens=(1,))


@pytest.fixture(scope="module")
def demo_bytes(demo_onnx) -> bytes:
    return demo_onnx.read_bytes()


def _inspect(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "m.onnx"
        path.write_bytes(data)
        try:
            detect(load_model(path))
        except LynxError:
            pass


def _build(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "m.onnx"
        path.write_bytes(data)
        try:
            result = build(path, pathlib.Path(tmp) / "out", BuildOptions(PolicyChoice("lynx"), verify=TINY))
        except LynxError:
            assert not (pathlib.Path(tmp) / "out").exists()
            return
        assert result.report.passed


byte_edits = st.lists(st.tuples(st.integers(0, 10**7), st.integers(0, 255)), min_size=1, max_size=8)


@settings(FUZZ, max_examples=120 * SCALE)
@given(edits=byte_edits, cut=st.one_of(st.none(), st.integers(0, 10**7)))
def test_inspect_survives_byte_mutations(demo_bytes, edits, cut):
    data = bytearray(demo_bytes)
    for position, value in edits:
        data[position % len(data)] = value
    if cut is not None:
        data = data[: cut % len(data)]
    _inspect(bytes(data))


OPS = ["Softmax", "TopK", "Sigmoid", "Mul", "Add", "Reshape", "Identity", "Relu", "GatherND", "MatMul", "Split", "ReduceSum"]


@st.composite
def proto_mutations(draw):
    return draw(st.lists(st.tuples(st.sampled_from(["op", "drop_input", "swap_inputs", "attr", "dim", "const"]), st.integers(0, 10**6),
                                   st.integers(-3, 300)), min_size=1, max_size=4))


def _mutate(model: onnx.ModelProto, mutations) -> bytes:
    nodes = model.graph.node
    for kind, index, value in mutations:
        node = nodes[index % len(nodes)]
        if kind == "op":
            node.op_type = OPS[value % len(OPS)]
        elif kind == "drop_input" and node.input:
            del node.input[index % len(node.input)]
        elif kind == "swap_inputs" and len(node.input) > 1:
            node.input[0], node.input[1] = node.input[1], node.input[0]
        elif kind == "attr" and node.attribute:
            attr = node.attribute[index % len(node.attribute)]
            if attr.type == onnx.AttributeProto.INT:
                attr.i = value
        elif kind == "dim" and model.graph.initializer:
            tensor = model.graph.initializer[index % len(model.graph.initializer)]
            if tensor.dims:
                tensor.dims[index % len(tensor.dims)] = max(value, 0)
        elif kind == "const":
            # Small integer constants hold top-k, axes and shapes: change one.
            small = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT64 and len(t.raw_data) <= 32 and t.raw_data]
            if small:
                t = small[index % len(small)]
                t.raw_data = int(value).to_bytes(8, "little", signed=True) + t.raw_data[8:]
    return model.SerializeToString()


@settings(FUZZ, max_examples=40 * SCALE)
@given(mutations=proto_mutations())
def test_inspect_survives_graph_mutations(demo_onnx, mutations):
    _inspect(_mutate(onnx.load(demo_onnx), mutations))


@settings(FUZZ, max_examples=15 * SCALE)
@given(mutations=proto_mutations())
def test_build_survives_graph_mutations(demo_onnx, mutations):
    _build(_mutate(onnx.load(demo_onnx), mutations))
