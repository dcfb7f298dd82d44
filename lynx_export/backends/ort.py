"""Run ONNX files on ONNX Runtime's CPU provider."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from lynx_export.errors import LoweringError, RunError, one_line

__all__ = ["OrtRunner"]

log = logging.getLogger(__name__)


class OrtRunner:
    """Run an ONNX file on ONNX Runtime's CPU provider; `infer` returns name -> array.

    A context manager: the session exists between `__enter__` and `__exit__`. `last_inference_s`
    holds the wall time of the latest `infer` call. `spinning=False` stops the session's idle
    worker threads from busy-waiting after a run: where several sessions take turns on the same
    cores (the benchmark), a spinning idle session takes CPU from the one running.
    """

    def __init__(self, path: str, *, threads: int | None = None, spinning: bool = True) -> None:
        self.path = path
        self.threads = threads
        self.spinning = spinning
        self.session = None
        self.last_inference_s = 0.0

    def __enter__(self) -> OrtRunner:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        if self.threads:
            options.intra_op_num_threads = self.threads
        if not self.spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(self.path, options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise LoweringError(f"{self.path}: ONNX Runtime cannot load the model ({one_line(exc)})") from None
        log.debug("ONNX Runtime %s session for %s (threads %s, spinning %s)", ort.__version__, self.path, self.threads or "default", self.spinning)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.session = None

    def infer(self, feeds: dict[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        import time

        if self.session is None:
            raise RuntimeError("OrtRunner.infer called outside its context")
        names = list(outputs) if outputs is not None else [o.name for o in self.session.get_outputs()]
        start = time.perf_counter()
        try:
            values = self.session.run(names, feeds)
        except Exception as exc:  # ONNX Runtime raises its own types for every run-time failure
            raise RunError(f"{self.path}: ONNX Runtime failed to run the model ({one_line(exc)})") from None
        self.last_inference_s = time.perf_counter() - start
        return dict(zip(names, values))
