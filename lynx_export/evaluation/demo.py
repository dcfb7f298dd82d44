"""A small Mixtral-style decoder LM, defined here and exported with torch's dynamo exporter."""

from __future__ import annotations

import contextlib
import dataclasses
import pathlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from lynx_export.compiler.output import staged_file

__all__ = ["DemoConfig", "build_demo_model", "export_demo_model", "export_model", "save_onnx_program", "moe_blocks", "DISPATCHES", "set_dispatch", "dispatched", "empty_cache", "logits_from_start", "demo_io_names"]

ROUTER_SCALE = 2.0
ROUTER_BIAS_STD = 2.0


@dataclass(frozen=True)
class DemoConfig:
    """Shape of the demo LM: byte vocabulary, RoPE attention with a KV cache, SwiGLU experts."""

    vocab_size: int = 256
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_experts: int = 8
    top_k: int = 2
    expert_size: int = 128
    rope_theta: float = 10000.0
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def demo_io_names(num_layers: int) -> tuple[list[str], list[str]]:
    """Graph input and output names of the exported model, in order."""
    inputs = ["input_ids"]
    outputs = ["logits"]
    for i in range(num_layers):
        inputs += [f"past_key.{i}", f"past_value.{i}"]
        outputs += [f"present_key.{i}", f"present_value.{i}"]
    return inputs, outputs


def build_demo_model(config: DemoConfig, synthetic_skew: bool = True):  # -> torch.nn.Module
    """Return the torch module with deterministic random weights (seeded, no download).

    synthetic_skew: scale the routers and give them a random per-expert bias (see below); training
    starts without it.
    """
    import torch
    from torch import nn
    from torch.nn import functional as F

    class RMSNorm(nn.Module):
        def __init__(self, dim: int) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(dim))

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight

    def rotate(x, cos, sin):
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin

    class Attention(nn.Module):
        def __init__(self, c: DemoConfig) -> None:
            super().__init__()
            self.num_heads = c.num_heads
            self.head_dim = c.hidden_size // c.num_heads
            self.qkv = nn.Linear(c.hidden_size, 3 * c.hidden_size, bias=False)
            self.o_proj = nn.Linear(c.hidden_size, c.hidden_size, bias=False)

        def forward(self, x, cos, sin, past_k, past_v):
            b, s, h = x.shape
            q, k, v = self.qkv(x).view(b, s, 3, self.num_heads, self.head_dim).transpose(1, 3).unbind(2)
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
            k = torch.cat([past_k, k], dim=2)
            v = torch.cat([past_v, v], dim=2)
            p = past_k.shape[2]
            # Query i sits at absolute position p + i and sees keys 0 .. p + i.
            q_pos = torch.arange(s, device=x.device).unsqueeze(1) + p
            k_pos = torch.arange(p + s, device=x.device).unsqueeze(0)
            mask = k_pos <= q_pos
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            return self.o_proj(y.transpose(1, 2).reshape(b, s, h)), k, v

    class SparseMoeBlock(nn.Module):
        """Mixtral routing (softmax -> top-k -> renormalise) with stacked experts run as batched matmuls."""

        def __init__(self, c: DemoConfig) -> None:
            super().__init__()
            self.top_k = c.top_k
            self.gate = nn.Linear(c.hidden_size, c.num_experts, bias=True)
            # [E, 2I, H]: rows 0..I-1 are the gate projection, rows I..2I-1 the up projection.
            self.gate_up_proj = nn.Parameter(torch.randn(c.num_experts, 2 * c.expert_size, c.hidden_size) * c.hidden_size**-0.5)
            # [E, H, I]
            self.down_proj = nn.Parameter(torch.randn(c.num_experts, c.hidden_size, c.expert_size) * c.expert_size**-0.5)
            # "batched_mm" is the form the exporter sees (one gathered matmul per token and slot).
            # Training and evaluation cannot gather [T*K, 2I, H] weight copies at their sizes:
            # "loop" runs each expert once on its tokens; "grouped" sorts the (token, slot) pairs by
            # expert and runs two grouped matmuls, a few ops per layer instead of ~10 per expert
            # (each of whose backward passes also fills a full-size gradient buffer).
            self.dispatch = "batched_mm"
            # Optional hook: router logits [B, S, E] -> the logits to route on (a selection
            # policy masks experts with -inf). Evaluation uses it to apply a policy per step.
            self.selector = None

        def forward(self, x):
            b, s, h = x.shape
            tokens = x.reshape(-1, h)
            router_logits = self.gate(tokens)
            if self.selector is not None:
                router_logits = self.selector(router_logits.view(b, s, -1)).reshape(b * s, -1)
            probs = torch.softmax(router_logits, dim=-1)
            weights, ids = torch.topk(probs, self.top_k, dim=-1)
            weights = weights / weights.sum(dim=-1, keepdim=True)
            if self.dispatch == "loop":
                return self._experts_loop(tokens, ids, weights).view(b, s, h)
            if self.dispatch == "grouped":
                return self._experts_grouped(tokens, ids, weights).view(b, s, h)
            flat_ids = ids.reshape(-1)
            # One (token, slot) pair per row: gather that expert's weights and run a batched matmul.
            rows = tokens.unsqueeze(1).expand(-1, self.top_k, -1).reshape(-1, h)
            gate_up = torch.bmm(self.gate_up_proj[flat_ids], rows.unsqueeze(-1)).squeeze(-1)
            gate, up = gate_up.chunk(2, dim=-1)
            act = F.silu(gate) * up
            out = torch.bmm(self.down_proj[flat_ids], act.unsqueeze(-1)).squeeze(-1)
            out = (out.view(-1, self.top_k, h) * weights.unsqueeze(-1)).sum(dim=1)
            return out.view(b, s, h)

        def _experts_loop(self, tokens, ids, weights):
            out = torch.zeros_like(tokens)
            for expert in range(self.gate_up_proj.shape[0]):
                rows, slot = torch.where(ids == expert)
                if rows.numel() == 0:
                    continue
                gate, up = (tokens[rows] @ self.gate_up_proj[expert].T).chunk(2, dim=-1)
                y = (F.silu(gate) * up) @ self.down_proj[expert].T
                out.index_add_(0, rows, y * weights[rows, slot].unsqueeze(-1))
            return out

        def _experts_grouped(self, tokens, ids, weights):
            flat = ids.reshape(-1)
            order = torch.argsort(flat, stable=True)
            # Pairs sorted by expert; offsets end each expert's run of rows (empty runs allowed).
            offsets = torch.cumsum(torch.bincount(flat, minlength=self.gate_up_proj.shape[0]), 0).to(torch.int32)
            token = order // self.top_k
            rows = tokens.index_select(0, token)
            gate, up = F.grouped_mm(rows, self.gate_up_proj.transpose(1, 2), offs=offsets).chunk(2, dim=-1)
            y = F.grouped_mm(F.silu(gate) * up, self.down_proj.transpose(1, 2), offs=offsets)
            return torch.zeros_like(tokens).index_add(0, token, y * weights.reshape(-1)[order].unsqueeze(-1))

    class DecoderLayer(nn.Module):
        def __init__(self, c: DemoConfig) -> None:
            super().__init__()
            self.input_norm = RMSNorm(c.hidden_size)
            self.attn = Attention(c)
            self.post_attn_norm = RMSNorm(c.hidden_size)
            self.mlp = SparseMoeBlock(c)

        def forward(self, x, cos, sin, past_k, past_v):
            a, k, v = self.attn(self.input_norm(x), cos, sin, past_k, past_v)
            x = x + a
            x = x + self.mlp(self.post_attn_norm(x))
            return x, k, v

    class DemoMoELM(nn.Module):
        def __init__(self, c: DemoConfig) -> None:
            super().__init__()
            self.config = c
            self.embed = nn.Embedding(c.vocab_size, c.hidden_size)
            self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c.num_layers))
            self.norm = RMSNorm(c.hidden_size)
            self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
            head_dim = c.hidden_size // c.num_heads
            inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
            self.register_buffer("inv_freq", inv_freq, persistent=False)

        def forward(self, input_ids, *past):
            s = input_ids.shape[1]
            p = past[0].shape[2]
            pos = torch.arange(s, device=input_ids.device).float() + p
            freqs = torch.outer(pos, self.inv_freq)
            emb = torch.cat([freqs, freqs], dim=-1)
            cos, sin = emb.cos(), emb.sin()
            x = self.embed(input_ids)
            present = []
            for i, layer in enumerate(self.layers):
                x, k, v = layer(x, cos, sin, past[2 * i], past[2 * i + 1])
                present += [k, v]
            return (self.lm_head(self.norm(x)), *present)

    torch.manual_seed(config.seed)
    model = DemoMoELM(config)
    # Routers drawn at init are near uniform; a per-expert bias gives the batch-level skew that
    # trained MoEs show (some experts popular, some rare), so the demo exercises what LYNX exploits.
    with torch.no_grad():
        for layer in model.layers if synthetic_skew else ():
            layer.mlp.gate.weight.mul_(ROUTER_SCALE)
            layer.mlp.gate.bias.copy_(torch.randn(config.num_experts) * ROUTER_BIAS_STD)
    return model.eval()


def empty_cache(config: DemoConfig, batch: int) -> list:  # -> list[torch.Tensor]
    """The past key/value inputs of a fresh sequence: one [batch, heads, 0, head_dim] per input."""
    import torch

    return [torch.zeros(batch, config.num_heads, 0, config.hidden_size // config.num_heads)] * (2 * config.num_layers)


def logits_from_start(model, ids):  # (torch.nn.Module, LongTensor [B, S]) -> FloatTensor [B, S, V]
    """Next-token logits of whole sequences run from an empty cache."""
    return model(ids, *empty_cache(model.config, ids.shape[0]))[0]


def moe_blocks(model) -> list:  # -> list[torch.nn.Module]
    """The sparse MoE block of every decoder layer, in layer order."""
    return [layer.mlp for layer in model.layers]


# How a MoE block runs its experts (SparseMoeBlock.dispatch): the exporter's form, one call per
# expert, or grouped matmuls over expert-sorted rows (training and evaluation).
DISPATCHES = ("batched_mm", "loop", "grouped")


def set_dispatch(model, dispatch: str, selector=None) -> list[tuple[str, Any]]:
    """Run every MoE block of `model` with `dispatch` (one of DISPATCHES) and router hook `selector`
    (None: the model's own routing); returns each block's previous pair, for `dispatched`."""
    if dispatch not in DISPATCHES:
        raise ValueError(f"unknown expert dispatch '{dispatch}' (choose from {', '.join(DISPATCHES)})")
    blocks = moe_blocks(model)
    previous = [(b.dispatch, b.selector) for b in blocks]
    for block in blocks:
        block.dispatch, block.selector = dispatch, selector
    return previous


@contextlib.contextmanager
def dispatched(model, dispatch: str, selector=None) -> Iterator[None]:
    """`set_dispatch` for the block's duration; each block's own dispatch and hook come back after."""
    previous = set_dispatch(model, dispatch, selector)
    try:
        yield
    finally:
        for block, (mode, hook) in zip(moe_blocks(model), previous):
            block.dispatch, block.selector = mode, hook


def export_demo_model(path: pathlib.Path, config: DemoConfig = DemoConfig()) -> pathlib.Path:
    """Export the demo LM (random weights) to ONNX with dynamic batch, sequence and past lengths."""
    return export_model(build_demo_model(config), path)


def export_model(model, path: pathlib.Path) -> pathlib.Path:
    """Export a model built by build_demo_model (any weights) in the batched-matmul form."""
    import torch

    config = model.config
    set_dispatch(model, "batched_mm")
    head_dim = config.hidden_size // config.num_heads
    batch, seq, past_len = 2, 3, 4
    input_ids = torch.randint(0, config.vocab_size, (batch, seq))
    past = [torch.randn(batch, config.num_heads, past_len, head_dim) for _ in range(2 * config.num_layers)]
    input_names, output_names = demo_io_names(config.num_layers)
    b = torch.export.Dim("batch", min=1, max=1024)
    s = torch.export.Dim("sequence", min=1, max=4096)
    p = torch.export.Dim("past", min=0, max=4096)
    shapes = ({0: b, 1: s}, tuple({0: b, 2: p} for _ in past))
    program = torch.onnx.export(
        model,
        (input_ids, *past),
        dynamo=True,
        input_names=input_names,
        output_names=output_names,
        dynamic_shapes=shapes,
        optimize=True,
        verbose=False,
    )
    return save_onnx_program(program, path)


def save_onnx_program(program, path: pathlib.Path) -> pathlib.Path:  # (torch.onnx.ONNXProgram, Path)
    """Save an exported program to `path`, writing beside it and renaming, so that an interrupted
    export never leaves half a file."""
    with staged_file(path) as partial:
        program.save(str(partial))
    return path
