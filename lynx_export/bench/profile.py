"""Where a decode step's time goes: the MoE layers' nodes vs the rest, from ONNX Runtime's profiler.

The lowering and the dense twin name every node they write `<block>.n<N>` (ONNX Runtime's
fusions keep that prefix in the names of the nodes they make), so a node event belongs to a MoE
layer when its node name starts with a block's name. Events of nodes inside an `If` branch lie
within their `If`'s event and are not counted twice.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lynx_export.backends.ort import InPlaceStep

__all__ = ["StepSplit", "split_events", "profile_steps"]

KERNEL_SUFFIX = "_kernel_time"


@dataclass(frozen=True)
class StepSplit:
    """One profiled step (milliseconds)."""

    step_ms: float  # the whole run (the profiler's model_run event)
    moe_ms: float  # in nodes of the MoE layers (or of the dense FFNs that replace them)
    other_ms: float  # step_ms - moe_ms: every other node and the session's own work between nodes


def _top_level(events: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Node events not nested inside another (a subgraph's nodes run within their If's event)."""
    kept, end = [], -1
    for e in sorted(events, key=lambda e: (e["ts"], -e["dur"])):
        if e["ts"] + e["dur"] <= end:
            continue
        kept.append(e)
        end = e["ts"] + e["dur"]
    return kept


def split_events(events: Sequence[dict[str, Any]], block_names: Sequence[str]) -> list[StepSplit]:
    """One StepSplit per run (model_run event) of an ONNX Runtime profile, in run order."""
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"), key=lambda e: e["ts"])
    nodes = [e for e in events if e.get("cat") == "Node" and str(e.get("name", "")).endswith(KERNEL_SUFFIX)]
    prefixes = tuple(f"{name}." for name in block_names)
    splits = []
    for run in runs:
        start, stop = run["ts"], run["ts"] + run["dur"]
        inside = _top_level([e for e in nodes if start <= e["ts"] and e["ts"] + e["dur"] <= stop])
        moe_us = sum(e["dur"] for e in inside if e["name"][: -len(KERNEL_SUFFIX)].startswith(prefixes))
        splits.append(StepSplit(run["dur"] / 1e3, moe_us / 1e3, (run["dur"] - moe_us) / 1e3))
    return splits


def profile_steps(path: pathlib.Path, feeds: Mapping[int, Mapping[str, np.ndarray]], block_names: Sequence[str], threads: int,
                  folder: pathlib.Path, in_place: Mapping[str, str] | None = None) -> dict[int, StepSplit]:
    """Per batch size, one profiled step of `path` after one untimed step at the same shapes (the
    first run at a shape allocates); a session of its own, so the timed sessions never profile.
    `in_place`: the caches bound in place as the timed steps bind them (InPlaceStep)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    options.profile_file_prefix = str(folder / "profile")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for feed in feeds.values():
        run = InPlaceStep(session, feed, in_place, 1).run if in_place else lambda: session.run(None, dict(feed))
        run()
        run()
    trace = session.end_profiling()
    try:
        with open(trace) as f:
            events = json.load(f)
    finally:
        os.remove(trace)
    splits = split_events(events, block_names)
    return {batch: splits[2 * i + 1] for i, batch in enumerate(feeds)}
