"""What every subcommand shares: one-line errors, progress lines, tables and option types.

The option types bound every value by what it feeds (an int32 plugin field, a float32
attribute, a verification case that must fit in memory), so a bad value is refused while the
command line is parsed, before anything is read or written.
"""

from __future__ import annotations

import functools
import math
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import click
import numpy as np

from lynx_export.errors import LynxError, ToleranceError
from lynx_export.op.contract import INT32_MAX
from lynx_export.progress import Progress, step_text

__all__ = ["expected_errors", "ConsoleProgress", "progress", "table", "given", "refuse_unless", "trained_option", "Float32", "Int", "IntList",
           "ChoiceList", "DimSize"]


def expected_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Print a LynxError as one line and exit with its code; anything else keeps its traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except LynxError as exc:
            _print_error(exc)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            # Staged output has been removed on the way out; what was there before is intact.
            progress.close()
            click.echo("lynx-export: interrupted", err=True)
            sys.exit(130)

    return wrapper


def _print_error(exc: LynxError) -> None:
    progress.close()
    # A failed verification's cases go above the one line: which output, where and how far.
    if isinstance(exc, ToleranceError) and exc.cases:
        click.echo(table(["output", "batch", "seq", "phase", "max|diff|", "mean|diff|", "tolerance", "result"],
                         [[r["output"], r["batch"], r["seq_len"], r["phase"], f"{r['max_abs_diff']:.3g}", f"{r['mean_abs_diff']:.3g}",
                           f"{r['tolerance']:g}", "ok" if r["passed"] else "FAIL"] for r in exc.cases]), err=True)
    click.echo(f"lynx-export: error: {exc}", err=True)


class ConsoleProgress(Progress):
    """Progress on stderr. On a terminal a stage's steps redraw one bar line (stage, bar, i of n,
    elapsed, detail); elsewhere a step prints a plain `[lynx-export] stage i/n: detail` line when its
    stage starts or ends, or LINE_EVERY_S after the stage's last line (a log keeps a long stage's
    pace without a line per step). Every note is a plain line."""

    WIDTH = 24
    LINE_EVERY_S = 10.0

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.drawn = False
        self._line: tuple[str, float] | None = None  # the stage of the last step line and when it was printed

    def note(self, text: str) -> None:
        self.close()
        self._line = None
        click.echo(f"[lynx-export] {text}", err=True)

    def step(self, stage: str, i: int, n: int, detail: str = "") -> None:
        now = time.monotonic()
        if sys.stderr.isatty() and n > 0:
            filled = min(self.WIDTH, self.WIDTH * i // n)
            line = (f"[lynx-export] {stage} [{'#' * filled}{'.' * (self.WIDTH - filled)}] {i}/{n} {now - self.start:6.1f}s"
                    + (f": {detail}" if detail else ""))
            columns = shutil.get_terminal_size().columns
            click.echo(f"\r\x1b[K{line[:columns - 1]}", err=True, nl=False)
            self.drawn = True
            return
        if self._line is None or self._line[0] != stage or i >= n or now - self._line[1] >= self.LINE_EVERY_S:
            click.echo(f"[lynx-export] {step_text(stage, i, n, detail)}", err=True)
            self._line = (stage, now)

    def close(self) -> None:
        """End a drawn bar's line, before anything else is printed."""
        if self.drawn:
            click.echo("", err=True)
            self.drawn = False


progress = ConsoleProgress()


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [list(map(str, headers))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def given(ctx: click.Context, name: str) -> bool:
    """Whether the user set option `name` (its value did not come from the default)."""
    source = ctx.get_parameter_source(name)
    return source is not None and source is not click.core.ParameterSource.DEFAULT


def refuse_unless(ctx: click.Context, condition: bool, names: Sequence[str], needs: str) -> None:
    """Usage error (exit 2) when any option in `names` was given but `condition` is false."""
    if condition:
        return
    for name in names:
        if given(ctx, name):
            flag = next(o for p in ctx.command.params if p.name == name for o in p.opts if o.startswith("--"))
            raise click.UsageError(f"{flag} applies to {needs} only", ctx=ctx)


def trained_option(help_text: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """`--trained [coarse|fine]`: which shipped trained model; `--trained` alone is the coarse one."""
    from lynx_export.evaluation.trained import DEFAULT_TRAINED, TRAINED_MODELS

    kinds = "; ".join(f"{m.name}: {m.about}" for m in TRAINED_MODELS.values())
    return click.option("--trained", type=click.Choice(tuple(TRAINED_MODELS)), is_flag=False, flag_value=DEFAULT_TRAINED, default=None,
                        help=f"{help_text} ({kinds}; --trained alone: {DEFAULT_TRAINED}).")


class Float32(click.ParamType):
    """A finite number in [min, max] (min excluded when `min_open`) that stays finite and, with an
    open lower bound, above it once stored as float32."""

    name = "float"

    def __init__(self, min: float | None = None, max: float | None = None, min_open: bool = False) -> None:
        self.min, self.max, self.min_open = min, max, min_open

    def _range(self) -> str:
        low = "-inf" if self.min is None else f"{self.min:g}"
        high = f"{np.finfo(np.float32).max:.3g}" if self.max is None else f"{self.max:g}"
        return f"{'(' if self.min_open else '['}{low}, {high}]"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        with np.errstate(over="ignore"):
            stored = float(np.float32(number)) if math.isfinite(number) else number
        inside = (math.isfinite(stored)
                  and (self.min is None or (stored > self.min if self.min_open else stored >= self.min))
                  and (self.max is None or stored <= self.max))
        if not inside:
            self.fail(f"{value!r} is not a finite float32 in {self._range()}", param, ctx)
        return number


class Int(click.IntRange):
    """An integer in [min, max]; the default max is what an int32 field holds."""

    def __init__(self, min: int = 0, max: int = INT32_MAX) -> None:
        super().__init__(min=min, max=max)


class IntList(click.ParamType):
    """Comma-separated integers, each in [min, max]."""

    name = "integers"

    def __init__(self, min: int = 1, max: int = INT32_MAX) -> None:
        self.min, self.max = min, max

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[int, ...]:
        if isinstance(value, tuple):
            return value
        try:
            items = tuple(int(x) for x in str(value).split(",") if x.strip())
        except ValueError:
            self.fail(f"expected comma-separated integers, got '{value}'", param, ctx)
        if not items or any(not self.min <= x <= self.max for x in items):
            self.fail(f"expected integers in [{self.min}, {self.max}], got '{value}'", param, ctx)
        return items


class DimSize(click.ParamType):
    """NAME=SIZE: the size of a named (symbolic) input dimension, SIZE in [min, max]."""

    name = "name=size"

    def __init__(self, min: int = 1, max: int = INT32_MAX) -> None:
        self.min, self.max = min, max

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[str, int]:
        if isinstance(value, tuple):
            return value
        name, sep, size = str(value).partition("=")
        try:
            number = int(size)
        except ValueError:
            number = None
        if not sep or not name.strip() or number is None:
            self.fail(f"expected NAME=SIZE, got '{value}'", param, ctx)
        if not self.min <= number <= self.max:
            self.fail(f"expected a size in [{self.min}, {self.max}], got '{value}'", param, ctx)
        return name.strip(), number


class ChoiceList(click.ParamType):
    """Comma-separated names from `choices`, in the given order without repeats ("" is none)."""

    name = "names"

    def __init__(self, choices: Sequence[str]) -> None:
        self.choices = tuple(choices)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[str, ...]:
        if isinstance(value, tuple):
            return value
        items = tuple(dict.fromkeys(x.strip() for x in str(value).split(",") if x.strip()))
        unknown = [x for x in items if x not in self.choices]
        if unknown:
            flag = param.opts[0] if param is not None else "value"
            self.fail(f"{flag}: unknown {', '.join(map(repr, unknown))}; choose from {', '.join(self.choices)}", param, ctx)
        return items
