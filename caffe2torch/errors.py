"""The one error type the readers and converters raise for a user's mistake or a bad file."""


class CaffeError(Exception):
    """A problem with the user's files or arguments; the CLI prints it as one line and exits non-zero."""
