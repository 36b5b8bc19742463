"""The one exception type the CLI turns into a one-line message and exit code 1."""


class HaloError(Exception):
    """A user-facing error: its message names the problem and the fix, on one line."""
