"""The one exception type the command line turns into a one-line message."""

from __future__ import annotations


class CliError(Exception):
    """An operator-facing error: printed as one line (what is wrong, how to fix it), exit status 1."""
