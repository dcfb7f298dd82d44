"""A tiny MoE language model in the classic per-expert loop style, exported by torch's legacy
TorchScript exporter (`dynamo=False`), for the `expert_loop` form's tests (random weights, offline).

The MoE block follows the shape of transformers 4.x's `MixtralSparseMoeBlock.forward`: a router
Linear, softmax, top-k, renormalise, a one-hot expert mask, and a Python loop over the experts
that gathers each expert's tokens (`torch.where`), runs its SwiGLU FFN (separate gate/up/down
Linears, no bias), weighs it and accumulates with `index_add_`. Both exporters unroll the loop,
so every expert appears in the graph as its own chain: TorchScript spells it NonZero / Gather /
MatMul (weights stored transposed, [in,out]) / ScatterElements + Add; dynamo (`dynamo=True`)
spells it NonZero / GatherND / Gemm (transB, [out,in]) / ScatterND(reduction="add"). The
ARRANGEMENTS options write the same loop as a user's code might instead (`hidden_states[top_x]`,
`torch.nonzero`, `scatter_add_`, `index_put_`, transformers 5's stacked expert parameters).

`family` picks the router, renormalisation, shared expert and expert activation of an MoE family,
written in that same loop style (as exports of those families' older, per-expert-module code
looked); the default is Mixtral's math, which Qwen3-MoE (norm_topk_prob=True) shares:

  * "mixtral": softmax -> top-k -> renormalise; SwiGLU experts w1/w3/w2, no biases.
  * "olmoe": softmax -> top-k, not renormalised.
  * "qwen2_moe": OLMoE's router, plus a shared expert (a SwiGLU MLP on every token) times
    sigmoid(Linear(x, 1)) added to the routed sum, outside the loop.
  * "granitemoe": top-k of the logits -> softmax over the K picked.
  * "gpt_oss": router Linear with a bias, top-k -> softmax; experts with biases and gpt-oss's
    clamped SwiGLU, gate and up from separate Linears: gate = clamp(gate, max=7),
    up = clamp(up, -7, 7), out = (up + 1) * gate * sigmoid(1.702 * gate). Gate and up weights
    are scaled up (down's scaled down as much) so that many pre-activations pass the limit.
  * "deepseek_v3": transformers' DeepseekV3TopkRouter (sigmoid scores plus a correction bias,
    2 of 4 groups kept, renormalised, scaled by 2.5) and a shared SwiGLU expert reading the
    block's [B,S,H] input.
  * "phimoe": transformers' PhiMoE sparse mixer router (`sparsemixer`, eval mode), always top-2:
    round 1 takes the argmax of the logits, weighted by a softmax over the logits within a
    relative jitter (PHIMOE_JITTER_EPS) of the maximum; round 2 does the same over the logits with
    round 1's expert scattered to -inf. ONNX Runtime's MoE kernel cannot route so: the block is
    reported and left as it is.
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

__all__ = ["FAMILIES", "ARRANGEMENTS", "LoopConfig", "build_loop_model", "export_loop_model", "cached_loop_model"]

FAMILIES = ("mixtral", "olmoe", "qwen2_moe", "granitemoe", "gpt_oss", "deepseek_v3", "phimoe")
# gpt-oss's activation constants; DeepSeek-V3's router parameters.
GPT_OSS_ALPHA, GPT_OSS_LIMIT = 1.702, 7.0
GPT_OSS_SCALE = 12.0  # gate/up weights times this, down weights divided by it
DEEPSEEK_GROUPS, DEEPSEEK_TOPK_GROUPS, DEEPSEEK_SCALING = 4, 2, 2.5
PHIMOE_JITTER_EPS = 0.01  # PhimoeConfig.router_jitter_noise's default
# Arrangements of the same loop a user's code may write (LoopConfig fields; the first is the default):
#   rows: an expert's token rows, `hidden_states[None, top_x].reshape(-1, H)` or `hidden_states[top_x]`;
#   positions: its (slot, token) pairs, `torch.where(mask)` or the columns of `torch.nonzero(mask)`;
#   combine: `final.index_add_(0, top_x, y)`, `final.scatter_add_(0, top_x[:, None].expand(-1, H), y)`
#     or `final.index_put_((top_x,), y, accumulate=True)`;
#   experts: separate gate/up/down Linears, or transformers 5's stacked parameters `gate_up_proj`
#     [E,2I,H] and `down_proj` [E,H,I] indexed per expert (`F.linear(x, gate_up_proj[e]).chunk(2, -1)`).
ARRANGEMENTS = {
    "rows": ("none_reshape", "index"),
    "positions": ("where", "nonzero"),
    "combine": ("index_add", "scatter_add", "index_put"),
    "experts": ("linears", "stacked", "stacked_in_out"),
}


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
    family: str = "mixtral"  # one of FAMILIES
    # How the loop spells the same computation (ARRANGEMENTS; the first of each is the default).
    rows: str = "none_reshape"
    positions: str = "where"
    combine: str = "index_add"
    experts: str = "linears"

    def __post_init__(self) -> None:
        for name, options in ARRANGEMENTS.items():
            if getattr(self, name) not in options:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; known: {', '.join(options)}")
        if self.experts != "linears" and (self.family == "gpt_oss" or self.activation != "swiglu"):
            raise ValueError("stacked experts compute plain SwiGLU without biases")

    def key(self) -> str:
        fields = asdict(self)
        # The names exports had before families and arrangements existed.
        for name, default in (("family", "mixtral"), *((k, v[0]) for k, v in ARRANGEMENTS.items())):
            if fields[name] == default:
                del fields[name]
        return "-".join(f"{k}{v}" for k, v in fields.items()).replace(" ", "").replace(",", "_")


def build_loop_model(config: LoopConfig = LoopConfig()) -> Any:
    """The torch model: input_ids [batch, sequence] -> logits [batch, sequence, vocab]."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    if config.family not in FAMILIES:
        raise ValueError(f"unknown family {config.family!r}; known: {', '.join(FAMILIES)}")
    family = config.family
    if family == "phimoe" and config.top_k != 2:
        raise ValueError(f"PhiMoE's sparse mixer picks 2 experts, not top_k={config.top_k}")
    gpt_oss = family == "gpt_oss"

    def sparse_mixer(scores, jitter_eps):
        """transformers' PhiMoE `sparsemixer` in eval mode: two argmax rounds, each weighted by
        its expert's share of a softmax over the logits within a relative jitter of the round's
        maximum (the second round with the first's expert masked out). Returns ([T,2], [T,2])."""
        threshold, selected = scores.max(dim=-1, keepdim=True)
        factor = scores.abs().clamp(min=threshold)
        masked = scores.masked_fill(((threshold - scores) / factor) > (2 * jitter_eps), float("-inf"))
        multiplier = F.softmax(masked, dim=-1).gather(dim=-1, index=selected)

        masked_scores = torch.scatter(scores, -1, selected, float("-inf"))
        threshold_2, selected_2 = masked_scores.max(dim=-1, keepdim=True)
        factor_2 = scores.abs().clamp(min=threshold_2)
        masked_2 = masked_scores.masked_fill(((threshold_2 - scores) / factor_2) > (2 * jitter_eps), float("-inf"))
        multiplier_2 = F.softmax(masked_2, dim=-1).gather(dim=-1, index=selected_2)
        return torch.cat((multiplier, multiplier_2), dim=-1), torch.cat((selected, selected_2), dim=-1)

    class Expert(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=gpt_oss)  # gate
            self.w2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=gpt_oss)  # down
            self.w3 = nn.Linear(config.hidden_size, config.intermediate_size, bias=gpt_oss)  # up

        def forward(self, x):
            if gpt_oss:
                gate = self.w1(x).clamp(min=None, max=GPT_OSS_LIMIT)
                up = self.w3(x).clamp(min=-GPT_OSS_LIMIT, max=GPT_OSS_LIMIT)
                glu = gate * torch.sigmoid(gate * GPT_OSS_ALPHA)
                return self.w2((up + 1) * glu)
            if config.activation == "gelu":
                return self.w2(F.gelu(self.w1(x)) * self.w3(x))
            return self.w2(F.silu(self.w1(x)) * self.w3(x))

    class SparseMoeBlock(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.num_experts = config.num_experts
            self.top_k = config.top_k
            self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=gpt_oss)
            e, h, i = config.num_experts, config.hidden_size, config.intermediate_size
            if config.experts == "stacked":  # transformers 5's MixtralExperts parameters, [E,out,in]
                self.gate_up_proj = nn.Parameter(torch.randn(e, 2 * i, h) / h**0.5)
                self.down_proj = nn.Parameter(torch.randn(e, h, i) / i**0.5)
            elif config.experts == "stacked_in_out":  # transformers 4.5x's gpt-oss layout, [E,in,out]: x @ W[e]
                self.gate_up_proj = nn.Parameter(torch.randn(e, h, 2 * i) / h**0.5)
                self.down_proj = nn.Parameter(torch.randn(e, i, h) / i**0.5)
            else:
                self.experts = nn.ModuleList(Expert() for _ in range(config.num_experts))
            if family in ("qwen2_moe", "deepseek_v3"):
                self.shared_expert = Expert()
            if family == "qwen2_moe":
                self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)
            if family == "deepseek_v3":
                self.register_buffer("e_score_correction_bias", torch.rand(config.num_experts) * 0.1)

        def route(self, router_logits):
            """(routing weights [T,K], expert ids [T,K]) of the family's router."""
            if family == "phimoe":
                return sparse_mixer(router_logits, PHIMOE_JITTER_EPS)
            if family in ("granitemoe", "gpt_oss"):
                top, selected = torch.topk(router_logits, self.top_k, dim=-1)
                return F.softmax(top, dim=1, dtype=torch.float), selected
            if family == "deepseek_v3":  # transformers' DeepseekV3TopkRouter
                scores = router_logits.sigmoid()
                choice = scores + self.e_score_correction_bias
                group_scores = choice.view(-1, DEEPSEEK_GROUPS, self.num_experts // DEEPSEEK_GROUPS).topk(2, dim=-1)[0].sum(dim=-1)
                group_idx = torch.topk(group_scores, k=DEEPSEEK_TOPK_GROUPS, dim=-1, sorted=False)[1]
                group_mask = torch.zeros_like(group_scores)
                group_mask.scatter_(1, group_idx, 1)
                score_mask = (
                    group_mask.unsqueeze(-1)
                    .expand(-1, DEEPSEEK_GROUPS, self.num_experts // DEEPSEEK_GROUPS)
                    .reshape(-1, self.num_experts)
                )
                choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
                selected = torch.topk(choice, k=self.top_k, dim=-1, sorted=False)[1]
                weights = scores.gather(1, selected)
                weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
                return weights * DEEPSEEK_SCALING, selected
            routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
            routing_weights, selected = torch.topk(routing_weights, self.top_k, dim=-1)
            if family == "mixtral":
                routing_weights = routing_weights / routing_weights.sum(dim=-1, keepdim=True)
            return routing_weights, selected

        def expert(self, e, x):
            if config.experts == "stacked":
                gate, up = F.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)
                return F.linear(F.silu(gate) * up, self.down_proj[e])
            if config.experts == "stacked_in_out":
                gate, up = (x @ self.gate_up_proj[e]).chunk(2, dim=-1)
                return (F.silu(gate) * up) @ self.down_proj[e]
            return self.experts[e](x)

        def forward(self, x):
            batch, seq, hidden = x.shape
            hidden_states = x.view(-1, hidden)
            router_logits = self.gate(hidden_states)
            routing_weights, selected_experts = self.route(router_logits)
            routing_weights = routing_weights.to(hidden_states.dtype)
            final = torch.zeros((batch * seq, hidden), dtype=hidden_states.dtype, device=hidden_states.device)
            expert_mask = F.one_hot(selected_experts, num_classes=self.num_experts).permute(2, 1, 0)
            for expert_idx in range(self.num_experts):
                if expert_idx in config.skip_experts:
                    continue
                if config.positions == "where":
                    idx, top_x = torch.where(expert_mask[expert_idx])
                else:
                    nonzero = torch.nonzero(expert_mask[expert_idx])
                    idx, top_x = nonzero[:, 0], nonzero[:, 1]
                if config.rows == "index":
                    current_state = hidden_states[top_x]
                else:
                    current_state = hidden_states[None, top_x].reshape(-1, hidden)
                current = self.expert(expert_idx, current_state) * routing_weights[top_x, idx, None]
                current = current.to(hidden_states.dtype)
                if config.combine == "scatter_add":
                    final.scatter_add_(0, top_x[:, None].expand(-1, hidden), current)
                elif config.combine == "index_put":
                    final.index_put_((top_x,), current, accumulate=True)
                else:
                    final.index_add_(0, top_x, current)
            if family == "qwen2_moe":  # reads the flattened tokens, as Qwen2MoeSparseMoeBlock
                shared = self.shared_expert(hidden_states)
                final = final + torch.sigmoid(self.shared_expert_gate(hidden_states)) * shared
            out = final.reshape(batch, seq, hidden)
            if family == "deepseek_v3":  # reads the block's input, as DeepseekV3MoE
                out = out + self.shared_expert(x)
            return out

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
    model = LoopLM().eval()
    if gpt_oss:
        with torch.no_grad():
            for layer in model.layers:
                for expert in layer.mlp.experts:
                    for linear, factor in ((expert.w1, GPT_OSS_SCALE), (expert.w3, GPT_OSS_SCALE), (expert.w2, 1 / GPT_OSS_SCALE)):
                        linear.weight.mul_(factor)
                        linear.bias.mul_(factor)
    return model


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


def cached_loop_model(config: LoopConfig = LoopConfig(), dynamo: bool = False, opset: int = 17, infer_shapes: bool = False) -> pathlib.Path:
    """The export of `config` (TorchScript unless `dynamo`), through the tests' artefact cache
    (tests/artifacts.py), keyed by the settings, the exporters' versions and this file's source."""
    from tests.artifacts import cached, versions

    key = {"config": config.key(), "dynamo": dynamo, "opset": opset, "infer_shapes": infer_shapes,
           "versions": versions("torch", "onnx", "onnxscript", "onnx-ir"), "code": pathlib.Path(__file__).read_text()}
    return cached("expert-loop", key, lambda path: export_loop_model(path, config, dynamo=dynamo, opset=opset, infer_shapes=infer_shapes),
                  suffix=".onnx")