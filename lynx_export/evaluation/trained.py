"""The shipped MoE language models trained on the standard library's source: their shapes and weights.

The weights are stored as float16 arrays (numpy .npz, no pickle) with a JSON file that records
how they were made; scripts/train_stdlib_moe.py reproduces them.
"""

from __future__ import annotations

import json
import pathlib
import zipfile
from dataclasses import dataclass
from typing import Any

import numpy as np

from lynx_export.compiler.output import staged_files
from lynx_export.evaluation.demo import DemoConfig, build_demo_model
from lynx_export.errors import DataError

__all__ = ["TrainedModel", "TRAINED_MODELS", "DEFAULT_TRAINED", "trained_model", "TrainedModelError", "load_trained_model", "save_weights", "read_metadata"]

_DATA = pathlib.Path(__file__).parent / "data"


@dataclass(frozen=True)
class TrainedModel:
    """One shipped model: its shape and where its weights live (metadata: same name, .json)."""

    name: str
    config: DemoConfig
    weights: pathlib.Path
    about: str


# Both train on two CPU cores in under an hour with the same recipe, corpus and split, at about
# the same total parameter count (3.5 M); their experts differ in size and number.
TRAINED_MODELS = {
    m.name: m
    for m in (
        # Mixtral-like routing: 8 experts, top-2, softmax -> top-k -> renormalise.
        TrainedModel("coarse", DemoConfig(vocab_size=256, hidden_size=128, num_layers=4, num_heads=4, num_experts=8, top_k=2, expert_size=256),
                     _DATA / "stdlib_moe.npz", "8 experts of 256, top-2 (Mixtral-like)"),
        # Fine-grained (OLMoE / Qwen3-MoE-like): 64 experts, top-8, each expert 1/8 the size, so
        # the expert parameters are the same and a token's active expert width is half.
        TrainedModel("fine", DemoConfig(vocab_size=256, hidden_size=128, num_layers=4, num_heads=4, num_experts=64, top_k=8, expert_size=32),
                     _DATA / "stdlib_moe_fine.npz", "64 experts of 32, top-8 (OLMoE/Qwen3-MoE-like)"),
    )
}
DEFAULT_TRAINED = "coarse"


def trained_model(name: str = DEFAULT_TRAINED) -> TrainedModel:
    try:
        return TRAINED_MODELS[name]
    except KeyError:
        raise TrainedModelError(f"no shipped trained model {name!r} (choose from {', '.join(TRAINED_MODELS)})") from None


class TrainedModelError(DataError):
    """The weights file is missing or does not match the model (one-line message)."""


def load_trained_model(weights: pathlib.Path | None = None):  # -> torch.nn.Module
    """The trained model in float32 (from its float16 weights), in eval mode; default: the coarse one."""
    weights = weights or trained_model().weights
    import torch

    config = DemoConfig(**read_metadata(weights)["model"])
    model = build_demo_model(config)
    try:
        with np.load(weights, allow_pickle=False) as arrays:
            state = {name: torch.from_numpy(arrays[name].astype(np.float32)) for name in arrays.files}
    except FileNotFoundError:
        raise TrainedModelError(f"{weights}: missing; train the model with scripts/train_stdlib_moe.py") from None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise TrainedModelError(f"{weights}: cannot read the weights ({type(exc).__name__}: {exc})") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise TrainedModelError(f"{weights}: weights do not match the model (missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    return model.eval()


def read_metadata(weights: pathlib.Path | None = None) -> dict[str, Any]:
    weights = weights or trained_model().weights
    path = weights.with_suffix(".json")
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise TrainedModelError(f"{path}: missing; train the model with scripts/train_stdlib_moe.py") from None
    except (OSError, ValueError) as exc:
        raise TrainedModelError(f"{path}: cannot read ({exc})") from None


def save_weights(model, metadata: dict[str, Any], weights: pathlib.Path) -> None:
    """Write float16 weights and their metadata, each atomically (rename over the old file)."""
    arrays = {name: t.detach().cpu().numpy().astype(np.float16) for name, t in model.state_dict().items()}
    with staged_files(weights.parent) as staging:
        with open(staging / weights.name, "wb") as f:
            np.savez_compressed(f, **arrays)
        (staging / weights.with_suffix(".json").name).write_text(json.dumps({"model": model.config.to_dict(), **metadata}, indent=2) + "\n")
