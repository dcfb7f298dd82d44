"""Every error lynx-export raises on purpose: one class per stage, one line of text each."""

from __future__ import annotations

__all__ = [
    "LynxError",
    "OptionError",
    "DataError",
    "ContractError",
    "RoutingError",
    "ModelLoadError",
    "DetectError",
    "RewriteError",
    "LoweringError",
    "ToleranceError",
    "RunError",
    "BackendUnavailable",
    "EngineError",
    "OutputError",
    "one_line",
]


class LynxError(Exception):
    """Base of expected errors: the CLI prints the message on one line and exits with `exit_code`."""

    exit_code = 1


class OptionError(LynxError):
    """An option is out of range or conflicts with another option: wrong whatever the model, so it
    exits 2 like the command line's own usage errors. Options wrong for one model (a budget above
    its expert count) raise the stage's error and exit 1."""

    exit_code = 2


class ModelLoadError(LynxError):
    """The input file is missing, unreadable or not a valid ONNX model."""


class DetectError(LynxError):
    """The model holds no MoE block that the compiler pass can rewrite."""


class RewriteError(LynxError):
    """A detected block could not be rewritten into a LynxMoE node."""


class LoweringError(LynxError):
    """A LynxMoE node could not be lowered for a backend."""


class ToleranceError(LynxError):
    """The compiled model does not match the original within the required tolerance.

    `cases` holds one JSON-able row per (case, output) that had to match, failed or not
    (verify.output_rows), so the message can stay one line and the CLI can show the rest.
    """

    def __init__(self, message: str, cases: tuple[dict, ...] = ()) -> None:
        super().__init__(message)
        self.cases = cases


class RunError(LynxError):
    """A model failed while a backend ran it (for example, shapes that only fail at run time)."""


class BackendUnavailable(LynxError):
    """A backend's optional dependency is not installed."""

    exit_code = 3


class EngineError(LynxError):
    """An engine builder (TensorRT, TensorRT-RTX) rejected the model or failed."""


class OutputError(LynxError):
    """The output location cannot be written safely."""


class RoutingError(LynxError, ValueError):
    """Invalid arguments to a routing function or selection policy (a ValueError too, as numpy's
    own argument errors are)."""


class DataError(LynxError, ValueError):
    """Evaluation or training input (text, a router trace, trained weights, a batch size larger
    than the sequences) cannot be used (a ValueError too, as RoutingError is)."""


class ContractError(LynxError, ValueError):
    """Values that break the LynxMoE op's contract: attributes outside what a kernel implements,
    quantized weights, scales or zero points of the wrong layout (a ValueError too)."""


def one_line(exc: BaseException, limit: int = 300) -> str:
    """A foreign exception's message folded onto one line, for quoting inside our own errors."""
    text = " ".join(str(exc).split())
    return text[:limit] if text else type(exc).__name__
