"""Router-logit traces: record them from any torch MoE model, replay selection policies on them.

A trace holds, for every MoE layer, the router logits of N sequences at S positions ([N, S, E]
float32). Replaying groups the sequences into decode batches of B and, at every position, runs
a policy on the B tokens' logits, as a server's decode step would. Replay sees each layer's
logits as the unmodified model produced them: what a remapped expert does to later layers is
measured by `lynx-export eval`, not here.
"""

from __future__ import annotations

import json
import pathlib
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lynx_export.compiler.output import staged_file
from lynx_export.errors import DataError
from lynx_export.routing import Router, RouterForm, SelectionPolicy
from lynx_export.evaluation.sweep import batch_groups, mean_ci, policy_label, select_steps
from lynx_export.progress import SILENT, Progress

__all__ = ["TraceError", "RouterTrace", "RouterCapture", "record_trace", "replay", "expert_load", "FORMAT"]

FORMAT = "lynx-router-trace/1"


class TraceError(DataError):
    """A trace file that cannot be read or recorded (one-line message)."""


@dataclass(frozen=True, eq=False)
class RouterTrace:
    logits: tuple[np.ndarray, ...]  # one float32 [N, S, E] per MoE layer
    top_k: int
    router: RouterForm = RouterForm.SOFTMAX_TOPK
    normalize: bool = True
    source: str = ""

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.logits[0].shape  # type: ignore[return-value]

    @property
    def routing(self) -> Router:
        """The traced model's router, for the routing oracle."""
        return Router(self.top_k, self.router, self.normalize)

    def save(self, path: pathlib.Path) -> None:
        """Write an .npz (no pickle) atomically."""
        meta = {"format": FORMAT, "top_k": self.top_k, "router": self.router.value, "normalize": self.normalize,
                "source": self.source, "layers": len(self.logits)}
        with staged_file(path) as partial, open(partial, "wb") as f:
            np.savez(f, meta=np.array(json.dumps(meta)), **{f"layer_{i}": x for i, x in enumerate(self.logits)})

    @classmethod
    def load(cls, path: pathlib.Path) -> RouterTrace:
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                if meta.get("format") != FORMAT:
                    raise TraceError(f"{path}: not a router trace (format {meta.get('format')!r}, expected {FORMAT!r})")
                logits = tuple(np.asarray(data[f"layer_{i}"], dtype=np.float32) for i in range(int(meta["layers"])))
        except TraceError:
            raise
        except FileNotFoundError:
            raise TraceError(f"{path}: no such file") from None
        except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as exc:
            raise TraceError(f"{path}: not a readable router trace ({type(exc).__name__}: {exc})") from None
        trace = cls(logits, int(meta["top_k"]), RouterForm(meta["router"]), bool(meta["normalize"]), str(meta.get("source", "")))
        trace._check(str(path))
        return trace

    def _check(self, where: str) -> None:
        if not self.logits:
            raise TraceError(f"{where}: the trace has no layers")
        shapes = {x.shape for x in self.logits}
        if len(shapes) != 1 or len(self.logits[0].shape) != 3:
            raise TraceError(f"{where}: every layer must hold [sequences, positions, experts] logits; got shapes {sorted(shapes)}")
        if not 1 <= self.top_k <= self.shape[2]:
            raise TraceError(f"{where}: top_k {self.top_k} is not in [1, {self.shape[2]} experts]")
        if any(not np.isfinite(x).all() for x in self.logits):
            raise TraceError(f"{where}: the trace holds non-finite router logits")


class RouterCapture:
    """Forward hooks on router modules that keep each one's latest output (the router logits).

    A router returning a tuple (transformers' Mixtral router returns logits, scores, indices)
    contributes its first element. The tensors are kept as produced, gradients included.
    Use as a context manager; the hooks are removed on exit.
    """

    def __init__(self, routers: Sequence[Any]) -> None:
        self.logits: list[Any] = [None] * len(routers)
        self._handles = [router.register_forward_hook(self._hook(i)) for i, router in enumerate(routers)]

    def _hook(self, index: int):
        def keep(module, inputs, output) -> None:
            self.logits[index] = output[0] if isinstance(output, tuple) else output

        return keep

    def clear(self) -> None:
        self.logits = [None] * len(self.logits)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()

    def __enter__(self) -> RouterCapture:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def record_trace(
    routers: Sequence[Any],
    run: Callable[[np.ndarray], Any],
    sequences: np.ndarray,
    top_k: int,
    router: RouterForm = RouterForm.SOFTMAX_TOPK,
    normalize: bool = True,
    batch: int = 16,
    source: str = "",
    progress: Progress = SILENT,
) -> RouterTrace:
    """Record router logits from a torch model.

    routers: the modules whose outputs are the router logits, one per MoE layer in order (for a
        transformers Mixtral: `[layer.mlp.gate for layer in model.model.layers]`); their output may be
        [B*S, E] or [B, S, E].
    run: runs the model on token ids [b, S] (int64 numpy); its return value is ignored.
    sequences: [N, S] token ids.
    """
    import torch

    captured: list[list[np.ndarray]] = [[] for _ in routers]
    with RouterCapture(routers) as capture, torch.no_grad():
        for start in range(0, len(sequences), batch):
            ids = sequences[start : start + batch]
            capture.clear()
            run(ids)
            for i, logits in enumerate(capture.logits):
                if logits is None:
                    raise TraceError(f"router {i} ({type(routers[i]).__name__}) produced no output during the run")
                captured[i].append(logits.detach().float().reshape(ids.shape[0], ids.shape[1], -1).numpy())
            progress.step("traced sequences", min(start + batch, len(sequences)), len(sequences))
    trace = RouterTrace(tuple(np.concatenate(c) for c in captured), top_k, router, normalize, source)
    trace._check("recorded trace")
    return trace


def replay(trace: RouterTrace, policies: Sequence[SelectionPolicy], batch_sizes: Sequence[int], seed: int = 0) -> list[dict[str, Any]]:
    """Per (batch size, policy), with 95% intervals over decode steps (layer x position x batch):
    active experts (model's routing and the policy's), routing agreement, distinct first choices
    (the floor for any policy that keeps them) and the share of first choices kept."""
    sequences, positions, _ = trace.shape
    rows = []
    for batch in batch_sizes:
        groups = batch_groups(sequences, batch, seed)
        for policy in policies:
            # A trace's logits are fixed (replay never feeds a selection back), so every step of a
            # layer is independent: one select_steps per layer over its [groups x positions] steps,
            # in the order of select_step's loop (group, then position), with the same results.
            steps = [
                stats
                for layer in trace.logits
                for stats in select_steps(policy, _steps_of(layer, groups), trace.routing)[1]
            ]
            rows.append({
                "batch": batch,
                "policy": policy_label(policy),
                "params": {"name": policy.name, **policy.params()},
                "steps": len(steps),
                "active_experts_model": mean_ci([x.active_model for x in steps]),
                "active_experts_policy": mean_ci([x.active_policy for x in steps]),
                "routing_agreement": mean_ci([x.agreement for x in steps]),
                "first_choices": mean_ci([x.first_choices for x in steps]),
                "first_choice_kept": mean_ci([x.first_kept for x in steps]),
            })
    return rows


def expert_load(trace: RouterTrace) -> list[dict[str, Any]]:
    """Per layer, how evenly the model's own top-K picks spread over the experts on the traced
    text: each expert's share of the picks against the even share 1/E (max and min ratio), the
    experts never picked, and the Switch balance statistic E * sum_e(pick share * mean router
    probability), 1.0 for perfectly even use (what the training loss pushes towards)."""
    out = []
    for index, layer in enumerate(trace.logits):
        experts = layer.shape[-1]
        flat = layer.reshape(-1, experts).astype(np.float64)
        picks = np.argpartition(-flat, trace.top_k - 1, axis=1)[:, : trace.top_k]
        share = np.bincount(picks.ravel(), minlength=experts) / picks.size
        probs = np.exp(flat - flat.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        out.append({
            "layer": index,
            "max_over_even": float(share.max() * experts),
            "min_over_even": float(share.min() * experts),
            "unused_experts": int((share == 0).sum()),
            "balance": float(experts * (share * probs.mean(axis=0)).sum()),
        })
    return out


def _steps_of(layer: np.ndarray, groups: Sequence[np.ndarray]) -> np.ndarray:
    """[G*S, B, E]: the decode steps of one layer's logits [N, S, E] for G sequence groups of B."""
    stacked = layer[np.stack(groups)]  # [G, B, S, E]
    return stacked.transpose(0, 2, 1, 3).reshape(-1, stacked.shape[1], layer.shape[2])
