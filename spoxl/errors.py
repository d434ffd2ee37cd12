"""User-facing errors: one line naming the problem, non-zero exit, no traceback.

Raise `SpoxlError` for anything the user can fix (a path, a config value, a dataset row). The
command-line entry points catch it, print `spoxl: error: <message>` and exit with status 2.
"""


class SpoxlError(Exception):
    """A problem with the user's input, reported as one line."""

    def __init__(self, message: str):
        # Collapse to one line: multi-line messages read badly in launcher logs of many ranks.
        super().__init__(" ".join(str(message).split()))


class SharedError(SpoxlError):
    """A SpoxlError every rank of the job raises together (spoxl.engine.zero_utils shares one
    rank's error with all): rank 0 reports it, the others stay quiet, so the job prints it once."""
