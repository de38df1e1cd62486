"""Errors a user can fix: the CLI prints their message on one line and exits 2."""


class UserError(Exception):
    """Bad input (a missing path, an unsupported architecture, a nonsense ratio...)."""


class GateFailed(Exception):
    """A quality gate did not pass: the CLI exits 1."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none): how a library's error is quoted."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def validation_line(exc, locate=lambda loc: ".".join(map(str, loc))) -> str:
    """One line for a pydantic ValidationError: its first error's message, after `locate(loc)` (where the user
    wrote the bad value: an option, a recipe key; nothing when it gives "") and a colon."""
    first = exc.errors()[0]
    where = locate(tuple(first["loc"]))
    message = first["msg"].removeprefix("Value error, ")
    return f"{where}: {message}" if where else message
