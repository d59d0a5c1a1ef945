"""Errors shown to users without a traceback by the CLI."""


class DensedetError(Exception):
    """A user-facing problem (bad input file, bad config, bad option). The message says
    which file, line, object or key is at fault; the CLI prints it and exits 1."""
