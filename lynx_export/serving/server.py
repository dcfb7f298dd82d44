"""Start and stop a real Triton Inference Server on 127.0.0.1 for a model repository.

Uses the `tritonserver` binary and python backend bundled by nvidia-pytriton, installed in a
separate Python environment (`env`) that also holds what the served models import (numpy<2,
onnxruntime): Triton's python-backend stub runs models in the first Python on PATH.
"""

from __future__ import annotations

import os
import pathlib
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

from lynx_export.errors import BackendUnavailable, LynxError

__all__ = ["TritonServer", "ServerError", "request_inputs"]


class ServerError(LynxError):
    """The server did not start, or stopped unexpectedly."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

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

    def __enter__(self) -> TritonServer:
        root = self._triton_root()
        self._tmp = tempfile.TemporaryDirectory(prefix="lynx-triton-")
        folder = pathlib.Path(self._tmp.name)
        backends = self._backend_dir(root, folder)
        self.http_port, self.grpc_port, self.metrics_port = _free_port(), _free_port(), _free_port()
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
        ]
        self.log_path = folder / "tritonserver.log"
        log = open(self.log_path, "wb")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()
        try:
            self._wait_ready()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def log_tail(self, lines: int = 20) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        url = f"http://{self.http_url}/v2/health/ready"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"tritonserver exited with {self.process.returncode}: {self.log_tail(5)}")
            try:
                with urllib.request.urlopen(url, timeout=1) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        raise ServerError(f"tritonserver not ready after {self.startup_timeout_s:.0f} s: {self.log_tail(5)}")

    def __exit__(self, *exc_info: object) -> None:
        if self.process is not None and self.process.poll() is None:
            # The whole process group: the server and its python-backend stubs.
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def request_inputs(client_module, feeds: dict) -> list:
    """tritonclient `InferInput`s (of `tritonclient.http` or `.grpc`) holding numpy `feeds`."""
    from tritonclient.utils import np_to_triton_dtype

    inputs = []
    for name, array in feeds.items():
        tensor = client_module.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs
