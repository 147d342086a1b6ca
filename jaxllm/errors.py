"""Errors that describe a problem with the user's input rather than a bug.

Command-line tools print a `UserError` as one line and exit with status 2; anything else keeps
its traceback, since it is a bug to fix.
"""


class UserError(Exception):
    """An expected problem with what the user gave (config, files, flags), said in one line."""


class ConfigError(UserError, ValueError):
    """A config problem, described in one line that names the key."""
