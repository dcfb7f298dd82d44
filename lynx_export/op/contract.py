"""The contract of the `LynxMoE` node: domain, input slots and attributes, in one place.

The rewrite writes these nodes, every backend reads them; plugins/lynx_moe/README.md documents
the same contract for the TensorRT plugin.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from lynx_export.routing import RouterForm, SelectionPolicy, make_policy
from lynx_export.op.spec import MoESpec

__all__ = ["DOMAIN", "OP_TYPE", "PLUGIN_NAMESPACE", "PLUGIN_VERSION", "Slot", "LynxMoEAttributes", "to_attributes", "from_node", "gate_up"]

DOMAIN = "trt.plugins"
OP_TYPE = "LynxMoE"
PLUGIN_NAMESPACE = "lynx"
PLUGIN_VERSION = "1"


class Slot(enum.IntEnum):
    """Input positions of LynxMoE. Optional slots are empty strings in ONNX."""

    HIDDEN = 0  # [T,H] float
    ROUTER_LOGITS = 1  # [T,E] float, the model's own router output
    FC1 = 2  # [E,2I,H] gate/up rows interleaved: row 2i = gate_i, row 2i+1 = up_i
    FC1_BIAS = 3  # [E,2I] optional
    FC2 = 4  # [E,H,I]
    FC2_BIAS = 5  # [E,H] optional
    SEQ_LEN = 6  # int64 scalar, optional: the policy runs only when it equals 1 (decode)
    NUM_VALID = 7  # int64 scalar, optional: rows >= NUM_VALID are padding and do not vote


@dataclass(frozen=True)
class LynxMoEAttributes:
    """A LynxMoE node's attributes, parsed."""

    spec: MoESpec
    policy: SelectionPolicy


def gate_up(fc1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gate and up projections [E,I,H] of a canonical fc1 [E,2I,H] (rows interleaved)."""
    return fc1[:, 0::2], fc1[:, 1::2]


def to_attributes(spec: MoESpec, policy: SelectionPolicy) -> dict[str, object]:
    params = policy.params()
    beta = params.get("beta")
    optional: dict[str, object] = {}
    if spec.swiglu_limit is not None:
        optional["swiglu_limit"] = float(spec.swiglu_limit)
    if spec.router is RouterForm.SIGMOID_GROUPED:
        optional["num_groups"] = int(spec.num_groups)
        optional["topk_groups"] = int(spec.topk_groups)
        optional["routed_scaling"] = float(spec.routed_scaling)
        if spec.score_bias is not None:
            optional["score_bias"] = [float(x) for x in spec.score_bias]
    return {
        "plugin_namespace": PLUGIN_NAMESPACE,
        "plugin_version": PLUGIN_VERSION,
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
        **optional,
    }


def _float32(x: float) -> float:
    """A FLOAT attribute's value as the shortest decimal that round-trips in float32 (2.5, 0.1 for
    0.1's float32), as the matchers write spec fields, so a spec read back equals the one written."""
    return float(str(np.float32(x)))


def from_node(node: ir.Node) -> LynxMoEAttributes:
    a = node.attributes

    def get(name: str):
        return a[name].value

    def get_or(name: str, default):
        # Attributes added after version 1's first release: nodes written before lack them.
        return a[name].value if name in a else default

    spec = MoESpec(
        num_experts=get("num_experts"),
        top_k=get("top_k"),
        hidden_size=get("hidden_size"),
        expert_size=get("expert_size"),
        activation=get("activation"),
        router=RouterForm(get("router")),
        normalize=bool(get("normalize")),
        activation_alpha=_float32(get_or("activation_alpha", 1.0)),
        activation_beta=_float32(get_or("activation_beta", 0.0)),
        swiglu_limit=None if "swiglu_limit" not in a else _float32(get("swiglu_limit")),
        # sigmoid_grouped only (written for that router alone).
        num_groups=int(get_or("num_groups", 1)),
        topk_groups=int(get_or("topk_groups", 1)),
        routed_scaling=_float32(get_or("routed_scaling", 1.0)),
        score_bias=None if "score_bias" not in a else tuple(_float32(x) for x in get("score_bias")),
    )
    name = get("policy")
    policy = make_policy(
        name,
        alpha=_float32(get("alpha")) if name == "lynx" else None,
        beta=None if get("beta") < 0 else get("beta"),
        budget=get("budget") if name == "budget" else None,
        tie_break=get("tie_break"),
        num_experts=spec.num_experts,
        top_k=spec.top_k,
    )
    return LynxMoEAttributes(spec, policy)
