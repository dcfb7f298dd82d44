"""onnxruntime-genai model folders in and out.

A folder holding `genai_config.json` is what onnxruntime-genai loads: the config names the decoder
model (`model.decoder.filename`) and the tokenizer files lie beside it. `lynx-export build FOLDER`
compiles that model and writes an output folder onnxruntime-genai loads too: the compiled ONNX
Runtime model also under the config's file name, and the folder's other files (the config, the
tokenizer) copied as they are. The compiled model keeps the source's inputs and outputs, so the
config holds for it unchanged.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
from collections.abc import Sequence
from dataclasses import dataclass

from lynx_export.errors import ModelLoadError, OutputError, one_line

__all__ = ["CONFIG", "GenaiFolder", "read_decoder_config"]

CONFIG = "genai_config.json"


def read_decoder_config(folder: pathlib.Path) -> dict:
    """The `model.decoder` section of `folder`'s genai_config.json ({} where there is none), or a
    one-line ModelLoadError for a file that is not such a config."""
    config = folder / CONFIG
    if not config.is_file():
        return {}
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{config}: cannot be read as JSON ({one_line(exc)})") from None
    model = data.get("model") if isinstance(data, dict) else None
    decoder = model.get("decoder") if isinstance(model, dict) else None
    if not isinstance(decoder, dict):
        raise ModelLoadError(f"{config}: has no decoder section (model.decoder)")
    return decoder


@dataclass(frozen=True)
class GenaiFolder:
    """An onnxruntime-genai model folder and the decoder model its config names."""

    folder: pathlib.Path
    model: pathlib.Path

    @classmethod
    def resolve(cls, path: pathlib.Path) -> GenaiFolder | None:
        """The folder `path` is, or None where `path` is not a folder (a model file)."""
        if not path.is_dir():
            return None
        config = path / CONFIG
        if not config.is_file():
            raise ModelLoadError(f"{path}: not a file, and not an onnxruntime-genai model folder (no {CONFIG} in it)")
        filename = read_decoder_config(path).get("filename")
        if not isinstance(filename, str) or not filename:
            raise ModelLoadError(f"{config}: names no decoder model (model.decoder.filename)")
        model = path / filename
        if pathlib.PurePath(filename).name != filename or model.resolve().parent != path.resolve():
            raise ModelLoadError(f"{config}: the decoder model '{filename}' is not a file in {path}")
        return cls(path, model)

    def check_names(self, written: Sequence[str], inputs: Sequence[pathlib.Path]) -> None:
        """Refuse, before any work, a companion or a decoder file name that is one of the names the
        build writes itself (`written`)."""
        for name in [p.name for p in self.companions(inputs)] + [self.model.name]:
            if name in written:
                raise OutputError(f"{self.folder / name}: the build writes a file of that name itself; rename it (and the config's entry)")

    def companions(self, inputs: Sequence[pathlib.Path]) -> list[pathlib.Path]:
        """The folder's files the runtime reads beside the model: all but the model and its data (`inputs`)."""
        skip = {p.resolve() for p in inputs}
        return sorted(p for p in self.folder.iterdir() if p.is_file() and p.resolve() not in skip)

    def write(self, staging: pathlib.Path, compiled: pathlib.Path, inputs: Sequence[pathlib.Path]) -> list[pathlib.Path]:
        """Make `staging` a folder onnxruntime-genai loads: `compiled` (in it) also under the config's
        file name (a hard link where the file system allows), the companions copied. Returns the files added."""
        added = []
        for source in self.companions(inputs):
            target = staging / source.name
            if target.exists():
                raise OutputError(f"{source}: the build writes a file of that name itself; rename it in {self.folder}")
            shutil.copy2(source, target)
            added.append(target)
        target = staging / self.model.name
        if target != compiled:
            if target.exists():
                raise OutputError(f"{self.folder / CONFIG}: its decoder model name '{self.model.name}' is a file the build writes itself")
            try:
                os.link(compiled, target)
            except OSError:
                shutil.copy2(compiled, target)
            added.append(target)
        return added
