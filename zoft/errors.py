"""The one exception type zoft raises for problems the user can fix (bad input, missing data)."""


class ZoftError(Exception):
    """An error in the user's input or environment.

    The CLI prints str(e) on one line and exits 2 (no traceback), so messages are one actionable line.
    """


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; the run saved a checkpoint and can be resumed. `code` is the exit status."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code
