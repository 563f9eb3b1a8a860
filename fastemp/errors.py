"""User errors: what the CLI prints as one line, `fastemp: error: <what>; <how to fix>`, exit 2."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input, files or machine (not a bug): one line saying what to do."""


class ConfigError(UserError, ValueError):
    """A config file or override that does not fit the schema."""


class DataError(UserError, RuntimeError):
    """A dataset that cannot be loaded; the message is one line and says what to do."""


def one_line(text: object) -> str:
    lines = [s.strip() for s in str(text).splitlines() if s.strip()]
    return " ".join(lines) if lines else type(text).__name__


class NonFiniteError(UserError, FloatingPointError):
    """Training diverged: a loss term or the gradient became NaN/inf (nothing non-finite is saved)."""
