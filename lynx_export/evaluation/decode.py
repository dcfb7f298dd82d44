"""Accuracy under batched decode.

Held-out sequences are decoded teacher-forced in batches of B: at each position the B tokens of a
batch form one decode step, and a selection policy sees exactly those B tokens' router logits at
every MoE layer. On the torch model the whole sequence runs in one forward pass with the policy
applied per position (causal attention makes that the same computation as step-by-step decode
with a KV cache); on a compiled ONNX model it runs step by step with the cache, as served.
"""

from __future__ import annotations

import math
import pathlib
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lynx_export.compiler.lowering.ort import LoweredBlock
from lynx_export.backends.ort import OrtRunner
from lynx_export.evaluation.demo import demo_io_names, dispatched, logits_from_start
from lynx_export.routing import Router, SelectionPolicy
from lynx_export.evaluation.sweep import batch_groups, mean_ci, policy_label, select_step, select_steps
from lynx_export.compiler.verify import probe_copy, routing_summary
from lynx_export.errors import DataError

__all__ = ["DecodeRun", "KVCache", "decode_torch", "decode_onnx", "summarize", "compare_predictions"]


@dataclass(eq=False)
class DecodeRun:
    """Teacher-forced decode of N sequences of S tokens (S-1 predictions each) with one policy."""

    batch: int
    policy: str
    params: dict[str, Any]
    correct: np.ndarray  # [N] correct next-token predictions per sequence
    nll: np.ndarray  # [N] summed negative log-likelihood (nats) per sequence
    predictions: np.ndarray  # [N, S-1] argmax token per position
    # One sample per (layer, decode step): distinct experts used, and routing agreement.
    active_model: list[int] = field(default_factory=list)
    active_policy: list[int] = field(default_factory=list)
    agreement: list[float] = field(default_factory=list)

    @property
    def tokens_per_sequence(self) -> int:
        return self.predictions.shape[1]

    def mean_active(self) -> float:
        return float(np.mean(self.active_policy)) if self.active_policy else math.nan


class _StepSelector:
    """Torch hook for one MoE block: applies the policy to each position's B tokens separately.

    Batched over positions (`batched`, the default): the hook runs once per block and forward
    pass, with the router logits of every position of that block at once. Those logits are already
    fixed when it runs: position t's logits in layer l depend on the tokens at positions <= t and
    on the selections of layers < l (earlier hooks of this same forward pass), never on layer l's
    own selections at other positions, because a layer's MoE output feeds only later layers. So
    the S decode steps of one layer are independent problems, and one select_steps over [S, B, E]
    equals S calls of select_step, bit for bit (tests/test_routing_batched.py). The other axes are
    not free: the layers of one step depend on each other, and batching sequence groups or
    policies together would change the shapes of the model's own matmuls (and so its rounding).
    `batched=False` keeps the per-position loop over the oracle, the reference.
    """

    def __init__(self, policy: SelectionPolicy, top_k: int, run: DecodeRun, batched: bool = True) -> None:
        self.policy, self.router, self.run, self.batched = policy, Router(top_k), run, batched  # the demo's softmax -> top-k router

    def __call__(self, logits):  # [B, S, E] -> [B, S, E]
        import torch

        arr = logits.detach().numpy()
        if self.batched:
            chosen, steps = select_steps(self.policy, arr.transpose(1, 0, 2), self.router)
            routed = np.ascontiguousarray(chosen.masked_logits.transpose(1, 0, 2))
        else:
            routed = np.empty_like(arr)
            steps = []
            for pos in range(arr.shape[1]):
                one, stats = select_step(self.policy, arr[:, pos], self.router)
                steps.append(stats)
                routed[:, pos] = one.masked_logits
        for stats in steps:
            self.run.active_model.append(stats.active_model)
            self.run.active_policy.append(stats.active_policy)
            self.run.agreement.append(stats.agreement)
        return torch.from_numpy(routed)


def _score(run: DecodeRun, rows: np.ndarray, logits: np.ndarray, targets: np.ndarray) -> None:
    """Record [b, S-1, V] float logits against [b, S-1] targets for the sequences `rows`."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    picked = np.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    run.nll[rows] = -picked.sum(axis=1)
    run.predictions[rows] = logits.argmax(axis=-1)
    run.correct[rows] = (run.predictions[rows] == targets).sum(axis=1)


def _new_run(sequences: np.ndarray, batch: int, policy: SelectionPolicy) -> DecodeRun:
    n, s = sequences.shape
    return DecodeRun(batch, policy_label(policy), {"name": policy.name, **policy.params()},
                     np.zeros(n, np.int64), np.zeros(n), np.zeros((n, s - 1), np.int64))


def decode_torch(model, sequences: np.ndarray, batch: int, policy: SelectionPolicy, seed: int = 0, *, batched: bool = True) -> DecodeRun:
    """Run a model built by lynx_export.evaluation.demo (its routing is softmax -> top-K -> renormalise).

    batched=False applies the policy position by position through the oracle (select_step): the
    same results, slower; the default runs each layer's positions at once (see _StepSelector)."""
    import torch

    run = _new_run(sequences, batch, policy)
    with dispatched(model, "grouped", _StepSelector(policy, model.config.top_k, run, batched)), torch.no_grad():
        for rows in batch_groups(len(sequences), batch, seed):
            ids = torch.from_numpy(sequences[rows])
            logits = logits_from_start(model, ids[:, :-1])
            _score(run, rows, logits.double().numpy(), sequences[rows, 1:])
    return run


def decode_onnx(
    path: pathlib.Path,
    sequences: np.ndarray,
    batch: int,
    policy: SelectionPolicy,
    blocks: Sequence[LoweredBlock] = (),
    threads: int | None = None,
    seed: int = 0,
) -> DecodeRun:
    """Decode step by step with the KV cache through an exported demo-architecture model (original
    or compiled); `blocks` (of a compiled model) adds the routing read back from the graph."""
    run = _new_run(sequences, batch, policy)
    with tempfile.TemporaryDirectory(prefix="lynx-eval-") as tmp:
        model_path = probe_copy(path, blocks, pathlib.Path(tmp)) if blocks else path
        with OrtRunner(str(model_path), threads=threads) as runner:
            cache = KVCache(runner)
            for rows in batch_groups(len(sequences), batch, seed):
                past = cache.empty(batch)
                steps = []
                for pos in range(sequences.shape[1] - 1):
                    out, past = cache.step(sequences[rows, pos : pos + 1], past)
                    steps.append(out["logits"][:, 0])
                    for block in routing_summary(blocks, out).blocks if blocks else ():
                        run.active_model.append(block.active_experts_model)
                        run.active_policy.append(block.active_experts_policy)
                        run.agreement.append(block.routing_agreement)
                _score(run, rows, np.stack(steps, axis=1).astype(np.float64), sequences[rows, 1:])
    return run


class KVCache:
    """The KV-cache inputs and outputs of an exported demo-architecture model in an open session."""

    def __init__(self, runner: OrtRunner) -> None:
        past = [meta for meta in runner.sess.get_inputs() if meta.name.startswith("past_key.")]
        if not past or not all(isinstance(d, int) for d in (past[0].shape[1], past[0].shape[3])):
            raise DataError("the model has no past_key inputs with static head count and size")
        self.runner = runner
        self.heads, self.head_dim = past[0].shape[1], past[0].shape[3]
        self.inputs, self.outputs = demo_io_names(len(past))

    def empty(self, batch: int) -> list[np.ndarray]:
        """The cache of fresh sequences, in the order of the past inputs."""
        return [np.zeros((batch, self.heads, 0, self.head_dim), np.float32)] * (len(self.inputs) - 1)

    def feeds(self, ids: np.ndarray, past: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        return {self.inputs[0]: ids, **dict(zip(self.inputs[1:], past))}

    def step(self, ids: np.ndarray, past: Sequence[np.ndarray]) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
        """Run ids [B, S] after `past`; return every output and the cache that now includes them."""
        out = self.runner.infer(self.feeds(ids, past))
        return out, [out[name] for name in self.outputs[1:]]


def summarize(run: DecodeRun, reference: DecodeRun | None = None) -> dict[str, Any]:
    """Accuracy, perplexity, active experts and agreement with 95% intervals over sequences; with a
    reference run of the same sequences, the paired accuracy change in percentage points."""
    per_token = run.tokens_per_sequence
    accuracy = mean_ci(run.correct / per_token)
    nll = mean_ci(run.nll / per_token)
    row = {
        "batch": run.batch,
        "policy": run.policy,
        "params": run.params,
        "sequences": int(run.correct.size),
        "tokens": int(run.correct.size * per_token),
        "accuracy": accuracy,
        "perplexity": tuple(math.exp(x) for x in nll),
        "active_experts_model": mean_ci(run.active_model),
        "active_experts_policy": mean_ci(run.active_policy),
        "routing_agreement": mean_ci(run.agreement),
    }
    if reference is not None:
        row["accuracy_change_pp"] = mean_ci(100 * (run.correct - reference.correct) / per_token)
        row["active_reduction_pct"] = 100 * (1 - row["active_experts_policy"][0] / reference.mean_active())
    return row


def compare_predictions(a: DecodeRun, b: DecodeRun) -> dict[str, float]:
    """How closely two decodes of the same sequences agree (e.g. torch vs the compiled model)."""
    return {
        "prediction_agreement": float((a.predictions == b.predictions).mean()),
        "accuracy_a": float(a.correct.sum() / a.predictions.size),
        "accuracy_b": float(b.correct.sum() / b.predictions.size),
        "max_nll_diff_per_token": float(np.abs(a.nll - b.nll).max() / a.tokens_per_sequence),
    }
