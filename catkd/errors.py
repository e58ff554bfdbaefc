"""The one base class of every error a user's input can cause (DESIGN section 8).

A ``CatkdError`` names the field, file or sample that is wrong and says what to do;
the ``catkd`` command prints it as one line and exits with status 2. Anything else
that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations


class CatkdError(Exception):
    """Bad input: configuration, data, cache, checkpoint, storage or resume."""


class ConfigError(CatkdError, ValueError):
    """A configuration value of the wrong type, out of range, or an unknown key."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, at most ``limit`` characters (its type's
    name when it has no message): what a one-line error quotes of a library's own error."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


def user_error(exc: BaseException) -> BaseException:
    """What to raise for an exception that came back from a worker (a Ray task error, or
    a pool future's): the user error it carries as its cause, rebuilt plain so that it
    prints as one line, or, for anything else (a bug), the exception itself."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, CatkdError):
        return type(cause)(str(cause))
    return exc
