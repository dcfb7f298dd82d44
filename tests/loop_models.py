"""A tiny MoE language model in the classic per-expert loop style, exported by torch's legacy
TorchScript exporter (`dynamo=False`), for the `expert_loop` form's tests (random weights, offline).

The MoE block follows the shape of transformers 4.x's `MixtralSparseMoeBlock.forward`: a router
Linear, softmax, top-k, renormalise, a one-hot expert mask, and a Python loop over the experts
that gathers each expert's tokens (`torch.where`), runs its SwiGLU FFN (separate gate/up/down
Linears, no bias), weighs it and accumulates with `index_add_`. Both exporters unroll the loop,
so every expert appears in the graph as its own chain: TorchScript spells it NonZero / Gather /
MatMul (weights stored transposed, [in,out]) / ScatterElements + Add; dynamo (`dynamo=True`)
spells it NonZero / GatherND / Gemm (transB, [out,in]) / ScatterND(reduction="add").
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import pathlib
import tempfile
import warnings
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["LoopConfig", "build_loop_model", "export_loop_model", "cached_loop_model"]


@dataclass(frozen=True)
class LoopConfig:
    vocab_size: int = 128
    hidden_size: int = 32
    intermediate_size: int = 48
    num_experts: int = 8
    top_k: int = 2
    num_layers: int = 2
    seed: int = 0
    # Mangled variants: experts the loop leaves out, and the experts' activation ("swiglu": silu(w1 x) * w3 x).
    skip_experts: tuple[int, ...] = ()
    activation: str = "swiglu"

    def key(self) -> str:
        return "-".join(f"{k}{v}" for k, v in asdict(self).items()).replace(" ", "").replace(",", "_")


def build_loop_model(config: LoopConfig = LoopConfig()) -> Any:
    """The torch model: input_ids [batch, sequence] -> logits [batch, sequence, vocab]."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    class Expert(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
            self.w2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
            self.w3 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)

        def forward(self, x):
            if config.activation == "gelu":
                return self.w2(F.gelu(self.w1(x)) * self.w3(x))
            return self.w2(F.silu(self.w1(x)) * self.w3(x))

    class SparseMoeBlock(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.num_experts = config.num_experts
            self.top_k = config.top_k
            self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
            self.experts = nn.ModuleList(Expert() for _ in range(config.num_experts))

        def forward(self, hidden_states):
            batch, seq, hidden = hidden_states.shape
            hidden_states = hidden_states.view(-1, hidden)
            router_logits = self.gate(hidden_states)
            routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
            routing_weights, selected_experts = torch.topk(routing_weights, self.top_k, dim=-1)
            routing_weights = routing_weights / routing_weights.sum(dim=-1, keepdim=True)
            routing_weights = routing_weights.to(hidden_states.dtype)
            final = torch.zeros((batch * seq, hidden), dtype=hidden_states.dtype, device=hidden_states.device)
            expert_mask = F.one_hot(selected_experts, num_classes=self.num_experts).permute(2, 1, 0)
            for expert_idx in range(self.num_experts):
                if expert_idx in config.skip_experts:
                    continue
                idx, top_x = torch.where(expert_mask[expert_idx])
                current_state = hidden_states[None, top_x].reshape(-1, hidden)
                current = self.experts[expert_idx](current_state) * routing_weights[top_x, idx, None]
                final.index_add_(0, top_x, current.to(hidden_states.dtype))
            return final.reshape(batch, seq, hidden)

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mlp = SparseMoeBlock()

        def forward(self, x):
            return x + self.mlp(x)

    class LoopLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
            self.layers = nn.ModuleList(Layer() for _ in range(config.num_layers))
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

        def forward(self, input_ids):
            x = self.embed(input_ids)
            for layer in self.layers:
                x = layer(x)
            return self.lm_head(x)

    torch.manual_seed(config.seed)
    return LoopLM().eval()


def export_loop_model(
    path: str | pathlib.Path, config: LoopConfig = LoopConfig(), dynamo: bool = False, opset: int = 17, infer_shapes: bool = False
) -> pathlib.Path:
    """Export the model to `path` (written to a temporary name, then renamed).

    TorchScript records no intermediate shapes or types; `infer_shapes` adds them (ONNX shape
    inference), as tools that post-process exports do.
    """
    import torch

    path = pathlib.Path(path)
    model = build_loop_model(config)
    ids = torch.randint(0, config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(config.seed))
    kwargs: dict[str, Any] = dict(
        dynamo=dynamo, opset_version=opset, input_names=["input_ids"], output_names=["logits"],
        dynamic_axes={"input_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"}},
    )
    if dynamo:
        kwargs["external_data"] = False
    # The dynamo exporter's progress lines and its log lines about optional torchvision ops and
    # opset conversion.
    quiet = [logging.getLogger(f"torch.onnx._internal.exporter.{name}") for name in ("_registration", "_compat")]
    levels = [log.level for log in quiet]
    fd, tmp = tempfile.mkstemp(suffix=".onnx.tmp", dir=path.parent)
    os.close(fd)
    try:
        for log in quiet:
            log.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (ids,), tmp, **kwargs)
        if infer_shapes:
            import onnx

            onnx.save(onnx.shape_inference.infer_shapes(onnx.load(tmp), data_prop=True), tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        for log, level in zip(quiet, levels):
            log.setLevel(level)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def cached_loop_model(
    request: Any, config: LoopConfig = LoopConfig(), dynamo: bool = False, opset: int = 17, infer_shapes: bool = False
) -> pathlib.Path:
    """The export of `config` (TorchScript unless `dynamo`), kept in pytest's cache between test runs."""
    import torch

    directory = pathlib.Path(request.config.cache.mkdir("lynx_expert_loop"))
    exporter = "dynamo" if dynamo else "torchscript"
    shapes = "-inferred" if infer_shapes else ""
    path = directory / f"loop-{config.key()}-{exporter}-opset{opset}{shapes}-torch{torch.__version__}.onnx"
    if not path.exists():
        export_loop_model(path, config, dynamo=dynamo, opset=opset, infer_shapes=infer_shapes)
    return path
