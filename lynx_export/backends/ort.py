"""Run ONNX files on ONNX Runtime's CPU provider, as a Polygraphy runner.

`OrtRunner` is Polygraphy's `OnnxrtRunner` with this project's session options and errors, so
verification (through Polygraphy's `Comparator`) and the benchmark time and compare through
the same runner. Polygraphy's own log goes to this package's logger at debug level (`-v`),
never to stdout, which carries the commands' results.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from polygraphy.backend.onnxrt import OnnxrtRunner
from polygraphy.logger import G_LOGGER

from lynx_export.errors import LoweringError, RunError, one_line

__all__ = ["InPlaceStep", "OrtRunner", "SharedInitializers", "configure_polygraphy", "polygraphy_quiet"]

log = logging.getLogger(__name__)


class _PolygraphyLog:
    """Polygraphy's python-logging sink: every message at debug level under this package."""

    logger = logging.getLogger("lynx_export.polygraphy")

    def log(self, level: int, msg: str) -> None:
        self.logger.debug("%s", msg)


_POLYGRAPHY_SINK = _PolygraphyLog()


def polygraphy_quiet():
    """Polygraphy's verbosity for a run: its info messages (output statistics it computes) only
    when this package logs at debug level."""
    configure_polygraphy()
    return G_LOGGER.verbosity(G_LOGGER.INFO if _PolygraphyLog.logger.isEnabledFor(logging.DEBUG) else G_LOGGER.ERROR)


class _TorchOnceImported:
    """Polygraphy's lazy `torch` module, seen as installed only once something has imported torch.

    Polygraphy asks whether torch is importable to handle torch tensors (every array it stores,
    every JSON file it writes), and imports it to answer: 5 s per process where torch is
    installed. Nothing can be a torch tensor before torch is imported, so the answer is the same.
    """

    def __init__(self, lazy: object) -> None:
        self._lazy = lazy

    def is_installed(self) -> bool:
        return "torch" in sys.modules and self._lazy.is_installed()

    def is_importable(self) -> bool:
        return "torch" in sys.modules and self._lazy.is_importable()

    def __getattr__(self, name: str) -> object:
        return getattr(self._lazy, name)


# The Polygraphy modules that ask whether an array is a torch tensor, through their own lazy `torch`.
POLYGRAPHY_TORCH_USERS = ("polygraphy.util.array", "polygraphy.json.serde", "polygraphy.comparator.compare", "polygraphy.comparator.data_loader",
                          "polygraphy.datatype.torch")


def configure_polygraphy() -> None:
    """This project's Polygraphy settings, made when a runner or a comparison needs them (never at
    import) and idempotent:

    1. the lazy `torch` of POLYGRAPHY_TORCH_USERS counts as installed only once something has
       imported torch (`_TorchOnceImported`);
    2. Polygraphy logs through Python's logging, to this package's logger at debug level, without
       colours (else its first message prints a hint about the 'colored' package to stdout).

    tests/test_replay.py checks that Polygraphy still has what this sets.
    """
    for name in POLYGRAPHY_TORCH_USERS:
        module = importlib.import_module(name)
        lazy = vars(module)["torch"]
        if not isinstance(lazy, _TorchOnceImported):
            module.torch = _TorchOnceImported(lazy)
    G_LOGGER.colors = False
    G_LOGGER.use_python_logging_system = True  # (which points python_logger at logging's "Polygraphy")
    G_LOGGER.python_logger = _POLYGRAPHY_SINK


class OrtRunner(OnnxrtRunner):
    """Run an ONNX file on ONNX Runtime's CPU provider; `infer` returns name -> array.

    A context manager (Polygraphy's activate / deactivate): the session exists between
    `__enter__` and `__exit__`. `last_inference_s` holds the wall time of the latest `infer`
    call. `spinning=False` stops the session's idle worker threads from busy-waiting after a
    run: where several sessions take turns on the same cores (the benchmark), a spinning idle
    session takes CPU from the one running. A model ONNX Runtime cannot load is a
    LoweringError, one that fails while running a RunError, each one line.
    """

    def __init__(self, path: str, *, threads: int | None = None, spinning: bool = True, name: str | None = None,
                 on_infer: Callable[[int], None] | None = None, shared: Mapping[str, Any] | None = None, label: str | None = None) -> None:
        configure_polygraphy()
        super().__init__(self._session, name=name)
        self.path = str(path)
        self.label = label or self.path  # what errors call the model (a temporary copy's user-facing name)
        self.threads = threads
        self.spinning = spinning
        self.shared = dict(shared or {})  # initializer name -> OrtValue the session reads instead of its own copy
        self.on_infer = on_infer  # called with each run's index before it starts (progress)
        self.last_inference_s = 0.0
        self._runs = 0

    def _session(self):
        import onnxruntime as ort

        options = ort.SessionOptions()
        # ONNX Runtime's own log lines (a failed kernel's, in colour) only under -v: its errors
        # reach the user as this runner's one-line LynxErrors.
        options.log_severity_level = 2 if log.isEnabledFor(logging.DEBUG) else 4
        if self.threads:
            options.intra_op_num_threads = self.threads
        if not self.spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        for name, value in self.shared.items():
            options.add_initializer(name, value)
        try:
            session = ort.InferenceSession(self.path, options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise LoweringError(f"{self.label}: ONNX Runtime cannot load the model ({one_line(exc)})") from None
        log.debug("ONNX Runtime %s session for %s (threads %s, spinning %s)", ort.__version__, self.path, self.threads or "default", self.spinning)
        return session

    def infer_impl(self, feed_dict: dict[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
        if self.on_infer is not None:
            self.on_infer(self._runs)
        self._runs += 1
        start = time.perf_counter()
        try:
            values = self.sess.run(None, feed_dict)
        except Exception as exc:  # ONNX Runtime raises its own types for every run-time failure
            raise RunError(f"{self.label}: ONNX Runtime failed to run the model ({one_line(exc)})") from None
        self.last_inference_s = self.inference_time = time.perf_counter() - start
        return OrderedDict(zip((o.name for o in self.sess.get_outputs()), values))

    def infer(self, feed_dict: dict[str, np.ndarray], check_inputs: bool = False) -> OrderedDict[str, np.ndarray]:
        """Polygraphy's infer; inputs are not checked against the session's metadata by default,
        so that ONNX Runtime itself reports what is wrong with them (a RunError)."""
        return super().infer(feed_dict, check_inputs=check_inputs)

    def in_place_step(self, feeds: Mapping[str, np.ndarray], presents: Mapping[str, str], new_rows: int,
                      buffers: dict[str, Any] | None = None) -> InPlaceStep:
        """`feeds` bound to this runner's open session, each cache in `presents` in place (InPlaceStep)."""
        return InPlaceStep(self.sess, feeds, presents, new_rows, self.label, buffers)


class InPlaceStep:
    """One step bound to a session once (IO binding), each KV cache input sharing one buffer with
    its present output, as onnxruntime-genai runs its decoders (`past_present_share_buffer`):
    GroupQueryAttention then writes the step's new rows into the buffer and copies nothing.

    `presents` maps each cache input to its present output. A buffer holds the cache's past rows
    and room for the step's `new_rows` (its sequence length) on axis 2; running the step
    again writes the same rows again, so repeated runs time the same step. Other outputs are
    allocated by ONNX Runtime at each run, as a plain run allocates them. Steps given one
    `buffers` dict (cache input -> OrtValue, filled by the first) share their buffers: models that
    only differ past the caches' rows (the benchmark's variants) then hold one copy of the cache.
    """

    def __init__(self, session: Any, feeds: Mapping[str, np.ndarray], presents: Mapping[str, str], new_rows: int,
                 label: str = "model", buffers: dict[str, Any] | None = None) -> None:
        import onnxruntime as ort

        self.label = label
        self.binding = session.io_binding()
        self._session = session
        self.buffers = {} if buffers is None else buffers  # cache input -> its OrtValue (past rows, then the step's)
        outputs = [o.name for o in session.get_outputs()]
        bound = {presents[name] for name in feeds if name in presents}
        for name in outputs:  # outputs first, in the session's order, so results() keeps that order
            if name not in bound:
                self.binding.bind_output(name)
        self._outputs = [n for n in outputs if n not in bound]
        for name, array in feeds.items():
            if name not in presents:
                self.binding.bind_cpu_input(name, np.ascontiguousarray(array))
                continue
            if name not in self.buffers:
                buffer = np.zeros((*array.shape[:2], array.shape[2] + new_rows, *array.shape[3:]), dtype=array.dtype)
                buffer[:, :, : array.shape[2]] = array
                self.buffers[name] = ort.OrtValue.ortvalue_from_numpy(buffer)
            self.binding.bind_ortvalue_input(name, self.buffers[name])
            self.binding.bind_ortvalue_output(presents[name], self.buffers[name])
        self._values = dict(feeds)  # keeps the bound inputs alive

    def run(self) -> float:
        """Run the step; its wall time in seconds."""
        start = time.perf_counter()
        try:
            self._session.run_with_iobinding(self.binding)
        except Exception as exc:  # ONNX Runtime raises its own types for every run-time failure
            raise RunError(f"{self.label}: ONNX Runtime failed to run the model ({one_line(exc)})") from None
        return time.perf_counter() - start

    def results(self) -> dict[str, np.ndarray]:
        """The latest run's outputs other than the caches (whose rows are in `buffers`: `.numpy()`)."""
        return dict(zip(self._outputs, self.binding.copy_outputs_to_cpu()))


class SharedInitializers:
    """One OrtValue per distinct large initializer, for sessions of several models at once.

    Sessions of models built from one source hold the same expert weights (the benchmark's
    variants differ in routing, not weights). Given through SessionOptions.add_initializer, a
    weight is read from one numpy array instead of each session loading its own copy: ONNX
    Runtime's fused MoE kernel then holds nothing of its own; MatMul still prepacks a private
    copy per session, which the Python API cannot share (docs/BENCHMARKS.md, "Sharing weights
    between sessions"). Contents are matched by hash, not by name.
    """

    def __init__(self, min_bytes: int = 1 << 16) -> None:
        self.min_bytes = min_bytes
        self._values: dict[tuple[str, tuple[int, ...], bytes], Any] = {}  # (dtype, shape, digest) -> OrtValue (keeps its array alive)
        self.bytes = 0  # held once, however many sessions read them

    def for_model(self, path: str) -> dict[str, Any]:
        """Initializer name -> shared OrtValue for every initializer of `path` above min_bytes."""
        import onnx
        import onnxruntime as ort
        from onnx import numpy_helper

        out = {}
        for tensor in onnx.load(str(path)).graph.initializer:
            array = numpy_helper.to_array(tensor)
            if array.nbytes < self.min_bytes:
                continue
            array = np.ascontiguousarray(array)
            key = (str(array.dtype), array.shape, hashlib.blake2b(array.data, digest_size=20).digest())
            if key not in self._values:
                self._values[key] = ort.OrtValue.ortvalue_from_numpy(array)
                self.bytes += array.nbytes
            out[tensor.name] = self._values[key]
        return out
