"""The one error type the readers and converters raise for a user's mistake or a bad file."""


class CaffeError(Exception):
    """A problem with the user's files or arguments; the CLI prints it as one line and exits non-zero."""


class ShapelessInput(CaffeError):
    """A net input whose size neither the net nor the user gives (a data layer reading a dataset)."""


class InputSizeError(CaffeError, ValueError):
    """A converted net given inputs of a size one of its layers cannot take (the message names the layer, the size
    it was converted for and the size it got): Caffe's Reshape() refuses such sizes too."""
