"""Errors that mean "bad input", reported to the user as one line and exit code 2."""

from __future__ import annotations


class InputError(ValueError):
    """Bad input: the message names the file, key or value and what was expected (one line)."""
