"""A small builder for replacement subgraphs (onnx-ir tape underneath), shared by the passes
that replace LynxMoE nodes."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

__all__ = ["GraphBuilder", "unique_name", "graph_names"]


class GraphBuilder:
    """Emits nodes onto a tape with short, named helpers; builds what replaces one node.

    Nodes, values and constants are named `<prefix>.n<N>` / `<prefix>.v<N>` / `<prefix>.c<N>` from
    one counter, so names stay unique across the graph.
    """

    def __init__(self, prefix: str) -> None:
        self.tape = ir.tape.Tape()
        self.prefix = prefix
        self._count = 0

    def _name(self, kind: str) -> str:
        self._count += 1
        return f"{self.prefix}.{kind}{self._count}"

    def const(self, array: np.ndarray | float | int, dtype=np.float32) -> ir.Value:
        return self.tape.initializer(ir.tensor(np.asarray(array, dtype=dtype)), name=self._name("c"))

    def op(self, op_type: str, *inputs: ir.Value | None, **attributes) -> ir.Value:
        return self.op_multi(op_type, 1, *inputs, **attributes)[0]

    def op_multi(self, op_type: str, num_outputs: int, *inputs: ir.Value | None, domain: str = "", **attributes) -> Sequence[ir.Value]:
        outputs = self.tape.op_multi_out(op_type, list(inputs), attributes or None, num_outputs=num_outputs, domain=domain)
        # Named nodes let a profile (ONNX Runtime's names its events by node) attribute time to the block.
        outputs[0].producer().name = self._name("n")
        for value in outputs:
            value.name = self._name("v")
        return outputs

    def topk(self, x: ir.Value, k: ir.Value) -> Sequence[ir.Value]:
        """(values, indices) of the k largest along the last axis, equal values in index order."""
        return self.op_multi("TopK", 2, x, k, axis=-1, largest=1, sorted=1)

    def topk_indices(self, x: ir.Value, k: ir.Value) -> ir.Value:
        return self.topk(x, k)[1]

    def topk_by(self, primary: ir.Value, secondary: ir.Value, k: ir.Value, width: ir.Value) -> ir.Value:
        """Indices of the k largest `primary` per row, ties by larger `secondary`, then lower index.

        TopK keeps equal values in index order, so ordering columns by `secondary` first and
        then taking TopK of `primary` in that order gives the lexicographic choice exactly.
        """
        order = self.topk_indices(secondary, width)
        permuted = self.op("GatherElements", primary, order, axis=-1)
        position = self.topk_indices(permuted, k)
        return self.op("GatherElements", order, position, axis=-1)

    def swiglu_ffn(
        self,
        x: ir.Value,
        w_in: ir.Value,
        w_out: ir.Value,
        width: int,
        *,
        b_in: ir.Value | None = None,
        b_out: ir.Value | None = None,
        alpha: float = 1.0,
        beta: float = 0.0,
        limit: float | None = None,
    ) -> ir.Value:
        """SwiGLU FFN with w_in [H,2W] = gate | up (b_in [2W] alike) and w_out [W,H]:
        gate * sigmoid(alpha * gate) * (up + beta) @ w_out + b_out, where with a `limit` the gate is
        clamped to <= limit and up to [-limit, limit] first (plain SwiGLU: alpha 1, beta 0, no limit)."""
        proj = self.op("MatMul", x, w_in)
        if b_in is not None:
            proj = self.op("Add", proj, b_in)
        out = self.op("MatMul", self.swiglu(proj, width, alpha=alpha, beta=beta, limit=limit), w_out)
        return out if b_out is None else self.op("Add", out, b_out)

    def swiglu(self, proj: ir.Value, width: int, *, alpha: float = 1.0, beta: float = 0.0, limit: float | None = None) -> ir.Value:
        """gate * sigmoid(alpha * gate) * (up + beta) of proj [..,2W] = gate | up (see swiglu_ffn)."""
        gate, up = self.op_multi("Split", 2, proj, self.const([width, width], np.int64), axis=-1)
        if limit is not None:
            gate = self.op("Min", gate, self.const(limit))
            up = self.op("Clip", up, self.const(-limit), self.const(limit))
        sig = self.op("Sigmoid", gate if alpha == 1.0 else self.op("Mul", gate, self.const(alpha)))
        if beta != 0.0:
            up = self.op("Add", up, self.const(beta))
        return self.op("Mul", self.op("Mul", gate, sig), up)

    def replace(self, graph: ir.Graph, node: ir.Node, out: ir.Value) -> None:
        """Put what this builder emitted in place of `node`, whose only output `out` takes over."""
        old = node.outputs[0]
        out.shape, out.dtype = old.shape, old.dtype
        for init in self.tape.initializers:
            graph.register_initializer(init)
        graph.insert_before(node, self.tape.nodes)
        old.replace_all_uses_with(out, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        out.name = old.name


def unique_name(base: str, used: set[str]) -> str:
    """`base`, or `base_2`, `base_3`, ... whichever is not in `used` yet; records the choice."""
    name, n = base, 1
    while name in used:
        n += 1
        name = f"{base}_{n}"
    used.add(name)
    return name


def graph_names(graph: ir.Graph) -> set[str]:
    """Every value name the main graph uses (inputs, initializers, node outputs)."""
    names = {v.name for v in graph.inputs if v.name} | set(graph.initializers)
    for n in graph:
        names.update(v.name for v in n.outputs if v.name)
    return names
