"""Errors that describe a problem with the user's input rather than a bug.

Command-line tools print a `UserError` as one line and exit with status 2; anything else keeps
its traceback, since it is a bug to fix.
"""


class UserError(Exception):
    """An expected problem with what the user gave (config, files, flags), said in one line."""


class ConfigError(UserError, ValueError):
    """A config problem, described in one line that names the key."""


def run_cli(body) -> int:
    """Runs a command-line tool's `body()`: a UserError or a missing file is printed as one line
    on stderr with exit status 2; any other exception is a bug and keeps its traceback."""
    import sys

    try:
        return body() or 0
    except (UserError, FileNotFoundError) as e:
        text = str(e).strip()
        print(f"error: {text.splitlines()[0] if text else type(e).__name__}", file=sys.stderr)
        return 2
