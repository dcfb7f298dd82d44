"""Serving subcommands: triton (write a model repository for a build) and serve (run Triton)."""

from __future__ import annotations

import dataclasses
import pathlib
import re
from typing import Any

import click

from lynx_export.cli._common import Int, IntList, expected_errors

MAX_INSTANCES = 1024
MAX_THREADS = 1024


class ModelName(click.ParamType):
    """A Triton model name that is also one safe folder name: ASCII letters, digits, '_' and '-',
    not starting with '-', at most 64 characters."""

    name = "name"
    _PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,63}")

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        if not self._PATTERN.fullmatch(str(value)):
            self.fail(f"{value!r} must be 1-64 ASCII letters, digits, '_' or '-', not starting with '-'", param, ctx)
        return str(value)


def _triton_options(name: str, max_batch_size: int, preferred: tuple[int, ...], delay_us: int, instances: int, threads: int, force: bool):
    from lynx_export.serving.repository import TritonOptions

    return TritonOptions(name=name, max_batch_size=max_batch_size, preferred_batch_sizes=preferred, max_queue_delay_us=delay_us,
                         instances=instances, threads=threads, force=force)


@click.command("triton")
@click.argument("build_dir", type=click.Path(file_okay=False, path_type=pathlib.Path))
@click.option("--repo", required=True, type=click.Path(file_okay=False, path_type=pathlib.Path), help="Model repository folder to write.")
@click.option("--name", default="lynx_moe", show_default=True, type=ModelName(), help="Model name (the models are NAME_cpu, NAME_onnx and, with an engine, NAME).")
@click.option("--max-batch-size", default=64, show_default=True, type=Int(1), help="Triton max_batch_size.")
@click.option("--preferred-batch-sizes", default="8,16,32", show_default=True, type=IntList(1), help="Dynamic batcher's preferred sizes (each at most --max-batch-size).")
@click.option("--max-queue-delay-us", default=2000, show_default=True, type=Int(0), help="Dynamic batcher's queue delay.")
@click.option("--instances", default=1, show_default=True, type=Int(1, MAX_INSTANCES), help="Model instances.")
@click.option("--threads", default=0, show_default=True, type=Int(0, MAX_THREADS), help="ONNX Runtime threads per CPU instance (0: default).")
@click.option("--max-slots", default=32, show_default=True, type=Int(1, 4096),
              help="NAME_generate: requests decoding at once (each holds a KV cache slot; more wait).")
@click.option("--max-length", default=0, show_default=True, type=Int(0, 1 << 20),
              help="NAME_generate: tokens a request's cache holds, prompt and answer (0: the model's context length, at most 2048).")
@click.option("--spinning/--no-spinning", default=True, show_default=True,
              help="NAME_generate: ONNX Runtime's threads spin between ops (--no-spinning: they sleep, leaving the cores to the server and "
                   "clients on the same machine; docs/SERVING.md measures both).")
@click.option("--force", is_flag=True, help="Replace a non-empty repository folder.")
@click.pass_context
@expected_errors
def triton_cmd(ctx: click.Context, build_dir: pathlib.Path, repo: pathlib.Path, name: str, max_batch_size: int, preferred_batch_sizes: tuple[int, ...],
               max_queue_delay_us: int, instances: int, threads: int, max_slots: int, max_length: int, spinning: bool, force: bool) -> None:
    """Write a Triton Inference Server model repository for BUILD_DIR (a `build` output):
    NAME_cpu (python backend running model.ort.onnx), NAME_onnx (Triton's onnxruntime backend,
    the same file), when the build holds a TensorRT model.plan NAME (tensorrt_plan), and for a
    decoder in onnxruntime-genai's form NAME_generate (text generation with in-flight batching:
    docs/SERVING.md).
    Configs are validated against Triton's schema before writing."""
    from lynx_export.serving.repository import write_repository

    if max(preferred_batch_sizes) > max_batch_size:
        raise click.UsageError(f"--preferred-batch-sizes: {max(preferred_batch_sizes)} is over --max-batch-size {max_batch_size}", ctx=ctx)
    options = dataclasses.replace(_triton_options(name, max_batch_size, preferred_batch_sizes, max_queue_delay_us, instances, threads, force),
                                  max_slots=max_slots, max_length=max_length, spinning=spinning)
    result = write_repository(build_dir, repo, options)
    for model in result.models:
        click.echo(f"{model.name} ({model.kind}): {model.path}")
    for name, reason in result.skipped:
        click.echo(f"{name}: not written: {reason}")


@click.command("serve")
@click.argument("repos", nargs=-1, required=True, type=click.Path(file_okay=False, exists=True, path_type=pathlib.Path))
@click.option("--env", "env", default=pathlib.Path(".venv-serve"), show_default=True, type=click.Path(file_okay=False, path_type=pathlib.Path),
              help="Python environment holding nvidia-pytriton, numpy<2 and onnxruntime.")
@expected_errors
def serve_cmd(repos: tuple[pathlib.Path, ...], env: pathlib.Path) -> None:
    """Serve model repositories REPOS with Triton Inference Server on 127.0.0.1 until Ctrl-C."""
    import signal
    import threading

    from lynx_export.serving.server import TritonServer

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with TritonServer(list(repos), env) as server:
        click.echo(f"serving {', '.join(map(str, repos))}: HTTP {server.http_url}, gRPC {server.grpc_url}, metrics {server.metrics_url} "
                   f"(Ctrl-C stops)")
        try:
            while not stop.wait(0.5):
                if server.process.poll() is not None:
                    raise click.ClickException(f"tritonserver exited: {server.log_tail(5)}")
        except KeyboardInterrupt:
            pass
    click.echo("stopped")


COMMANDS = (triton_cmd, serve_cmd)
