"""The one error type the readers and converters raise for a user's mistake or a bad file, and the words its
messages use for options."""

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator


class CaffeError(Exception):
    """A problem with the user's files or arguments; the CLI prints it as one line and exits non-zero.

    `warnings` are those gathered before it (e.g. fields a conversion skipped, which may explain a shape error):
    the CLI prints them with it.
    """

    warnings: tuple = ()


class ShapelessInput(CaffeError):
    """A net input whose size neither the net nor the user gives (a data layer reading a dataset)."""


class InputSizeError(CaffeError, ValueError):
    """A converted net given inputs of a size one of its layers cannot take (the message names the layer, the size
    it was converted for and the size it got): Caffe's Reshape() refuses such sizes too."""


# While a command of ours runs, errors name its options (`--force`); otherwise the Python API's arguments
# (`force=True`): the same check serves both, and each user reads their own words.
_COMMAND_LINE: ContextVar[bool] = ContextVar("caffe2torch_command_line", default=False)


def term(cli: str, api: str) -> str:
    """How an error message names an option: `cli` under a command, `api` from Python."""
    return cli if _COMMAND_LINE.get() else api


@contextmanager
def command_line_terms() -> Iterator[None]:
    """Errors raised inside speak in command-line terms (the commands' entry points use this)."""
    token = _COMMAND_LINE.set(True)
    try:
        yield
    finally:
        _COMMAND_LINE.reset(token)


class UnknownFieldError(CaffeError):
    """A field the schema does not know that may change a layer's forward (caffe2torch.fields): `finding` names it,
    the message adds what to do, which a caller with other options may say differently."""

    def __init__(self, finding: str, remedy: str) -> None:
        super().__init__(f"{finding}: {remedy}")
        self.finding = finding
