"""Find MoE blocks in an ONNX graph and describe each as an `MoEBlock` (spec + bindings).

Each exporter form has a matcher module in `lynx_export/compiler/forms/`: `claims(node)` says whether a
node anchors a block of that form (a router TopK, an ONNX Runtime MoE node), `match(node)`
returns the block or raises `NoMatch` with the reason. Every claimed node becomes a `Candidate`;
a candidate the pass cannot rewrite carries the reason. Blocks are named after the exporter's
module scope shared by their nodes (e.g. `model.layers.0.mlp`), else positionally.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import onnx_ir as ir

from lynx_export.compiler.blocks import Candidate, MoEBlock, NoMatch
from lynx_export.compiler.forms import batched_mm, expert_loop, grouped_mm, ort_moe, rewritten
from lynx_export.compiler.forms.match import block_name
from lynx_export.compiler.graph_builder import unique_name
from lynx_export.compiler.ranks import inferred_ranks

__all__ = ["DetectResult", "detect", "FORMS"]

log = logging.getLogger(__name__)

FORMS = (rewritten, batched_mm, grouped_mm, ort_moe, expert_loop)


@dataclass(frozen=True)
class DetectResult:
    """Every router found, in graph order."""

    candidates: tuple[Candidate, ...]

    @property
    def blocks(self) -> tuple[MoEBlock, ...]:
        return tuple(c.block for c in self.candidates if c.block is not None)


def detect(model: ir.Model) -> DetectResult:
    """Return a Candidate for every node some form claims, in graph order.

    The matchers read ranks the exporter may not have recorded: RankInferencePass fills them in
    for the duration of the detection, and the shapes it added are taken back after it.
    """
    with inferred_ranks(model):
        return _detect(model)


def _detect(model: ir.Model) -> DetectResult:
    candidates: list[Candidate] = []
    used_names: set[str] = set()
    for node in model.graph:
        form = next((f for f in FORMS if f.claims(node)), None)
        if form is None:
            continue
        try:
            found = form.match(node)
        except NoMatch as exc:
            name = unique_name(block_name([node], len(candidates)), used_names)
            candidates.append(Candidate(name, None, str(exc)))
            log.debug("%s claims node %s (%s) as block %s, unsupported: %s", form.__name__.rsplit(".", 1)[-1], node.name, node.op_type, name, exc)
            continue
        # A form may know the block's name (a LynxMoE node keeps its own); else the module scope.
        name = unique_name(found.block.name or block_name(found.scope_nodes, len(candidates)), used_names)
        candidates.append(Candidate(name, replace(found.block, name=name)))
        spec = found.block.spec
        log.debug("%s matches block %s at node %s: E=%d K=%d H=%d I=%d, router %s", form.__name__.rsplit(".", 1)[-1], name, node.name,
                  spec.num_experts, spec.top_k, spec.hidden_size, spec.expert_size, spec.router.value)
    return DetectResult(tuple(candidates))
