"""Errors a user can fix: the CLI prints their message on one line and exits 2."""


class UserError(Exception):
    """Bad input (a missing path, an unsupported architecture, a nonsense ratio...)."""


class GateFailed(Exception):
    """A quality gate did not pass: the CLI exits 1."""
