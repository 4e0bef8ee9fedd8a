"""User-facing errors: the CLI prints them as one line and exits non-zero."""


class FedmetaError(Exception):
    """A bad input (parameter, file, archive, checkpoint) that the user must fix; the message names it."""
