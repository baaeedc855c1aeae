"""The errors a user can act on: their message says what was wrong and how to fix it.

The command line prints such an error as one line and exits with its
`exit_status` (2 for bad settings, unless the error says otherwise), never
with a traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """An error whose message tells the user what was wrong and how to fix it."""


class ConfigError(UserError, ValueError):
    """Flags or settings that do not make sense together."""
