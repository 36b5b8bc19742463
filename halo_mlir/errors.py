"""The one exception type the CLI turns into a one-line message and exit code 1."""


class HaloError(Exception):
    """A user-facing error: its message names the problem and the fix, on one line."""


def lookup(table: dict, key, what: str):
    """table[key]; a missing key is one error naming it and the valid keys (`what`: what a
    key is, as the user knows it: "preset", "kernel", "--dtype")."""
    try:
        return table[key]
    except KeyError:
        raise HaloError(f"unknown {what} {key!r}: choose one of {', '.join(table)}") from None
