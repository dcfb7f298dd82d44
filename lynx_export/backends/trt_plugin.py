"""The LynxMoE TensorRT plugin in Python: an IPluginV3 and its IPluginCreatorV3One creator.

One implementation serves every TensorRT flavour: `register(trt)` takes the imported module
(`tensorrt` or `tensorrt_rtx`, whose Python APIs agree on IPluginV3) and registers the creator
under the `lynx` namespace, where the ONNX parser finds it for `trt.plugins::LynxMoE` nodes.

- Build-time half (every flavour, no GPU needed): the node's attributes as fields (the contract
  table's `PLUGIN_FIELDS`), output types and shapes (dynamic dimensions pass through as
  expressions), supported formats, workspace size, and the fields serialized into the engine. A
  node the plugin does not implement (a `sigmoid_grouped` router, quantized experts) fails the
  parse with an EngineError naming the node.
- Shapes: configure_plugin (build time, -1 for dimensions not known yet) and on_shape_change
  (run time) check every input's shape against the contract table's (`[E,2I,H]` ...), so a
  transposed weight fails the build instead of giving wrong numbers (`input_shape_problem`).
- Runtime half: `enqueue` calls the core library (lynx_moe_lib) through ctypes, so a Python
  application can run engines without the C++ plugin library.

The C++ adapter in plugins/lynx_moe/trt/ implements the same contract for trtexec and Triton.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import numpy as np

from lynx_export.backends import lynx_moe_lib
from lynx_export.errors import EngineError
from lynx_export.op.contract import (ATTRIBUTE_BY_NAME, INPUTS, OP_TYPE, PLUGIN_FIELDS, PLUGIN_GUARDS, PLUGIN_NAMESPACE, PLUGIN_SLOTS,
                                     PLUGIN_VERSION, Slot)

__all__ = ["FIELD_NAMES", "FIELD_DEFAULTS", "DECLARED_FIELDS", "register", "input_shape_problem"]

# The node attributes the plugin serializes, from the contract's table; the ONNX parser passes only
# the fields a creator declares, so the creator also declares the guards, to refuse what it does
# not implement (quantized experts).
FIELD_NAMES = tuple(f.name for f in PLUGIN_FIELDS)
DECLARED_FIELDS = PLUGIN_FIELDS + PLUGIN_GUARDS
# Serialized fields a node may leave out (attributes added after the first release): their meaning when absent.
FIELD_DEFAULTS = {f.name: ATTRIBUTE_BY_NAME[f.name].default for f in PLUGIN_FIELDS if not ATTRIBUTE_BY_NAME[f.name].required}
_GUARD_DEFAULTS = {f.name: ATTRIBUTE_BY_NAME[f.name].default for f in PLUGIN_GUARDS}
_NUMPY_TYPES = {"INT32": np.int32, "FLOAT32": np.float32, "CHAR": np.int8}

_WEIGHT_SLOTS = (Slot.FC1, Slot.FC1_BIAS, Slot.FC2, Slot.FC2_BIAS)
_SCALAR_SLOTS = (Slot.SEQ_LEN, Slot.NUM_VALID)

_registered: dict[str, Any] = {}  # module name -> creator; TensorRT keeps only a reference
_TERM = re.compile(r"(\d*)([EHI])")


def _format(dims: Sequence[int]) -> str:
    return "[" + ",".join(str(int(d)) for d in dims) + "]"


def _shape_problem(name: str, shape: str, dims: tuple[int, ...], sizes: dict[str, int], tokens: tuple[int, ...] | None) -> str:
    """Why `dims` breaks the contract's `shape` ('[]', '[T,H]', '[E,2I,H]' ...), or ''; -1 matches anything.

    The C++ adapter's shapeProblem (trt/LynxMoEChecks.h) says the same, word for word.
    """
    got = f"input {name} has shape {_format(dims)}; the contract says {shape}"
    terms = shape.strip("[]").split(",") if shape != "[]" else []
    if not terms:
        return "" if all(d in (1, -1) for d in dims) else got + " (a scalar)"
    leading = terms[0] == "T"
    if leading:
        terms = terms[1:]
        if len(dims) < 2:
            return got
        if tokens is not None and (len(tokens) != len(dims) or any(a >= 0 and b >= 0 and a != b for a, b in zip(dims[:-1], tokens[:-1]))):
            return f"{got} with the leading dimensions of hidden {_format(tokens)}"
    want = []
    for term in terms:
        match = _TERM.fullmatch(term)
        if match is None:
            raise ValueError(f"unknown term '{term}' in the contract shape {shape}")
        want.append(int(match.group(1) or 1) * sizes[match.group(2)])
    fixed = dims[len(dims) - len(want):] if leading else dims
    if len(fixed) != len(want) or any(d >= 0 and d != w for d, w in zip(fixed, want)):
        return (f"{got} = [{'...,' if leading else ''}{','.join(map(str, want))}] "
                f"(E {sizes['E']}, H {sizes['H']}, I {sizes['I']})")
    return ""


def input_shape_problem(params: lynx_moe_lib.Params, dims: Sequence[Sequence[int]]) -> str:
    """The first plugin input whose dims (by slot) break the contract's shape, as a message, or ''."""
    sizes = {"E": params.num_experts, "H": params.hidden_size, "I": params.expert_size}
    hidden = tuple(int(d) for d in dims[Slot.HIDDEN])
    for slot in PLUGIN_SLOTS:
        spec = INPUTS[slot]
        problem = _shape_problem(spec.name, spec.shape, tuple(int(d) for d in dims[slot]), sizes, None if slot == Slot.HIDDEN else hidden)
        if problem:
            return problem
    return ""


def register(trt: ModuleType) -> Any:
    """Register the LynxMoE creator with `trt`'s plugin registry (once per module); returns it."""
    if trt.__name__ not in _registered:
        creator = _creator_class(trt)()
        if not trt.get_plugin_registry().register_creator(creator, PLUGIN_NAMESPACE):
            raise EngineError(f"{trt.__name__} refused to register the {OP_TYPE} plugin creator")
        _registered[trt.__name__] = creator
    return _registered[trt.__name__]


def _creator_class(trt: ModuleType) -> type:
    plugin_class = _plugin_class(trt)
    dtypes = {trt.DataType.FLOAT: lynx_moe_lib.DType.FLOAT32, trt.DataType.HALF: lynx_moe_lib.DType.FLOAT16, trt.DataType.BF16: lynx_moe_lib.DType.BFLOAT16}

    class LynxMoECreator(trt.IPluginCreatorV3One):
        def __init__(self) -> None:
            trt.IPluginCreatorV3One.__init__(self)
            self.name = OP_TYPE
            self.plugin_namespace = PLUGIN_NAMESPACE
            self.plugin_version = PLUGIN_VERSION
            self.field_names = trt.PluginFieldCollection(_declared_fields(trt))
            # Why nodes were refused: TensorRT only logs a creator's exception and the ONNX parser
            # reports "could not create the plugin", so the engine builder reads the reason here.
            self.refusals: list[str] = []

        def create_plugin(self, name: str, fields: Any, phase: Any) -> Any:
            try:
                return plugin_class(_read_fields(trt, fields), dtypes, name, self.refusals)
            except ValueError as exc:  # attributes outside what the plugin implements: fails the parse of the node
                self.refusals.append(f"{OP_TYPE} node '{name}': {exc}")
                raise EngineError(self.refusals[-1]) from None

    return LynxMoECreator


def _declared_fields(trt: ModuleType) -> list[Any]:
    return [trt.PluginField(f.name, np.array([], _NUMPY_TYPES[f.type]), getattr(trt.PluginFieldType, f.type)) for f in DECLARED_FIELDS]


def _read_fields(trt: ModuleType, fields: Any) -> dict[str, object]:
    """Node attributes from a PluginFieldCollection (ints, floats, NUL-terminated strings)."""
    attrs: dict[str, object] = {**FIELD_DEFAULTS, **_GUARD_DEFAULTS}
    for field in fields:
        data = np.asarray(field.data)
        if field.type == trt.PluginFieldType.CHAR:
            attrs[field.name] = data.astype(np.uint8).tobytes().split(b"\0", 1)[0].decode()
        elif field.type == trt.PluginFieldType.FLOAT32:
            attrs[field.name] = float(data.reshape(-1)[0])
        else:
            attrs[field.name] = int(data.reshape(-1)[0])
    return attrs


def _plugin_class(trt: ModuleType) -> type:
    class LynxMoEPlugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
        def __init__(self, attrs: dict[str, object], dtypes: dict[Any, lynx_moe_lib.DType], node: str = OP_TYPE,
                     refusals: list[str] | None = None) -> None:
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            self.plugin_name = OP_TYPE
            self.plugin_namespace = PLUGIN_NAMESPACE
            self.plugin_version = PLUGIN_VERSION
            self.num_outputs = 1
            self.attrs = attrs
            self.dtypes = dtypes
            self.node = node
            # The creator's list: a shape refused at build time is reported by the engine builder.
            self.refusals = refusals if refusals is not None else []
            # Raises ValueError for attributes outside the contract, which fails the parse of the node.
            self.params = lynx_moe_lib.params_from_attributes(attrs)
            self.library: lynx_moe_lib.CoreLibrary | None = None
            self._serialized: list[tuple[str, np.ndarray, Any]] = []

        # --- core -----------------------------------------------------------------------------
        def get_capability_interface(self, capability: Any) -> Any:
            return self

        def clone(self) -> Any:
            twin = LynxMoEPlugin(dict(self.attrs), self.dtypes, self.node, self.refusals)
            twin.params = lynx_moe_lib.Params.from_buffer_copy(self.params)
            twin.library = self.library
            return twin

        # --- build ----------------------------------------------------------------------------
        def get_output_data_types(self, input_types: list[Any]) -> list[Any]:
            return [input_types[Slot.HIDDEN]]

        def get_output_shapes(self, inputs: list[Any], shape_inputs: list[Any], expr_builder: Any) -> list[Any]:
            return [trt.DimsExprs(inputs[Slot.HIDDEN])]

        def supports_format_combination(self, pos: int, in_out: list[Any], num_inputs: int) -> bool:
            desc = in_out[pos].desc
            if desc.format != trt.TensorFormat.LINEAR:
                return False
            if pos in _SCALAR_SLOTS:
                return desc.type == trt.DataType.INT64
            if desc.type not in self.dtypes:
                return False
            # Activations (hidden, logits, output) share one type, weights another.
            if pos == Slot.ROUTER_LOGITS or pos == num_inputs:
                return desc.type == in_out[Slot.HIDDEN].desc.type
            if pos in _WEIGHT_SLOTS and pos != Slot.FC1:
                return desc.type == in_out[Slot.FC1].desc.type
            return True

        # configure_plugin gets DynamicPluginTensorDesc (the tensor in .desc, with min/opt/max);
        # on_shape_change and enqueue get PluginTensorDesc itself (.dims, .type, no .desc).
        def configure_plugin(self, inputs: list[Any], outputs: list[Any]) -> None:
            self._check_inputs([d.desc.dims for d in inputs], [d.desc.type for d in inputs])

        def on_shape_change(self, inputs: list[Any], outputs: list[Any]) -> None:
            self._check_inputs([d.dims for d in inputs], [d.type for d in inputs])

        def _check_inputs(self, dims: list[Any], types: list[Any]) -> None:
            if len(dims) != len(PLUGIN_SLOTS):
                self._refuse(f"has {len(dims)} inputs, the plugin takes {len(PLUGIN_SLOTS)}")
            problem = input_shape_problem(self.params, dims)
            if problem:
                self._refuse(problem)
            self.params.activation_dtype = int(self.dtypes[types[Slot.HIDDEN]])
            self.params.weight_dtype = int(self.dtypes[types[Slot.FC1]])

        def _refuse(self, why: str) -> None:
            self.refusals.append(f"{OP_TYPE} node '{self.node}': {why}")
            raise EngineError(self.refusals[-1])

        def get_workspace_size(self, inputs: list[Any], outputs: list[Any]) -> int:
            max_tokens = math.prod(inputs[Slot.HIDDEN].max[:-1])
            return lynx_moe_lib.workspace_bytes(self.params, max_tokens)

        def get_valid_tactics(self) -> list[int]:
            return []

        def set_tactic(self, tactic: int) -> None:
            pass

        def get_fields_to_serialize(self) -> Any:
            # A PluginField points into its array without owning it: the plugin keeps the arrays
            # alive until TensorRT has copied them (a temporary array serialised garbage).
            self._serialized = [(f.name, self._field_data(f.name, f.type), getattr(trt.PluginFieldType, f.type)) for f in PLUGIN_FIELDS]
            return trt.PluginFieldCollection([trt.PluginField(n, data, kind) for n, data, kind in self._serialized])

        def _field_data(self, name: str, kind: str) -> np.ndarray:
            if kind == "CHAR":  # NUL-terminated, as the C++ plugin writes strings
                return np.frombuffer(str(self.attrs[name]).encode() + b"\0", np.int8).copy()
            return np.array([self.attrs[name]], _NUMPY_TYPES[kind])

        # --- runtime --------------------------------------------------------------------------
        def attach_to_context(self, context: Any) -> Any:
            return self.clone()

        def enqueue(self, input_desc: list[Any], output_desc: list[Any], inputs: list[int], outputs: list[int], workspace: int, stream: int) -> None:
            if self.library is None:
                self.library = lynx_moe_lib.CoreLibrary()
            self.params.activation_dtype = int(self.dtypes[input_desc[Slot.HIDDEN].type])
            self.params.weight_dtype = int(self.dtypes[input_desc[Slot.FC1].type])
            tokens = math.prod(tuple(input_desc[Slot.HIDDEN].dims)[:-1])  # [T,H] or [B,S,H]
            if tokens == 0:
                return  # an empty batch: nothing to write
            tensors = lynx_moe_lib.Tensors(*[inputs[s] for s in PLUGIN_SLOTS], outputs[0])
            size = lynx_moe_lib.workspace_bytes(self.params, tokens)
            self.library.enqueue(self.params, tokens, tensors, workspace, size, stream)

    return LynxMoEPlugin
