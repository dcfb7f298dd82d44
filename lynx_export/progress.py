"""Progress of long work: what a stage reports, and nothing about how it is shown.

Library code reports through the `Progress` it is given: `note(text)` for a message and
`step(stage, i, n, detail)` for the i-th of n steps of one stage. `SILENT` drops both; the CLI
shows them (a bar on a terminal, lines elsewhere: `cli._common.ConsoleProgress`); `Recorder` keeps
them as lines (tests, and callers that log).
"""

from __future__ import annotations

__all__ = ["Progress", "SILENT", "Recorder", "step_text"]


def step_text(stage: str, i: int, n: int, detail: str = "") -> str:
    """A step as one line: `stage i/n: detail`."""
    return f"{stage} {i}/{n}" + (f": {detail}" if detail else "")


class Progress:
    """Receives a long job's messages and steps; this base drops them."""

    def note(self, text: str) -> None:
        """A message: what the work is doing now."""

    def step(self, stage: str, i: int, n: int, detail: str = "") -> None:
        """Step `i` of `n` of `stage` (1-based) has started or ended; `detail` says which."""


SILENT = Progress()


class Recorder(Progress):
    """Keeps every message and step as a line (`step_text`) in `lines`."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def note(self, text: str) -> None:
        self.lines.append(text)

    def step(self, stage: str, i: int, n: int, detail: str = "") -> None:
        self.lines.append(step_text(stage, i, n, detail))
