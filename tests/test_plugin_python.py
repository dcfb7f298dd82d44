"""The Python plugin's runtime half (lynx_export/backends/trt_plugin.py), called as TensorRT calls it,
with the tensorrt_rtx bindings' own descriptor objects, on a machine with no GPU:

- configure_plugin gets DynamicPluginTensorDesc (the tensor in `.desc`), on_shape_change and
  enqueue get PluginTensorDesc (`.dims`, `.type`, no `.desc`);
- both check every input's shape against the contract (a transposed fc2 is refused, naming the node);
- enqueue hands the core library the tokens of [T,H] or [B,S,H], the slots' pointers in the
  contract's order, the workspace and the stream: checked on the fake-runtime core library, whose
  launches show what arrived;
- an engine build of a node with a transposed fc2 fails in one line saying so.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from lynx_export.backends import lynx_moe_lib, trt_plugin
from lynx_export.backends import tensorrt as trt_backend
from lynx_export.backends.lynx_moe_lib import DType
from lynx_export.errors import EngineError
from lynx_export.op import contract
from lynx_export.op.contract import PLUGIN_SLOTS, Slot
from lynx_export.op.spec import MoESpec
from lynx_export.routing import LynxPolicy, RouterForm
from tests.test_plugin_build import core_build
from tests.test_plugin_core import FakeCuda

trt = pytest.importorskip("tensorrt_rtx")

E, K, H, I = 8, 2, 64, 32
_KEEP: list[np.ndarray] = []  # PluginField points into its array without owning it


def _plugin(name: str = "layers.0.mlp"):
    creator = trt_plugin._creator_class(trt)()
    attributes = contract.to_attributes(MoESpec(num_experts=E, top_k=K, hidden_size=H, expert_size=I, activation="swiglu",
                                                router=RouterForm.SOFTMAX_TOPK, normalize=True), LynxPolicy(alpha=3.0, beta=1))
    declared = {f.name for f in creator.field_names}
    fields = []
    for key, value in attributes.items():
        if key not in declared:
            continue
        if isinstance(value, str):
            data, kind = np.frombuffer(value.encode() + b"\0", np.int8).copy(), trt.PluginFieldType.CHAR
        elif isinstance(value, float):
            data, kind = np.array([value], np.float32), trt.PluginFieldType.FLOAT32
        else:
            data, kind = np.array([value], np.int32), trt.PluginFieldType.INT32
        _KEEP.append(data)
        fields.append(trt.PluginField(key, data, kind))
    return creator, creator.create_plugin(name, trt.PluginFieldCollection(fields), trt.TensorRTPhase.BUILD)


def _shapes(tokens: tuple[int, ...] = (4,), fc2: tuple[int, ...] = (E, H, I)) -> list[tuple[int, ...]]:
    return [(*tokens, H), (*tokens, E), (E, 2 * I, H), (E, 2 * I), fc2, (E, H), (), ()]


def _descs(shapes: list[tuple[int, ...]], dtype=None) -> list:
    out = []
    for slot, shape in zip(PLUGIN_SLOTS, shapes):
        d = trt.PluginTensorDesc()
        d.dims = trt.Dims(list(shape))
        d.type = trt.DataType.INT64 if slot in (Slot.SEQ_LEN, Slot.NUM_VALID) else (dtype or trt.DataType.BF16)
        d.format = trt.TensorFormat.LINEAR
        out.append(d)
    return out


def _dynamic(shapes: list[tuple[int, ...]]) -> list:
    out = []
    for desc in _descs(shapes):
        d = trt.DynamicPluginTensorDesc()
        d.desc = desc
        d.min = d.opt = d.max = desc.dims
        out.append(d)
    return out


def test_on_shape_change_reads_plugin_tensor_descs():
    _, plugin = _plugin()
    descs = _descs(_shapes((3, 1)), trt.DataType.HALF)
    plugin.on_shape_change(descs, descs[:1])  # PluginTensorDesc has no .desc: this raised AttributeError before
    assert (plugin.params.activation_dtype, plugin.params.weight_dtype) == (DType.FLOAT16, DType.FLOAT16)


def test_configure_plugin_reads_dynamic_descs_with_unknown_dims():
    _, plugin = _plugin()
    descs = _dynamic(_shapes((-1,)))
    plugin.configure_plugin(descs, descs[:1])
    assert plugin.params.activation_dtype == DType.BFLOAT16


@pytest.mark.parametrize("method", ["configure_plugin", "on_shape_change"])
def test_a_transposed_fc2_is_refused_naming_the_node(method):
    creator, plugin = _plugin("layers.3.mlp")
    shapes = _shapes((4,), fc2=(E, I, H))
    descs = _dynamic(shapes) if method == "configure_plugin" else _descs(shapes)
    with pytest.raises(EngineError) as info:
        getattr(plugin, method)(descs, descs[:1])
    assert str(info.value) == ("LynxMoE node 'layers.3.mlp': input fc2 has shape [8,32,64]; the contract says [E,H,I] = [8,64,32] "
                               "(E 8, H 64, I 32)")  # the C++ plugin's message, word for word (test_plugin_cpp)
    assert creator.refusals == [str(info.value)]


@pytest.mark.parametrize("slot,shape,why", [
    (Slot.FC1_BIAS, (E, I), "input fc1_bias has shape [8,32]; the contract says [E,2I] = [8,64]"),
    (Slot.FC1, (E, H, 2 * I), "input fc1 has shape [8,64,64]; the contract says [E,2I,H] = [8,64,64]"),  # 2I == H: undetectable
    (Slot.SEQ_LEN, (2,), "input seq_len has shape [2]; the contract says [] (a scalar)"),
    (Slot.ROUTER_LOGITS, (5, E), "input router_logits has shape [5,8]; the contract says [T,E] with the leading dimensions of hidden [4,64]"),
    (Slot.HIDDEN, (4, H + 1), "input hidden has shape [4,65]; the contract says [T,H] = [...,64]"),
])
def test_input_shape_problems(slot, shape, why):
    _, plugin = _plugin()
    shapes = _shapes()
    shapes[slot] = shape
    problem = trt_plugin.input_shape_problem(plugin.params, shapes)
    if slot == Slot.FC1:
        assert problem == ""  # a transposed fc1 with 2I == H has the contract's shape: only numerics can tell
    else:
        assert problem.startswith(why), problem
    assert trt_plugin.input_shape_problem(plugin.params, _shapes((2, 3))) == ""  # [B,S,H]
    assert trt_plugin.input_shape_problem(plugin.params, [*_shapes()[:6], (1,), (1, 1)]) == ""


# --- enqueue ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fake_library():
    path = core_build() / "liblynx_moe_fake_cuda.so"
    return lynx_moe_lib.CoreLibrary(path), FakeCuda(path)


def _enqueue(plugin, fake: FakeCuda, dims: tuple[int, ...], stream: int = 0xC0FFEE, fc1: int | None = None):
    descs = _descs(_shapes(dims))
    plugin.on_shape_change(descs, descs[:1])
    pointers = [(slot + 1) << 24 for slot in PLUGIN_SLOTS]
    if fc1 is not None:
        pointers[Slot.FC1] = fc1
    fake.reset()
    plugin.enqueue(descs, descs[:1], pointers, [0x7F000000], 0x10000000, stream)
    return fake.launches()


def test_enqueue_passes_tokens_pointers_workspace_and_stream(fake_library):
    library, fake = fake_library
    _, plugin = _plugin()
    plugin.library = library
    launched = _enqueue(plugin, fake, (3, 5))  # [B,S,H]: 15 tokens
    assert launched and {launch.stream for launch in launched} == {0xC0FFEE}
    route = next(launch for launch in launched if launch.kernel == "route_tokens")
    assert route.grid[0] == -(-15 // 4)
    assert launched[-1].kernel == "combine" and launched[-1].grid[0] == -(-15 * H // 256)
    # The fc1 slot's pointer reaches the kernels: misaligned, it takes the scalar GEMV.
    gemv = [launch.template[1] for launch in _enqueue(plugin, fake, (2,), fc1=(3 << 24) + 2) if launch.kernel == "expert_gemv"]
    assert gemv == ["1", "8"]
    assert _enqueue(plugin, fake, (0,)) == []  # an empty batch launches nothing


def test_clones_keep_the_node_and_the_library(fake_library):
    library, _ = fake_library
    creator, plugin = _plugin("layers.1.mlp")
    plugin.library = library
    twin = plugin.attach_to_context(None)
    assert twin.library is library and twin.node == "layers.1.mlp" and twin.refusals is creator.refusals


# --- the engine build ------------------------------------------------------------------------------------


def _model(path, fc2_shape: tuple[int, ...]):
    spec = MoESpec(num_experts=E, top_k=K, hidden_size=H, expert_size=I, activation="swiglu", router=RouterForm.SOFTMAX_TOPK, normalize=True)
    arrays = {"fc1": np.zeros((E, 2 * I, H), np.float32), "fc1_bias": np.zeros((E, 2 * I), np.float32), "fc2": np.zeros(fc2_shape, np.float32),
              "fc2_bias": np.zeros((E, H), np.float32), "seq_len": np.array(1, np.int64), "num_valid": np.array(2, np.int64)}
    node = onnx.helper.make_node(contract.OP_TYPE, ["x", "logits", *arrays], ["y"], name="layers.0.mlp", domain=contract.DOMAIN,
                                 **contract.to_attributes(spec, LynxPolicy(alpha=3.0, beta=1)))
    graph = onnx.helper.make_graph(
        [node], "transposed",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", H]),
         onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["batch", E])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", H])],
        [onnx.numpy_helper.from_array(a, n) for n, a in arrays.items()])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18), onnx.helper.make_opsetid(contract.DOMAIN, 1)]), path)
    return path


def test_an_engine_with_a_transposed_fc2_fails_in_one_line(tmp_path):
    with pytest.raises(EngineError) as info:
        trt_backend.build_engine(_model(tmp_path / "bad.onnx", (E, I, H)), tmp_path / "model.plan", "tensorrt-rtx", trt_backend.EngineOptions())
    message = str(info.value)
    assert "\n" not in message and "LynxMoE node 'layers.0.mlp': input fc2 has shape [8,32,64]" in message, message
    assert not (tmp_path / "model.plan").exists()
    trt_backend.build_engine(_model(tmp_path / "good.onnx", (E, H, I)), tmp_path / "model.plan", "tensorrt-rtx", trt_backend.EngineOptions())
    assert (tmp_path / "model.plan").is_file()
