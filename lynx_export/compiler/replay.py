"""Verification anyone can replay: the build's cases in Polygraphy's JSON formats, and the
`polygraphy run` command that checks each artifact against them.

`verification/inputs.json` is what `polygraphy run --save-inputs` writes (a list of feed
dicts), `verification/expected.json` what `--save-outputs` writes (`RunResults`, one runner
named `expected`). Expected outputs are the original model's where the outputs must match
(policy off, prefill) and the compiled ONNX Runtime model's elsewhere, since a LYNX decode step
differs from the original by design and an engine must match the ONNX Runtime model of its own
graph. On the target machine, `polygraphy run ARTIFACT ... --load-inputs inputs.json
--load-outputs expected.json` proves that artifact.
"""

from __future__ import annotations

import pathlib
import shlex
from collections.abc import Mapping, Sequence

import numpy as np
from polygraphy.comparator import RunResults
from polygraphy.json import load_json, save_json

from lynx_export.backends.ort import configure_polygraphy
from lynx_export.backends.tensorrt import Engine
from lynx_export.compiler.results import ReplayCommand

__all__ = ["FOLDER", "INPUTS", "EXPECTED", "RUNNER", "save_replay", "load_replay", "replay_commands"]

FOLDER = "verification"
INPUTS = f"{FOLDER}/inputs.json"
EXPECTED = f"{FOLDER}/expected.json"
RUNNER = "expected"
PLUGIN_LIBRARY = "liblynx_moe_trt_plugin.so"


def save_replay(build_dir: pathlib.Path, feeds: Sequence[Mapping[str, np.ndarray]],
                expected: Sequence[Mapping[str, np.ndarray]]) -> list[pathlib.Path]:
    """Write the cases' inputs and expected outputs under `build_dir`; return the two files."""
    configure_polygraphy()  # Polygraphy's JSON writer would import torch to ask whether arrays are tensors
    (build_dir / FOLDER).mkdir(exist_ok=True)
    save_json([dict(f) for f in feeds], build_dir / INPUTS, description="verification inputs")
    results = RunResults()
    results.add([dict(e) for e in expected], runner_name=RUNNER)
    results.save(str(build_dir / EXPECTED))
    return [build_dir / INPUTS, build_dir / EXPECTED]


def load_replay(build_dir: pathlib.Path) -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]:
    """The cases' inputs and expected outputs `save_replay` wrote under `build_dir`."""
    configure_polygraphy()
    feeds = load_json(build_dir / INPUTS, description="verification inputs")
    expected = RunResults.load(str(build_dir / EXPECTED))[RUNNER]
    return [dict(f) for f in feeds], [dict(e) for e in expected]


def _command(artifact: str, runner: list[str], tolerance: float, env: str = "") -> str:
    words = ["polygraphy", "run", artifact, *runner, "--load-inputs", INPUTS, "--load-outputs", EXPECTED,
             "--atol", f"{tolerance:g}", "--rtol", "0"]
    return (f"{env} " if env else "") + shlex.join(words)


def replay_commands(tolerance: float, engine: Engine | None) -> tuple[ReplayCommand, ...]:
    """One entry per artifact: the command (run in the build folder) and what it needs."""
    commands = [ReplayCommand(
        artifact="model.ort.onnx",
        command=_command("model.ort.onnx", ["--onnxrt"], tolerance),
        needs="polygraphy and onnxruntime (CPU is enough); the build made the same comparison in-process",
    )]
    if engine:
        plugins = ["--trt", "--plugins", f"/path/to/{PLUGIN_LIBRARY}"]
        if engine.backend == "tensorrt-rtx":
            commands.append(ReplayCommand(
                artifact=engine.file,
                command=_command(engine.file, plugins, tolerance, env="POLYGRAPHY_USE_TENSORRT_RTX=1"),
                needs=f"TensorRT-RTX (Polygraphy's TensorRT-RTX mode), an NVIDIA GPU of a target the plan was built for "
                      f"({', '.join(engine.targets)}), and the C++ LynxMoE plugin library ({PLUGIN_LIBRARY}, "
                      "plugins/lynx_moe/README.md): the engine's plugin layers were built by the Python plugin, which "
                      "registers only inside lynx-export",
            ))
        else:
            commands.append(ReplayCommand(
                artifact=engine.file,
                command=_command(engine.file, plugins, tolerance),
                needs=f"TensorRT {engine.builder.version} on the GPU it was built on, and the C++ LynxMoE plugin "
                      f"library ({PLUGIN_LIBRARY}, plugins/lynx_moe/README.md)",
            ))
    return tuple(commands)
