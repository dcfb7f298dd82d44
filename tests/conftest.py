"""Shared fixtures: the demo model is exported once per session (a real dynamo export)."""

from __future__ import annotations

import pathlib

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper


@pytest.fixture(scope="session")
def demo_onnx(tmp_path_factory) -> pathlib.Path:
    pytest.importorskip("torch")
    from lynx_export.evaluation.demo import export_demo_model

    return export_demo_model(tmp_path_factory.mktemp("demo") / "model.onnx")


@pytest.fixture(scope="session")
def dense_onnx(tmp_path_factory) -> pathlib.Path:
    """A model with no MoE block: y = relu(x @ W)."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 4], np.eye(4, dtype=np.float32).ravel().tolist())
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
        "dense",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [w],
    )
    path = tmp_path_factory.mktemp("dense") / "dense.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path
