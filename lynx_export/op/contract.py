"""The contract of the `LynxMoE` node as one table: identity, input slots, attributes, plugin fields, C API.

This module is the single source. The rewrite writes nodes with `to_attributes`; every backend
reads them with `from_node` / `from_attributes`; the Python TensorRT plugin and the ctypes binding
derive their field lists from the tables below. The copies that cannot import Python (the C
header, the C++ adapter, plugins/lynx_moe/README.md) are checked against these tables as text by
tests/test_contract.py, so none of them can drift unnoticed.

Pure data plus numpy: no onnx-ir at import time, because scripts/gpu_check.py and the numpy
reference (op/reference.py) run where onnx-ir may be absent.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from lynx_export.op.spec import MoESpec, WeightQuantization
from lynx_export.routing import INT32_MAX, RouterForm, SelectionPolicy, make_policy

if TYPE_CHECKING:  # only for the annotation of from_node: the module must import without onnx-ir
    import onnx_ir as ir

__all__ = [
    "INT32_MAX",  # the op's integer attributes, plugin fields and TensorRT profile dimensions are int32
    "DOMAIN",
    "is_lynx_node",
    "OP_TYPE",
    "PLUGIN_NAMESPACE",
    "PLUGIN_VERSION",
    "DTYPES",
    "Slot",
    "Input",
    "INPUTS",
    "PLUGIN_SLOTS",
    "QUANTIZED_SLOTS",
    "PluginUse",
    "Attribute",
    "ATTRIBUTES",
    "ATTRIBUTE_BY_NAME",
    "PluginField",
    "PLUGIN_FIELDS",
    "PLUGIN_GUARDS",
    "C_PARAMS",
    "C_CHOICES",
    "C_DTYPES",
    "C_TENSORS",
    "LynxMoEAttributes",
    "to_attributes",
    "from_attributes",
    "from_node",
    "write_attributes",
    "gate_up",
]

# --- identity ----------------------------------------------------------------------------------

DOMAIN = "trt.plugins"
OP_TYPE = "LynxMoE"
PLUGIN_NAMESPACE = "lynx"
PLUGIN_VERSION = "1"

# --- inputs ------------------------------------------------------------------------------------

# Element types an input may have, by the group names the README uses: the activations (hidden,
# router logits, output) share one float type and the float weights another, independently.
DTYPES: dict[str, tuple[str, ...]] = {
    "activation": ("float32", "float16", "bfloat16"),
    "weight": ("float32", "float16", "bfloat16"),
    "int64": ("int64",),
    "uint8": ("uint8",),
}


class Slot(enum.IntEnum):
    """Input positions of LynxMoE (`INPUTS` describes each). Optional slots are empty strings in ONNX."""

    HIDDEN = 0
    ROUTER_LOGITS = 1
    FC1 = 2
    FC1_BIAS = 3
    FC2 = 4
    FC2_BIAS = 5
    SEQ_LEN = 6
    NUM_VALID = 7
    # Quantized experts only (weight_bits > 0); after NUM_VALID so float nodes keep their inputs.
    FC1_SCALES = 8
    FC2_SCALES = 9
    FC1_ZERO_POINTS = 10
    FC2_ZERO_POINTS = 11


@dataclass(frozen=True)
class Input:
    """One input slot. Shapes use T tokens, H hidden size, I expert size, E experts, `bits` and
    `block_size` (the quantization attributes); [] is a scalar."""

    slot: Slot
    dtype: str  # a DTYPES key
    shape: str
    optional: bool
    description: str
    plugin: bool = True  # the TensorRT plugins take it (a pointer in lynx_moe_tensors_t)
    quantized_dtype: str | None = None  # dtype and shape instead when weight_bits > 0 (None: unchanged)
    quantized_shape: str | None = None

    @property
    def name(self) -> str:
        return self.slot.name.lower()


INPUTS: tuple[Input, ...] = (
    Input(Slot.HIDDEN, "activation", "[T,H]", False, "tokens the experts read"),
    Input(Slot.ROUTER_LOGITS, "activation", "[T,E]", False, "the model's own router output; the router stays in the graph"),
    Input(Slot.FC1, "weight", "[E,2I,H]", False, "gate/up projections, rows interleaved: row 2i = gate_i, row 2i+1 = up_i",
          quantized_dtype="uint8", quantized_shape="[E,2I,H*bits/8]"),
    Input(Slot.FC1_BIAS, "weight", "[E,2I]", True, "interleaved like fc1", quantized_dtype="activation"),
    Input(Slot.FC2, "weight", "[E,H,I]", False, "down projection", quantized_dtype="uint8", quantized_shape="[E,H,I*bits/8]"),
    Input(Slot.FC2_BIAS, "weight", "[E,H]", True, "down projection bias", quantized_dtype="activation"),
    Input(Slot.SEQ_LEN, "int64", "[]", True, "the policy runs only when it equals 1 (decode); absent: every call is a decode step"),
    Input(Slot.NUM_VALID, "int64", "[]", True, "rows >= num_valid are padding and do not vote; absent (or >= T): every row votes"),
    Input(Slot.FC1_SCALES, "activation", "[E,2I,H/block_size]", True,
          "quantized only, required then: one scale per block of block_size inputs", plugin=False),
    Input(Slot.FC2_SCALES, "activation", "[E,H,I/block_size]", True,
          "quantized only, required then: one scale per block of block_size inputs", plugin=False),
    Input(Slot.FC1_ZERO_POINTS, "uint8", "[E,2I,ceil(H/block_size*bits/8)]", True,
          "quantized only: packed like MatMulNBits zero points; absent: 2^(bits-1)", plugin=False),
    Input(Slot.FC2_ZERO_POINTS, "uint8", "[E,H,ceil(I/block_size*bits/8)]", True,
          "quantized only: packed like MatMulNBits zero points; absent: 2^(bits-1)", plugin=False),
)

PLUGIN_SLOTS: tuple[Slot, ...] = tuple(i.slot for i in INPUTS if i.plugin)  # the plugins' inputs, in order
QUANTIZED_SLOTS: tuple[Slot, ...] = tuple(i.slot for i in INPUTS if not i.plugin)

# --- attributes --------------------------------------------------------------------------------


class PluginUse(enum.Enum):
    """What the TensorRT plugins do with an attribute."""

    FIELD = "field"  # both plugins declare it and serialize it into the engine
    GUARD = "guard"  # only the Python plugin declares it, to refuse a node whose value is not the
    #                  default (the ONNX parser passes only declared fields); never serialized
    NONE = "none"  # not declared; nodes that need it are refused otherwise (router value, input count)


@dataclass(frozen=True)
class Attribute:
    """One node attribute. `default` is what a node without it means; None with `required`."""

    name: str
    onnx_type: str  # INT, FLOAT, STRING or FLOATS
    required: bool  # every node carries it (plugin version 1's first release wrote it)
    default: object
    written: str  # when the rewrite writes it
    description: str
    plugin: PluginUse = PluginUse.FIELD

    @property
    def field_type(self) -> str | None:
        """The plugin field's type (TensorRT's PluginFieldType name), or None when not declared."""
        return None if self.plugin is PluginUse.NONE else _FIELD_TYPES[self.onnx_type]


_FIELD_TYPES = {"INT": "INT32", "FLOAT": "FLOAT32", "STRING": "CHAR"}
_ALWAYS = "always"
_GROUPED = "router is sigmoid_grouped"
_QUANTIZED = "weight_bits > 0"

ATTRIBUTES: tuple[Attribute, ...] = (
    Attribute("num_experts", "INT", True, None, _ALWAYS, "E"),
    Attribute("top_k", "INT", True, None, _ALWAYS, "K"),
    Attribute("hidden_size", "INT", True, None, _ALWAYS, "H"),
    Attribute("expert_size", "INT", True, None, _ALWAYS, "I"),
    Attribute("activation", "STRING", True, None, _ALWAYS, "`swiglu`"),
    Attribute("router", "STRING", True, None, _ALWAYS,
              "`softmax_topk` (softmax, top-K, optional renormalise), `topk_softmax`, or `sigmoid_grouped` "
              "(DeepSeek-V3; ONNX Runtime lowering only, see Routing)"),
    Attribute("normalize", "INT", True, None, _ALWAYS,
              "1: top-K weights renormalised to sum 1 (`sigmoid_grouped`: to sum 1 before `routed_scaling`)"),
    Attribute("policy", "STRING", True, None, _ALWAYS, "`off`, `lynx` or `budget`"),
    Attribute("alpha", "FLOAT", True, None, _ALWAYS, "`lynx`: bin resolution (0 for the other policies)"),
    Attribute("beta", "INT", True, None, _ALWAYS, "`lynx`: bin floor; -1 for none"),
    Attribute("budget", "INT", True, None, _ALWAYS, "`budget`: experts kept per batch (0 for the other policies)"),
    Attribute("tie_break", "STRING", True, None, _ALWAYS, "`lynx`: `logit` (default) or `index`"),
    # Added after version 1's first release: nodes written before lack them.
    Attribute("activation_alpha", "FLOAT", False, 1.0, _ALWAYS, "SwiGLU: `gate * sigmoid(alpha * gate)`"),
    Attribute("activation_beta", "FLOAT", False, 0.0, _ALWAYS, "SwiGLU: `(up + beta)`"),
    Attribute("swiglu_limit", "FLOAT", False, math.inf, "the experts clamp",
              "SwiGLU: gate clamped to `<= limit`, up to `[-limit, limit]` before the activation; "
              "+inf: no clamp (gpt-oss: alpha 1.702, beta 1, limit 7)"),
    Attribute("num_groups", "INT", False, 1, _GROUPED, "experts in this many contiguous groups of E / num_groups", PluginUse.NONE),
    Attribute("topk_groups", "INT", False, 1, _GROUPED, "groups each token may route into", PluginUse.NONE),
    Attribute("routed_scaling", "FLOAT", False, 1.0, _GROUPED, "factor on the routing weights (DeepSeek-V3: 2.5)", PluginUse.NONE),
    Attribute("score_bias", "FLOATS", False, None, _GROUPED + " with a bias",
              "[E] added to the sigmoid scores to rank experts, never to the weights "
              "(DeepSeek-V3's `e_score_correction_bias`); absent: 0", PluginUse.NONE),
    Attribute("weight_bits", "INT", False, 0, _QUANTIZED,
              "0: float experts; 4 or 8: fc1/fc2 hold block-wise quantized weights (see Quantized experts)", PluginUse.GUARD),
    Attribute("block_size", "INT", False, 0, _QUANTIZED,
              "quantization block along the input dimension K (H for fc1, I for fc2): a power of two >= 16", PluginUse.NONE),
)
ATTRIBUTE_BY_NAME: dict[str, Attribute] = {a.name: a for a in ATTRIBUTES}


@dataclass(frozen=True)
class PluginField:
    name: str
    type: str  # TensorRT's PluginFieldType name: INT32, FLOAT32 or CHAR


# Both plugins declare and serialize exactly these, in this order (the attribute table's).
PLUGIN_FIELDS: tuple[PluginField, ...] = tuple(PluginField(a.name, a.field_type) for a in ATTRIBUTES  # type: ignore[arg-type]
                                               if a.plugin is PluginUse.FIELD)
# Declared by the Python plugin only, so that it can refuse what it does not implement.
PLUGIN_GUARDS: tuple[PluginField, ...] = tuple(PluginField(a.name, a.field_type) for a in ATTRIBUTES  # type: ignore[arg-type]
                                               if a.plugin is PluginUse.GUARD)

# --- the core library's C API (include/lynx_moe.h) ---------------------------------------------

# lynx_moe_params_t, member by member: the ctypes binding's layout, so the order is the ABI.
C_PARAMS: tuple[tuple[str, str], ...] = (
    ("num_experts", "int32_t"),
    ("top_k", "int32_t"),
    ("hidden_size", "int32_t"),
    ("expert_size", "int32_t"),
    ("router", "int32_t"),
    ("normalize", "int32_t"),
    ("policy", "int32_t"),
    ("alpha", "float"),
    ("beta", "int32_t"),
    ("budget", "int32_t"),
    ("tie_break", "int32_t"),
    ("activation_dtype", "int32_t"),
    ("weight_dtype", "int32_t"),
    ("activation_alpha", "float"),
    ("activation_beta", "float"),
    ("swiglu_limit", "float"),
    ("kernels", "int32_t"),  # lynx_kernels_t flags: which kernel variants run (not an attribute; 0 = the defaults)
)
# String attributes the core library takes as C enums: the values it implements, by enum value.
C_CHOICES: dict[str, tuple[str, ...]] = {
    "router": ("softmax_topk", "topk_softmax"),
    "policy": ("off", "lynx", "budget"),
    "tie_break": ("logit", "index"),
}
C_DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16")  # lynx_dtype_t by value
# lynx_moe_tensors_t: one device pointer per plugin input, then the output.
C_TENSORS: tuple[str, ...] = tuple(INPUTS[s].name for s in PLUGIN_SLOTS) + ("output",)

# --- parsed attributes ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LynxMoEAttributes:
    """A LynxMoE node's attributes, parsed."""

    spec: MoESpec
    policy: SelectionPolicy
    quantization: WeightQuantization | None = None


def is_lynx_node(node: ir.Node) -> bool:
    """Whether `node` is a LynxMoE node: its op type in its domain (a node of the same name in
    another domain is not)."""
    return node.op_type == OP_TYPE and node.domain == DOMAIN


def gate_up(fc1: np.ndarray, axis: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Gate and up halves of the canonical interleaved gate/up layout (g0,u0,g1,u1,... along
    `axis`): fc1 [E,2I,H] -> [E,I,H] each; also its bias [E,2I], one expert's [2I,H], or a
    projection's output [N,2I] with axis=-1."""
    gate, up = [slice(None)] * fc1.ndim, [slice(None)] * fc1.ndim
    gate[axis], up[axis] = slice(0, None, 2), slice(1, None, 2)
    return fc1[tuple(gate)], fc1[tuple(up)]


def to_attributes(spec: MoESpec, policy: SelectionPolicy, quantization: WeightQuantization | None = None) -> dict[str, object]:
    """The node attributes of a block: identity first, then the table's order. Conditional
    attributes are written only when they apply, so a float softmax model's nodes stay as they were."""
    params = policy.params()
    beta = params.get("beta")
    values: dict[str, object] = {
        "num_experts": spec.num_experts,
        "top_k": spec.top_k,
        "hidden_size": spec.hidden_size,
        "expert_size": spec.expert_size,
        "activation": spec.activation,
        "router": spec.router.value,
        "normalize": int(spec.normalize),
        "policy": policy.name,
        "alpha": float(params.get("alpha") or 0.0),
        "beta": -1 if beta is None else int(beta),  # -1: no bin floor
        "budget": int(params.get("budget") or 0),
        "tie_break": str(params.get("tie_break", "logit")),
        "activation_alpha": float(spec.activation_alpha),
        "activation_beta": float(spec.activation_beta),
    }
    if spec.swiglu_limit is not None:
        values["swiglu_limit"] = float(spec.swiglu_limit)
    if spec.router is RouterForm.SIGMOID_GROUPED:
        values["num_groups"] = int(spec.num_groups)
        values["topk_groups"] = int(spec.topk_groups)
        values["routed_scaling"] = float(spec.routed_scaling)
        if spec.score_bias is not None:
            values["score_bias"] = [float(x) for x in spec.score_bias]
    if quantization is not None:
        values["weight_bits"] = int(quantization.bits)
        values["block_size"] = int(quantization.block_size)
    ordered = {a.name: values[a.name] for a in ATTRIBUTES if a.name in values}
    return {"plugin_namespace": PLUGIN_NAMESPACE, "plugin_version": PLUGIN_VERSION, **ordered}


def _float32(x: object) -> float:
    """A FLOAT attribute's value as the shortest decimal that round-trips in float32 (2.5, 0.1 for
    0.1's float32), as the matchers write spec fields, so a spec read back equals the one written."""
    return float(str(np.float32(x)))  # type: ignore[arg-type]


def from_attributes(attrs: Mapping[str, object]) -> LynxMoEAttributes:
    """Parse attribute values (name -> int, float, str or float list) into spec, policy and quantization.

    Raises KeyError for a missing required attribute and ValueError (RoutingError among them)
    for values outside the contract.
    """

    def value(name: str) -> object:
        if name in attrs:
            return attrs[name]
        attribute = ATTRIBUTE_BY_NAME[name]
        if attribute.required:
            raise KeyError(name)
        # Added after version 1's first release, or written only when it applies.
        return attribute.default

    def as_int(name: str) -> int:
        return int(value(name))  # type: ignore[call-overload]

    spec = MoESpec(
        num_experts=as_int("num_experts"),
        top_k=as_int("top_k"),
        hidden_size=as_int("hidden_size"),
        expert_size=as_int("expert_size"),
        activation=str(value("activation")),
        router=RouterForm(value("router")),
        normalize=bool(value("normalize")),
        activation_alpha=_float32(value("activation_alpha")),
        activation_beta=_float32(value("activation_beta")),
        swiglu_limit=None if "swiglu_limit" not in attrs else _float32(value("swiglu_limit")),
        # sigmoid_grouped only (written for that router alone).
        num_groups=as_int("num_groups"),
        topk_groups=as_int("topk_groups"),
        routed_scaling=_float32(value("routed_scaling")),
        score_bias=None if "score_bias" not in attrs else tuple(_float32(x) for x in value("score_bias")),  # type: ignore[attr-defined]
    )
    name = str(value("policy"))
    beta = as_int("beta")
    policy = make_policy(
        name,
        alpha=_float32(value("alpha")) if name == "lynx" else None,
        beta=None if beta < 0 else beta,
        budget=as_int("budget") if name == "budget" else None,
        tie_break=str(value("tie_break")),
        num_experts=spec.num_experts,
        top_k=spec.top_k,
    )
    bits = as_int("weight_bits")
    quantization = WeightQuantization(bits, as_int("block_size")) if bits else None
    return LynxMoEAttributes(spec, policy, quantization)


def from_node(node: ir.Node) -> LynxMoEAttributes:
    """`from_attributes` of an onnx-ir node (it only reads the attribute values)."""
    return from_attributes({name: attr.value for name, attr in node.attributes.items()})


def write_attributes(node: ir.Node, spec: MoESpec, policy: SelectionPolicy, quantization: WeightQuantization | None = None) -> None:
    """Set `to_attributes` on an onnx-ir node (other attributes it holds stay)."""
    import onnx_ir  # here, not at the top: the op's reference and the plugins import this module without onnx-ir

    for name, value in to_attributes(spec, policy, quantization).items():
        node.attributes[name] = onnx_ir.convenience.convert_attribute(name, value)
