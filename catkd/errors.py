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
