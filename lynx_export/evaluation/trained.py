"""The shipped MoE language model trained on the standard library's source: its shape and weights.

The weights are stored as float16 arrays (numpy .npz, no pickle) with a JSON file that records
how they were made; scripts/train_stdlib_moe.py reproduces them.
"""

from __future__ import annotations

import json
import os
import pathlib
import zipfile
from typing import Any

import numpy as np

from lynx_export.evaluation.demo import DemoConfig, build_demo_model
from lynx_export.errors import DataError

__all__ = ["STDLIB_MODEL", "WEIGHTS", "METADATA", "TrainedModelError", "load_trained_model", "save_weights", "read_metadata"]

# Mixtral-like routing (8 experts, top-2, softmax -> top-k -> renormalise) at a size that trains on
# two CPU cores in about an hour.
STDLIB_MODEL = DemoConfig(vocab_size=256, hidden_size=128, num_layers=4, num_heads=4, num_experts=8, top_k=2, expert_size=256)

_DATA = pathlib.Path(__file__).parent / "data"
WEIGHTS = _DATA / "stdlib_moe.npz"
METADATA = _DATA / "stdlib_moe.json"


class TrainedModelError(DataError):
    """The weights file is missing or does not match the model (one-line message)."""


def load_trained_model(weights: pathlib.Path = WEIGHTS):  # -> torch.nn.Module
    """The trained model in float32 (from its float16 weights), in eval mode."""
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


def read_metadata(weights: pathlib.Path = WEIGHTS) -> dict[str, Any]:
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
    weights.parent.mkdir(parents=True, exist_ok=True)
    partial = weights.with_name(f".{weights.name}.partial")
    with open(partial, "wb") as f:
        np.savez_compressed(f, **arrays)
    os.replace(partial, weights)
    meta = weights.with_suffix(".json")
    partial = meta.with_name(f".{meta.name}.partial")
    partial.write_text(json.dumps({"model": model.config.to_dict(), **metadata}, indent=2) + "\n")
    os.replace(partial, meta)
