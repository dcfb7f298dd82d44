"""The `lynx-export` command line: each subcommand parses, calls one library function, prints.

Subcommands live in one module per job (models, build, bench, text, serving); this module
only assembles the group. Usage errors print as one line, like every other expected error.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from lynx_export.cli import bench, build, models, serving, text

__all__ = ["main"]


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


class _Group(click.Group):
    """A click group whose usage errors print one line (`lynx-export CMD: error: ...`) and exit
    2, instead of click's usage block, so that every refusal reads the same."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx is not None else "lynx-export"
            hint = f" (see '{where} --help')"
            click.echo(f"{where}: error: {exc.format_message()}{hint}", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            click.echo(f"lynx-export: error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("lynx-export: interrupted", err=True)
            sys.exit(130)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lynx-export")
@click.option("-v", "--verbose", is_flag=True, help="Log the package's debug messages to stderr.")
def main(verbose: bool) -> None:
    """Compile MoE ONNX models into engines with batch-aware expert selection (LYNX)."""
    import signal

    # SIGTERM unwinds like Ctrl-C, so staged output is cleaned up rather than left half-written.
    signal.signal(signal.SIGTERM, _interrupt)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    package = logging.getLogger("lynx_export")
    package.handlers[:] = [handler]
    package.setLevel(logging.DEBUG if verbose else logging.WARNING)
    package.propagate = False  # other libraries' loggers keep their own level


for _module in (models, build, bench, text, serving):
    for _command in _module.COMMANDS:
        main.add_command(_command)
