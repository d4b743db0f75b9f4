"""Errors that mean "bad input", reported to the user as one line and exit code 2."""

from __future__ import annotations


class InputError(ValueError):
    """Bad input: the message names the file, key or value and what was expected (one line)."""


class StorageError(InputError):
    """A file could not be written because its file system is full (one line naming the file).

    A subclass of :class:`InputError` so that every command reports it as one line with exit code
    2: the fix is on the user's side (free space, or another output folder), not in the program.

    Attributes:
        path: the destination file that was not written.
    """

    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(message)
        self.path = path
