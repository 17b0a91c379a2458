"""The errors a user fixes. Every command line catches ``UserError`` and prints its message as one line
(``error: <message>``) with exit code 2: the message names the problem, the file or key, and the fix."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input or files (not a bug): one line naming the problem, the file and the fix."""


class ConfigError(UserError, ValueError):
    """A configuration value is missing, unknown, out of range or of the wrong type."""
