"""Training loop for the MoE language model: next-byte loss plus a load-balancing loss on every router."""

from __future__ import annotations

import dataclasses
import math
import pathlib
import time
from dataclasses import dataclass

import numpy as np

from lynx_export.compiler.output import staged_file
from lynx_export.evaluation.corpus import Corpus
from lynx_export.evaluation.demo import DemoConfig, build_demo_model, logits_from_start, moe_blocks, set_dispatch
from lynx_export.evaluation.trace import RouterCapture
from lynx_export.errors import DataError
from lynx_export.progress import SILENT, Progress

__all__ = ["TrainConfig", "train", "heldout_metrics"]


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 2400
    batch: int = 32
    seq_len: int = 256
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup: int = 100
    weight_decay: float = 0.1
    # Switch-Transformer load-balancing loss: E * sum_e (fraction routed to e) * (mean prob of e).
    balance_coef: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    threads: int = 2
    eval_every: int = 250
    eval_sequences: int = 64
    # The MoE block's expert dispatch while training (see demo.SparseMoeBlock): "grouped" is ~40%
    # faster at E=64 than "loop", with which the coarse model was trained.
    dispatch: str = "grouped"


def _balance_loss(router_logits, top_k: int):
    import torch

    num_experts = router_logits.shape[-1]
    probs = torch.softmax(router_logits.float(), dim=-1)
    picked = torch.nn.functional.one_hot(torch.topk(probs, top_k, dim=-1).indices, num_experts).sum(dim=1).float()
    return num_experts * (picked.mean(dim=0) / top_k * probs.mean(dim=0)).sum()


def _lr(config: TrainConfig, step: int) -> float:
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * progress))


def heldout_metrics(model, sequences: np.ndarray, batch: int = 16) -> dict[str, float]:
    """Next-byte accuracy and bits per byte of the model's own routing on [N, S] sequences."""
    import torch

    correct = total = 0
    nll = 0.0
    with torch.no_grad():
        for start in range(0, len(sequences), batch):
            ids = torch.from_numpy(sequences[start : start + batch])
            logits = logits_from_start(model, ids)[:, :-1]
            target = ids[:, 1:]
            nll += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"))
            correct += int((logits.argmax(-1) == target).sum())
            total += target.numel()
    return {"accuracy": correct / total, "bits_per_byte": nll / total / math.log(2), "tokens": total}


def train(
    model_config: DemoConfig,
    config: TrainConfig,
    train_corpus: Corpus,
    heldout_corpus: Corpus,
    checkpoint: pathlib.Path,
    progress: Progress = SILENT,
):  # -> (torch.nn.Module, metadata dict)
    """Train from scratch, or resume from `checkpoint` (written every eval_every steps)."""
    import torch

    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    model = build_demo_model(model_config, synthetic_skew=False).train()
    set_dispatch(model, config.dispatch)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    other = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": other, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.95)
    )
    start, history = 0, []
    if checkpoint.exists():
        state = torch.load(checkpoint, weights_only=False)
        if state["model_config"] != model_config.to_dict() or state["train_config"] != dataclasses.asdict(config):
            raise DataError(f"{checkpoint}: made with another configuration; delete it to start over")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, history = state["step"], state["history"]
        progress.note(f"resuming at step {start}")
    heldout = heldout_corpus.sequences(config.eval_sequences, config.seq_len)
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    capture = RouterCapture([block.gate for block in moe_blocks(model)])
    began = time.monotonic()
    try:
        for step in range(start, config.steps):
            # Each step's batch depends only on (seed, step): resuming replays the same data.
            ids = torch.from_numpy(train_corpus.windows(config.batch, config.seq_len + 1, np.random.default_rng([config.seed, step])))
            for group in optimizer.param_groups:
                group["lr"] = _lr(config, step)
            logits = logits_from_start(model, ids[:, :-1])
            lm_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
            balance = torch.stack([_balance_loss(x, model_config.top_k) for x in capture.logits]).mean()
            loss = lm_loss + config.balance_coef * balance
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            done = step + 1
            if done % config.eval_every == 0 or done == config.steps:
                model.eval()
                metrics = heldout_metrics(model, heldout)
                model.train()
                history.append({"step": done, "train_loss": lm_loss.item(), "balance_loss": balance.item(), **metrics})
                with staged_file(checkpoint) as partial:
                    torch.save(
                        {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": done, "history": history,
                         "model_config": model_config.to_dict(), "train_config": dataclasses.asdict(config)},
                        partial,
                    )
                rate = (done - start) * config.batch * config.seq_len / (time.monotonic() - began)
                progress.step(
                    "step", done, config.steps, f"train loss {history[-1]['train_loss']:.3f}, balance {history[-1]['balance_loss']:.3f}, "
                    f"held-out accuracy {metrics['accuracy']:.3f}, {metrics['bits_per_byte']:.3f} bits/byte, {rate:.0f} tokens/s"
                )
    finally:
        capture.close()
    model.eval()
    return model, {"train": dataclasses.asdict(config), "history": history}
