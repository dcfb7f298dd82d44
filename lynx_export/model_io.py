"""Load and save ONNX models as onnx-ir graphs, turning every parse failure into one-line errors."""

from __future__ import annotations

import hashlib
import pathlib

import onnx
import onnx_ir as ir

from lynx_export.errors import ModelLoadError

__all__ = ["load_model", "save_model", "sha256_file", "EXTERNAL_DATA_THRESHOLD"]

# Protobuf cannot serialise a message over 2 GiB; above this many weight bytes, weights go to a
# side file.
EXTERNAL_DATA_THRESHOLD = 1 << 30


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] if text else type(exc).__name__


def load_model(path: str | pathlib.Path) -> ir.Model:
    """Read and check an ONNX model; raise ModelLoadError saying what is wrong and where."""
    path = pathlib.Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if not path.is_file():
        raise ModelLoadError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise ModelLoadError(f"{path}: empty file, not an ONNX model")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and friends; all mean "not ONNX"
        raise ModelLoadError(f"{path}: not an ONNX model ({_one_line(exc)})") from None
    if not proto.HasField("graph") or len(proto.graph.node) == 0:
        raise ModelLoadError(f"{path}: not an ONNX model (no graph nodes)")
    try:
        # By path, so models with external data over 2 GiB are checked too.
        onnx.checker.check_model(str(path))
    except Exception as exc:
        raise ModelLoadError(f"{path}: fails the ONNX checker ({_one_line(exc)})") from None
    try:
        return ir.load(path)
    except Exception as exc:
        raise ModelLoadError(f"{path}: cannot be read ({_one_line(exc)})") from None


def _weight_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def save_model(model: ir.Model, path: pathlib.Path) -> list[pathlib.Path]:
    """Save `model` to `path`; weights go to `<name>.data` beside it when they are large.

    Returns the files written.
    """
    if _weight_bytes(model) > EXTERNAL_DATA_THRESHOLD:
        data = path.with_name(path.name + ".data")
        ir.save(model, path, external_data=data.name)
        return [path, data]
    ir.save(model, path)
    return [path]


def sha256_file(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
