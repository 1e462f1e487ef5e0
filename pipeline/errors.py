"""The exceptions that mean "the user can fix this" (exit code 2)."""
from __future__ import annotations

from typing import Callable

__all__ = ["UserError", "ParameterError", "DamagedCacheError"]


class UserError(Exception):
    """A problem with the user's input or environment, not a bug.

    The message is one line: what is wrong, where, and how to fix it. The CLI prints it
    without a traceback and exits with code 2.
    """


class ParameterError(UserError):
    """A configuration value outside the accepted ones.

    ``template`` writes each parameter it names as ``{name}`` (literal braces doubled), so
    ``str()`` names config fields (``batch_size -3 must be >= 0``) and the CLI can name its
    options instead (``render(flag)`` -> ``--batch-size -3 must be >= 0``).
    """

    def __init__(self, template: str, *parameters: str):
        self.template = template
        self.parameters = parameters
        super().__init__(self.render())

    def render(self, name: Callable[[str], str] = str) -> str:
        """The message, each parameter written as ``name(parameter)``."""
        return self.template.format(**{p: name(p) for p in self.parameters})


class DamagedCacheError(UserError):
    """A feature cache whose bytes are not what was written: a chunk failing its checksum, a
    truncated or garbled file. The message names the file and the fix (``--rebuild``).

    Unlike other problems with a cache, it is never worked around silently (for example by
    recomputing the features): the user learns that the file is damaged."""
