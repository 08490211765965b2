"""Exceptions that carry a one-sentence message meant for the user.

Library code raises these for bad input; the ``lefusion`` command prints the message as
``lefusion: error: <message>`` and exits with status 2. Anything else is a bug.
"""


class LeFusionInputError(ValueError):
    """Bad user input: the message says what is wrong, which file, and how to fix it."""


class LeFusionCheckpointError(LeFusionInputError):
    """A checkpoint is truncated, not ours, from a newer format, or made for other data."""
