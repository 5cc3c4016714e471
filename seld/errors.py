"""Exception types a user sees: each message names the file or field and what was expected."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input (file, folder, flag); printed as one line by the CLI."""


class DataError(UserError):
    """A data file (wav, csv, parquet, checkpoint) is missing, corrupt or breaks the format."""
