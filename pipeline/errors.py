"""The one exception type that means "the user can fix this" (exit code 2)."""
from __future__ import annotations

__all__ = ["UserError"]


class UserError(Exception):
    """A problem with the user's input or environment, not a bug.

    The message is one line: what is wrong, where, and how to fix it. The CLI prints it
    without a traceback and exits with code 2.
    """
