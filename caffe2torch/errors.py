"""The one error type the readers and converters raise for a user's mistake or a bad file."""


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


class UnknownFieldError(CaffeError):
    """A field the schema does not know that may change a layer's forward (caffe2torch.fields): `finding` names it,
    the message adds what to do, which a caller with other options may say differently."""

    def __init__(self, finding: str, remedy: str) -> None:
        super().__init__(f"{finding}: {remedy}")
        self.finding = finding
