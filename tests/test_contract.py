"""Every copy of the LynxMoE contract against its one table (lynx_export/op/contract.py).

The C header, the C++ adapter and the plugin README are read as text: their input slots,
attributes, plugin fields and C enums must equal the table's (names, order, types), and a copy
changed in any of these ways fails (the drift cases below). The Python copies derive from the
table; the tests check that the Python plugin and the ctypes binding really do. Then the numpy
reference: its inputs follow the slots, it imports no onnx-ir, and it dequantizes weights as
ONNX Runtime's MatMulNBits does.
"""

from __future__ import annotations

import ctypes
import dataclasses
import enum
import importlib.util
import math
import pathlib
import re
import subprocess
import sys
import types
from collections.abc import Callable

import numpy as np
import pytest

from lynx_export.backends import lynx_moe_lib, trt_plugin
from lynx_export.errors import EngineError
from lynx_export.op import contract, reference
from lynx_export.op.contract import ATTRIBUTES, INPUTS, PLUGIN_FIELDS, PLUGIN_GUARDS, PluginUse, Slot
from lynx_export.op.spec import MoESpec, WeightQuantization
from lynx_export.routing import LynxPolicy, OffPolicy, RouterForm

ROOT = pathlib.Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "plugins" / "lynx_moe"
HEADER = (PLUGIN / "include" / "lynx_moe.h").read_text()
CPP = (PLUGIN / "trt" / "LynxMoEPlugin.cpp").read_text()
CPP_HEADER = (PLUGIN / "trt" / "LynxMoEPlugin.h").read_text()
README = (PLUGIN / "README.md").read_text()

_READERS = {"INT32": "readInt", "FLOAT32": "readFloat", "CHAR": "readString"}


def _section(text: str, start: str, end: str) -> str:
    """The text after the first `start` up to the next `end` ('' when `start` is missing)."""
    at = text.find(start)
    if at < 0:
        return ""
    stop = text.find(end, at + len(start))
    return text[at + len(start): stop if stop >= 0 else len(text)]


def _compare(what: str, found: list, expected: list) -> list[str]:
    return [] if found == expected else [f"{what}: found {found}, the table says {expected}"]


# --- the C header --------------------------------------------------------------------------------


def _c_enum(text: str, prefix: str) -> dict[str, int]:
    return {name.lower(): int(value) for name, value in re.findall(rf"\b{prefix}_(\w+) = (\d+)", text)}


def header_problems(text: str) -> list[str]:
    problems = []
    params = re.findall(r"^\s*(int32_t|float)\s+(\w+);", _section(text, "typedef struct {", "} lynx_moe_params_t;"), re.M)
    problems += _compare("lynx_moe_params_t", [(n, t) for t, n in params], list(contract.C_PARAMS))
    body = _section(text, "typedef struct {", "} lynx_moe_tensors_t;")
    body = body[body.rfind("typedef struct {") + 1:] if "typedef struct {" in body else body
    members = re.findall(r"^\s*((?:const )?(?:void|int64_t)\*)\s+(\w+);\s*/\*([^*]*)\*/", body, re.M)
    problems += _compare("lynx_moe_tensors_t", [n for _, n, _ in members], list(contract.C_TENSORS))
    for c_type, name, comment in members:
        spec = next((i for i in INPUTS if i.name == name), None)
        want_type = "void*" if spec is None else "const int64_t*" if spec.dtype == "int64" else "const void*"
        want_shape = "[T,H]" if spec is None else spec.shape
        if c_type != want_type or (want_shape != "[]" and want_shape not in comment):
            problems.append(f"lynx_moe_tensors_t.{name}: {c_type} /*{comment}*/, the table says {want_type} {want_shape}")
    for attribute, prefix in (("router", "LYNX_ROUTER"), ("policy", "LYNX_POLICY"), ("tie_break", "LYNX_TIE_BREAK")):
        problems += _compare(f"{prefix}_*", sorted(_c_enum(text, prefix).items(), key=lambda kv: kv[1]),
                             [(n, i) for i, n in enumerate(contract.C_CHOICES[attribute])])
    problems += _compare("LYNX_DTYPE_*", sorted(_c_enum(text, "LYNX_DTYPE").items(), key=lambda kv: kv[1]),
                         [(n, i) for i, n in enumerate(contract.C_DTYPES)])
    version = re.search(r"#define LYNX_MOE_API_VERSION (\d+)", text)
    problems += _compare("LYNX_MOE_API_VERSION", [version and int(version.group(1))], [lynx_moe_lib.API_VERSION])
    return problems


# --- the C++ adapter ------------------------------------------------------------------------------


def cpp_problems(source: str, header: str = CPP_HEADER) -> list[str]:
    problems = []
    slots = re.findall(r"\bk(\w+) = (\d+),", _section(source, "enum Slot : int32_t", "};"))
    plugin_inputs = [(s.name, int(s)) for s in contract.PLUGIN_SLOTS]
    problems += _compare("enum Slot", [(n, int(v)) for n, v in slots], plugin_inputs + [("NB_INPUTS", len(plugin_inputs))])
    fields = [(f.name, f.type) for f in PLUGIN_FIELDS]
    serialized = re.findall(r'mFields\.emplace_back\(\s*"(\w+)",[^;]*?PluginFieldType::k(\w+)', _section(source, "getFieldsToSerialize() noexcept", "mFieldCollection.nbFields"), re.S)
    problems += _compare("getFieldsToSerialize", serialized, fields)
    declared = re.findall(r'PluginField\("(\w+)", nullptr, PluginFieldType::k(\w+), 1\)', _section(source, "LynxMoEPluginCreator::LynxMoEPluginCreator()", "};"))
    problems += _compare("the creator's fields", declared, fields)
    parsed = re.findall(r'name == "(\w+)"\) ok = (read\w+)\(', _section(source, "LynxMoEPluginCreator::createPlugin(", "else\n"))
    problems += _compare("createPlugin's field parser", parsed, [(f.name, _READERS[f.type]) for f in PLUGIN_FIELDS])
    arrays = dict(re.findall(r"constexpr Choice (k\w+)\[\] = \{(.*?)\};", source))
    for array, member in re.findall(r"parseChoice\((k\w+), text, params\.(\w+)\)", source):
        pairs = re.findall(r'\{"(\w+)", (\w+)\}', arrays.get(array, ""))
        problems += _compare(array, [(name, c_name) for name, c_name in pairs],
                             [(name, f"LYNX_{member.upper()}_{name.upper()}") for name in contract.C_CHOICES.get(member, ())])
    identity = dict(re.findall(r'constexpr char const\* (k\w+) = "(\w+)";', header))
    problems += _compare("plugin identity", [identity.get(k) for k in ("kPluginName", "kPluginNamespace", "kPluginVersion")],
                         [contract.OP_TYPE, contract.PLUGIN_NAMESPACE, contract.PLUGIN_VERSION])
    return problems


# --- the README -----------------------------------------------------------------------------------


def _markdown_table(text: str, heading: str, first_column: str) -> list[list[str]]:
    """Rows (header first) of the first table under `heading` whose header starts with `first_column`."""
    lines = _section(text, f"\n{heading}\n", "\n## ").splitlines()
    start = next((n for n, line in enumerate(lines) if line.startswith(f"| {first_column} |")), None)
    if start is None:
        return []
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        if not set(line) <= set("|- "):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def _with_quantized(plain: str, quantized: str | None) -> str:
    return plain if quantized is None else f"{plain}; quantized: {quantized}"


def _default_cell(a: contract.Attribute) -> str:
    return "—" if a.default is None else "+inf" if a.default == math.inf else str(a.default)


def _plugin_cell(a: contract.Attribute) -> str:
    return {PluginUse.FIELD: str(a.field_type), PluginUse.GUARD: f"{a.field_type} (guard)", PluginUse.NONE: "—"}[a.plugin]


def readme_problems(text: str) -> list[str]:
    yes = {True: "yes", False: "no"}
    problems = []
    identity = {row[0]: row[1] for row in _markdown_table(text, "## Identity", "field")[1:]}
    problems += _compare("Identity", [identity.get(k) for k in ("ONNX domain", "op type / plugin name", "`plugin_namespace` attribute", "`plugin_version` attribute")],
                         [f"`{v}`" for v in (contract.DOMAIN, contract.OP_TYPE, contract.PLUGIN_NAMESPACE, contract.PLUGIN_VERSION)])
    inputs = _markdown_table(text, "## Inputs", "#")
    problems += _compare("Inputs header", inputs[:1], [["#", "name", "dtype", "shape", "optional", "plugins", "notes"]])
    problems += _compare("Inputs", [row[:6] for row in inputs[1:]],
                         [[str(int(i.slot)), i.name, _with_quantized(i.dtype, i.quantized_dtype), _with_quantized(i.shape, i.quantized_shape),
                           yes[i.optional], yes[i.plugin]] for i in INPUTS])
    attributes = _markdown_table(text, "## Attributes", "name")
    problems += _compare("Attributes header", attributes[:1], [["name", "type", "required", "absent means", "written", "plugins", "meaning"]])
    problems += _compare("Attributes", [row[:6] for row in attributes[1:]],
                         [[a.name, a.onnx_type, yes[a.required], _default_cell(a), a.written, _plugin_cell(a)] for a in ATTRIBUTES])
    return problems


# --- the copies agree with the table --------------------------------------------------------------


def test_the_c_header_matches_the_table():
    assert header_problems(HEADER) == []


def test_the_cpp_plugin_matches_the_table():
    assert cpp_problems(CPP) == []


def test_the_readme_matches_the_table():
    assert readme_problems(README) == []


DRIFTS = [
    # (checker, text, what a careless edit would change, into what)
    (header_problems, HEADER, "float alpha;", "int32_t alpha;"),
    (header_problems, HEADER, "int32_t budget;", "int32_t budgets;"),
    (header_problems, HEADER, "const void* fc2_bias;", "const void* fc2_bias_;"),
    (header_problems, HEADER, "LYNX_POLICY_BUDGET = 2", "LYNX_POLICY_BUDGET = 3"),
    (header_problems, HEADER, "[E,2I,H] weight dtype", "[E,H,2I] weight dtype"),
    (cpp_problems, CPP, 'PluginField("swiglu_limit", nullptr, PluginFieldType::kFLOAT32, 1)', 'PluginField("swiglu_limit", nullptr, PluginFieldType::kINT32, 1)'),
    (cpp_problems, CPP, 'mFields.emplace_back("budget"', 'mFields.emplace_back("budgets"'),
    (cpp_problems, CPP, 'name == "beta") ok = readInt', 'name == "beta") ok = readFloat'),
    (cpp_problems, CPP, "kNUM_VALID = 7,", "kNUM_VALID = 8,"),
    (cpp_problems, CPP, '{"index", LYNX_TIE_BREAK_INDEX}', '{"lowest", LYNX_TIE_BREAK_INDEX}'),
    (readme_problems, README, "| 9 | fc2_scales |", "| 9 | fc2_scale |"),
    (readme_problems, README, "| top_k | INT |", "| top_k | FLOAT |"),
    (readme_problems, README, "| weight_bits | INT | no | 0 |", "| weight_bits | INT | no | 4 |"),
    (readme_problems, README, "| 7 | num_valid | int64 | [] | yes | yes |", "| 7 | num_valid | int64 | [] | no | yes |"),
]


@pytest.mark.parametrize("check,text,old,new", DRIFTS, ids=[f"{d[0].__name__}:{d[2][:30]}" for d in DRIFTS])
def test_a_drifted_copy_fails(check: Callable[[str], list[str]], text: str, old: str, new: str):
    assert old in text  # the case still describes the file
    assert check(text.replace(old, new, 1))


def test_swapped_rows_fail():
    """Order counts: two attribute rows of the README or two creator fields swapped are drift."""
    rows = [line for line in README.splitlines() if line.startswith("| beta |") or line.startswith("| budget |")]
    assert len(rows) == 2 and readme_problems(README.replace(rows[0], "\0").replace(rows[1], rows[0]).replace("\0", rows[1]))
    first, second = ('PluginField("beta", nullptr', 'PluginField("budget", nullptr')
    assert cpp_problems(CPP.replace(first, "\0").replace(second, first).replace("\0", second))


# --- the Python copies derive from the table ------------------------------------------------------


def test_slots_are_the_table_rows_in_order():
    assert [i.slot for i in INPUTS] == list(Slot) and [int(s) for s in Slot] == list(range(len(Slot)))
    assert contract.PLUGIN_SLOTS == tuple(Slot)[: len(contract.PLUGIN_SLOTS)]  # plugin inputs come first
    assert all(i.dtype in contract.DTYPES and (i.quantized_dtype is None or i.quantized_dtype in contract.DTYPES) for i in INPUTS)
    assert [f.name for f in dataclasses.fields(reference.LynxMoEInputs)] == [i.name for i in INPUTS]


def test_the_ctypes_binding_follows_the_table():
    c_types = {"int32_t": ctypes.c_int32, "float": ctypes.c_float}
    assert lynx_moe_lib.Params._fields_ == [(n, c_types[t]) for n, t in contract.C_PARAMS]
    assert [n for n, _ in lynx_moe_lib.Tensors._fields_] == list(contract.C_TENSORS)
    assert [(d.name.lower(), int(d)) for d in lynx_moe_lib.DType] == [(n, i) for i, n in enumerate(contract.C_DTYPES)]
    # Every plugin field the kernels take has a parameter (activation is checked, not passed).
    assert {f.name for f in PLUGIN_FIELDS} - {"activation"} <= {n for n, _ in contract.C_PARAMS}
    params = lynx_moe_lib.params_from_attributes(contract.to_attributes(_spec(), LynxPolicy(alpha=3.0, beta=1, tie_break="index")))
    assert (params.policy, params.tie_break, params.beta, params.swiglu_limit) == (1, 1, 1, math.inf)


def _fake_tensorrt() -> types.ModuleType:
    """The few TensorRT Python names trt_plugin's field handling uses, for machines without TensorRT."""
    trt = types.ModuleType("fake_tensorrt")

    class Base:
        def __init__(self) -> None:
            pass

    @dataclasses.dataclass
    class PluginField:
        name: str
        data: np.ndarray
        type: object

    trt.IPluginCreatorV3One = type("IPluginCreatorV3One", (Base,), {})
    for name in ("IPluginV3", "IPluginV3OneCore", "IPluginV3OneBuild", "IPluginV3OneRuntime"):
        setattr(trt, name, type(name, (Base,), {}))
    trt.PluginField = PluginField
    trt.PluginFieldCollection = list
    trt.PluginFieldType = enum.Enum("PluginFieldType", "INT32 FLOAT32 CHAR")
    trt.DataType = enum.Enum("DataType", "FLOAT HALF BF16")
    return trt


def _trt_modules() -> list[types.ModuleType]:
    real = [importlib.import_module(m) for m in ("tensorrt_rtx", "tensorrt") if importlib.util.find_spec(m) is not None]
    return [_fake_tensorrt(), *real]


def _spec(**overrides: object) -> MoESpec:
    fields = dict(num_experts=8, top_k=2, hidden_size=64, expert_size=32, activation="swiglu", router=RouterForm.SOFTMAX_TOPK, normalize=True)
    return MoESpec(**{**fields, **overrides})  # type: ignore[arg-type]


_KEEP_ALIVE: list[np.ndarray] = []  # TensorRT's PluginField points into its array without owning it


def _parser_fields(trt: types.ModuleType, attributes: dict[str, object], declared: set[str]) -> list:
    """What the ONNX parser hands the creator: the declared attributes as plugin fields."""
    fields = []
    for name, value in attributes.items():
        if name not in declared:
            continue
        if isinstance(value, str):
            data, kind = np.frombuffer(value.encode() + b"\0", np.int8).copy(), trt.PluginFieldType.CHAR
        elif isinstance(value, float):
            data, kind = np.array([value], np.float32), trt.PluginFieldType.FLOAT32
        else:
            data, kind = np.array([value], np.int32), trt.PluginFieldType.INT32
        _KEEP_ALIVE.append(data)
        fields.append(trt.PluginField(name, data, kind))
    return fields


@pytest.mark.parametrize("trt", _trt_modules(), ids=lambda m: m.__name__)
def test_the_python_plugin_declares_and_serializes_the_table_fields(trt):
    creator = trt_plugin._creator_class(trt)()
    declared = [(f.name, f.type) for f in creator.field_names]
    assert declared == [(f.name, getattr(trt.PluginFieldType, f.type)) for f in PLUGIN_FIELDS + PLUGIN_GUARDS]
    assert trt_plugin.FIELD_NAMES == tuple(f.name for f in PLUGIN_FIELDS)
    assert trt_plugin.FIELD_DEFAULTS == {a.name: a.default for a in ATTRIBUTES if a.plugin is PluginUse.FIELD and not a.required}
    attributes = contract.to_attributes(_spec(swiglu_limit=7.0), LynxPolicy(alpha=3.0, beta=1))
    plugin = creator.create_plugin("layers.0.mlp", trt.PluginFieldCollection(_parser_fields(trt, attributes, {n for n, _ in declared})), None)
    serialized = list(plugin.get_fields_to_serialize())
    assert [(f.name, f.type) for f in serialized] == [(f.name, getattr(trt.PluginFieldType, f.type)) for f in PLUGIN_FIELDS]
    values = {f.name: np.asarray(f.data) for f in serialized}
    assert values["swiglu_limit"][0] == 7.0 and values["policy"].tobytes() == b"lynx\0" and values["beta"][0] == 1


@pytest.mark.parametrize("trt", _trt_modules(), ids=lambda m: m.__name__)
def test_the_python_plugin_refuses_quantized_experts_in_one_line(trt):
    creator = trt_plugin._creator_class(trt)()
    attributes = contract.to_attributes(_spec(), OffPolicy(), WeightQuantization(4, 32))
    fields = _parser_fields(trt, attributes, {f.name for f in creator.field_names})
    with pytest.raises(EngineError) as info:
        creator.create_plugin("layers.3.mlp", trt.PluginFieldCollection(fields), None)
    message = str(info.value)
    assert "\n" not in message and "layers.3.mlp" in message and "does not implement quantized experts yet" in message
    assert creator.refusals == [message]


# --- to_attributes / from_attributes ----------------------------------------------------------------


def test_attributes_follow_the_table_and_float_nodes_carry_no_quantization():
    names = [a.name for a in ATTRIBUTES]
    plain = contract.to_attributes(_spec(), OffPolicy())
    assert list(plain)[:2] == ["plugin_namespace", "plugin_version"]
    written = list(plain)[2:]
    assert written == [n for n in names if n in written]  # the table's order
    assert {a.name for a in ATTRIBUTES if a.required} <= set(written)
    assert not {"weight_bits", "block_size", "swiglu_limit", "num_groups"} & set(written)
    assert contract.from_attributes(plain).quantization is None
    quantized = contract.to_attributes(_spec(), OffPolicy(), WeightQuantization(8, 64))
    assert {k: v for k, v in quantized.items() if k not in plain} == {"weight_bits": 8, "block_size": 64}
    assert list(quantized)[-2:] == ["weight_bits", "block_size"]
    parsed = contract.from_attributes(quantized)
    assert parsed.quantization == WeightQuantization(8, 64) and parsed.spec == _spec()


@pytest.mark.parametrize("bits,block", [(3, 32), (4, 0), (8, 24), (4, 8)])
def test_quantization_outside_the_contract_is_a_value_error(bits, block):
    attributes = {**contract.to_attributes(_spec(), OffPolicy()), "weight_bits": bits, "block_size": block}
    with pytest.raises(ValueError, match="weight_bits|block_size"):
        contract.from_attributes(attributes)


def test_a_missing_required_attribute_is_a_key_error():
    attributes = contract.to_attributes(_spec(), OffPolicy())
    del attributes["tie_break"]
    with pytest.raises(KeyError, match="tie_break"):
        contract.from_attributes(attributes)


# --- the numpy reference ------------------------------------------------------------------------------


def test_the_reference_and_the_gpu_check_import_without_onnx_ir():
    blocked = "import sys; sys.modules['onnx_ir'] = None; sys.modules['onnx'] = None; sys.modules['onnxruntime'] = None; "
    code = blocked + "import lynx_export.op.reference, lynx_export.op.contract, lynx_export.backends.lynx_moe_lib"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    script = blocked + f"import runpy; sys.argv = ['gpu_check.py', '--help']; runpy.run_path({str(ROOT / 'scripts' / 'gpu_check.py')!r}, run_name='__main__')"
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "usage" in r.stdout, r.stderr


def test_phase_gating_and_padding_of_the_reference():
    rng = np.random.default_rng(3)
    spec, policy = _spec(), LynxPolicy(alpha=0.7, beta=1)
    logits = (rng.standard_normal(8) * 2 + rng.standard_normal((12, 8))).astype(np.float32)
    assert reference.select(spec, policy, logits, seq_len=1).ids.tolist() == policy.select(logits, 2).ids.tolist()
    assert reference.select(spec, policy, logits, seq_len=7).ids.tolist() == OffPolicy().select(logits, 2).ids.tolist()
    assert reference.select(spec, policy, logits, num_valid=5).ids.tolist() == policy.select(logits, 2, valid=5).ids.tolist()
    assert reference.valid_rows(np.iinfo(np.int64).max, 12) == 12 and reference.valid_rows(-3, 12) == 0 and reference.valid_rows(None, 4) == 4


def _pack(values: np.ndarray, bits: int) -> np.ndarray:
    """uint8 bytes of `bits`-wide values along the last axis, low nibble first (MatMulNBits)."""
    v = values.astype(np.uint8)
    if bits == 8:
        return v
    if v.shape[-1] % 2:
        v = np.concatenate([v, np.zeros((*v.shape[:-1], 1), np.uint8)], axis=-1)
    return (v[..., 0::2] | (v[..., 1::2] << 4)).astype(np.uint8)


def test_dequantize_blockwise_by_hand():
    # int4, one row of K=32 in two blocks of 16; zero points 3 and 12 share one byte (low nibble first).
    q = np.arange(32) % 16
    scales = np.array([[[0.5, 2.0]]], np.float32)
    got = reference.dequantize_blockwise(_pack(q, 4)[None, None], scales, np.array([[[3 | 12 << 4]]], np.uint8), 4, 16, 32)
    np.testing.assert_array_equal(got[0, 0], np.concatenate([(q[:16] - 3) * 0.5, (q[16:] - 12) * 2.0]))
    assert got.dtype == np.float32 and got.shape == (1, 1, 32)
    # Absent zero points: 2^(bits-1); int8 stores one value per byte; a partial last block (K=20).
    got = reference.dequantize_blockwise(np.full((1, 1, 32), 130, np.uint8), np.ones((1, 1, 2), np.float16), None, 8, 16, 20)
    np.testing.assert_array_equal(got, np.full((1, 1, 20), 2.0))
    with pytest.raises(ValueError, match="scales"):
        reference.dequantize_blockwise(_pack(q, 4)[None, None], np.ones((1, 1, 3), np.float32), None, 4, 16, 32)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("k,block", [(64, 16), (48, 32)])
def test_dequantize_blockwise_agrees_with_matmulnbits(bits, k, block):
    """ONNX Runtime's MatMulNBits reads the same packing: Y = A @ dequantized(B).T up to fp32 summation order."""
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(bits + k)
    n, blocks = 6, -(-k // block)
    q = _pack(rng.integers(0, 2**bits, (n, blocks * block)), bits)
    zero = _pack(rng.integers(0, 2**bits, (n, blocks)), bits)
    scales = rng.uniform(0.01, 0.1, (n, blocks)).astype(np.float32)
    a = rng.standard_normal((3, k)).astype(np.float32)
    node = helper.make_node("MatMulNBits", ["A", "B", "S", "Z"], ["Y"], domain="com.microsoft", K=k, N=n, bits=bits, block_size=block)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [3, k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [3, n])],
                              [numpy_helper.from_array(q.reshape(n, blocks, -1), "B"), numpy_helper.from_array(scales.ravel(), "S"),
                               numpy_helper.from_array(zero.ravel(), "Z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"A": a})[0]
    w = reference.dequantize_blockwise(q[None], scales[None], zero[None], bits, block, k)[0].astype(np.float64)
    # MLAS picks its kernel, and so the fp32 summation order, by CPU features: a k-long fp32 dot
    # product in any order is within k * eps/2 * sum|a||w| of the exact one, and each weight it
    # dequantizes within eps/2 of ours, so (k + 1) * eps * sum|a||w| bounds the difference.
    bound = (k + 1) * np.finfo(np.float32).eps * (np.abs(a.astype(np.float64)) @ np.abs(w).T)
    assert np.all(np.abs(y - a.astype(np.float64) @ w.T) <= bound)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("zero_points", [True, False])
def test_quantized_node_equals_the_float_node_on_its_dequantized_weights(bits, zero_points):
    rng = np.random.default_rng(bits)
    spec, policy, quantization = _spec(), LynxPolicy(alpha=3.0, beta=1), WeightQuantization(bits, 16)
    e, h, i = spec.num_experts, spec.hidden_size, spec.expert_size
    q1, q2 = rng.integers(0, 2**bits, (e, 2 * i, h)), rng.integers(0, 2**bits, (e, h, i))
    s1, s2 = rng.uniform(0.01, 0.05, (e, 2 * i, h // 16)).astype(np.float32), rng.uniform(0.01, 0.05, (e, h, i // 16)).astype(np.float32)
    z1 = _pack(rng.integers(0, 2**bits, s1.shape), bits) if zero_points else None
    z2 = _pack(rng.integers(0, 2**bits, s2.shape), bits) if zero_points else None
    hidden, logits = rng.standard_normal((9, h)).astype(np.float32), rng.standard_normal((9, e)).astype(np.float32)
    quantized = reference.LynxMoEInputs(hidden=hidden, router_logits=logits, fc1=_pack(q1, bits), fc2=_pack(q2, bits), seq_len=1,
                                        fc1_scales=s1, fc2_scales=s2, fc1_zero_points=z1, fc2_zero_points=z2)
    fc1 = reference.dequantize_blockwise(_pack(q1, bits), s1, z1, bits, 16, h)
    fc2 = reference.dequantize_blockwise(_pack(q2, bits), s2, z2, bits, 16, i)
    assert fc1.shape == (e, 2 * i, h) and fc2.shape == (e, h, i)
    want = reference.lynx_moe(reference.LynxMoEInputs(hidden=hidden, router_logits=logits, fc1=fc1, fc2=fc2, seq_len=1), spec, policy)
    np.testing.assert_array_equal(reference.lynx_moe(quantized, spec, policy, quantization), want)
    with pytest.raises(ValueError, match="scales"):
        reference.lynx_moe(dataclasses.replace(quantized, fc2_scales=None), spec, policy, quantization)
