"""What goes wrong with a dataset's files, as errors a user fixes (the CLI prints each as one line, exit code 2).

They stay ``FileNotFoundError`` / ``ValueError`` too, so code that caught those before still does."""

from __future__ import annotations

from reproduce.errors import UserError


class DataNotFoundError(UserError, FileNotFoundError):
    """The dataset's files are not where the upstream layout (or the prepared cache) puts them."""


class DataNotPreparedError(DataNotFoundError):
    """The prepared cache a run reads does not exist yet; the message gives the ``prepare`` command that makes it."""


class DataFormatError(UserError, ValueError):
    """Files exist but are not what their format promises (truncated, corrupt, modified)."""
