"""One exception type for every user-facing failure: the CLI prints its message on one line."""


class ConnpubError(Exception):
    """A failure the user can act on; str(err) is a single line saying what and how to fix."""
