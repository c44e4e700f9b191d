"""specserve: lossless speculative decoding on CPU."""

__version__ = "0.1.0"


class SpecserveError(Exception):
    """An error with a one-line message meant for the user, not a traceback."""
