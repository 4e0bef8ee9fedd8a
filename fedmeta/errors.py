"""User-facing errors: the CLI prints them as one line and exits non-zero."""


class FedmetaError(Exception):
    """A bad input (parameter, file, archive, checkpoint) that the user must fix; the message names it."""


class Diverged(FedmetaError):
    """A computation produced NaN or infinite weights: the stage stops before it writes any result.
    `runtime.stage` puts the stage's name in front of the message."""


def first_line(exc: BaseException) -> str:
    """A wrapped library error's first line (its type when it has no message), so messages stay one line."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
