"""Start and stop a real Triton Inference Server on 127.0.0.1 for a model repository.

Uses the `tritonserver` binary and python backend bundled by nvidia-pytriton, installed in a
separate Python environment (`env`) that also holds what the served models import (numpy<2,
onnxruntime): Triton's python-backend stub runs models in the first Python on PATH.

That server has the python backend only. The models of a repository whose backend it lacks
(`backend: "onnxruntime"`, `platform: "tensorrt_plan"`, ...) would keep it from getting ready,
so it starts with `--model-control-mode=explicit` and `--load-model` for every other model; each
model left out is logged as a warning, with its backend, and listed in `TritonServer.skipped`.
A model it does load and that fails to load is an error (`ServerError`, with Triton's reason),
never skipped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import re
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

from lynx_export.errors import BackendUnavailable, LynxError

__all__ = ["TritonServer", "ServerError", "request_inputs", "model_backend"]

log = logging.getLogger(__name__)

# Backends inside Triton's core: they need no backend library.
_CORE_BACKENDS = frozenset({"ensemble"})
# The backend each of Triton's platform names runs on (model_config.proto's `platform`).
_PLATFORM_BACKENDS = {
    "tensorrt_plan": "tensorrt",
    "onnxruntime_onnx": "onnxruntime",
    "pytorch_libtorch": "pytorch",
    "tensorflow_graphdef": "tensorflow",
    "tensorflow_savedmodel": "tensorflow",
    "ensemble": "ensemble",
}
_BACKEND_FIELDS = re.compile(r"""^\s*(backend|platform)\s*:\s*(?:"([^"]*)"|'([^']*)')""", re.MULTILINE)


class ServerError(LynxError):
    """The server did not start, or stopped unexpectedly."""


def model_backend(model_dir: pathlib.Path) -> str | None:
    """The backend the model in `model_dir` needs: its config's `backend`, else the one its
    `platform` runs on; None when its config.pbtxt is missing or says neither (Triton decides)."""
    try:
        text = (model_dir / "config.pbtxt").read_text()
    except OSError:
        return None
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        # Without Triton's schema: ModelConfig has no nested fields of these names.
        fields = {m.group(1): m.group(2) if m.group(2) is not None else m.group(3) for m in _BACKEND_FIELDS.finditer(text)}
        backend, platform = fields.get("backend", ""), fields.get("platform", "")
    else:
        try:
            config = text_format.Parse(text, model_config_pb2.ModelConfig())
        except text_format.ParseError:
            return None  # Triton reports a broken config itself, as a load failure
        backend, platform = config.backend, config.platform
    return backend or _PLATFORM_BACKENDS.get(platform) or None


_START_ATTEMPTS = 3


# What tritonserver logs when it cannot bind a port it was given.
_PORT_PROBLEMS = ("already in use", "cannot listen to")


class _PortTaken(Exception):
    """The server could not bind a port chosen as free: another process took it in between."""


def _free_ports(count: int) -> list[int]:
    """`count` distinct ports free on 127.0.0.1 now: all bound at once, so the system cannot hand
    the same one out twice (one at a time, it may)."""
    with contextlib.ExitStack() as held:
        sockets = [held.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


class TritonServer:
    """Context manager: a running `tritonserver` serving `repos`; `http_url` / `grpc_url` reach it."""

    def __init__(self, repos: str | pathlib.Path | list[str | pathlib.Path], env: str | pathlib.Path, *, startup_timeout_s: float = 120.0) -> None:
        self.repos = [pathlib.Path(r).resolve() for r in (repos if isinstance(repos, list) else [repos])]
        self.env = pathlib.Path(env).resolve()
        self.startup_timeout_s = startup_timeout_s
        self.process: subprocess.Popen | None = None
        self.http_port = self.grpc_port = self.metrics_port = 0
        self._tmp: tempfile.TemporaryDirectory | None = None
        self.log_path: pathlib.Path | None = None
        self.loaded: list[str] = []  # the models the server was asked to load
        self.skipped: dict[str, str] = {}  # model name -> why it was left out

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def _triton_root(self) -> pathlib.Path:
        found = sorted(self.env.glob("lib/python3*/site-packages/pytriton/tritonserver"))
        if not found:
            raise BackendUnavailable(f"{self.env}: no tritonserver found (install nvidia-pytriton there; `make serve` does)")
        return found[0]

    def _backend_dir(self, root: pathlib.Path, folder: pathlib.Path) -> pathlib.Path:
        """Triton's backend layout: python/{libtriton_python.so, utils, the stub for our Python}."""
        python = next(iter(sorted(self.env.glob("lib/python3*"))))
        version = python.name.removeprefix("python")
        stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
        if not stub.exists():
            raise BackendUnavailable(f"no python backend stub for Python {version} in {root}")
        backend = folder / "backends" / "python"
        backend.mkdir(parents=True)
        for source in (root / "backends" / "python" / "libtriton_python.so", root / "backends" / "python" / "triton_python_backend_utils.py", stub):
            (backend / source.name).symlink_to(source)
        return backend.parent

    def _choose_models(self, backends: pathlib.Path) -> None:
        """Load every model whose backend this server has; log and list the others in `skipped`."""
        installed = sorted(p.name for p in backends.iterdir())
        available = set(installed) | _CORE_BACKENDS
        self.loaded, self.skipped = [], {}
        for repo in self.repos:
            if not repo.is_dir():
                raise ServerError(f"{repo}: no such model repository")
            for model_dir in sorted(p for p in repo.iterdir() if p.is_dir()):
                backend = model_backend(model_dir)
                if backend is not None and backend not in available:
                    reason = f"this server has no '{backend}' backend (its backends: {', '.join(installed)})"
                    self.skipped[model_dir.name] = reason
                    log.warning("not loading model %s (%s): %s", model_dir.name, model_dir, reason)
                elif model_dir.name not in self.loaded:
                    self.loaded.append(model_dir.name)
        if self.skipped and not self.loaded:
            raise ServerError(f"nothing this server can load in {', '.join(map(str, self.repos))}: "
                              + "; ".join(f"{name}: {why}" for name, why in self.skipped.items()))

    def __enter__(self) -> TritonServer:
        root = self._triton_root()
        self._tmp = tempfile.TemporaryDirectory(prefix="lynx-triton-")
        folder = pathlib.Path(self._tmp.name)
        try:
            backends = self._backend_dir(root, folder)
            self._choose_models(backends)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        for attempt in range(1, _START_ATTEMPTS + 1):
            try:
                self._start(root, backends, folder)
                return self
            except _PortTaken:
                # Another process bound a chosen port between choosing and binding: new ports.
                log.info("tritonserver: a port was taken by another process (attempt %d of %d)", attempt, _START_ATTEMPTS)
                self._stop()
            except BaseException:
                self.__exit__(None, None, None)
                raise
        self.__exit__(None, None, None)
        raise ServerError(f"tritonserver could not bind free ports on 127.0.0.1 in {_START_ATTEMPTS} attempts")

    def _start(self, root: pathlib.Path, backends: pathlib.Path, folder: pathlib.Path) -> None:
        """Start the server on free ports and wait until it is ready."""
        self.http_port, self.grpc_port, self.metrics_port = _free_ports(3)
        libs = root.parent.parent / "nvidia_pytriton.libs"
        env = dict(os.environ)
        env["PATH"] = f"{self.env / 'bin'}:{env.get('PATH', '')}"
        env["LD_LIBRARY_PATH"] = ":".join(p for p in (env.get("LD_LIBRARY_PATH", ""), str(libs)) if p)
        command = [
            str(root / "bin" / "tritonserver"),
            *(f"--model-repository={r}" for r in self.repos),
            f"--backend-directory={backends}",
            "--disable-auto-complete-config",
            "--http-address=127.0.0.1", f"--http-port={self.http_port}",
            "--grpc-address=127.0.0.1", f"--grpc-port={self.grpc_port}",
            "--metrics-address=127.0.0.1", f"--metrics-port={self.metrics_port}",
            "--exit-on-error=false",
            "--model-control-mode=explicit",
            *(f"--load-model={name}" for name in self.loaded),
        ]
        self.log_path = folder / "tritonserver.log"
        log_file = open(self.log_path, "wb")
        self.process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log_file.close()
        self._wait_ready()

    def log_tail(self, lines: int = 20) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        url = f"http://{self.http_url}/v2/health/ready"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                if any(sign in self.log_tail(50) for sign in _PORT_PROBLEMS):
                    raise _PortTaken
                raise ServerError(f"tritonserver exited with {self.process.returncode}: {self.log_tail(5)}")
            try:
                with urllib.request.urlopen(url, timeout=1) as response:
                    # Ready, and ours: another process's server may answer on a port taken from us.
                    if response.status == 200 and self.process.poll() is None and self._serving_http():
                        return
            except urllib.error.HTTPError:
                # Responding but not ready: has a model it was asked to load failed to?
                self._raise_failed_loads()
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        raise ServerError(f"tritonserver not ready after {self.startup_timeout_s:.0f} s: {self.log_tail(5)}")

    def _serving_http(self) -> bool:
        """Whether this server's own log says it serves HTTP on its port."""
        return f"Started HTTPService at 127.0.0.1:{self.http_port}" in (self.log_path.read_text(errors="replace") if self.log_path else "")

    def _raise_failed_loads(self) -> None:
        """ServerError naming each model of `loaded` that Triton marks UNAVAILABLE, with its reason."""
        request = urllib.request.Request(f"http://{self.http_url}/v2/repository/index", data=b"{}", method="POST")
        try:
            with urllib.request.urlopen(request, timeout=1) as response:
                index = json.loads(response.read())
        except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
            return
        # The reason's first line (a python-backend model's is followed by its traceback).
        failed = [f"{m['name']}: {(str(m.get('reason') or '').strip() or 'unavailable').splitlines()[0]}" for m in index
                  if m.get("name") in self.loaded and m.get("state") == "UNAVAILABLE"]
        if failed:
            raise ServerError(f"tritonserver could not load {'; '.join(failed)}")

    def __exit__(self, *exc_info: object) -> None:
        self._stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def _stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            # The whole process group: the server and its python-backend stubs.
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def request_inputs(client_module, feeds: dict) -> list:
    """tritonclient `InferInput`s (of `tritonclient.http` or `.grpc`) holding numpy `feeds`."""
    from tritonclient.utils import np_to_triton_dtype

    inputs = []
    for name, array in feeds.items():
        tensor = client_module.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs
